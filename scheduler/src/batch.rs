//! Batch sizing from free GPU memory: the tier rule and the memory-model rule.

use crate::model::BatchPolicy;

/// A batch size and the per-GPU memory a job reserves for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchChoice {
    /// Batch size to run with.
    pub size: u32,
    /// Memory to reserve on each GPU.
    pub reserve: u64,
}

/// Chooses the batch size for a GPU with `free` bytes of effective free
/// memory. `explicit` is the job's own `gpu_memory`, which, when given, is
/// what gets reserved. Returns `None` when nothing fits.
pub fn choose_batch(policy: &BatchPolicy, free: u64, explicit: Option<u64>) -> Option<BatchChoice> {
    if !policy.tiers.is_empty() {
        let tier = policy
            .tiers
            .iter()
            .find(|t| t.min_free.is_none_or(|min| min <= free))?;
        let reserve = explicit.or(tier.min_free)?;
        return (reserve <= free).then_some(BatchChoice {
            size: tier.size,
            reserve,
        });
    }
    let model = policy.model.as_ref()?;
    let budget = match explicit {
        Some(explicit) if explicit <= free => explicit,
        Some(_) => return None,
        None => free,
    };
    let room = budget.checked_sub(model.base)?;
    // A model with no per-sample cost fits its largest batch.
    let by_memory = room
        .checked_div(model.per_sample)
        .unwrap_or(u64::from(model.max));
    // The min() keeps the value within u32, so the cast cannot truncate.
    let mut size = by_memory.min(u64::from(model.max.max(model.min))) as u32;
    if model.multiple_of > 1 {
        size -= size % model.multiple_of;
    }
    if size < model.min || size == 0 {
        return None;
    }
    let needed = model
        .base
        .saturating_add(model.per_sample.saturating_mul(u64::from(size)));
    Some(BatchChoice {
        size,
        reserve: explicit.unwrap_or(needed),
    })
}

/// The least effective free memory on which [`choose_batch`] finds a batch:
/// a GPU with less can never take the job, one with at least this always
/// can. `None` when no amount of memory is enough (e.g. a catch-all tier and
/// no explicit `gpu_memory`).
///
/// `choose_batch` is monotone in `free` (more memory never turns a fit into
/// a miss), which is what lets the placement index search by this bound.
pub fn min_free_needed(policy: &BatchPolicy, explicit: Option<u64>) -> Option<u64> {
    smallest_free(
        |free| choose_batch(policy, free, explicit).is_some(),
        candidates(policy, explicit),
    )
}

/// The least effective free memory that gives the job the largest batch it
/// can ever get. `prefer_largest` jobs search for a GPU with at least this
/// much first. Assumes more memory never gives a smaller batch, which holds
/// for memory models and for tiers listed from the largest `min_free` down.
pub fn free_for_largest(policy: &BatchPolicy, explicit: Option<u64>) -> Option<u64> {
    let largest = choose_batch(policy, u64::MAX, explicit)?.size;
    smallest_free(
        |free| choose_batch(policy, free, explicit).is_some_and(|c| c.size >= largest),
        candidates(policy, explicit),
    )
}

/// Amounts at which a rule's outcome can change: tier bounds, the explicit
/// reservation, and the memory model's smallest batch.
fn candidates(policy: &BatchPolicy, explicit: Option<u64>) -> Vec<u64> {
    let mut out: Vec<u64> = policy.tiers.iter().filter_map(|t| t.min_free).collect();
    out.extend(explicit);
    if let Some(model) = &policy.model {
        let step = u64::from(model.multiple_of.max(1));
        let smallest = u64::from(model.min.max(1))
            .div_ceil(step)
            .saturating_mul(step);
        let largest = u64::from(model.max.max(model.min));
        for size in [smallest, largest - largest % step] {
            out.push(
                model
                    .base
                    .saturating_add(model.per_sample.saturating_mul(size)),
            );
        }
    }
    out.push(0);
    out.sort_unstable();
    out.dedup();
    out
}

/// Smallest `free` for which the monotone predicate `fits` holds: tries the
/// likely break points first, then falls back to a binary search.
fn smallest_free(fits: impl Fn(u64) -> bool, candidates: Vec<u64>) -> Option<u64> {
    if !fits(u64::MAX) {
        return None;
    }
    // The first candidate that fits is the answer only if the one before it
    // bounds the search from below; check by bisecting between them.
    let mut low = 0u64; // largest amount known not to fit, or 0
    let mut high = u64::MAX; // smallest amount known to fit
    for c in candidates {
        if fits(c) {
            high = c;
            break;
        }
        low = c;
    }
    if fits(low) {
        return Some(low);
    }
    // Usually a candidate is the exact break point: one probe settles it.
    if !fits(high - 1) {
        return Some(high);
    }
    // Invariant: !fits(low) && fits(high).
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if fits(mid) {
            high = mid;
        } else {
            low = mid;
        }
    }
    Some(high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BatchTier, MemoryModel};

    const GIB: u64 = 1 << 30;

    fn users_rule() -> BatchPolicy {
        BatchPolicy::users_rule_of_thumb()
    }

    #[test]
    fn users_rule_of_thumb() {
        // free -> (batch, reserved) with an explicit 12 GiB reservation.
        let cases = [(80, 512), (40, 512), (24, 256), (20, 256), (12, 128)];
        for (free_gib, batch) in cases {
            let choice = choose_batch(&users_rule(), free_gib * GIB, Some(12 * GIB)).expect("fits");
            assert_eq!(
                choice,
                BatchChoice {
                    size: batch,
                    reserve: 12 * GIB
                },
                "{free_gib} GiB free"
            );
        }
        assert_eq!(choose_batch(&users_rule(), 8 * GIB, Some(12 * GIB)), None);
    }

    #[test]
    fn tier_reserves_its_min_free_without_explicit_memory() {
        let choice = choose_batch(&users_rule(), 40 * GIB, None).expect("fits");
        assert_eq!(
            choice,
            BatchChoice {
                size: 512,
                reserve: 32 * GIB
            }
        );
        // the catch-all tier has no min_free, so without gpu_memory it cannot reserve.
        assert_eq!(choose_batch(&users_rule(), 8 * GIB, None), None);
    }

    #[test]
    fn memory_model() {
        let policy = BatchPolicy {
            model: Some(MemoryModel {
                base: 4 * GIB,
                per_sample: 64 << 20,
                min: 32,
                max: 1024,
                multiple_of: 32,
            }),
            ..Default::default()
        };
        // 20 GiB free: (20-4) GiB / 64 MiB = 256.
        assert_eq!(
            choose_batch(&policy, 20 * GIB, None),
            Some(BatchChoice {
                size: 256,
                reserve: 20 * GIB
            })
        );
        // 21 GiB free: 272 -> rounded down to 256; reserves only what 256 needs.
        assert_eq!(
            choose_batch(&policy, 21 * GIB, None),
            Some(BatchChoice {
                size: 256,
                reserve: 20 * GIB
            })
        );
        // clamp to max.
        assert_eq!(
            choose_batch(&policy, 200 * GIB, None).map(|c| c.size),
            Some(1024)
        );
        // below min.
        assert_eq!(choose_batch(&policy, 5 * GIB, None), None);
    }

    #[test]
    fn least_free_that_fits() {
        let model = |multiple_of: u32| BatchPolicy {
            model: Some(MemoryModel {
                base: 4 * GIB,
                per_sample: 64 << 20,
                min: 33,
                max: 1024,
                multiple_of,
            }),
            ..Default::default()
        };
        let catch_all_first = BatchPolicy {
            tiers: vec![
                BatchTier {
                    min_free: None,
                    size: 128,
                },
                BatchTier {
                    min_free: Some(32 * GIB),
                    size: 512,
                },
            ],
            ..Default::default()
        };
        // (policy, explicit, min_free_needed, free_for_largest)
        type Case = (BatchPolicy, Option<u64>, Option<u64>, Option<u64>);
        let cases: Vec<Case> = vec![
            (users_rule(), None, Some(16 * GIB), Some(32 * GIB)),
            (users_rule(), Some(12 * GIB), Some(12 * GIB), Some(32 * GIB)),
            (users_rule(), Some(40 * GIB), Some(40 * GIB), Some(40 * GIB)),
            (catch_all_first.clone(), None, None, None),
            (catch_all_first, Some(GIB), Some(GIB), Some(GIB)),
            // 33 samples round up to 64 with multiple_of 32: 4 GiB + 64 * 64 MiB.
            (model(32), None, Some(8 * GIB), Some(68 * GIB)),
            (
                model(1),
                None,
                Some(4 * GIB + 33 * (64 << 20)),
                Some(68 * GIB),
            ),
            (model(32), Some(10 * GIB), Some(10 * GIB), Some(10 * GIB)),
            (model(32), Some(5 * GIB), None, None),
            (BatchPolicy::default(), None, None, None),
        ];
        for (policy, explicit, least, largest) in cases {
            assert_eq!(
                min_free_needed(&policy, explicit),
                least,
                "least for {policy:?} {explicit:?}"
            );
            assert_eq!(
                free_for_largest(&policy, explicit),
                largest,
                "largest for {policy:?} {explicit:?}"
            );
            // The bound is exact: one byte less does not fit.
            if let Some(least) = least.filter(|&l| l > 0) {
                assert!(choose_batch(&policy, least, explicit).is_some());
                assert!(choose_batch(&policy, least - 1, explicit).is_none());
            }
        }
    }
}
