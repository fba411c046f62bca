//! Full disks (issue 15, item 5), coordinator side: a coordinator whose
//! data volume (a small tmpfs mounted here) fills refuses client writes
//! with RESOURCE_EXHAUSTED and one line, keeps serving reads, resumes once
//! space is freed, and its state survives a restart intact. Needs `mount`
//! (root); without it the test says so and skips, unless
//! GANTRY_REQUIRE_TOOLS=1.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gantry_integration_tests::{Sandbox, tools_required};

const T: Duration = Duration::from_secs(30);

/// A tmpfs mounted for the test, unmounted when dropped (also on panic).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `dir`; `None` (after saying why) when
    /// mounting is not permitted here and tools are not required.
    fn mount(dir: &Path, size: &str) -> anyhow::Result<Option<Tmpfs>> {
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        let why = match out {
            Ok(out) if out.status.success() => return Ok(Some(Tmpfs(dir.to_path_buf()))),
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            Err(error) => error.to_string(),
        };
        anyhow::ensure!(
            !tools_required(),
            "cannot mount a tmpfs (GANTRY_REQUIRE_TOOLS=1): {why}"
        );
        eprintln!("SKIPPED: the full-disk test needs to mount a tmpfs (root): {why}");
        Ok(None)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the volume of `dir` until a write fails for lack of space.
fn fill(path: &Path) -> anyhow::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0xa5u8; 1 << 20];
    loop {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
            Err(error) => return Err(error.into()),
        }
    }
    // The last partial chunk may have left a few bytes: fill them too.
    let _ = file.write_all(&[0; 4096]);
    Ok(())
}

#[test]
fn a_full_data_volume_refuses_writes_serves_reads_and_resumes() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let volume = sandbox.path().join("volume");
    // Unmounted on drop, also on panic (the sandbox's processes are
    // stopped first on success; a lazy unmount copes with the rest).
    let Some(mount) = Tmpfs::mount(&volume, "160m")? else {
        return Ok(());
    };
    let data_dir = volume.join("coordinator");
    let coordinator = sandbox.start_coordinator("coordinator", 0, Some(data_dir.clone()))?;
    let url = coordinator.url.clone();
    let before = sandbox.submit(&url, &["--", "true"])?;

    let filler = volume.join("filler");
    fill(&filler)?;
    let out = sandbox.gantry(&url, &["submit", "--", "true"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("is full")
            && out
                .stderr
                .contains("writes are refused until space is freed"),
        "{out:?}"
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "one line: {out:?}");
    let out = sandbox.gantry(&url, &["cancel", &before.to_string()]);
    assert_eq!(out.code, 1, "cancel is a write too: {out:?}");
    // Reads go on.
    let jobs = sandbox.gantry_json(&url, &["jobs"])?;
    assert_eq!(jobs[0]["id"], before, "{jobs}");
    assert_eq!(sandbox.gantry(&url, &["status"]).code, 0);

    // Space freed: writes resume.
    std::fs::remove_file(&filler)?;
    let after = sandbox.submit(&url, &["--", "true"])?;
    assert!(after > before);

    // Nothing was corrupted: a restart on the same data dir has both jobs.
    sandbox.proc(coordinator.index).stop(T);
    let restarted = sandbox.start_coordinator("coordinator-again", 0, Some(data_dir))?;
    let jobs = sandbox.gantry_json(&restarted.url, &["jobs"])?;
    let ids: Vec<u64> = jobs
        .as_array()
        .map(|a| a.iter().filter_map(|j| j["id"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(ids, [after, before], "{jobs}");
    sandbox.proc(restarted.index).stop(T);
    drop(mount);
    Ok(())
}

/// Agent side: a job whose output fills the agent's data volume (a small
/// tmpfs) still has its end recorded as it happened (its exit code, one
/// attempt, not lost and run again), because the agent keeps a reserve for
/// those records; the full volume shows as disk pressure on the node; a
/// new attempt that cannot even be recorded once the reserve is spent waits
/// for room instead of failing its job; and once space is freed the agent
/// runs jobs there again.
#[test]
fn a_full_job_output_volume_loses_no_exit_report() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let agent_dir = sandbox.agent_dir("node-a");
    let Some(mount) = Tmpfs::mount(&agent_dir, "64m")? else {
        return Ok(());
    };
    // The tmpfs's real figures, not the sandbox's roomy fake disk. 64 MiB,
    // so that the 4 MiB reserve given back still leaves it above the 85%
    // disk-pressure mark.
    std::fs::write(agent_dir.join("fake-state.json"), "{}")?;
    let coordinator = sandbox.start_coordinator_with("coordinator", &[])?;
    let url = coordinator.url.clone();
    sandbox.start_agent("node-a", &url, "1xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.wait_nodes_ready(&url, 1, T)?;
    // Its reserve is in place before any job runs.
    let reserve = agent_dir.join("disk-reserve");
    gantry_integration_tests::wait_until("the agent's disk reserve", T, || {
        (std::fs::metadata(&reserve).ok()?.len() > 0).then_some(())
    })?;

    let spec = sandbox.path().join("fill.yaml");
    std::fs::write(
        &spec,
        "kind: evaluation\nresources: {gpus: 0}\nretry: {max_attempts: 1}\n\
         command: [sh, -c, 'head -c 100000000 /dev/zero; echo wrote >&2; exit 3']\n",
    )?;
    let id = sandbox.submit(&url, &["-f", &spec.display().to_string()])?;
    let job = sandbox.wait_job_state(&url, id, "deadlettered", T)?;
    let attempts = job["attempts"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 1, "ended once, not lost and retried: {job}");
    assert_eq!(attempts[0]["exit_code"], 3, "{job}");

    // The full volume shows on the node.
    gantry_integration_tests::wait_until("disk pressure on the node", T, || {
        let nodes = sandbox.gantry_json(&url, &["nodes"]).ok()?;
        (nodes.as_array()?.first()?["disk_pressure"] == true).then_some(())
    })?;

    // The volume entirely full, the reserve spent: a new attempt's own
    // record cannot be written. That is the node's condition, not the
    // job's: the agent waits for room instead of failing the job, whose
    // only attempt is not used up.
    let filler = agent_dir.join("filler");
    fill(&filler)?;
    let one_try = sandbox.path().join("one-try.yaml");
    std::fs::write(
        &one_try,
        "resources: {gpus: 0}\nretry: {max_attempts: 1}\ncommand: [sh, -c, 'echo ran']\n",
    )?;
    let waiting = sandbox.submit(&url, &["-f", &one_try.display().to_string()])?;
    gantry_integration_tests::wait_until("the agent to wait for room", T, || {
        sandbox
            .log("node-a")
            .contains("waiting for room to record the attempt")
            .then_some(())
    })?;
    let job = sandbox.job(&url, waiting)?;
    assert!(
        !["failed", "deadlettered"].contains(&job["state"].as_str().unwrap_or("")),
        "charged to the job: {job}"
    );

    // Space freed (the job's output and the filler removed): jobs run
    // there again, the waiting one first, on its one attempt.
    let stdout = agent_dir
        .join("jobs")
        .join(id.to_string())
        .join("1")
        .join("stdout");
    std::fs::remove_file(&stdout)?;
    std::fs::remove_file(&filler)?;
    let job = sandbox.wait_job_state(&url, waiting, "succeeded", T)?;
    let attempts = job["attempts"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 1, "{job}");
    let again = sandbox.submit(&url, &["--gpus", "0", "--", "true"])?;
    sandbox.wait_job_state(&url, again, "succeeded", T)?;
    gantry_integration_tests::wait_until("the reserve refilled", T, || {
        (std::fs::metadata(&reserve).ok()?.len() >= 4 << 20).then_some(())
    })?;
    drop(sandbox);
    drop(mount);
    Ok(())
}
