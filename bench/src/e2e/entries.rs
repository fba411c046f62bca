//! The "Raft entries per job" figure: how many log entries the cluster
//! committed for each acknowledged job of the load (submit, placement,
//! start, exit, and whatever else committed meanwhile), from the leader's
//! commit index read before the load and again once the load's jobs have
//! all started and the log has gone quiet.

use std::time::{Duration, Instant};

use super::status;

/// How long a quiet log must stay unchanged to count as settled.
const QUIET: Duration = Duration::from_millis(300);

/// How long the reading waits for the log to settle at most.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// Entries per acknowledged job, or `None` when either reading failed or
/// there is nothing to divide by. Since the commands of one replica round
/// share one entry the figure is far below 1 under load (about 0.04), which
/// the report's one decimal printed as "0.0"; it now prints two. A failed
/// reading is unknown, not an index of 0 (which made the delta 0 before).
pub(super) fn entries_per_job(before: Option<u64>, after: Option<u64>, jobs: usize) -> Option<f64> {
    let (before, after) = (before?, after?);
    if jobs == 0 || after < before {
        return None;
    }
    Some((after - before) as f64 / jobs as f64)
}

/// The leader's commit index, once two readings `QUIET` apart agree (the
/// exits of the last jobs committed), or the last reading after
/// `SETTLE_LIMIT`; `None` when no reading succeeded.
pub(super) async fn settled_commit_index(url: &str) -> Option<u64> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    let mut last = None;
    loop {
        let now = status(url).await.map(|s| s.commit_index);
        if now.is_some() && now == last {
            return now;
        }
        last = now.or(last);
        if Instant::now() > deadline {
            return last;
        }
        tokio::time::sleep(QUIET).await;
    }
}

/// The leader's commit index now, retried for a few seconds: a single
/// Status call may time out on a busy leader.
pub(super) async fn commit_index(url: &str) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(s) = status(url).await {
            return Some(s.commit_index);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::entries_per_job;

    /// Commit index before, after, jobs, expected figure.
    type Case = (Option<u64>, Option<u64>, usize, Option<f64>);

    #[test]
    fn entries_per_job_is_the_commit_delta_over_the_jobs() {
        let cases: &[Case] = &[
            (Some(100), Some(400), 100, Some(3.0)),
            (Some(0), Some(150), 100, Some(1.5)),
            (Some(7), Some(7), 10, Some(0.0)),
            // A failed reading after the load is unknown, not 0 entries.
            (Some(100), None, 100, None),
            (None, Some(400), 100, None),
            (Some(100), Some(400), 0, None),
            // A commit index that went back (another leader's view) is no figure.
            (Some(500), Some(400), 10, None),
        ];
        for &(before, after, jobs, expected) in cases {
            assert_eq!(
                entries_per_job(before, after, jobs),
                expected,
                "before {before:?} after {after:?} jobs {jobs}"
            );
        }
    }
}
