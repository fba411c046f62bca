//! The coordinator's scheduling policy from flags and the settings file:
//! fair-share queue weights and per-kind disk thresholds. Flags win over
//! the file key by key (a `--queue-weight bob=5` changes bob's weight and
//! keeps the file's others). Every bad value is refused with one error
//! naming the flag or key and the reason.
//!
//!     queue_weights: {alice: 1, bob: 3}
//!     disk_thresholds: {export: {high: 0.92, low: 0.85}}

use std::collections::BTreeMap;

use clap::Args;
use gantry_coordinator::limits::MAX_NAME_LEN;
use gantry_scheduler::{DiskThresholds, JobKind};
use serde::Deserialize;

/// Largest queue weight: a weight is a share, and a million to one is
/// already a priority, which has its own field.
pub const MAX_QUEUE_WEIGHT: u32 = 10_000;
/// Most queues given a weight.
pub const MAX_QUEUES: usize = 1_000;

/// `--queue-weight` and `--disk-threshold`.
#[derive(Debug, Default, Args)]
pub struct PolicyArgs {
    /// Fair-share weight of a queue, QUEUE=WEIGHT (repeatable; 1 to 10000,
    /// unnamed queues weigh 1; "" names the default queue: `=2`). Under
    /// contention queues hold GPUs in the ratio of their weights.
    #[arg(long = "queue-weight")]
    pub queue_weights: Vec<String>,
    /// Disk watermarks of one job kind, KIND=HIGH/LOW as fractions of the
    /// data volume (repeatable), e.g. export=0.92/0.85: jobs of that kind
    /// stay off a node whose disk use went above HIGH until it falls
    /// below LOW.
    #[arg(long = "disk-threshold")]
    pub disk_thresholds: Vec<String>,
}

/// `disk_thresholds:` entries of the settings file.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdsFile {
    /// Use fraction above which pressure turns on.
    pub high: f64,
    /// Use fraction below which it turns off again.
    pub low: f64,
}

/// The policy, checked.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SchedulingPolicy {
    /// Weight per queue.
    pub queue_weights: BTreeMap<String, u32>,
    /// Watermarks per kind.
    pub disk_thresholds: BTreeMap<JobKind, DiskThresholds>,
}

/// Merges the settings file's policy with the flags (flags win per key).
pub fn resolve(
    args: PolicyArgs,
    file_weights: Option<BTreeMap<String, u32>>,
    file_thresholds: Option<BTreeMap<String, ThresholdsFile>>,
) -> Result<SchedulingPolicy, String> {
    let mut policy = SchedulingPolicy::default();
    for (queue, weight) in file_weights.unwrap_or_default() {
        let field = format!("--config: queue_weights: {queue:?}");
        policy
            .queue_weights
            .insert(check_queue(&field, &queue)?, check_weight(&field, weight)?);
    }
    for text in &args.queue_weights {
        let field = format!("--queue-weight {text:?}");
        let (queue, weight) = text
            .split_once('=')
            .ok_or_else(|| format!("{field}: expected QUEUE=WEIGHT"))?;
        let weight: u32 = weight
            .trim()
            .parse()
            .map_err(|_| format!("{field}: the weight must be a whole number"))?;
        policy
            .queue_weights
            .insert(check_queue(&field, queue)?, check_weight(&field, weight)?);
    }
    if policy.queue_weights.len() > MAX_QUEUES {
        return Err(format!(
            "queue weights: {} queues, at most {MAX_QUEUES}",
            policy.queue_weights.len()
        ));
    }
    for (kind, t) in file_thresholds.unwrap_or_default() {
        let field = format!("--config: disk_thresholds: {kind:?}");
        let kind = check_kind(&field, &kind)?;
        policy
            .disk_thresholds
            .insert(kind, check_thresholds(&field, t.high, t.low)?);
    }
    for text in &args.disk_thresholds {
        let field = format!("--disk-threshold {text:?}");
        let (kind, marks) = text
            .split_once('=')
            .ok_or_else(|| format!("{field}: expected KIND=HIGH/LOW"))?;
        let (high, low) = marks
            .split_once('/')
            .ok_or_else(|| format!("{field}: expected KIND=HIGH/LOW, e.g. export=0.92/0.85"))?;
        let fraction = |s: &str| {
            s.trim()
                .parse::<f64>()
                .map_err(|_| format!("{field}: {s:?} is not a fraction"))
        };
        let kind = check_kind(&field, kind)?;
        policy.disk_thresholds.insert(
            kind,
            check_thresholds(&field, fraction(high)?, fraction(low)?)?,
        );
    }
    Ok(policy)
}

fn check_queue(field: &str, queue: &str) -> Result<String, String> {
    if queue.len() > MAX_NAME_LEN {
        return Err(format!(
            "{field}: queue name longer than {MAX_NAME_LEN} characters"
        ));
    }
    if let Some(bad) = queue
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
    {
        return Err(format!(
            "{field}: queue name contains {bad:?}; use letters, digits, '-', '_', '.', '/'"
        ));
    }
    Ok(queue.to_string())
}

fn check_weight(field: &str, weight: u32) -> Result<u32, String> {
    if (1..=MAX_QUEUE_WEIGHT).contains(&weight) {
        Ok(weight)
    } else {
        Err(format!(
            "{field}: weight {weight} is out of range 1 to {MAX_QUEUE_WEIGHT}"
        ))
    }
}

fn check_kind(field: &str, kind: &str) -> Result<JobKind, String> {
    JobKind::parse(kind.trim()).ok_or_else(|| {
        let kinds: Vec<&str> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
        format!(
            "{field}: unknown job kind; expected one of {}",
            kinds.join(", ")
        )
    })
}

fn check_thresholds(field: &str, high: f64, low: f64) -> Result<DiskThresholds, String> {
    if !(high > 0.0 && high <= 1.0) {
        return Err(format!(
            "{field}: high watermark {high} must be a fraction above 0 and at most 1"
        ));
    }
    if !(0.0..=high).contains(&low) {
        return Err(format!(
            "{field}: low watermark {low} must be between 0 and the high watermark {high}"
        ));
    }
    Ok(DiskThresholds { high, low })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(weights: &[&str], thresholds: &[&str]) -> PolicyArgs {
        PolicyArgs {
            queue_weights: weights.iter().map(|s| s.to_string()).collect(),
            disk_thresholds: thresholds.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn flags_win_over_the_file_key_by_key() {
        let file = [("alice".to_string(), 1), ("bob".to_string(), 3)].into();
        let marks = [(
            "export".to_string(),
            ThresholdsFile {
                high: 0.9,
                low: 0.8,
            },
        )]
        .into();
        let policy = resolve(
            args(&["bob=5", "=2"], &["selfplay=0.8/0.7"]),
            Some(file),
            Some(marks),
        )
        .expect("valid");
        assert_eq!(
            policy.queue_weights,
            [
                (String::new(), 2),
                ("alice".to_string(), 1),
                ("bob".to_string(), 5)
            ]
            .into()
        );
        assert_eq!(
            policy.disk_thresholds,
            [
                (
                    JobKind::Export,
                    DiskThresholds {
                        high: 0.9,
                        low: 0.8
                    }
                ),
                (
                    JobKind::Selfplay,
                    DiskThresholds {
                        high: 0.8,
                        low: 0.7
                    }
                ),
            ]
            .into()
        );
    }

    #[test]
    fn bad_values_are_named() {
        // (weights, thresholds, expected error fragment)
        let cases: &[(&[&str], &[&str], &str)] = &[
            (
                &["bob"],
                &[],
                "--queue-weight \"bob\": expected QUEUE=WEIGHT",
            ),
            (&["bob=0"], &[], "weight 0 is out of range 1 to 10000"),
            (
                &["bob=x"],
                &[],
                "\"bob=x\": the weight must be a whole number",
            ),
            (&["bob=10001"], &[], "out of range"),
            (&["b b=1"], &[], "queue name contains ' '"),
            (&[], &["export=0.9"], "expected KIND=HIGH/LOW"),
            (
                &[],
                &["exprt=0.9/0.8"],
                "\"exprt=0.9/0.8\": unknown job kind",
            ),
            (&[], &["export=1.5/0.8"], "high watermark 1.5"),
            (&[], &["export=0.8/0.9"], "low watermark 0.9"),
            (&[], &["export=NaN/0.1"], "high watermark NaN"),
            (&[], &["export=0.9/x"], "\"x\" is not a fraction"),
        ];
        for (weights, thresholds, fragment) in cases {
            let error = resolve(args(weights, thresholds), None, None).expect_err("refused");
            assert!(error.contains(fragment), "{error:?} lacks {fragment:?}");
        }
        let error = resolve(
            PolicyArgs::default(),
            Some([("alice".to_string(), 0)].into()),
            None,
        )
        .expect_err("refused");
        assert!(
            error.starts_with("--config: queue_weights: \"alice\": weight 0"),
            "{error}"
        );
        let many = (0..=MAX_QUEUES).map(|i| (format!("q{i}"), 1)).collect();
        let error = resolve(PolicyArgs::default(), Some(many), None).expect_err("too many");
        assert!(error.contains("at most 1000"), "{error}");
    }
}
