//! `--run-as` (issue 16): a job running as `nobody` reads nothing through the
//! agent that `nobody` could not read itself. Snapshot sources are copied
//! with the job user's rights, so a root-only file is refused whether it is
//! named directly, through a symlink, or through a symlink inside a copied
//! directory, and the attempt fails with a reason naming the field.
//!
//! Needs root (to start an agent that switches users); skipped otherwise.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use gantry_integration_tests::Sandbox;

const WAIT: Duration = Duration::from_secs(40);
const SECRET: &str = "root-only-secret";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Submits a one-attempt job that snapshots `from` and prints the copy.
fn submit_snapshot_job(sandbox: &Sandbox, url: &str, from: &Path) -> anyhow::Result<u64> {
    let spec = format!(
        "retry: {{max_attempts: 1}}\nsnapshot: [{{from: {}, as: m}}]\nshell: true\ncommand: [\"cat $GANTRY_SNAPSHOT_DIR/m || cat $GANTRY_SNAPSHOT_DIR/m/*\"]\n",
        from.display()
    );
    let path = sandbox.path().join("spec.yaml");
    std::fs::write(&path, spec)?;
    let out = sandbox.gantry_json(url, &["submit", "-f", &path.display().to_string()])?;
    out["job_ids"][0]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no job id in {out}"))
}

#[test]
fn snapshots_are_read_with_the_job_users_rights() -> anyhow::Result<()> {
    if !is_root() {
        eprintln!("skipped: --run-as needs root");
        return Ok(());
    }
    let mut sandbox = Sandbox::new()?;
    // The job user must reach its work directory and the public sources.
    chmod(sandbox.path(), 0o755)?;
    let secret = sandbox.path().join("secret");
    std::fs::write(&secret, SECRET)?;
    chmod(&secret, 0o600)?;
    let public = sandbox.path().join("public");
    std::fs::create_dir(&public)?;
    std::fs::write(public.join("ok.txt"), "public-data")?;
    chmod(&public.join("ok.txt"), 0o644)?;
    let link = sandbox.path().join("link-to-secret");
    std::os::unix::fs::symlink(&secret, &link)?;
    let tree = sandbox.path().join("tree");
    std::fs::create_dir(&tree)?;
    std::os::unix::fs::symlink(&secret, tree.join("inner-link"))?;

    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url;
    sandbox.start_agent_with(
        "node-a",
        &url,
        "1xH100-80GiB",
        "127.0.0.2",
        &[],
        &["--run-as", "nobody"],
    )?;
    chmod(&sandbox.agent_dir("node-a"), 0o755)?;
    sandbox.wait_nodes_ready(&url, 1, WAIT)?;

    // What nobody may read is copied, and the job reads it.
    let id = submit_snapshot_job(&sandbox, &url, &public.join("ok.txt"))?;
    sandbox.wait_job_state(&url, id, "succeeded", WAIT)?;
    let logs = sandbox.gantry(&url, &["logs", &id.to_string()]);
    assert_eq!(logs.stdout.trim(), "public-data", "{logs:?}");

    for (what, from, refused) in [
        ("the file itself", &secret, &secret),
        ("a symlink to it", &link, &link),
        (
            "a directory holding a symlink to it",
            &tree,
            &tree.join("inner-link"),
        ),
    ] {
        let id = submit_snapshot_job(&sandbox, &url, from)?;
        let job = sandbox.wait_job_state(&url, id, "deadlettered", WAIT)?;
        let text = job.to_string();
        let expected = format!(
            "snapshot[0].from: {}: not readable by user nobody",
            refused.display()
        );
        assert!(text.contains(&expected), "{what}: {expected:?} in {job:#}");
        let logs = sandbox.gantry(&url, &["logs", &id.to_string()]);
        assert!(!logs.stdout.contains(SECRET), "{what}: leaked: {logs:?}");
        let attempts = job["attempts"].as_array().map_or(0, Vec::len);
        assert_eq!(attempts, 1, "{what}: {job:#}");
        let work = sandbox
            .agent_dir("node-a")
            .join(format!("jobs/{id}/1/work"));
        assert!(
            !contains_secret(&work),
            "{what}: the secret was copied into {}",
            work.display()
        );
    }
    Ok(())
}

/// Whether any file under `dir` (symlinks not followed) holds the secret.
fn contains_secret(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let path = entry.path();
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => contains_secret(&path),
            Ok(meta) if meta.is_file() => {
                std::fs::read(&path).is_ok_and(|data| data == SECRET.as_bytes())
            }
            _ => false,
        }
    })
}
