//! Snapshot copies made with the job user's rights (`--run-as`).
//!
//! An agent that runs jobs as another user is root, and root reads every
//! file. So the agent never opens a job's snapshot source itself: it starts
//! a helper, its own binary re-executed as `gantry __snapshot-copy`, which
//! drops to the job's uid, gid and groups (exactly what the job's own
//! process gets: no supplementary groups, as std's `Command::uid` does)
//! before it looks at any path, then runs the same
//! [`copy_tree`](super::copy_tree) into a staging directory the agent handed
//! to that user. The kernel checks every open, symlinks included, so the
//! job gets through a snapshot exactly what it could read itself.
//!
//! Why a process and not a thread with `setfsuid`: a thread keeps the
//! agent's other capabilities (`CAP_SYS_PTRACE` would still open
//! `/proc/<pid>/environ` of root's processes), and a process cannot leak
//! what it was given back into the agent.
//!
//! The request travels in environment variables (the helper starts with an
//! empty environment otherwise); a failure comes back as one JSON line on
//! stderr, so the agent formats it like an in-process error.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{CopyError, check_cancel, copy_tree, msg};
use crate::config::RunAs;

/// The hidden `gantry` subcommand that runs [`helper_main`].
pub const HELPER_ARG: &str = "__snapshot-copy";
const ENV_UID: &str = "GANTRY_SNAPSHOT_UID";
const ENV_GID: &str = "GANTRY_SNAPSHOT_GID";
const ENV_FROM: &str = "GANTRY_SNAPSHOT_FROM";
const ENV_TO: &str = "GANTRY_SNAPSHOT_TO";
/// How often the agent checks the helper and the cancel flag.
const POLL: Duration = Duration::from_millis(10);
/// Most bytes of the helper's stderr kept (its report is one short line).
const MAX_REPORT: u64 = 16 * 1024;
/// Exit code of a helper that could not become the job's user.
const SETUP_FAILED: u8 = 2;
/// Exit code of a helper whose copy failed (the report says why).
const COPY_FAILED: u8 = 1;

/// A failed copy, as the helper reports it.
#[derive(Debug, Serialize, Deserialize)]
struct Failure {
    path: PathBuf,
    /// The OS error number, when there was one.
    errno: Option<i32>,
    message: String,
}

/// Hands the staging directory to `user`, private to it: the helper writes
/// the copies there, as that user.
pub(super) fn prepare_staging(staging: &Path, user: RunAs) -> Result<(), String> {
    let fail = |e: io::Error| {
        format!(
            "cannot hand {} to the job user: {}",
            staging.display(),
            msg(&e)
        )
    };
    std::os::unix::fs::lchown(staging, Some(user.uid), Some(user.gid)).map_err(fail)?;
    std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o700)).map_err(fail)
}

/// Copies `from` to the new path `to` as `user`, in a helper process; a set
/// `cancel` kills the helper.
pub(super) fn copy(
    user: RunAs,
    from: &Path,
    to: &Path,
    cancel: &AtomicBool,
) -> Result<(), CopyError> {
    let at_from = |e: io::Error| (from.to_path_buf(), e);
    let mut child = helper_command()
        .env(ENV_UID, user.uid.to_string())
        .env(ENV_GID, user.gid.to_string())
        .env(ENV_FROM, from)
        .env(ENV_TO, to)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            at_from(io::Error::other(format!(
                "cannot start the snapshot helper: {}",
                msg(&e)
            )))
        })?;
    // Read while it runs, so a chatty helper cannot block on a full pipe.
    let reader = child.stderr.take().map(|stderr| {
        std::thread::spawn(move || {
            let mut report = Vec::new();
            let mut stderr = stderr;
            let _ = (&mut stderr).take(MAX_REPORT).read_to_end(&mut report);
            let _ = io::copy(&mut stderr, &mut io::sink());
            report
        })
    });
    let status = wait_unless_cancelled(&mut child, cancel).map_err(at_from)?;
    let report = reader
        .and_then(|r| r.join().ok())
        .map(|r| String::from_utf8_lossy(&r).into_owned())
        .unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let failure = report
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<Failure>(line).ok());
    Err(match failure {
        Some(f) if status.code() == Some(i32::from(COPY_FAILED)) => (
            f.path,
            match f.errno {
                Some(errno) => io::Error::from_raw_os_error(errno),
                None => io::Error::other(f.message),
            },
        ),
        _ => at_from(io::Error::other(format!(
            "snapshot helper failed ({status}): {}",
            report.lines().last().unwrap_or("no output").trim()
        ))),
    })
}

/// Waits for `child`; kills it (and reaps it) when `cancel` is set.
fn wait_unless_cancelled(child: &mut Child, cancel: &AtomicBool) -> io::Result<ExitStatus> {
    loop {
        let polled = check_cancel(cancel).and_then(|()| child.try_wait());
        match polled {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
    }
}

/// The user's name for messages, or its uid when it has none.
pub(super) fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => format!("uid {uid}"),
    }
}

/// The agent's own binary in helper mode. `/proc/self/exe` rather than a
/// path: it still works after the binary was replaced on disk.
fn helper_command() -> Command {
    let mut command = Command::new("/proc/self/exe");
    command.env_clear();
    #[cfg(not(test))]
    command.arg(HELPER_ARG);
    // A unit test binary has no `gantry` main: it runs one test that plays
    // the helper (see `tests::helper_process`).
    #[cfg(test)]
    command
        .args([
            "--exact",
            "snapshot::as_user::tests::helper_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(tests::HELPER_TEST_ENV, "1");
    command
}

/// Entry point of `gantry __snapshot-copy`: becomes the requested user,
/// copies, and reports. Call it before starting any runtime or thread.
pub fn helper_main() -> ExitCode {
    ExitCode::from(helper_status())
}

fn helper_status() -> u8 {
    let request = (|| {
        let id = |name: &str| -> Result<u32, String> {
            std::env::var(name)
                .map_err(|_| format!("{name} is not set"))?
                .parse()
                .map_err(|_| format!("{name} is not a number"))
        };
        let path = |name: &str| -> Result<PathBuf, String> {
            std::env::var_os(name)
                .map(PathBuf::from)
                .ok_or_else(|| format!("{name} is not set"))
        };
        Ok::<_, String>((id(ENV_UID)?, id(ENV_GID)?, path(ENV_FROM)?, path(ENV_TO)?))
    })();
    let (uid, gid, from, to) = match request {
        Ok(request) => request,
        Err(e) => return setup_failed(&e),
    };
    if let Err(e) = become_user(uid, gid) {
        return setup_failed(&e);
    }
    // Dies with the agent (set after the switch, which clears it).
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    match copy_tree(&from, &to, 0, &AtomicBool::new(false)) {
        Ok(()) => 0,
        Err((path, e)) => {
            let failure = Failure {
                path,
                errno: e.raw_os_error(),
                message: msg(&e),
            };
            match serde_json::to_string(&failure) {
                Ok(line) => eprintln!("{line}"),
                Err(_) => eprintln!("{}: {}", failure.path.display(), failure.message),
            }
            COPY_FAILED
        }
    }
}

fn setup_failed(why: &str) -> u8 {
    let args: Vec<OsString> = std::env::args_os().take(2).collect();
    eprintln!("{args:?}: {why}");
    SETUP_FAILED
}

/// Switches this process to `uid`/`gid` for good, with the credentials std
/// gives the job's process: no supplementary groups when switching from
/// root. Checks the switch took and cannot be undone.
fn become_user(uid: u32, gid: u32) -> Result<(), String> {
    use nix::unistd::{Gid, Uid, getgroups, getresgid, getresuid, setgid, setgroups, setuid};
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    let was_root = nix::unistd::geteuid().is_root();
    if was_root {
        setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    }
    setgid(gid).map_err(|e| format!("setgid {gid}: {e}"))?;
    setuid(uid).map_err(|e| format!("setuid {uid}: {e}"))?;
    let u = getresuid().map_err(|e| format!("getresuid: {e}"))?;
    let g = getresgid().map_err(|e| format!("getresgid: {e}"))?;
    let groups = getgroups().map_err(|e| format!("getgroups: {e}"))?;
    if [u.real, u.effective, u.saved] != [uid; 3]
        || [g.real, g.effective, g.saved] != [gid; 3]
        || (was_root && !groups.iter().all(|&g| g == gid))
    {
        return Err(format!(
            "credentials did not switch to uid {uid} gid {gid}: {u:?} {g:?} groups {groups:?}"
        ));
    }
    if !uid.is_root() && setuid(Uid::from_raw(0)).is_ok() {
        return Err("could switch back to root after dropping privileges".into());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Set in the environment of a test binary started as the helper.
    pub(crate) const HELPER_TEST_ENV: &str = "GANTRY_SNAPSHOT_HELPER_TEST";

    /// Plays `gantry __snapshot-copy` when the test binary is started as the
    /// helper ([`helper_command`]); passes trivially otherwise.
    #[test]
    fn helper_process() {
        if std::env::var_os(HELPER_TEST_ENV).is_some() {
            let status = helper_status();
            // Not `process::exit`: this runs on a libtest worker thread, and
            // std's exit-time cleanup unmaps the main thread's signal stack
            // while the main thread may still be finishing glibc's setxid
            // handler on it (the `setuid` above signals every thread), which
            // crashed the helper with SIGSEGV under load. `exec` ends the
            // other threads in the kernel first, with no cleanup to race.
            use std::os::unix::process::CommandExt;
            let error = Command::new("/bin/sh")
                .args(["-c", &format!("exit {status}")])
                .exec();
            panic!("cannot exec /bin/sh to exit with {status}: {error}");
        }
    }

    #[test]
    fn a_helper_without_a_request_fails_setup() {
        let out = Command::new("/proc/self/exe")
            .args([
                "--exact",
                "snapshot::as_user::tests::helper_process",
                "--nocapture",
            ])
            .env(HELPER_TEST_ENV, "1")
            .env_remove(ENV_UID)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(i32::from(SETUP_FAILED)));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("GANTRY_SNAPSHOT_UID is not set"),
            "{stderr}"
        );
    }
}
