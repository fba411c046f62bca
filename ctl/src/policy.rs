//! The coordinator's scheduling policy from flags and the settings file:
//! fair-share queue weights, per-kind disk thresholds and the circuit
//! breaker's numbers. Flags win over the file key by key (a `--queue-weight
//! bob=5` changes bob's weight and keeps the file's others). Every bad
//! value is refused with one error naming the flag or key and the reason.
//!
//!     queue_weights: {alice: 1, bob: 3}
//!     disk_thresholds: {export: {high: 0.92, low: 0.85}}
//!     breaker: {trip_points: 3, window: 10m, cool_down: 5m, max_doublings: 3, max_share_percent: 10}

use std::collections::BTreeMap;

use clap::Args;
use gantry_coordinator::breaker::{BreakerPolicy, POLICY_BOUNDS};
use gantry_coordinator::limits::MAX_NAME_LEN;
use gantry_scheduler::units::{format_duration_ms, parse_duration_ms};
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
    /// Circuit breaker: evidence points against a node that quarantine it
    /// (1 to 1000; default 3).
    #[arg(long = "breaker-trip-points", value_name = "POINTS")]
    pub breaker_trip_points: Option<String>,
    /// Circuit breaker: how long evidence counts, and how soon a trip after
    /// a quarantine doubles the next (1s to 7d; default 10m).
    #[arg(long = "breaker-window", value_name = "DURATION")]
    pub breaker_window: Option<String>,
    /// Circuit breaker: the first quarantine's length (1s to 7d; default 5m).
    #[arg(long = "breaker-cool-down", value_name = "DURATION")]
    pub breaker_cool_down: Option<String>,
    /// Circuit breaker: doublings of the cool-down at most (0 to 10;
    /// default 3, i.e. 8x).
    #[arg(long = "breaker-max-doublings", value_name = "N")]
    pub breaker_max_doublings: Option<String>,
    /// Circuit breaker: most of the fleet quarantined at once, percent
    /// (1 to 100, at least one node of two; default 10).
    #[arg(long = "breaker-max-share", value_name = "PERCENT")]
    pub breaker_max_share: Option<String>,
}

/// `breaker:` in the settings file (durations as text: `10m`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerFile {
    /// Evidence points that trip it.
    pub trip_points: Option<u32>,
    /// How long evidence counts.
    pub window: Option<String>,
    /// The first quarantine's length.
    pub cool_down: Option<String>,
    /// Doublings at most.
    pub max_doublings: Option<u32>,
    /// Most of the fleet at once, percent.
    pub max_share_percent: Option<u32>,
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
    /// The circuit breaker's numbers.
    pub breaker: BreakerPolicy,
}

/// Merges the settings file's policy with the flags (flags win per key).
pub fn resolve(
    args: PolicyArgs,
    file_weights: Option<BTreeMap<String, u32>>,
    file_thresholds: Option<BTreeMap<String, ThresholdsFile>>,
    file_breaker: Option<BreakerFile>,
) -> Result<SchedulingPolicy, String> {
    let mut policy = SchedulingPolicy {
        breaker: resolve_breaker(&args, file_breaker.unwrap_or_default())?,
        ..SchedulingPolicy::default()
    };
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

/// The breaker's numbers: defaults, then the file's keys, then the flags.
fn resolve_breaker(args: &PolicyArgs, file: BreakerFile) -> Result<BreakerPolicy, String> {
    let bounds = POLICY_BOUNDS;
    let mut policy = BreakerPolicy::default();
    let whole = |field: &str, text: &str| {
        text.trim()
            .parse::<u32>()
            .map_err(|_| format!("{field}: {text:?} is not a whole number"))
    };
    let duration = |field: &str, text: &str| {
        parse_duration_ms(text.trim()).map_err(|e| format!("{field}: {e}"))
    };
    // (the file's key and value, the flag and its value) per setting.
    let points = [
        (
            "--config: breaker: trip_points",
            file.trip_points.map(|v| v.to_string()),
        ),
        ("--breaker-trip-points", args.breaker_trip_points.clone()),
    ];
    for (field, value) in points {
        if let Some(text) = value {
            policy.trip_points = in_range(field, whole(field, &text)?, bounds.trip_points)?;
        }
    }
    let doublings = [
        (
            "--config: breaker: max_doublings",
            file.max_doublings.map(|v| v.to_string()),
        ),
        (
            "--breaker-max-doublings",
            args.breaker_max_doublings.clone(),
        ),
    ];
    for (field, value) in doublings {
        if let Some(text) = value {
            policy.max_doublings =
                in_range(field, whole(field, &text)?, (0, bounds.max_doublings))?;
        }
    }
    let share = [
        (
            "--config: breaker: max_share_percent",
            file.max_share_percent.map(|v| v.to_string()),
        ),
        ("--breaker-max-share", args.breaker_max_share.clone()),
    ];
    for (field, value) in share {
        if let Some(text) = value {
            let text = text.trim().trim_end_matches('%');
            policy.max_share_percent =
                in_range(field, whole(field, text)?, bounds.max_share_percent)?;
        }
    }
    let durations = [
        ("--config: breaker: window", file.window, true),
        ("--breaker-window", args.breaker_window.clone(), true),
        ("--config: breaker: cool_down", file.cool_down, false),
        ("--breaker-cool-down", args.breaker_cool_down.clone(), false),
    ];
    for (field, value, window) in durations {
        let Some(text) = value else { continue };
        let ms = duration(field, &text)?;
        let (least, most) = bounds.duration_ms;
        if !(least..=most).contains(&ms) {
            return Err(format!(
                "{field}: {} is out of range {} to {}",
                format_duration_ms(ms),
                format_duration_ms(least),
                format_duration_ms(most)
            ));
        }
        if window {
            policy.window_ms = ms;
        } else {
            policy.cool_down_ms = ms;
        }
    }
    Ok(policy)
}

fn in_range(field: &str, value: u32, (least, most): (u32, u32)) -> Result<u32, String> {
    if (least..=most).contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "{field}: {value} is out of range {least} to {most}"
        ))
    }
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
            ..PolicyArgs::default()
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
            None,
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
            let error = resolve(args(weights, thresholds), None, None, None).expect_err("refused");
            assert!(error.contains(fragment), "{error:?} lacks {fragment:?}");
        }
        let error = resolve(
            PolicyArgs::default(),
            Some([("alice".to_string(), 0)].into()),
            None,
            None,
        )
        .expect_err("refused");
        assert!(
            error.starts_with("--config: queue_weights: \"alice\": weight 0"),
            "{error}"
        );
        let many = (0..=MAX_QUEUES).map(|i| (format!("q{i}"), 1)).collect();
        let error = resolve(PolicyArgs::default(), Some(many), None, None).expect_err("too many");
        assert!(error.contains("at most 1000"), "{error}");
    }

    fn breaker_args(flags: &[(&str, &str)]) -> PolicyArgs {
        let mut args = PolicyArgs::default();
        for &(flag, value) in flags {
            let value = Some(value.to_string());
            match flag {
                "points" => args.breaker_trip_points = value,
                "window" => args.breaker_window = value,
                "cool" => args.breaker_cool_down = value,
                "doublings" => args.breaker_max_doublings = value,
                "share" => args.breaker_max_share = value,
                other => panic!("{other}"),
            }
        }
        args
    }

    #[test]
    fn breaker_policy_from_the_file_and_flags() {
        let defaults = resolve(PolicyArgs::default(), None, None, None).expect("defaults");
        assert_eq!(defaults.breaker, BreakerPolicy::default());
        let file = BreakerFile {
            trip_points: Some(5),
            window: Some("30m".into()),
            max_share_percent: Some(20),
            ..BreakerFile::default()
        };
        let policy = resolve(
            breaker_args(&[("points", "4"), ("cool", "90s"), ("doublings", "0")]),
            None,
            None,
            Some(file),
        )
        .expect("valid");
        assert_eq!(
            policy.breaker,
            BreakerPolicy {
                trip_points: 4,
                window_ms: 30 * 60_000,
                cool_down_ms: 90_000,
                max_doublings: 0,
                max_share_percent: 20,
            }
        );
    }

    #[test]
    fn bad_breaker_values_are_named() {
        // (flags, expected error)
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("points", "0")],
                "--breaker-trip-points: 0 is out of range 1 to 1000",
            ),
            (
                &[("points", "x")],
                "--breaker-trip-points: \"x\" is not a whole number",
            ),
            (
                &[("points", "-1")],
                "--breaker-trip-points: \"-1\" is not a whole number",
            ),
            (
                &[("doublings", "11")],
                "--breaker-max-doublings: 11 is out of range 0 to 10",
            ),
            (
                &[("share", "0")],
                "--breaker-max-share: 0 is out of range 1 to 100",
            ),
            (
                &[("share", "101%")],
                "--breaker-max-share: 101 is out of range 1 to 100",
            ),
            (
                &[("window", "500ms")],
                "--breaker-window: 500ms is out of range 1s to 7d",
            ),
            (
                &[("window", "8d")],
                "--breaker-window: 8d is out of range 1s to 7d",
            ),
            (&[("cool", "soon")], "--breaker-cool-down: "),
        ];
        for (flags, want) in cases {
            let error = resolve(breaker_args(flags), None, None, None).expect_err("refused");
            assert!(error.starts_with(want), "{error:?} is not {want:?}");
        }
        let file = BreakerFile {
            trip_points: Some(2000),
            ..BreakerFile::default()
        };
        let error = resolve(PolicyArgs::default(), None, None, Some(file)).expect_err("refused");
        assert_eq!(
            error,
            "--config: breaker: trip_points: 2000 is out of range 1 to 1000"
        );
    }
}
