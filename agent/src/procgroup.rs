//! Process-group signalling. Every job runs in its own process group (its
//! leader's pid is the group id) so that a cancel reaches the whole tree a
//! job forks, not only the process the agent started.

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Sends `signal` to every process of group `pgid`. A group that no longer
/// exists is not an error: it is what the caller wanted.
pub(crate) fn signal_group(pgid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pgid) else { return };
    // pgid 0 or 1 would address the agent's own group or everything; never.
    if raw <= 1 {
        return;
    }
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, ?signal, error = %e, "cannot signal process group"),
    }
}

/// Whether group `pgid` still has a live (non-zombie) member.
///
/// `killpg(pgid, 0)` alone is not enough: orphaned grandchildren are
/// re-parented to PID 1, and where PID 1 does not reap (containers), their
/// zombies keep the group "existing" forever. So a positive answer is checked
/// against `/proc`.
pub(crate) fn group_alive(pgid: u32) -> bool {
    let Ok(raw) = i32::try_from(pgid) else {
        return false;
    };
    if raw <= 1 {
        return false;
    }
    if let Err(Errno::ESRCH) = killpg(Pid::from_raw(raw), None) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            return false;
        };
        matches!(proc_stat(pid), Some(stat) if stat.pgrp == pgid && stat.state != 'Z' && stat.state != 'X')
    })
}

/// Whether process `pid` exists and is not a zombie.
#[cfg(test)]
pub(crate) fn pid_alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some(stat) if stat.state != 'Z' && stat.state != 'X')
}

/// One process, told apart from any later process that reuses its pid by
/// its start time (`/proc/PID/stat` field 22, clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessId {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
}

impl ProcessId {
    /// The live (non-zombie) process `pid`, if any.
    pub fn of(pid: u32) -> Option<ProcessId> {
        let stat = proc_stat(pid)?;
        (stat.state != 'Z' && stat.state != 'X').then_some(ProcessId {
            pid,
            start_time: stat.start_time,
        })
    }

    /// This process.
    pub fn current() -> Option<ProcessId> {
        Self::of(std::process::id())
    }

    /// Whether this very process still runs: its pid is live and started
    /// at the same time (a reused pid is a different process).
    pub fn is_alive(&self) -> bool {
        Self::of(self.pid) == Some(*self)
    }
}

/// The fields of `/proc/<pid>/stat` the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// `R`, `S`, `Z`, ...
    pub state: char,
    /// Parent pid.
    pub ppid: u32,
    /// Process group id.
    pub pgrp: u32,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
}

/// Reads `/proc/<pid>/stat`; `None` when the process is gone.
pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or
    // parentheses, so parse from the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    // Fields 6 to 21 (session .. itrealvalue), then 22: starttime.
    let start_time = fields.nth(16)?.parse().ok()?;
    Some(ProcStat {
        state,
        ppid,
        pgrp,
        start_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_unknown_group_is_not() {
        assert!(pid_alive(std::process::id()));
        let me = proc_stat(std::process::id()).unwrap();
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        assert_eq!(me.pgrp, nix::unistd::getpgrp().as_raw() as u32);
        assert!(!group_alive(0));
        assert!(!group_alive(1));
        // Pids are capped well below this on Linux.
        assert!(!group_alive(i32::MAX as u32 - 1));
    }

    #[test]
    fn a_process_id_with_another_start_time_is_not_alive() {
        let me = ProcessId::current().unwrap();
        assert!(me.is_alive());
        let reused = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.is_alive(), "same pid, other start time");
        assert_eq!(ProcessId::of(i32::MAX as u32 - 1), None);
    }
}
