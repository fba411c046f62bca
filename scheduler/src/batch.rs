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
    let by_memory = if model.per_sample == 0 {
        u64::from(model.max)
    } else {
        room / model.per_sample
    };
    let mut size = by_memory.min(u64::from(model.max.max(model.min))) as u32;
    if model.multiple_of > 1 {
        size -= size % model.multiple_of;
    }
    if size < model.min || size == 0 {
        return None;
    }
    let needed = model.base + model.per_sample * u64::from(size);
    Some(BatchChoice {
        size,
        reserve: explicit.unwrap_or(needed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BatchTier, MemoryModel};

    const GIB: u64 = 1 << 30;

    fn users_rule() -> BatchPolicy {
        BatchPolicy {
            tiers: vec![
                BatchTier {
                    min_free: Some(32 * GIB),
                    size: 512,
                },
                BatchTier {
                    min_free: Some(16 * GIB),
                    size: 256,
                },
                BatchTier {
                    min_free: None,
                    size: 128,
                },
            ],
            ..Default::default()
        }
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
}
