//! The ground truth of the nemesis: every job's command appends a `start`
//! and an `end` line to one shared ledger file (job id, attempt, pid, the
//! process's start time in clock ticks, wall-clock ms, node, and for `end`
//! the exit code). [`LedgerWatch`] reads the ledger as it grows and notes
//! when a process that never wrote its `end` (killed) was first seen dead, so
//! an interval of a killed process has an upper bound.
//!
//! Each line is one `echo` into a file opened with `O_APPEND` (`>>`), well
//! under `PIPE_BUF`: concurrent jobs never interleave inside a line. A pid
//! is always paired with its start time, so a reused pid is never mistaken
//! for the job's process.
//!
//! The checker that reads it with every replica's storage is in
//! [`crate::verdict`].

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use gantry_scheduler::JobId;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The job's shell script; `$1` ledger, `$2` seconds to sleep, `$3` how many
/// first attempts fail (exit 1) by design, to exercise retry back-off.
const SCRIPT: &str = r#"l=$1; d=$2; f=$3
t=$(cut -d' ' -f22 /proc/$$/stat)
echo "start $GANTRY_JOB_ID $GANTRY_ATTEMPT $$ $t $(date +%s%3N) $GANTRY_NODE" >> "$l"
sleep "$d"
rc=0; [ "$GANTRY_ATTEMPT" -le "$f" ] && rc=1
echo "end $GANTRY_JOB_ID $GANTRY_ATTEMPT $$ $t $(date +%s%3N) $GANTRY_NODE $rc" >> "$l"
exit $rc"#;

/// The argv of a ledger job: sleeps `sleep_ms`, fails its first
/// `failing_attempts` attempts.
pub fn job_command(ledger: &Path, sleep_ms: u64, failing_attempts: u32) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        SCRIPT.into(),
        "sh".into(),
        ledger.display().to_string(),
        format!("{}.{:03}", sleep_ms / 1000, sleep_ms % 1000),
        failing_attempts.to_string(),
    ]
}

/// One ledger line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    /// `None` for `start`, the exit code for `end`.
    end: Option<i32>,
    job: JobId,
    attempt: u32,
    pid: i32,
    ticks: u64,
    at_ms: u64,
    node: String,
}

fn parse_line(line: &str) -> anyhow::Result<Line> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let number = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("ledger line {line:?}: field {} is not a number", i + 1))
    };
    let end = match (fields.first().copied(), fields.len()) {
        (Some("start"), 7) => None,
        (Some("end"), 8) => Some(i32::try_from(number(7)?)?),
        _ => bail!("ledger line {line:?} is torn or malformed"),
    };
    Ok(Line {
        end,
        job: number(1)?,
        attempt: u32::try_from(number(2)?)?,
        pid: i32::try_from(number(3)?)?,
        ticks: number(4)?,
        at_ms: number(5)?,
        node: fields[6].to_string(),
    })
}

/// One process of one job, as the ledger and the watcher saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    /// Job id.
    pub job: JobId,
    /// Attempt number (the fencing token) it was started as.
    pub attempt: u32,
    /// Its pid.
    pub pid: i32,
    /// Its start time in clock ticks since boot (pid reuse guard).
    pub ticks: u64,
    /// Node that started it.
    pub node: String,
    /// When it wrote `start`.
    pub started_ms: u64,
    /// When it wrote `end`, and its exit code.
    pub ended: Option<(u64, i32)>,
    /// When the watcher first saw it gone without an `end` (killed).
    pub dead_by_ms: Option<u64>,
    /// Still running when the cluster went quiet (set by
    /// [`LedgerWatch::mark_survivors`]).
    pub alive_at_end: bool,
}

impl Execution {
    /// Until when it may have run: its end, when it was first seen dead, or
    /// for ever.
    pub fn until_ms(&self) -> u64 {
        self.ended
            .map(|(at, _)| at)
            .or(self.dead_by_ms)
            .unwrap_or(u64::MAX)
    }

    /// It ran to the end and exited 0.
    pub fn succeeded(&self) -> bool {
        matches!(self.ended, Some((_, 0)))
    }

    /// Whether its process is still running (same pid and start time).
    pub fn alive(&self) -> bool {
        process_alive(self.pid, self.ticks)
    }
}

impl std::fmt::Display for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "attempt {} pid {} on {} from {}",
            self.attempt, self.pid, self.node, self.started_ms
        )?;
        match (self.ended, self.dead_by_ms) {
            (Some((at, rc)), _) => write!(f, " to {at} (exit {rc})"),
            (None, Some(dead)) => write!(f, " killed, seen dead at {dead}"),
            (None, None) => write!(f, " never seen to end"),
        }
    }
}

/// Whether `pid` runs, is not a zombie, and started at `ticks` (field 22
/// of `/proc/PID/stat`), so a reused pid does not count.
pub fn process_alive(pid: i32, ticks: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Fields after the parenthesised command: state is field 3, start time 22.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let running = fields.first().is_some_and(|s| *s != "Z" && *s != "X");
    running && fields.get(19).and_then(|t| t.parse::<u64>().ok()) == Some(ticks)
}

/// Reads the ledger as it grows.
pub struct LedgerWatch {
    path: PathBuf,
    offset: u64,
    /// Bytes after the last newline (a line being written).
    partial: String,
    executions: Vec<Execution>,
    /// Executions without `end` nor seen dead, by (pid, ticks).
    open: BTreeMap<(i32, u64), usize>,
}

impl LedgerWatch {
    /// Watches `path` (created empty if missing).
    pub fn new(path: &Path) -> anyhow::Result<LedgerWatch> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("create ledger {}", path.display()))?;
        Ok(LedgerWatch {
            path: path.to_path_buf(),
            offset: 0,
            partial: String::new(),
            executions: Vec::new(),
            open: BTreeMap::new(),
        })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads new lines, then notes the open processes now gone as dead by
    /// `now_ms` (lines first: one that wrote `end` and exited in between
    /// keeps its exact end).
    pub fn poll(&mut self, now_ms: u64) -> anyhow::Result<()> {
        let mut file = std::fs::File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.partial
            .push_str(std::str::from_utf8(&bytes).context("ledger is not UTF-8")?);
        while let Some(newline) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=newline).collect();
            if !line.trim().is_empty() {
                self.apply(parse_line(&line)?)?;
            }
        }
        let executions = &mut self.executions;
        self.open.retain(|_, index| {
            let execution = &mut executions[*index];
            if execution.alive() {
                return true;
            }
            execution.dead_by_ms = Some(now_ms);
            false
        });
        Ok(())
    }

    fn apply(&mut self, line: Line) -> anyhow::Result<()> {
        let key = (line.pid, line.ticks);
        match line.end {
            None => {
                self.open.insert(key, self.executions.len());
                self.executions.push(Execution {
                    job: line.job,
                    attempt: line.attempt,
                    pid: line.pid,
                    ticks: line.ticks,
                    node: line.node,
                    started_ms: line.at_ms,
                    ended: None,
                    dead_by_ms: None,
                    alive_at_end: false,
                });
            }
            Some(rc) => {
                self.open.remove(&key);
                let execution = self
                    .executions
                    .iter_mut()
                    .rev()
                    .find(|e| (e.pid, e.ticks) == key)
                    .with_context(|| {
                        format!(
                            "ledger: end of job {} pid {} without a start",
                            line.job, line.pid
                        )
                    })?;
                execution.ended = Some((line.at_ms, rc));
                // Seen dead between its last write and our read of it.
                execution.dead_by_ms = None;
            }
        }
        Ok(())
    }

    /// Every execution seen so far, in start order.
    pub fn executions(&self) -> &[Execution] {
        &self.executions
    }

    /// Marks the executions still running now (`alive_at_end`).
    pub fn mark_survivors(&mut self) {
        for index in self.open.values() {
            let execution = &mut self.executions[*index];
            execution.alive_at_end = execution.alive();
        }
    }

    /// SIGKILLs the process group of every ledger process still running
    /// (orphans of killed agents); returns how many. Only a process whose
    /// pid and start time both match is signalled.
    pub fn kill_survivors(&self) -> usize {
        self.kill_where(|_| true)
    }

    /// [`LedgerWatch::kill_survivors`] for the processes of one node: the
    /// machine died with its agent.
    pub fn kill_on(&self, node: &str) -> usize {
        self.kill_where(|e| e.node == node)
    }

    fn kill_where(&self, pick: impl Fn(&Execution) -> bool) -> usize {
        let mut killed = 0;
        for index in self.open.values() {
            let execution = &self.executions[*index];
            if pick(execution)
                && execution.alive()
                && killpg(Pid::from_raw(execution.pid), Signal::SIGKILL).is_ok()
            {
                killed += 1;
            }
        }
        killed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_torn_lines_are_refused() {
        let start = parse_line("start 7 2 123 456 1700000000000 node-1").expect("start");
        assert_eq!(
            start,
            Line {
                end: None,
                job: 7,
                attempt: 2,
                pid: 123,
                ticks: 456,
                at_ms: 1_700_000_000_000,
                node: "node-1".into()
            }
        );
        let end = parse_line("end 7 2 123 456 1700000000500 node-1 1").expect("end");
        assert_eq!(end.end, Some(1));
        for torn in [
            "start 7 2 123",
            "end 7 2 123 456 1700000000500 node-1",
            "start 7 2 123 456 17000start 8",
            "begin 7 2 123 456 1 n",
            "start x 2 123 456 1 n",
        ] {
            assert!(parse_line(torn).is_err(), "{torn}");
        }
    }

    #[test]
    fn the_script_writes_what_the_watch_reads() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let ledger = dir.path().join("ledger");
        let mut watch = LedgerWatch::new(&ledger)?;
        for (attempt, failing) in [(1, 1), (2, 1)] {
            let argv = job_command(&ledger, 10, failing);
            let status = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .env("GANTRY_JOB_ID", "42")
                .env("GANTRY_ATTEMPT", attempt.to_string())
                .env("GANTRY_NODE", "node-x")
                .status()?;
            assert_eq!(status.success(), attempt == 2);
        }
        watch.poll(0)?;
        let runs = watch.executions();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].job, runs[0].attempt), (42, 1));
        assert_eq!(runs[0].ended.map(|(_, rc)| rc), Some(1));
        assert!(runs[1].succeeded() && runs[1].until_ms() >= runs[1].started_ms);
        assert_eq!(runs[1].node, "node-x");
        Ok(())
    }

    #[test]
    fn a_killed_process_is_seen_dead_and_a_live_one_survives() -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir()?;
        let ledger = dir.path().join("ledger");
        let mut watch = LedgerWatch::new(&ledger)?;
        let spawn = || {
            let argv = job_command(&ledger, 30_000, 0);
            std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .env("GANTRY_JOB_ID", "1")
                .env("GANTRY_ATTEMPT", "1")
                .env("GANTRY_NODE", "n")
                .process_group(0)
                .spawn()
        };
        let (mut a, mut b) = (spawn()?, spawn()?);
        crate::wait_until("two starts", std::time::Duration::from_secs(10), || {
            watch.poll(1).ok()?;
            (watch.executions().len() == 2).then_some(())
        })?;
        let _ = killpg(Pid::from_raw(a.id() as i32), Signal::SIGKILL);
        a.wait()?;
        watch.poll(5)?;
        watch.mark_survivors();
        let by_pid = |pid: u32| {
            watch
                .executions()
                .iter()
                .find(|e| e.pid == pid as i32)
                .cloned()
                .expect("execution")
        };
        let (dead, live) = (by_pid(a.id()), by_pid(b.id()));
        assert_eq!((dead.dead_by_ms, dead.until_ms()), (Some(5), 5));
        assert!(!dead.alive_at_end);
        assert!(live.alive_at_end && live.until_ms() == u64::MAX);
        assert!(!process_alive(live.pid, live.ticks + 1), "pid reuse guard");
        assert_eq!(watch.kill_survivors(), 1);
        b.wait()?;
        assert!(!live.alive());
        Ok(())
    }
}
