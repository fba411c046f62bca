//! A sandbox for multi-process tests: it starts real `gantry` processes on
//! loopback with port 0 in a temporary directory, runs client commands, waits
//! for state with [`wait_until`] (never a fixed sleep), and stops every
//! process it started when dropped.

pub mod check;
pub mod ledger;
pub mod load;
pub mod nemesis;
pub mod netns;
pub mod proxy;
pub mod verdict;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Path of the `gantry` binary: `GANTRY_BIN`, or the one cargo built next to
/// this test executable (`cargo test --workspace` builds it first).
pub fn gantry_bin() -> PathBuf {
    if let Ok(path) = std::env::var("GANTRY_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // A binary (gantry-bench) sits beside it: target/release/gantry.
    let beside = exe.with_file_name("gantry");
    if beside.is_file() {
        return beside;
    }
    // target/debug/deps/test-xxxx -> target/debug/gantry
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("gantry")
}

/// Polls `predicate` every 50 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut predicate: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = predicate() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process started by the sandbox.
pub struct Proc {
    /// Name for logs.
    pub name: String,
    child: Option<Child>,
    /// Lines of stdout, as they come.
    lines: mpsc::Receiver<String>,
    /// Base URL of its HTTP endpoint (`http://ip:port`), for a coordinator
    /// or `gantry dev` once started.
    pub http: Option<String>,
}

impl Proc {
    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_string());
                    }
                }
                Err(_) => bail!("{} printed no line starting with {prefix:?}", self.name),
            }
        }
    }

    /// The next stdout line, or `None` when none came within `timeout`
    /// (or stdout closed).
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
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

    /// Waits up to `timeout` for the process to exit on its own; its exit
    /// status, or `None` if it still runs (or was already reaped).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let status =
            wait_until("process exit", timeout, || child.try_wait().ok().flatten()).ok()?;
        self.child = None;
        Some(status)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// Output of one CLI run.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code (-1 when killed).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Parses stdout as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "stdout is not JSON: {:?} (stderr {:?})",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `gantry ARGS` against `url` with extra environment, to
/// completion; needs no sandbox, so other threads (a load generator) can.
pub fn run_gantry(url: &str, env: &[(String, String)], args: &[&str]) -> CliOutput {
    run_gantry_in(None, url, env, args)
}

/// The `gantry` binary as a command, run in network namespace `netns`
/// (`ip netns exec` execs it, so the child's pid is gantry's own).
pub fn gantry_command(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(gantry_bin());
            command
        }
        None => Command::new(gantry_bin()),
    }
}

/// [`run_gantry`] in network namespace `netns`.
pub fn run_gantry_in(
    netns: Option<&str>,
    url: &str,
    env: &[(String, String)],
    args: &[&str],
) -> CliOutput {
    let output = gantry_command(netns)
        .args(args)
        .env("GANTRY_ADDR", url)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("run gantry");
    CliOutput {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A temporary cluster of processes.
pub struct Sandbox {
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
    /// `RUST_LOG` of processes started from now on (None: the test's own, or `info`).
    log_filter: Option<String>,
    /// Environment of every client command (TLS files, token).
    client_env: Vec<(String, String)>,
    /// Data directories of the agents started (also `gantry dev`'s), whose
    /// job processes are killed on drop if an agent left any.
    agent_dirs: Vec<PathBuf>,
    /// Extra environment of the daemons started from now on (fault
    /// injection hooks).
    daemon_env: Vec<(String, String)>,
    /// Network namespace that processes and client commands started from
    /// now on run in ([`netns::NetLab`]); `None`: this process's.
    netns: Option<String>,
}

/// A started coordinator.
pub struct CoordinatorHandle {
    /// Index in the sandbox.
    pub index: usize,
    /// `http://host:port`.
    pub url: String,
    /// Base URL of its HTTP endpoint (metrics, JSON API, status page).
    pub http: String,
    /// Its data directory.
    pub data_dir: PathBuf,
}

impl Sandbox {
    /// A new empty sandbox.
    pub fn new() -> anyhow::Result<Sandbox> {
        let dir = tempfile::Builder::new().prefix("gantry-it-").tempdir()?;
        Ok(Sandbox {
            dir,
            procs: Vec::new(),
            log_filter: None,
            client_env: Vec::new(),
            agent_dirs: Vec::new(),
            daemon_env: Vec::new(),
            netns: None,
        })
    }

    /// Sets `RUST_LOG` for the processes started from now on.
    pub fn set_log_filter(&mut self, filter: &str) {
        self.log_filter = Some(filter.to_string());
    }

    /// Sets an environment variable for the daemons started from now on.
    pub fn set_daemon_env(&mut self, key: &str, value: &str) {
        self.daemon_env.push((key.to_string(), value.to_string()));
    }

    /// Runs the processes and client commands started from now on in network
    /// namespace `ns` (`None`: this process's own).
    pub fn set_netns(&mut self, ns: Option<&str>) {
        self.netns = ns.map(str::to_string);
    }

    /// The sandbox's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, name: &str, args: &[String]) -> anyhow::Result<usize> {
        let args = with_http_on_any_port(args);
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        let mut child = gantry_command(self.netns.as_deref())
            .args(args)
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                self.log_filter
                    .clone()
                    .unwrap_or_else(|| std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build it with cargo build)",
                    gantry_bin().display()
                )
            })?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.procs.push(Proc {
            name: name.to_string(),
            child: Some(child),
            lines: rx,
            http: None,
        });
        Ok(self.procs.len() - 1)
    }

    /// A process by index.
    pub fn proc(&mut self, index: usize) -> &mut Proc {
        &mut self.procs[index]
    }

    /// Starts a coordinator on `127.0.0.1:port` (0 = any) with its own data dir
    /// (or `data_dir` to restart on an existing one).
    pub fn start_coordinator(
        &mut self,
        name: &str,
        port: u16,
        data_dir: Option<PathBuf>,
    ) -> anyhow::Result<CoordinatorHandle> {
        let data_dir = data_dir.unwrap_or_else(|| self.dir.path().join(name));
        let args = vec![
            "coordinator".to_string(),
            "--grpc-addr".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        self.start_coordinator_args(name, args, data_dir)
    }

    fn start_coordinator_args(
        &mut self,
        name: &str,
        args: Vec<String>,
        data_dir: PathBuf,
    ) -> anyhow::Result<CoordinatorHandle> {
        let index = self.spawn(name, &args)?;
        let addr = self.procs[index].wait_line("listening grpc=", Duration::from_secs(30))?;
        let http = self.wait_http(index)?;
        Ok(CoordinatorHandle {
            index,
            url: format!("http://{addr}"),
            http,
            data_dir,
        })
    }

    /// Reads the `listening http=` line that follows `listening grpc=`.
    fn wait_http(&mut self, index: usize) -> anyhow::Result<String> {
        let addr = self.procs[index].wait_line("listening http=", Duration::from_secs(30))?;
        let http = format!("http://{addr}");
        self.procs[index].http = Some(http.clone());
        Ok(http)
    }

    /// Starts a coordinator on 127.0.0.1 (any port) with extra flags.
    pub fn start_coordinator_with(
        &mut self,
        name: &str,
        extra: &[&str],
    ) -> anyhow::Result<CoordinatorHandle> {
        self.start_coordinator_at(name, 0, extra)
    }

    /// Starts a coordinator on `127.0.0.1:port` with its own data dir and
    /// extra flags (e.g. `--restore FILE` on a port agents already know).
    pub fn start_coordinator_at(
        &mut self,
        name: &str,
        port: u16,
        extra: &[&str],
    ) -> anyhow::Result<CoordinatorHandle> {
        let data_dir = self.dir.path().join(name);
        let mut args = vec![
            "coordinator".to_string(),
            "--grpc-addr".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        self.start_coordinator_args(name, args, data_dir)
    }

    /// Starts an agent with fake GPUs, advertising `address`.
    pub fn start_agent(
        &mut self,
        name: &str,
        coordinators: &str,
        fake_gpus: &str,
        address: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<usize> {
        self.start_agent_with(name, coordinators, fake_gpus, address, labels, &[])
    }

    /// [`Sandbox::start_agent`] with extra flags.
    pub fn start_agent_with(
        &mut self,
        name: &str,
        coordinators: &str,
        fake_gpus: &str,
        address: &str,
        labels: &[(&str, &str)],
        extra: &[&str],
    ) -> anyhow::Result<usize> {
        give_fake_disk(&self.agent_dir(name))?;
        if !self.agent_dirs.contains(&self.agent_dir(name)) {
            self.agent_dirs.push(self.agent_dir(name));
        }
        let mut args = vec![
            "agent".to_string(),
            "--name".into(),
            name.into(),
            "--coordinators".into(),
            coordinators.into(),
            "--address".into(),
            address.into(),
            "--data-dir".into(),
            self.agent_dir(name).display().to_string(),
            "--fake-gpus".into(),
            fake_gpus.into(),
            // Agents keep their jobs over a restart by default; a sandbox
            // must end every process it caused.
            "--stop-jobs-on-exit".into(),
        ];
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        self.spawn(name, &args)
    }

    /// Starts a long-lived client command (`gantry ARGS --addr URL`, e.g.
    /// `watch` or `logs -f`) as a sandbox process.
    pub fn start_client(&mut self, name: &str, url: &str, args: &[&str]) -> anyhow::Result<usize> {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push("--addr".into());
        args.push(url.into());
        self.spawn(name, &args)
    }

    /// An agent's data directory.
    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}-data"))
    }

    /// Runs `gantry ARGS --addr URL` to completion.
    pub fn gantry(&self, url: &str, args: &[&str]) -> CliOutput {
        run_gantry_in(self.netns.as_deref(), url, &self.client_env, args)
    }

    /// Runs a client command with `-o json` and parses its output; fails on a non-zero exit.
    pub fn gantry_json(&self, url: &str, args: &[&str]) -> anyhow::Result<Value> {
        // Before any `--`, so it never lands in a job's command.
        let mut all: Vec<&str> = args.to_vec();
        let at = all.iter().position(|a| *a == "--").unwrap_or(all.len());
        all.splice(at..at, ["-o", "json"]);
        let out = self.gantry(url, &all);
        if out.code != 0 {
            bail!("gantry {args:?} exited {}: {}", out.code, out.stderr.trim());
        }
        out.json()
    }

    /// Submits with flags and returns the job id.
    pub fn submit(&self, url: &str, args: &[&str]) -> anyhow::Result<u64> {
        let mut all = vec!["submit"];
        all.extend_from_slice(args);
        let value = self.gantry_json(url, &all)?;
        value["job_ids"][0]
            .as_u64()
            .context("no job id in submit output")
    }

    /// Whether no job is left unfinished (pending, assigned, running, failed
    /// awaiting retry, or lost); `None` when the cluster does not answer.
    pub fn all_jobs_ended(&self, url: &str) -> Option<bool> {
        let open = self
            .gantry_json(
                url,
                &[
                    "jobs",
                    "--state",
                    "pending,assigned,running,failed,lost",
                    "--limit",
                    "1",
                ],
            )
            .ok()?;
        Some(open.as_array()?.is_empty())
    }

    /// A job as JSON.
    pub fn job(&self, url: &str, id: u64) -> anyhow::Result<Value> {
        self.gantry_json(url, &["job", &id.to_string()])
    }

    /// Waits until a job reaches `state`; fails early when it reaches
    /// another terminal state.
    pub fn wait_job_state(
        &self,
        url: &str,
        id: u64,
        state: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let mut last = Value::Null;
        let result = wait_until(&format!("job {id} to be {state}"), timeout, || {
            let job = self.job(url, id).ok()?;
            last = job.clone();
            (job["state"] == state).then_some(job)
        });
        result.with_context(|| format!("last seen: {last}"))
    }

    /// Waits until the cluster lists `count` connected, ready nodes.
    pub fn wait_nodes_ready(
        &self,
        url: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        wait_until(&format!("{count} ready nodes"), timeout, || {
            let nodes = self.gantry_json(url, &["nodes"]).ok()?;
            let ready = nodes
                .as_array()?
                .iter()
                .filter(|n| n["state"] == "ready" && n["connected"] == true)
                .count();
            (ready == count).then_some(nodes)
        })
    }

    /// The log of a process, for failure messages.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Agents first and gracefully, so they stop the jobs they run
        // (`--stop-jobs-on-exit`).
        for proc in self.procs.iter_mut().rev() {
            proc.stop(Duration::from_secs(10));
        }
        // Jobs of agents that were killed (their supervisors outlive them),
        // by recorded pid and start time.
        for dir in &self.agent_dirs {
            let left = gantry_agent::supervisor::kill_leftovers(dir);
            if left > 0 {
                eprintln!(
                    "killed the processes of {left} attempts left under {}",
                    dir.display()
                );
            }
        }
        // The test harness captures this and shows it only for failed tests
        // (which may fail by returning Err, not only by panicking).
        {
            for proc in &self.procs {
                let log =
                    std::fs::read_to_string(self.dir.path().join(format!("{}.log", proc.name)))
                        .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- {} log (last 40 lines) ----", proc.name);
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A log without its ANSI colours (the daemons' logs are coloured).
pub fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a process id is alive (and not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // state is the field after the parenthesised command name
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            state.is_some_and(|s| s != "Z" && s != "X")
        }
        Err(_) => false,
    }
}

impl Sandbox {
    /// Starts `gantry dev` on port 0 with its data in the sandbox; returns
    /// the process index and the coordinator URL.
    pub fn start_dev(&mut self, name: &str, fake_gpus: &str) -> anyhow::Result<(usize, String)> {
        give_fake_disk(&self.dir.path().join(name).join("agent"))?;
        self.agent_dirs
            .push(self.dir.path().join(name).join("agent"));
        let args = vec![
            "dev".to_string(),
            "--grpc-addr".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            self.dir.path().join(name).display().to_string(),
            "--fake-gpus".into(),
            fake_gpus.into(),
        ];
        let index = self.spawn(name, &args)?;
        let addr = self.procs[index].wait_line("listening grpc=", Duration::from_secs(30))?;
        self.wait_http(index)?;
        Ok((index, format!("http://{addr}")))
    }

    /// Sends SIGINT (Ctrl-C) and waits for the exit status.
    pub fn interrupt(
        &mut self,
        index: usize,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let proc = &mut self.procs[index];
        let child = proc.child.as_mut().context("already stopped")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGINT)?;
        let status = wait_until("exit after Ctrl-C", timeout, || {
            child.try_wait().ok().flatten()
        })?;
        proc.child = None;
        Ok(status)
    }
}

/// Daemons serve HTTP on 127.0.0.1:7080 by default; in the sandbox many run
/// side by side, so each coordinator or `gantry dev` not told otherwise gets
/// HTTP on its gRPC address's IP, any port (printed as `listening http=`).
fn with_http_on_any_port(args: &[String]) -> Vec<String> {
    let mut args = args.to_vec();
    let daemon = matches!(
        args.first().map(String::as_str),
        Some("coordinator" | "dev")
    );
    if !daemon || args.iter().any(|a| a == "--http-addr") {
        return args;
    }
    let ip = args
        .iter()
        .position(|a| a == "--grpc-addr")
        .and_then(|i| args.get(i + 1))
        .and_then(|addr| addr.rsplit_once(':'))
        .map_or("127.0.0.1".to_string(), |(ip, _)| ip.to_string());
    args.push("--http-addr".into());
    args.push(format!("{ip}:0"));
    args
}

/// Fake agents would report the host's real data volume, so a build
/// machine's full disk would put every test node under disk backpressure.
/// Unless a test already wrote its own `fake-state.json`, give the agent a
/// roomy fake disk (100 GiB used of 1 TiB).
fn give_fake_disk(agent_dir: &Path) -> anyhow::Result<()> {
    let state = agent_dir.join("fake-state.json");
    if state.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(agent_dir)?;
    std::fs::write(
        state,
        format!(
            r#"{{"disk_used_bytes": {}, "disk_total_bytes": {}}}"#,
            100u64 << 30,
            1u64 << 40
        ),
    )?;
    Ok(())
}

/// A free TCP port on `ip` (bound and released; the caller binds it next).
pub fn free_port(ip: &str) -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind((ip, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The `--peers` value for replicas 1..=N at `urls` (in id order).
pub fn peers_flag(urls: &[String]) -> String {
    urls.iter()
        .enumerate()
        .map(|(i, u)| format!("{}={u}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// A three-replica coordinator cluster on 127.0.0.11..13.
pub struct ReplicaSet {
    /// Process index of each replica in the sandbox (by id - 1), `None` when stopped.
    pub procs: Vec<Option<usize>>,
    /// Client URL of each replica.
    pub urls: Vec<String>,
    /// `--grpc-addr` of each replica.
    pub listen: Vec<String>,
    /// `--peers` value of each replica.
    pub peers: Vec<String>,
    /// Extra flags for every replica.
    pub extra_args: Vec<String>,
    /// Data directory of each replica.
    pub dirs: Vec<PathBuf>,
}

impl ReplicaSet {
    /// All URLs, comma-separated (what clients and agents are given).
    pub fn addrs(&self) -> String {
        self.urls.join(",")
    }
}

impl Sandbox {
    /// Starts three coordinator replicas on 127.0.0.11, .12, .13.
    pub fn start_replicas(&mut self, extra_args: &[&str]) -> anyhow::Result<ReplicaSet> {
        self.start_replicas_on("http", extra_args)
    }

    /// [`Sandbox::start_replicas`] with peer and client URLs of `scheme`
    /// (`https` for replicas started with TLS flags in `extra_args`).
    pub fn start_replicas_on(
        &mut self,
        scheme: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<ReplicaSet> {
        let mut urls = Vec::new();
        for i in 1..=3 {
            let ip = format!("127.0.0.{}", 10 + i);
            urls.push(format!("{scheme}://{ip}:{}", free_port(&ip)?));
        }
        let peers = peers_flag(&urls);
        let dirs: Vec<PathBuf> = (1..=3)
            .map(|i| self.dir.path().join(format!("replica-{i}")))
            .collect();
        let prefix = format!("{scheme}://");
        let listen = urls
            .iter()
            .map(|u| u.trim_start_matches(&prefix).to_string())
            .collect();
        let mut set = ReplicaSet {
            procs: vec![None; 3],
            urls,
            listen,
            peers: vec![peers; 3],
            dirs,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        for id in 1..=3 {
            self.start_replica(&mut set, id)?;
        }
        Ok(set)
    }

    /// (Re)starts replica `id` (1-based) of a set on its address and data dir.
    pub fn start_replica(&mut self, set: &mut ReplicaSet, id: usize) -> anyhow::Result<()> {
        let mut args = vec![
            "coordinator".to_string(),
            "--id".into(),
            id.to_string(),
            "--peers".into(),
            set.peers[id - 1].clone(),
            "--grpc-addr".into(),
            set.listen[id - 1].clone(),
            "--data-dir".into(),
            set.dirs[id - 1].display().to_string(),
        ];
        args.extend(set.extra_args.iter().cloned());
        let name = format!("replica-{id}-{}", self.procs.len());
        let index = self.spawn(&name, &args)?;
        self.procs[index].wait_line("listening grpc=", Duration::from_secs(30))?;
        self.wait_http(index)?;
        set.procs[id - 1] = Some(index);
        Ok(())
    }

    /// The 1-based id of the current leader, per the replicas' own status.
    pub fn leader_of(&self, set: &ReplicaSet) -> Option<usize> {
        set.urls.iter().enumerate().find_map(|(i, url)| {
            set.procs[i]?;
            let status = self.gantry_json(url, &["status"]).ok()?;
            (status["is_leader"] == true).then_some(i + 1)
        })
    }

    /// Waits until every replica at `urls` has applied the commit index
    /// that the one of them leading reports now. A follower learns a
    /// commit index with the leader's next append or heartbeat (there is
    /// no message of its own for it), so its applied state may trail an
    /// acknowledged write by up to a heartbeat: a test that reads stopped
    /// replicas' storage waits for this before stopping them.
    pub fn wait_applied(&self, urls: &[String], timeout: Duration) -> anyhow::Result<()> {
        let target = wait_until("a leader to read the commit index of", timeout, || {
            urls.iter().find_map(|url| {
                let status = self.gantry_json(url, &["status"]).ok()?;
                (status["is_leader"] == true).then(|| status["commit_index"].as_u64())?
            })
        })?;
        for url in urls {
            wait_until("every replica to apply the commit index", timeout, || {
                let status = self.gantry_json(url, &["status"]).ok()?;
                (status["applied_index"].as_u64()? >= target).then_some(())
            })?;
        }
        Ok(())
    }
}

/// Three replicas whose links all pass through [`proxy::Proxy`]s the test
/// controls: one per ordered pair of replicas (Raft traffic) and one per
/// replica for clients and agents.
pub struct PartitionableReplicas {
    /// The replicas; `urls` are the client proxies.
    pub set: ReplicaSet,
    /// Pair proxies: (from, to) 1-based ids.
    pub links: BTreeMap<(usize, usize), proxy::Proxy>,
    /// Client proxies, by replica (index id - 1).
    pub clients: Vec<proxy::Proxy>,
}

impl PartitionableReplicas {
    /// Cuts every Raft link to and from replica `id` (clients still reach it).
    pub fn isolate(&self, id: usize) {
        for ((from, to), link) in &self.links {
            if *from == id || *to == id {
                link.cut();
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        for link in self.links.values() {
            link.heal();
        }
    }
}

impl Sandbox {
    /// Starts three replicas on 127.0.0.11..13 behind proxies.
    pub fn start_partitionable_replicas(&mut self) -> anyhow::Result<PartitionableReplicas> {
        let mut listen = Vec::new();
        for i in 1..=3 {
            let ip = format!("127.0.0.{}", 10 + i);
            listen.push(format!("{ip}:{}", free_port(&ip)?));
        }
        let target =
            |i: usize| -> anyhow::Result<std::net::SocketAddr> { Ok(listen[i - 1].parse()?) };
        let mut clients = Vec::new();
        for i in 1..=3 {
            clients.push(proxy::Proxy::start(
                &format!("127.0.0.{}", 20 + i),
                target(i)?,
            )?);
        }
        let mut links = BTreeMap::new();
        for from in 1..=3 {
            for to in 1..=3 {
                if from != to {
                    links.insert((from, to), proxy::Proxy::start("127.0.0.1", target(to)?)?);
                }
            }
        }
        let urls: Vec<String> = clients
            .iter()
            .map(|p| format!("http://{}", p.addr))
            .collect();
        let peers = (1..=3)
            .map(|me| {
                (1..=3)
                    .map(|j| match links.get(&(me, j)) {
                        Some(link) => format!("{j}=http://{}", link.addr),
                        None => format!("{j}={}", urls[j - 1]),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        let dirs: Vec<PathBuf> = (1..=3)
            .map(|i| self.dir.path().join(format!("replica-{i}")))
            .collect();
        let mut set = ReplicaSet {
            procs: vec![None; 3],
            urls,
            listen,
            peers,
            dirs,
            extra_args: Vec::new(),
        };
        for id in 1..=3 {
            self.start_replica(&mut set, id)?;
        }
        Ok(PartitionableReplicas {
            set,
            links,
            clients,
        })
    }

    /// Stops a replica gracefully (SIGTERM), so its storage can be read.
    pub fn stop_replica(&mut self, set: &mut ReplicaSet, id: usize) {
        if let Some(index) = set.procs[id - 1].take() {
            self.procs[index].stop(Duration::from_secs(10));
        }
    }

    /// Stops every replica of `set`, then checks over their storage that
    /// each holds `jobs` jobs and that they agree
    /// ([`check::check_replicas`]).
    pub fn stop_and_check_replicas(
        &mut self,
        set: &mut ReplicaSet,
        jobs: usize,
    ) -> anyhow::Result<()> {
        for id in 1..=set.procs.len() {
            self.stop_replica(set, id);
        }
        let replicas = check::read_replicas(&set.dirs)?;
        for (i, replica) in replicas.iter().enumerate() {
            anyhow::ensure!(
                replica.jobs.len() == jobs,
                "replica {} has {} jobs, not every one of {jobs}",
                i + 1,
                replica.jobs.len()
            );
        }
        check::check_replicas(&replicas)
    }
}

/// One HTTP response, as the sandbox's tiny client reads it.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines as (lowercase name, value).
    pub headers: Vec<(String, String)>,
    /// Body text.
    pub body: String,
}

impl HttpResponse {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("HTTP {} body is not JSON: {}", self.status, self.body))
    }
}

/// `GET base+path` over HTTP/1.0 (so the body ends at close, never chunked);
/// enough for the coordinator's read-only endpoints without an HTTP crate.
pub fn http_get(base: &str, path: &str, accept: Option<&str>) -> anyhow::Result<HttpResponse> {
    let accept: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
    http_request(base, "GET", path, &accept, b"")
}

/// `METHOD base+path` with `headers` and `body` over HTTP/1.0 (the answer
/// ends at close, never chunked), for the JSON API's writes.
pub fn http_request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    use std::io::Read;
    let mut stream = http_send(base, method, path, headers, body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response: {raw}"))?;
    let (status, headers) = parse_head(head)?;
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Sends one HTTP/1.0 request and returns the connection to read the
/// answer from (10 s read timeout): for streamed answers (Server-Sent
/// Events, followed logs) read with [`read_http_head`] and then line by line.
pub fn http_send(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<std::net::TcpStream> {
    use std::io::Write;
    let authority = base
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {base}"))?
        .trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(authority)
        .with_context(|| format!("cannot connect to {authority}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head =
        format!("{method} {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method != "GET" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    Ok(stream)
}

/// Reads a response's status line and headers from `reader`, leaving it at
/// the start of the body.
pub fn read_http_head(
    reader: &mut impl std::io::BufRead,
) -> anyhow::Result<(u16, Vec<(String, String)>)> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    parse_head(&head)
}

fn parse_head(head: &str) -> anyhow::Result<(u16, Vec<(String, String)>)> {
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in {head}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}

/// Samples of a Prometheus text exposition: (name, labels, value).
pub fn parse_samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let labels = rest
                    .trim_end_matches('}')
                    .split("\",")
                    .filter_map(|pair| pair.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push((name, labels, value));
    }
    out
}

/// Whether tests must find external tools (promtool, chromium) rather than
/// skip the parts that need them: `.ci/run` installs them and sets this.
pub fn tools_required() -> bool {
    std::env::var_os("GANTRY_REQUIRE_TOOLS").is_some_and(|v| v == "1")
}

/// The path of an external tool on PATH, or None (failing when
/// [`tools_required`]).
pub fn find_tool(name: &str) -> anyhow::Result<Option<PathBuf>> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    match found {
        Some(path) => Ok(Some(path)),
        None if tools_required() => {
            bail!("{name} is required (GANTRY_REQUIRE_TOOLS=1) but not on PATH")
        }
        None => {
            eprintln!(
                "note: {name} is not installed; skipping the part of this test that needs it"
            );
            Ok(None)
        }
    }
}

/// Security helpers (TLS, tokens): certificates from `gantry certs init`.
impl Sandbox {
    /// Sets (or replaces) an environment variable of every later client
    /// command, e.g. `GANTRY_TLS_CA` or `GANTRY_TOKEN`; an empty value removes it.
    pub fn set_client_env(&mut self, key: &str, value: &str) {
        self.client_env.retain(|(k, _)| k != key);
        if !value.is_empty() {
            self.client_env.push((key.to_string(), value.to_string()));
        }
    }

    /// Runs `gantry certs init --dir <sandbox>/NAME [--host H...]` and
    /// returns the directory.
    pub fn certs_init(&self, name: &str, hosts: &[&str]) -> anyhow::Result<PathBuf> {
        let dir = self.dir.path().join(name);
        let output = Command::new(gantry_bin())
            .args(["certs", "init", "--dir"])
            .arg(&dir)
            .args(hosts.iter().flat_map(|h| ["--host", h]))
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            bail!(
                "gantry certs init failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(dir)
    }

    /// Runs `gantry ARGS` (no address, no client environment), killed after
    /// `timeout`: for commands that must refuse to start.
    pub fn gantry_bounded(&self, args: &[&str], timeout: Duration) -> CliOutput {
        let mut child = Command::new(gantry_bin())
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run gantry");
        let deadline = Instant::now() + timeout;
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
        }
        let output = child.wait_with_output().expect("wait for gantry");
        CliOutput {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Runs `body` on a single-threaded runtime with a raw client-API
/// connection to `url` (no CLI checks in between). Requests may be up to
/// 64 MiB, so oversized ones reach the coordinator's own size checks
/// instead of being refused by the client.
pub fn with_grpc_client<T, F>(
    url: &str,
    body: impl FnOnce(gantry_proto::gantry_client::GantryClient<tonic::transport::Channel>) -> F,
) -> anyhow::Result<T>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = gantry_proto::gantry_client::GantryClient::connect(url.to_string())
            .await?
            .max_encoding_message_size(64 << 20);
        body(client).await
    })
}
