//! The binary's own surface without a cluster: usage errors, spec errors and
//! unbuilt features fail with one clear line and the documented exit code.
//! (Having this file also makes `cargo test --workspace` build the `gantry`
//! binary that `integration-tests` runs.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the binary to completion. Every case here must fail fast; one that
/// starts a daemon instead is killed after 30 s and fails the test rather
/// than hanging the suite.
fn gantry(args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(args)
        .env("GANTRY_ADDR", "http://127.0.0.1:1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run gantry");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gantry {args:?} did not exit within 30s (did it start a daemon?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn exit_codes_are_documented_and_errors_are_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "command: [true]\nresources: {gpu_memory: -1}\n").expect("write");
    let bad = bad.display().to_string();
    let missing = dir.path().join("missing.yaml").display().to_string();
    let settings = dir.path().join("coordinator.yaml");
    std::fs::write(&settings, "id: 1\nport: 7070\n").expect("write");
    let settings = settings.display().to_string();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["submit", "-f", &bad],
            2,
            "resources.gpu_memory: must not be negative",
        ),
        (vec!["submit", "-f", &missing], 2, "No such file"),
        (
            vec!["submit", "--gpu-memory", "lots", "--", "true"],
            2,
            "--gpu-memory",
        ),
        (vec!["jobs"], 3, "cannot reach coordinator"),
        (vec!["dlq", "list"], 3, "cannot reach coordinator"),
        (
            vec!["coordinator", "--peers", "x=http://127.0.0.1:1"],
            2,
            "--peers",
        ),
        (
            vec![
                "coordinator",
                "--id",
                "4",
                "--peers",
                "1=http://127.0.0.1:1",
            ],
            2,
            "--id",
        ),
        (
            vec!["coordinator", "--http-addr", "localhost-ish:80"],
            2,
            "--http-addr",
        ),
        (vec!["coordinator", "--config", &settings], 2, "--config: "),
        (
            vec!["coordinator", "--raft-compact-after", "0"],
            2,
            "--raft-compact-after",
        ),
    ];
    for (args, code, expected) in cases {
        let (actual, _, stderr) = gantry(&args);
        assert_eq!(actual, code, "{args:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: {stderr:?} should contain {expected:?}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{args:?}: one line: {stderr:?}"
        );
    }
}

#[test]
fn agent_probe_without_a_driver_fails_cleanly_and_fake_gpus_are_listed() {
    let (code, stdout, stderr) = gantry(&["agent", "--probe", "--fake-gpus", "2xH100-80GiB"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("2 GPU(s)"), "{stdout}");
    let (code, _, stderr) = gantry(&["agent", "--probe", "--fake-gpus", "twoxH100"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--fake-gpus"), "{stderr}");
}
