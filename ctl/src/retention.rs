//! The coordinator's retention flags (`--job-retention`,
//! `--max-retained-jobs`, `--history-retention`, `--history-max-bytes`),
//! parsed into the [`RetentionPolicy`] a leader makes hard state.

use clap::Args;
use gantry_coordinator::state::RetentionPolicy;
use gantry_scheduler::units::{parse_bytes, parse_duration_ms};

/// Retention of finished work.
#[derive(Args, Debug, Clone, Default)]
pub struct RetentionArgs {
    /// A succeeded or cancelled job leaves hard state (into the history)
    /// this long after it finished (default 24h). The leader's value is
    /// applied by every replica.
    #[arg(long, value_name = "DURATION", value_parser = duration("--job-retention"))]
    job_retention: Option<u64>,
    /// Past this many finished jobs in hard state the oldest leave first
    /// (default 100000).
    #[arg(long, value_name = "N")]
    max_retained_jobs: Option<u64>,
    /// A retired job leaves the history this long after it finished
    /// (default 30d).
    #[arg(long, value_name = "DURATION", value_parser = duration("--history-retention"))]
    history_retention: Option<u64>,
    /// Past this size the oldest history records leave first (default 1GiB).
    #[arg(long, value_name = "SIZE", value_parser = size("--history-max-bytes"))]
    history_max_bytes: Option<u64>,
}

fn duration(flag: &'static str) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |text| parse_duration_ms(text).map_err(|e| format!("{flag}: {e} (e.g. 30m, 24h, 30d)"))
}

fn size(flag: &'static str) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |text| parse_bytes(text).map_err(|e| format!("{flag}: {e} (e.g. 512MiB, 1GiB)"))
}

impl RetentionArgs {
    /// The policy: the defaults where a flag is not given; an error naming
    /// the flag when a value is out of bounds.
    pub fn policy(&self) -> Result<RetentionPolicy, String> {
        let default = RetentionPolicy::default();
        let policy = RetentionPolicy {
            job_retention_ms: self.job_retention.unwrap_or(default.job_retention_ms),
            max_retained_jobs: self.max_retained_jobs.unwrap_or(default.max_retained_jobs),
            history_retention_ms: self
                .history_retention
                .unwrap_or(default.history_retention_ms),
            history_max_bytes: self.history_max_bytes.unwrap_or(default.history_max_bytes),
        };
        policy.validate()?;
        Ok(policy)
    }
}
