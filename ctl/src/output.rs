//! Human tables and JSON for client commands, and the one way they reach
//! stdout.
//!
//! Two rules hold for everything printed here. Every string that came from a
//! user (a job's command, env, labels, names, reasons, node names, errors the
//! server echoes) goes through [`escape`] before it reaches a terminal, so a
//! job cannot rewrite the screen of whoever looks at it; `-o json` is exact
//! (serde escapes control characters itself). And every line goes through
//! [`outln!`], which ends the process quietly when stdout is a closed pipe
//! (`gantry jobs | head -1`), as Unix tools do, instead of panicking.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io::Write as _;

use gantry_proto as pb;
use gantry_scheduler::units::{format_bytes, format_duration_ms};

use crate::client::exit;

pub use gantry_coordinator::json::{event_json, job_json, node_json, pipeline_json, status_json};

/// Output format of listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Prints a line to stdout like `println!`, but a closed pipe ends the
/// process with exit 0 and any other write error with exit 1 (see
/// [`write_stdout`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// Writes to stdout through its lock. A reader that went away (`| head`) is
/// the end of the command, not a failure: exit 0 at once, as `ls | head` does.
pub fn write_stdout(args: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_fmt(args) {
        stdout_failed(&error);
    }
}

/// Writes raw bytes to stdout and flushes them (`gantry logs`), with the
/// closed-pipe rule of [`write_stdout`].
pub fn write_stdout_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_all(bytes).and_then(|()| out.flush()) {
        stdout_failed(&error);
    }
}

/// Ends the process after a failed write to stdout: quietly with exit 0 when
/// the reader closed the pipe, with an error and exit 1 otherwise (a full
/// disk must not look like success).
fn stdout_failed(error: &std::io::Error) -> ! {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(i32::from(exit::OK));
    }
    eprintln!("error: writing to stdout: {error}");
    std::process::exit(i32::from(exit::FAILED));
}

/// `text` with everything a terminal would act on shown visibly instead:
/// ESC as `\e`, newline, carriage return and tab as `\n`, `\r`, `\t`, other
/// C0 controls and DEL as `\xNN`, C1 controls, bidirectional overrides and
/// isolates (which reorder what follows them) and line separators as
/// `\u{NNNN}`. Other text, backslashes included, is unchanged, so ordinary
/// commands read as typed; `-o json` is the exact form.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\x1b' => out.push_str("\\e"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Whether a terminal could act on `c` or reorder the text around it.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// An escaped, owned copy of `text` (for table cells).
fn esc(text: &str) -> String {
    escape(text).into_owned()
}

/// Prints rows as aligned columns under a header. Cells are printed as
/// given: callers escape user strings when building rows.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    // One buffer, one write: a large listing costs one syscall per 8 KiB,
    // not one per line.
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let start = out.len();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ", width = widths[i]);
            }
        }
        let kept = out[start..].trim_end().len();
        out.truncate(start + kept);
        out.push('\n');
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
    write_stdout(format_args!("{out}"));
}

fn bytes(v: i64) -> String {
    format_bytes(v.max(0) as u64)
}

/// One row of `gantry jobs` (user strings escaped).
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
    let mut detail = esc(&job.reason);
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
        esc(&spec.name),
        esc(&spec.kind),
        if job.archived {
            format!("{} (archived)", esc(&job.state))
        } else {
            esc(&job.state)
        },
        attempt.map_or_else(|| "-".into(), |a| esc(&a.node)),
        gpus,
        detail,
    ]
}

/// A command line for people: each argument escaped, and quoted when it is
/// empty or holds spaces, so argument boundaries stay visible.
fn command_line(args: &[String]) -> String {
    let words: Vec<String> = args
        .iter()
        .map(|arg| {
            let arg = escape(arg);
            if arg.is_empty() || arg.contains(' ') {
                format!("\"{arg}\"")
            } else {
                arg.into_owned()
            }
        })
        .collect();
    words.join(" ")
}

/// `KEY=VALUE` pairs in key order, escaped.
fn pairs(map: &HashMap<String, String>) -> String {
    let mut items: Vec<(&String, &String)> = map.iter().collect();
    items.sort();
    let items: Vec<String> = items
        .into_iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect();
    items.join(" ")
}

/// `gantry job <id>` for people (user strings escaped).
pub fn print_job(job: &pb::Job) {
    let spec = job.spec.clone().unwrap_or_default();
    let r = spec.resources.unwrap_or_default();
    outln!("job {} ({})", job.id, escape(&spec.name));
    outln!("  kind:      {}", escape(&spec.kind));
    outln!(
        "  state:     {}{}",
        escape(&job.state),
        if job.archived {
            " (archived: retired from the cluster state, kept in the history)"
        } else if job.cancel_requested && job.state != "cancelled" {
            " (cancel requested)"
        } else {
            ""
        }
    );
    if !job.reason.is_empty() {
        outln!("  reason:    {}", escape(&job.reason));
    }
    if !job.owner.is_empty() {
        outln!("  owner:     {}", escape(&job.owner));
    }
    outln!("  command:   {}", command_line(&spec.command));
    if !spec.env.is_empty() {
        outln!("  env:       {}", pairs(&spec.env));
    }
    if let Some(c) = spec.constraints.as_ref().filter(|c| !c.labels.is_empty()) {
        outln!("  labels:    {}", pairs(&c.labels));
    }
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
    outln!("  resources: {}", res.join(" "));
    if let Some(timeout_ms) = spec.timeout_ms {
        outln!("  timeout:   {}", format_duration_ms(timeout_ms));
    }
    if !spec.after.is_empty() {
        let after: Vec<Cow<'_, str>> = spec.after.iter().map(|a| escape(a)).collect();
        outln!("  after:     {}", after.join(", "));
    }
    for line in &job.preemptions {
        outln!("  preempt:   {}", escape(line));
    }
    if job.gang > 0 {
        outln!(
            "  gang:      {} nodes, gang {} (rank {})",
            spec.nodes,
            job.gang,
            job.gang_rank
        );
    }
    for m in &job.gang_members {
        let node = if m.node.is_empty() {
            "-"
        } else {
            m.node.as_str()
        };
        outln!(
            "  member:    rank {} job {} {} node={} attempt {}",
            m.rank,
            m.job_id,
            escape(&m.state),
            escape(node),
            m.attempt
        );
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
        outln!(
            "  attempt {}: node={} gpus=[{}] reserved={}{} {}{}",
            a.attempt,
            escape(&a.node),
            gpus.join(","),
            bytes(a.gpu_memory_bytes),
            batch,
            end,
            if a.error.is_empty() {
                String::new()
            } else {
                format!(" — {}", escape(a.error.lines().last().unwrap_or("")))
            }
        );
    }
}

/// One row of `gantry nodes` (user strings escaped).
pub fn node_row(node: &pb::Node) -> Vec<String> {
    let provider = node
        .labels
        .get("provider")
        .map_or_else(|| "-".into(), |p| esc(p));
    let mut gpus = match node.gpus.first() {
        None => "-".to_string(),
        Some(gpu) => format!("{}x{}", node.gpus.len(), escape(&gpu.model)),
    };
    let sick: Vec<&pb::GpuInfo> = node.gpus.iter().filter(|g| !g.fault.is_empty()).collect();
    if !sick.is_empty() {
        let list: Vec<String> = sick.iter().map(|g| g.index.to_string()).collect();
        gpus.push_str(&format!(" (unhealthy: {})", list.join(",")));
    }
    let free: i64 = node.gpus.iter().map(|g| g.free_bytes.max(0)).sum();
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
    let mut state = esc(&node.state);
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
    // Each unhealthy GPU's committed fault, shortened for the table (`-o
    // json` has it whole).
    for gpu in sick {
        let fault: String = gpu.fault.chars().take(48).collect();
        state.push_str(&format!(",gpu {} unhealthy: {}", gpu.index, esc(&fault)));
    }
    vec![
        esc(&node.name),
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

/// Indentation stops growing past this depth: a 10,000-stage chain would
/// otherwise print 100 MB of spaces (quadratic output). The `<-` inputs
/// still name every edge.
const MAX_PIPELINE_INDENT: usize = 32;

/// `gantry pipeline NAME` for people: stages in dependency order, each with
/// its state and the stages it waits for. Linear in stages plus edges.
pub fn print_pipeline(view: &pb::PipelineView) {
    let mut out = String::new();
    let _ = writeln!(out, "pipeline {} run {}", escape(&view.name), view.run);
    if let Some(line) = loop_line(view) {
        let _ = writeln!(out, "{line}");
    }
    let ready = ready_at(&view.jobs);
    let names: HashMap<u64, Cow<'_, str>> = view
        .jobs
        .iter()
        .map(|j| {
            (
                j.id,
                escape(j.spec.as_ref().map_or("", |s| s.name.as_str())),
            )
        })
        .collect();
    let depth = stage_depths(&view.jobs);
    let mut order: Vec<(usize, &pb::Job)> =
        view.jobs.iter().zip(depth).map(|(j, d)| (d, j)).collect();
    order.sort_by_key(|(d, j)| (*d, j.id));
    for (d, job) in order {
        let _ = write!(
            out,
            "{}{} [job {}] {}",
            "  ".repeat(d.min(MAX_PIPELINE_INDENT)),
            names.get(&job.id).map_or("", |n| n.as_ref()),
            job.id,
            escape(&job.state),
        );
        for (i, dep) in job.depends_on.iter().enumerate() {
            out.push_str(if i == 0 { "  <- " } else { ", " });
            match names.get(dep) {
                Some(name) => out.push_str(name),
                None => {
                    let _ = write!(out, "{dep}");
                }
            }
        }
        if let Some(times) = ready.get(&job.id).and_then(|r| stage_times(job, *r)) {
            let _ = write!(out, "  {times}");
        }
        if !job.reason.is_empty() {
            let _ = write!(out, "  ({})", escape(&job.reason));
        }
        out.push('\n');
    }
    if view.runs.len() > 1 || !view.loop_status.is_empty() {
        out.push_str("runs:\n");
        for run in &view.runs {
            let _ = writeln!(out, "  {}", run_line(run, now_ms()));
        }
    }
    write_stdout(format_args!("{out}"));
}

/// Seconds with a tenth, for times that are seconds to hours.
fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// `loop: repeating (max_runs 5)`; `None` for a pipeline that does not repeat.
fn loop_line(view: &pb::PipelineView) -> Option<String> {
    if view.loop_status.is_empty() {
        return None;
    }
    let repeat = match &view.repeat {
        Some(r) if r.forever => "repeat: forever".to_string(),
        Some(r) => format!("repeat: max_runs {}", r.max_runs),
        None => String::new(),
    };
    let what = match view.loop_status.as_str() {
        "repeating" => "the next run starts when this one succeeds".to_string(),
        "paused" => "a stage is dead-lettered: `gantry dlq retry` resumes it".to_string(),
        "stopped" => "stopped: no run starts after this one".to_string(),
        "finished" => "finished: max_runs reached".to_string(),
        "ended" => "ended: a stage was cancelled or dropped".to_string(),
        other => escape(other).into_owned(),
    };
    Some(format!(
        "loop: {} ({repeat}; {what})",
        escape(&view.loop_status)
    ))
}

/// When each stage could start: its latest input's end, or its submit
/// when it has no input in the view.
fn ready_at(jobs: &[pb::Job]) -> HashMap<u64, u64> {
    let ended: HashMap<u64, u64> = jobs
        .iter()
        .filter_map(|j| j.attempts.last().map(|a| (j.id, a.ended_at_ms)))
        .filter(|(_, end)| *end > 0)
        .collect();
    jobs.iter()
        .map(|j| {
            let inputs = j.depends_on.iter().filter_map(|d| ended.get(d)).max();
            (j.id, inputs.copied().unwrap_or(0).max(j.submitted_at_ms))
        })
        .collect()
}

/// `waited 0.3s, ran 4.1s`: from `ready_ms` to its first attempt's start,
/// and its last attempt's run (`None` before it started).
fn stage_times(job: &pb::Job, ready_ms: u64) -> Option<String> {
    let first = job.attempts.iter().find(|a| a.started_at_ms > 0)?;
    let waited = first.started_at_ms.saturating_sub(ready_ms);
    let last = job.attempts.last()?;
    let mut text = format!("waited {}", seconds(waited));
    if last.ended_at_ms >= last.started_at_ms && last.started_at_ms > 0 {
        let _ = write!(
            text,
            ", ran {}",
            seconds(last.ended_at_ms - last.started_at_ms)
        );
    }
    Some(text)
}

/// `run 2  succeeded  5/5 stages  took 41.2s`.
fn run_line(run: &pb::PipelineRunSummary, now_ms: u64) -> String {
    let time = if run.ended_at_ms > 0 {
        format!(
            "took {}",
            seconds(run.ended_at_ms.saturating_sub(run.submitted_at_ms))
        )
    } else {
        format!(
            "for {}",
            seconds(now_ms.saturating_sub(run.submitted_at_ms))
        )
    };
    format!(
        "run {}  {}  {}/{} stages  {time}",
        run.run,
        escape(&run.state),
        run.succeeded,
        run.stages
    )
}

/// Each stage's depth (the longest chain of inputs above it), by index in
/// `jobs`: one depth-first pass with an explicit stack (a 10,000-stage chain
/// must not overflow the call stack), each stage and edge visited once.
/// Inputs outside the view count as depth 0; a cycle (which the coordinator
/// refuses) is cut where it closes.
fn stage_depths(jobs: &[pb::Job]) -> Vec<usize> {
    let index: HashMap<u64, usize> = jobs.iter().enumerate().map(|(i, j)| (j.id, i)).collect();
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; jobs.len()];
    let mut depth = vec![0usize; jobs.len()];
    for root in 0..jobs.len() {
        if mark[root] != Mark::New {
            continue;
        }
        // (stage, next input to look at)
        let mut stack = vec![(root, 0usize)];
        mark[root] = Mark::Open;
        while let Some(&mut (stage, ref mut next)) = stack.last_mut() {
            let inputs = &jobs[stage].depends_on;
            if let Some(dep) = inputs.get(*next) {
                *next += 1;
                if let Some(&dep) = index.get(dep)
                    && mark[dep] == Mark::New
                {
                    mark[dep] = Mark::Open;
                    stack.push((dep, 0));
                }
                continue;
            }
            depth[stage] = inputs
                .iter()
                .filter_map(|dep| index.get(dep))
                .filter(|&&dep| mark[dep] == Mark::Done)
                .map(|&dep| depth[dep] + 1)
                .max()
                .unwrap_or(0);
            mark[stage] = Mark::Done;
            stack.pop();
        }
    }
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed_stage(id: u64, after: &[u64], submitted: u64, runs: &[(u64, u64)]) -> pb::Job {
        pb::Job {
            id,
            depends_on: after.to_vec(),
            submitted_at_ms: submitted,
            attempts: runs
                .iter()
                .map(|(start, end)| pb::Attempt {
                    started_at_ms: *start,
                    ended_at_ms: *end,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn stage_waits_runs_and_the_loop_line() {
        // a (submitted at 1000) -> b; b's first attempt failed, the second ran.
        let jobs = vec![
            timed_stage(1, &[], 1_000, &[(1_200, 5_200)]),
            timed_stage(2, &[1], 1_000, &[(5_500, 6_000), (16_000, 19_000)]),
            timed_stage(3, &[2], 1_000, &[]),
        ];
        let ready = ready_at(&jobs);
        assert_eq!((ready[&1], ready[&2], ready[&3]), (1_000, 5_200, 19_000));
        let times: Vec<Option<String>> =
            jobs.iter().map(|j| stage_times(j, ready[&j.id])).collect();
        assert_eq!(
            times,
            vec![
                Some("waited 0.2s, ran 4.0s".to_string()),
                Some("waited 0.3s, ran 3.0s".to_string()),
                None,
            ]
        );
        let run = |state: &str, ended| pb::PipelineRunSummary {
            run: 2,
            state: state.into(),
            stages: 5,
            succeeded: 3,
            submitted_at_ms: 10_000,
            ended_at_ms: ended,
        };
        assert_eq!(
            run_line(&run("running", 0), 12_500),
            "run 2  running  3/5 stages  for 2.5s"
        );
        assert_eq!(
            run_line(&run("failed", 41_200), 99_000),
            "run 2  failed  3/5 stages  took 31.2s"
        );
        let view = |status: &str, repeat| pb::PipelineView {
            loop_status: status.into(),
            repeat,
            ..Default::default()
        };
        let forever = Some(pb::PipelineRepeat {
            max_runs: 0,
            forever: true,
        });
        let three = Some(pb::PipelineRepeat {
            max_runs: 3,
            forever: false,
        });
        assert_eq!(loop_line(&view("", None)), None);
        assert_eq!(
            loop_line(&view("paused", forever)).as_deref(),
            Some(
                "loop: paused (repeat: forever; a stage is dead-lettered: `gantry dlq retry` resumes it)"
            )
        );
        assert_eq!(
            loop_line(&view("finished", three)).as_deref(),
            Some("loop: finished (repeat: max_runs 3; finished: max_runs reached)")
        );
    }

    #[test]
    fn escape_shows_what_a_terminal_would_act_on() {
        let cases = [
            (
                "plain",
                "python -m app.train --lr 0.1",
                "python -m app.train --lr 0.1",
            ),
            ("unicode text", "modèle 日本 ✓", "modèle 日本 ✓"),
            ("backslash kept", r"sed s/\./x/", r"sed s/\./x/"),
            (
                "title and clear",
                "\x1b]0;pwned\x07\x1b[2J",
                r"\e]0;pwned\x07\e[2J",
            ),
            ("newline and cr", "a\nb\rc\td", r"a\nb\rc\td"),
            ("nul and del", "\0\x7f", r"\x00\x7f"),
            ("c1 csi", "\u{9b}31m", r"\u{9b}31m"),
            ("bidi override", "abc\u{202e}fed", r"abc\u{202e}fed"),
            ("bidi isolates", "\u{2066}x\u{2069}", r"\u{2066}x\u{2069}"),
            (
                "marks and separators",
                "\u{200f}\u{061c}\u{2028}",
                r"\u{200f}\u{61c}\u{2028}",
            ),
        ];
        for (name, input, expect) in cases {
            assert_eq!(escape(input), expect, "{name}");
        }
        assert!(
            matches!(escape("plain"), Cow::Borrowed(_)),
            "no copy when clean"
        );
    }

    #[test]
    fn command_lines_keep_argument_boundaries() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            command_line(&args(&["echo", "a b", ""])),
            r#"echo "a b" """#
        );
        assert_eq!(
            command_line(&args(&["echo", "\x1b]0;pwned\x07"])),
            r"echo \e]0;pwned\x07"
        );
    }

    fn stage(id: u64, inputs: &[u64]) -> pb::Job {
        pb::Job {
            id,
            depends_on: inputs.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn stage_depths_are_longest_input_chains() {
        // (stage 0 does not exist: the first stage's input is outside the run)
        let cases: Vec<(&str, Vec<pb::Job>, Vec<usize>)> = vec![
            ("none", vec![], vec![]),
            (
                "independent",
                vec![stage(1, &[]), stage(2, &[])],
                vec![0, 0],
            ),
            (
                "diamond, listed backwards",
                vec![
                    stage(4, &[2, 3]),
                    stage(3, &[1]),
                    stage(2, &[1]),
                    stage(1, &[]),
                ],
                vec![2, 1, 1, 0],
            ),
            (
                "longest path wins",
                vec![
                    stage(1, &[]),
                    stage(2, &[1]),
                    stage(3, &[2]),
                    stage(4, &[1, 3]),
                ],
                vec![0, 1, 2, 3],
            ),
            ("input outside the run", vec![stage(5, &[99])], vec![0]),
            (
                "cycle is cut",
                vec![stage(1, &[2]), stage(2, &[1])],
                vec![1, 0],
            ),
        ];
        for (name, jobs, expect) in cases {
            assert_eq!(stage_depths(&jobs), expect, "{name}");
        }
        // A 100,000-stage chain, listed last stage first: no stack overflow.
        let chain: Vec<pb::Job> = (1..=100_000u64)
            .rev()
            .map(|id| stage(id, &[id - 1]))
            .collect();
        assert_eq!(stage_depths(&chain)[0], 99_999);
    }

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
