//! Child processes for the multi-process scenarios: started with stdout
//! read line by line on a thread and stderr to a log file, and stopped
//! (SIGTERM, then SIGKILL) when their [`ProcGroup`] is dropped, on success
//! and on error alike.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One started process.
pub struct Proc {
    /// Name for messages (also the log file's stem).
    pub name: String,
    /// Where its stderr goes.
    pub log: PathBuf,
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Waits for a stdout line starting with `prefix`; returns the rest.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_string());
                    }
                }
                Err(_) => {
                    let exited = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                        .map(|s| format!(" (it exited: {s})"))
                        .unwrap_or_default();
                    bail!(
                        "{} printed no line starting with {prefix:?} within {timeout:?}{exited}; log tail:\n{}",
                        self.name,
                        log_tail(&self.log, 20)
                    );
                }
            }
        }
    }

    /// SIGKILL, then reap. Returns whether it was running.
    pub fn kill9(&mut self) -> bool {
        match self.child.take() {
            Some(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
                true
            }
            None => false,
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it was started and not stopped by us.
    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }
}

/// Processes stopped together on drop, with a temporary directory removed
/// after them.
pub struct ProcGroup {
    procs: Vec<Proc>,
    // Dropped after the processes are stopped (field order would drop it
    // first, so `Drop` stops them explicitly).
    dir: tempfile::TempDir,
}

impl ProcGroup {
    /// An empty group with a fresh temporary directory named `prefix*`.
    pub fn new(prefix: &str) -> anyhow::Result<ProcGroup> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        Ok(ProcGroup {
            procs: Vec::new(),
            dir,
        })
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `program args` with `env`; returns its index.
    pub fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<usize> {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file));
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining after the receiver is gone so the child never
            // blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        self.procs.push(Proc {
            name: name.to_string(),
            log,
            child: Some(child),
            lines: rx,
        });
        Ok(self.procs.len() - 1)
    }

    /// Starts one `gantry coordinator` (`args` after the binary) named
    /// `coordinator` with `RUST_LOG=log_level`, waits until it listens, and
    /// returns its pid (for `/proc/PID/...`).
    pub fn spawn_coordinator(
        &mut self,
        gantry: &Path,
        args: &[String],
        log_level: &str,
    ) -> anyhow::Result<String> {
        let index = self.spawn("coordinator", gantry, args, &[("RUST_LOG", log_level)])?;
        let proc = self.proc(index);
        proc.wait_line("listening grpc=", std::time::Duration::from_secs(30))?;
        Ok(proc.pid().context("coordinator pid")?.to_string())
    }

    /// A process by index.
    pub fn proc(&mut self, index: usize) -> &mut Proc {
        &mut self.procs[index]
    }

    /// The process ids of the processes at `indices` that run.
    pub fn pids(&self, indices: &[usize]) -> Vec<u32> {
        indices
            .iter()
            .filter_map(|index| self.procs.get(*index)?.pid())
            .collect()
    }

    /// The last lines of every process's log, for error messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for p in &self.procs {
            out.push_str(&format!(
                "---- {} ----\n{}\n",
                p.name,
                log_tail(&p.log, lines)
            ));
        }
        out
    }

    /// Stops every process (SIGTERM, `grace`, SIGKILL).
    pub fn stop_all(&mut self, grace: Duration) {
        for p in &self.procs {
            if let Some(pid) = p.child.as_ref().and_then(|c| i32::try_from(c.id()).ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        for p in self.procs.iter_mut() {
            p.stop(grace);
        }
    }
}

impl Drop for ProcGroup {
    fn drop(&mut self) {
        self.stop_all(Duration::from_secs(3));
    }
}

/// `/proc/PID/stat` times are in USER_HZ, which Linux fixes at 100.
pub const CLOCK_TICKS_PER_S: f64 = 100.0;

/// CPU ticks (utime + stime, in [`CLOCK_TICKS_PER_S`]) a process has used
/// so far; `pid` is a number or `self`.
pub fn cpu_ticks(pid: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// CPU time used by a set of processes, and by this one, between two
/// readings: a figure of work done that, unlike throughput, does not
/// depend much on what else the (shared, 2-core) machine runs meanwhile.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    pids: Vec<u32>,
    start: Vec<u64>,
    own_start: u64,
}

impl CpuMeter {
    /// Starts measuring `pids` and this process now.
    pub fn start(pids: Vec<u32>) -> anyhow::Result<CpuMeter> {
        let start = pids
            .iter()
            .map(|pid| cpu_ticks(&pid.to_string()))
            .collect::<anyhow::Result<_>>()?;
        Ok(CpuMeter {
            pids,
            start,
            own_start: cpu_ticks("self")?,
        })
    }

    /// CPU time since [`start`](Self::start).
    pub fn used(&self) -> anyhow::Result<CpuUsed> {
        let mut ticks = 0;
        for (pid, start) in self.pids.iter().zip(&self.start) {
            ticks += cpu_ticks(&pid.to_string())?.saturating_sub(*start);
        }
        let own = cpu_ticks("self")?.saturating_sub(self.own_start);
        let time = |ticks: u64| Duration::from_secs_f64(ticks as f64 / CLOCK_TICKS_PER_S);
        Ok(CpuUsed {
            measured: time(ticks),
            own: time(own),
        })
    }

    /// [`used`](Self::used) of a meter that may have failed to start;
    /// `None`, with the reason printed under `scenario`'s name, when a
    /// reading failed (a figure reported missing, never as 0).
    pub fn used_or_report(meter: anyhow::Result<CpuMeter>, scenario: &str) -> Option<CpuUsed> {
        meter
            .and_then(|meter| meter.used())
            .inspect_err(|error| eprintln!("{scenario}: cannot read the CPU time used: {error:#}"))
            .ok()
    }
}

/// What a [`CpuMeter`] read: the measured processes' CPU time, summed, and
/// this process's.
#[derive(Debug, Clone, Copy)]
pub struct CpuUsed {
    /// The measured processes (the servers under load), summed.
    pub measured: Duration,
    /// This process (the load generator).
    pub own: Duration,
}

impl CpuUsed {
    /// Per operation, µs: (the measured processes', this process's);
    /// `None` when there were no operations.
    pub fn per_op_us(&self, ops: usize) -> Option<(f64, f64)> {
        let per_op = |cpu: Duration| cpu.as_secs_f64() * 1e6 / ops as f64;
        (ops > 0).then(|| (per_op(self.measured), per_op(self.own)))
    }
}

/// The last `n` lines of a file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Refuses to start a scenario without the `gantry` binary it runs, saying
/// how to build it.
pub fn require_gantry(gantry: &Path) -> anyhow::Result<()> {
    if !gantry.is_file() {
        bail!(
            "no gantry binary at {} (build it: cargo build --release -p gantry, or pass --gantry)",
            gantry.display()
        );
    }
    Ok(())
}

/// `count` distinct free TCP ports on `127.0.0.1` (all bound at once, then
/// released for the caller to bind).
pub fn free_ports(count: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)))
        .collect::<Result<_, _>>()?;
    Ok(listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<_, _>>()?)
}

/// Runs a scenario that starts processes on its own tokio runtime, then
/// stops the runtime's tasks and every process, whatever the outcome. An
/// error carries the last `log_lines` lines of each process's log.
pub fn run_scenario<R>(
    prefix: &str,
    log_lines: usize,
    scenario: impl AsyncFnOnce(&mut ProcGroup) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut procs = ProcGroup::new(prefix)?;
    let result = runtime.block_on(scenario(&mut procs));
    // Stop the simulated fleet's tasks before the coordinators go.
    runtime.shutdown_timeout(Duration::from_secs(1));
    procs.stop_all(Duration::from_secs(3));
    result.map_err(|error| {
        error.context(format!(
            "coordinator logs (last {log_lines} lines each):\n{}",
            procs.log_tails(log_lines)
        ))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cpu_per_operation_is_missing_without_operations() {
        let used = CpuUsed {
            measured: Duration::from_millis(300),
            own: Duration::from_millis(30),
        };
        assert_eq!(used.per_op_us(1_000), Some((300.0, 30.0)));
        assert_eq!(used.per_op_us(0), None);
    }
}
