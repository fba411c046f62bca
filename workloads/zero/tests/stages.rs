//! The stages run by hand (no Gantry): refusals name the flag and change
//! nothing; promote only promotes the file that was evaluated; a stale
//! candidate is not evaluated.

use std::path::Path;
use std::process::{Command, Output};

fn zero(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gantry-zero"))
        .args(args)
        // Not under Gantry: no job id, no snapshot directory.
        .env_remove("GANTRY_SNAPSHOT_DIR")
        .env_remove("GANTRY_JOB_ID")
        .output()
        .expect("run gantry-zero")
}

fn ok(args: &[&str]) -> String {
    let out = zero(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(args: &[&str]) -> String {
    let out = zero(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_flags_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let d = data.to_str().expect("utf-8");
    let cases: &[(&[&str], &str)] = &[
        (
            &["selfplay", "--data", d, "--batch-size", "0"],
            "error: --batch-size: 0",
        ),
        (
            &["selfplay", "--data", d, "--batch-size", "8", "--games", "0"],
            "error: --games: 0",
        ),
        (
            &["train", "--data", d, "--batch-size", "8", "--window", "0"],
            "error: --window: 0",
        ),
        (
            &[
                "train",
                "--data",
                d,
                "--batch-size",
                "8",
                "--learning-rate",
                "NaN",
            ],
            "error: --learning-rate",
        ),
        (
            &["evaluate", "--data", d, "--batch-size", "8", "--games", "0"],
            "error: --games: 0",
        ),
        (
            &["promote", "--data", d, "--threshold", "1.5"],
            "error: --threshold: 1.5",
        ),
        (
            &["promote", "--data", d, "--stall-rounds", "0"],
            "error: --stall-rounds",
        ),
        (
            &[
                "selfplay",
                "--data",
                d,
                "--batch-size",
                "8",
                "--rollout-weight",
                "1.5",
            ],
            "error: --rollout-weight: 1.5",
        ),
        (
            &[
                "evaluate",
                "--data",
                d,
                "--batch-size",
                "8",
                "--rollout-weight=-0.5",
            ],
            "error: --rollout-weight: -0.5",
        ),
        (
            &["learn-check", "--data", d, "--generations", "0"],
            "error: --generations: 0",
        ),
    ];
    for (args, expected) in cases {
        let stderr = refused(args);
        assert!(stderr.starts_with(expected), "{args:?}: {stderr}");
        assert!(!data.exists(), "{args:?} created the data directory");
    }
    // A stage whose input is missing says which.
    let stderr = refused(&["export", "--data", d]);
    assert!(stderr.contains("round 1: no games"), "{stderr}");
    let stderr = refused(&["train", "--data", d, "--batch-size", "8"]);
    assert!(stderr.contains("export has not run"), "{stderr}");
    let stderr = refused(&["evaluate", "--data", d, "--batch-size", "8"]);
    assert!(
        stderr.contains("--candidate: not given and GANTRY_SNAPSHOT_DIR is not set"),
        "{stderr}"
    );
}

/// Without the tch feature a network is refused by name, and a model the
/// data directory does not hold is refused rather than mixed in.
#[cfg(not(feature = "tch"))]
#[test]
fn the_model_flag_names_what_is_missing_or_mismatched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let d = data.to_str().expect("utf-8");
    let one = ["--games", "1", "--simulations", "2", "--batch-size", "1"];
    let stderr = refused(&[&["selfplay", "--data", d, "--model", "resnet"][..], &one].concat());
    assert!(
        stderr.starts_with("error: --model: a residual network")
            && stderr.contains("--features tch"),
        "{stderr}"
    );
    assert!(!data.join("models/best.bin").exists());
    ok(&[&["selfplay", "--data", d, "--model", "linear"][..], &one].concat());
    let stderr = refused(&[&["selfplay", "--data", d, "--model", "resnet"][..], &one].concat());
    assert!(
        stderr.contains("--model: resnet asked, but") && stderr.contains("holds a linear model"),
        "{stderr}"
    );
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).expect("copy");
}

#[test]
fn promote_refuses_a_candidate_that_changed_after_its_evaluation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let d = data.to_str().expect("utf-8");
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).expect("mkdir");
    let (cand, best) = (snap.join("candidate.bin"), snap.join("best.bin"));
    let (c, b) = (cand.to_str().expect("utf-8"), best.to_str().expect("utf-8"));
    let small = ["--batch-size", "4"];
    // The linear model in either build: the seeds below are chosen for it.
    ok(&[
        &[
            "selfplay",
            "--data",
            d,
            "--games",
            "4",
            "--simulations",
            "8",
            "--seed",
            "1",
            "--model",
            "linear",
        ][..],
        &small,
    ]
    .concat());
    ok(&["export", "--data", d]);
    ok(&[
        &["train", "--data", d, "--epochs", "2", "--seed", "1"][..],
        &small,
    ]
    .concat());
    copy(&data.join("models/candidate.bin"), &cand);
    copy(&data.join("models/best.bin"), &best);
    let evaluate = [
        &[
            "evaluate",
            "--data",
            d,
            "--games",
            "2",
            "--simulations",
            "8",
            "--random-games",
            "4",
            "--seed",
            "5",
        ][..],
        &small,
        &["--candidate", c, "--best", b],
    ]
    .concat();
    ok(&evaluate);
    // A training rewrites the candidate after the evaluation read its copy.
    ok(&[
        &["train", "--data", d, "--epochs", "3", "--seed", "2"][..],
        &small,
    ]
    .concat());
    let stderr = refused(&["promote", "--data", d, "--threshold", "0.01"]);
    assert!(
        stderr.contains("changed since it was evaluated"),
        "{stderr}"
    );
    assert!(!data.join("state.json").exists(), "nothing committed");
    assert!(!data.join("ratings.jsonl").exists());

    // Evaluated again, it is promoted (all seeds are fixed: it scores above
    // the 0.01 threshold); the round moves on, and the old candidate is not
    // evaluated as if it were the next round's.
    copy(&data.join("models/candidate.bin"), &cand);
    ok(&evaluate);
    let out = ok(&["promote", "--data", d, "--threshold", "0.01"]);
    assert!(out.contains("promoted"), "{out}");
    assert_eq!(
        std::fs::read(data.join("models/best.bin")).expect("best"),
        std::fs::read(data.join("models/candidate.bin")).expect("candidate")
    );
    let stderr = refused(&evaluate);
    assert!(stderr.contains("train has not run this round"), "{stderr}");
    // The refused promote wrote no history line.
    let lines = std::fs::read_to_string(data.join("ratings.jsonl")).expect("ratings");
    assert_eq!(lines.lines().count(), 1);
}
