//! Learned GPU-memory estimates per job class (`kind/name`), bounded.
//!
//! A class's estimate rises when one of its jobs runs out of memory or
//! reports a peak above it. Classes are named by users: a loop that names
//! every job uniquely (`selfplay-00123`) makes a class per job, so the map
//! is bounded by [`MAX_ESTIMATES`]: a new class past it evicts the class
//! used least recently, by command time (ties by name), so every replica
//! evicts the same one. A class is used when one of its jobs reports;
//! its time is refreshed at most once per [`TOUCH_INTERVAL_MS`], so a
//! class whose estimate is stable is not rewritten at every exit.

use std::collections::{BTreeMap, BTreeSet};

use gantry_scheduler::JobId;

use super::StateMachine;

/// Learned job classes kept at most.
pub const MAX_ESTIMATES: usize = 10_000;

/// A class's last use is refreshed at most this often (command time).
pub const TOUCH_INTERVAL_MS: u64 = 3_600_000;

/// One class's learned estimate. In the JSON snapshots of earlier
/// versions an estimate is its bytes alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(from = "StoredEstimate")]
pub struct Estimate {
    /// GPU memory to reserve at least, bytes.
    pub bytes: u64,
    /// Command time of the class's last use (0: stored by a version that
    /// did not record it, so the first to go).
    pub used_ms: u64,
}

/// An estimate as JSON snapshots hold it: the bytes alone (versions
/// before the bound) or the whole record.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum StoredEstimate {
    Bytes(u64),
    Record { bytes: u64, used_ms: u64 },
}

impl From<StoredEstimate> for Estimate {
    fn from(stored: StoredEstimate) -> Estimate {
        match stored {
            StoredEstimate::Bytes(bytes) => Estimate { bytes, used_ms: 0 },
            StoredEstimate::Record { bytes, used_ms } => Estimate { bytes, used_ms },
        }
    }
}

/// The estimates and their order of use (hard state; the order is
/// derived).
#[derive(Debug, Clone, Default)]
pub(super) struct Estimates {
    by_class: BTreeMap<String, Estimate>,
    by_use: BTreeSet<(u64, String)>,
}

impl Estimates {
    /// Rebuilds the estimates from stored ones.
    pub fn restore(stored: impl IntoIterator<Item = (String, Estimate)>) -> Estimates {
        let mut estimates = Estimates::default();
        for (class, estimate) in stored {
            estimates.by_use.insert((estimate.used_ms, class.clone()));
            estimates.by_class.insert(class, estimate);
        }
        estimates
    }

    pub fn get(&self, class: &str) -> Option<&Estimate> {
        self.by_class.get(class)
    }

    pub fn all(&self) -> &BTreeMap<String, Estimate> {
        &self.by_class
    }

    /// Sets a class's estimate; returns the classes evicted to make room.
    fn set(&mut self, class: &str, estimate: Estimate) -> Vec<String> {
        let mut evicted = Vec::new();
        match self.by_class.get(class) {
            Some(old) => {
                self.by_use.remove(&(old.used_ms, class.to_string()));
            }
            None => {
                while self.by_class.len() >= MAX_ESTIMATES {
                    let Some((_, oldest)) = self.by_use.pop_first() else {
                        break;
                    };
                    self.by_class.remove(&oldest);
                    evicted.push(oldest);
                }
            }
        }
        self.by_use.insert((estimate.used_ms, class.to_string()));
        self.by_class.insert(class.to_string(), estimate);
        evicted
    }
}

impl StateMachine {
    /// Updates the job class's learned GPU-memory estimate at command time
    /// `at_ms`: an OOM raises it above what was reserved; an observed peak
    /// above it raises it too. Every class changed or evicted is recorded
    /// in the change set (an evicted one is gone from the state).
    pub(super) fn learn(&mut self, at_ms: u64, job: JobId, oom: bool, peak: u64) {
        let Some(record) = self.jobs.get(&job) else {
            return;
        };
        let Some(attempt) = record.current_attempt() else {
            return;
        };
        let class = record.class();
        let current = self.estimates.get(&class).copied();
        let mut next = current.map_or(0, |e| e.bytes);
        if oom && attempt.gpu_memory > 0 {
            // 25% above what was not enough.
            next = next.max(attempt.gpu_memory.saturating_add(attempt.gpu_memory / 4));
        }
        if peak > 0 {
            // 10% headroom over the highest use seen.
            next = next.max(peak.saturating_add(peak / 10));
        }
        let changed = match current {
            None => next > 0,
            Some(current) => {
                next != current.bytes || at_ms >= current.used_ms.saturating_add(TOUCH_INTERVAL_MS)
            }
        };
        if !changed {
            return;
        }
        let used_ms = current.map_or(at_ms, |c| c.used_ms.max(at_ms));
        let evicted = self.estimates.set(
            &class,
            Estimate {
                bytes: next,
                used_ms,
            },
        );
        self.changes.estimates.extend(evicted);
        self.changes.estimates.insert(class);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn at(bytes: u64, used_ms: u64) -> Estimate {
        Estimate { bytes, used_ms }
    }

    #[test]
    fn a_new_class_past_the_bound_evicts_the_least_recently_used() {
        // (classes stored, class set, its use time) -> classes evicted
        let full = |oldest_used: u64| {
            Estimates::restore((0..MAX_ESTIMATES).map(|i| {
                let used = if i == 7 {
                    oldest_used
                } else {
                    1_000 + i as u64
                };
                (format!("k/c{i:05}"), at(1, used))
            }))
        };
        let cases: [(&str, Estimates, &str, u64, Vec<&str>); 4] = [
            (
                "updating a known class evicts nothing",
                full(5),
                "k/c00007",
                9_999_999,
                vec![],
            ),
            (
                "a new class evicts the oldest use",
                full(5),
                "k/new",
                9_999_999,
                vec!["k/c00007"],
            ),
            (
                "ties go by name",
                full(1_000),
                "k/new",
                9_999_999,
                vec!["k/c00000"],
            ),
            (
                "a class stored without a use time goes first",
                full(0),
                "k/new",
                9_999_999,
                vec!["k/c00007"],
            ),
        ];
        for (name, mut estimates, class, used, want) in cases {
            let evicted = estimates.set(class, at(2, used));
            assert_eq!(evicted, want, "{name}");
            assert_eq!(estimates.all().len(), MAX_ESTIMATES, "{name}");
            assert_eq!(estimates.by_use.len(), MAX_ESTIMATES, "{name}");
            assert_eq!(estimates.get(class), Some(&at(2, used)), "{name}");
        }
    }

    #[test]
    fn an_over_full_store_shrinks_back_to_the_bound_on_the_next_new_class() {
        let mut estimates = Estimates::restore(
            (0..MAX_ESTIMATES + 3).map(|i| (format!("k/c{i:05}"), at(1, i as u64))),
        );
        let evicted = estimates.set("k/new", at(1, u64::MAX));
        assert_eq!(evicted, ["k/c00000", "k/c00001", "k/c00002", "k/c00003"]);
        assert_eq!(estimates.all().len(), MAX_ESTIMATES);
    }
}
