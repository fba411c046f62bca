//! Human tables and JSON for client commands.

use gantry_proto as pb;
use gantry_scheduler::units::{format_bytes, format_duration_ms};

pub use gantry_coordinator::json::{event_json, job_json, node_json, status_json};

/// Output format of listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Prints rows as aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn bytes(v: i64) -> String {
    format_bytes(v.max(0) as u64)
}

/// One row of `gantry jobs`.
pub fn job_row(job: &pb::Job) -> Vec<String> {
    let spec = job.spec.clone().unwrap_or_default();
    let attempt = job.attempts.last();
    let r = spec.resources.unwrap_or_default();
    let gpus = if r.gpus == 0 {
        "-".to_string()
    } else if r.gpu_memory_bytes > 0 {
        format!("{}x{}", r.gpus, bytes(r.gpu_memory_bytes))
    } else {
        r.gpus.to_string()
    };
    let mut detail = job.reason.clone();
    if detail.is_empty()
        && let Some(a) = attempt
    {
        detail = match (a.exit_code, a.signal) {
            (Some(c), _) if a.ended_at_ms > 0 => format!("exit {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ if a.batch_size > 0 => format!("batch {}", a.batch_size),
            _ => String::new(),
        };
    }
    vec![
        job.id.to_string(),
        spec.name,
        spec.kind,
        job.state.clone(),
        attempt
            .map(|a| a.node.clone())
            .unwrap_or_else(|| "-".into()),
        gpus,
        detail,
    ]
}

/// `gantry job <id>` for people.
pub fn print_job(job: &pb::Job) {
    let spec = job.spec.clone().unwrap_or_default();
    let r = spec.resources.unwrap_or_default();
    println!("job {} ({})", job.id, spec.name);
    println!("  kind:      {}", spec.kind);
    println!(
        "  state:     {}{}",
        job.state,
        if job.cancel_requested && job.state != "cancelled" {
            " (cancel requested)"
        } else {
            ""
        }
    );
    if !job.reason.is_empty() {
        println!("  reason:    {}", job.reason);
    }
    println!("  command:   {}", spec.command.join(" "));
    let mut res = vec![format!("gpus={}", r.gpus)];
    if r.gpu_memory_bytes > 0 {
        res.push(format!("gpu_memory={}", bytes(r.gpu_memory_bytes)));
    }
    if r.cpu_millis > 0 {
        res.push(format!("cpus={}", r.cpu_millis as f64 / 1000.0));
    }
    if r.memory_bytes > 0 {
        res.push(format!("memory={}", bytes(r.memory_bytes)));
    }
    if r.disk_bytes > 0 {
        res.push(format!("disk={}", bytes(r.disk_bytes)));
    }
    println!("  resources: {}", res.join(" "));
    if spec.timeout_ms > 0 {
        println!("  timeout:   {}", format_duration_ms(spec.timeout_ms));
    }
    if !spec.after.is_empty() {
        println!("  after:     {}", spec.after.join(", "));
    }
    for a in &job.attempts {
        let end = match (a.exit_code, a.signal) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ if a.ended_at_ms > 0 => "ended".to_string(),
            _ if a.started_at_ms > 0 => "running".to_string(),
            _ => "assigned".to_string(),
        };
        let gpus: Vec<String> = a.gpus.iter().map(|g| g.to_string()).collect();
        let batch = if a.batch_size > 0 {
            format!(" batch={}", a.batch_size)
        } else {
            String::new()
        };
        println!(
            "  attempt {}: node={} gpus=[{}] reserved={}{} {}{}",
            a.attempt,
            a.node,
            gpus.join(","),
            bytes(a.gpu_memory_bytes),
            batch,
            end,
            if a.error.is_empty() {
                String::new()
            } else {
                format!(" — {}", a.error.lines().last().unwrap_or(""))
            }
        );
    }
}

/// One row of `gantry nodes`.
pub fn node_row(node: &pb::Node) -> Vec<String> {
    let provider = node
        .labels
        .get("provider")
        .cloned()
        .unwrap_or_else(|| "-".into());
    let gpus = if node.gpus.is_empty() {
        "-".to_string()
    } else {
        let model = node.gpus[0].model.clone();
        format!("{}x{}", node.gpus.len(), model)
    };
    let free: i64 = node
        .gpus
        .iter()
        .map(|g| (g.total_bytes - g.reserved_bytes.max(g.used_bytes)).max(0))
        .sum();
    let disk = if node.disk_total_bytes > 0 {
        format!(
            "{:.0}%{}",
            node.disk_used_bytes as f64 * 100.0 / node.disk_total_bytes as f64,
            if node.disk_pressure {
                " (pressure)"
            } else {
                ""
            }
        )
    } else {
        "-".into()
    };
    let mut state = node.state.clone();
    if node.draining {
        state.push_str(",draining");
        if node.drain_deadline_ms > 0 {
            state.push_str(&format!(
                " ({})",
                deadline_in(node.drain_deadline_ms, now_ms())
            ));
        }
    }
    if node.quarantined_until_ms > 0 {
        state.push(',');
        state.push_str(&quarantined_until(
            node.quarantined_until_ms,
            node.quarantine_failures,
        ));
    }
    vec![
        node.name.clone(),
        state,
        provider,
        gpus,
        bytes(free),
        disk,
        node.running_jobs.to_string(),
        format!("{:.1}ms", node.rtt_ms),
    ]
}

/// A drain deadline relative to `now` for people: `deadline in 12m`,
/// `deadline passed 3s ago`.
pub fn deadline_in(deadline_ms: u64, now: u64) -> String {
    if deadline_ms > now {
        format!("deadline in {}", rough_duration(deadline_ms - now))
    } else {
        format!("deadline passed {} ago", rough_duration(now - deadline_ms))
    }
}

/// A quarantine for people: `quarantined until 14:03:07 (3 failures)`, the
/// time of day in UTC.
pub fn quarantined_until(until_ms: u64, failures: u32) -> String {
    let secs = until_ms / 1000 % 86_400;
    format!(
        "quarantined until {:02}:{:02}:{:02} ({failures} failure{})",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        if failures == 1 { "" } else { "s" }
    )
}

/// A duration rounded up to whole seconds, minutes or hours-and-minutes.
fn rough_duration(ms: u64) -> String {
    let secs = ms.div_ceil(1000);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs.div_ceil(60)),
        _ => {
            let minutes = secs.div_ceil(60);
            match minutes % 60 {
                0 => format!("{}h", minutes / 60),
                m => format!("{}h{m}m", minutes / 60),
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `gantry pipeline NAME` for people: stages in dependency order, each with
/// its state and the stages it waits for.
pub fn print_pipeline(view: &pb::PipelineView) {
    println!("pipeline {} run {}", view.name, view.run);
    let names: std::collections::HashMap<u64, String> = view
        .jobs
        .iter()
        .map(|j| {
            (
                j.id,
                j.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
            )
        })
        .collect();
    // Depth = longest chain of inputs, so stages print in dependency order.
    let mut depth: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut order: Vec<&pb::Job> = view.jobs.iter().collect();
    for _ in 0..order.len() {
        for job in &order {
            let d = job
                .depends_on
                .iter()
                .map(|dep| depth.get(dep).copied().unwrap_or(0) + 1)
                .max()
                .unwrap_or(0);
            depth.insert(job.id, d);
        }
    }
    order.sort_by_key(|j| (depth.get(&j.id).copied().unwrap_or(0), j.id));
    for job in order {
        let d = depth.get(&job.id).copied().unwrap_or(0);
        let name = names.get(&job.id).cloned().unwrap_or_default();
        let inputs: Vec<String> = job
            .depends_on
            .iter()
            .map(|dep| names.get(dep).cloned().unwrap_or_else(|| dep.to_string()))
            .collect();
        let after = if inputs.is_empty() {
            String::new()
        } else {
            format!("  <- {}", inputs.join(", "))
        };
        let reason = if job.reason.is_empty() {
            String::new()
        } else {
            format!("  ({})", job.reason)
        };
        println!(
            "{}{} [job {}] {}{}{}",
            "  ".repeat(d),
            name,
            job.id,
            job.state,
            after,
            reason
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{deadline_in, quarantined_until};

    #[test]
    fn quarantines_read_as_a_time_of_day() {
        let cases = [
            (0, 3, "quarantined until 00:00:00 (3 failures)"),
            (
                1_764_770_587_999,
                1,
                "quarantined until 14:03:07 (1 failure)",
            ),
            (86_399_000, 12, "quarantined until 23:59:59 (12 failures)"),
        ];
        for (until, failures, expect) in cases {
            assert_eq!(quarantined_until(until, failures), expect, "{until}");
        }
    }

    #[test]
    fn drain_deadlines_read_as_relative_times() {
        let cases = [
            (12 * 60_000, 0, "deadline in 12m"),
            (11 * 60_000 + 1, 0, "deadline in 12m"),
            (1500, 0, "deadline in 2s"),
            (2 * 3_600_000 + 5 * 60_000, 0, "deadline in 2h5m"),
            (3_600_000, 0, "deadline in 1h"),
            (1000, 4000, "deadline passed 3s ago"),
        ];
        for (deadline, now, expect) in cases {
            assert_eq!(deadline_in(deadline, now), expect, "{deadline} at {now}");
        }
    }
}
