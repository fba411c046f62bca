//! The residual network of `gantry-zero` learns (issue 13): builds
//! `gantry-zero --features tch` against the system libtorch (Debian's
//! `libtorch-dev` 1.13, which `.ci/run` installs), runs `gantry-zero
//! learn-check` (two generations of selfplay, export, train, evaluate and
//! promote on the CPU from scratch) and checks its report: the trained
//! network's greedy policy (no search) beats a uniformly random player in
//! at least 90 of 100 games where the untrained network's does not.
//!
//! Skips with a note when libtorch is not installed, unless
//! GANTRY_REQUIRE_TOOLS=1 (then it fails). The build goes to its own
//! target directory (`target/zero-tch`), so the plain `gantry-zero` the
//! other tests run is never replaced by the network build.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use gantry_integration_tests::tools_required;
use gantry_zero::checkpoint::NET_MAGIC;
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests sits in the workspace")
        .to_path_buf()
}

/// Where libtorch's headers are: `$LIBTORCH` (as torch-sys reads it; the
/// workspace's .cargo/config.toml sets /usr, Debian's layout) or /usr.
fn libtorch_found() -> Option<PathBuf> {
    let root = std::env::var_os("LIBTORCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr"));
    let header = root.join("include/torch/csrc/api/include/torch/torch.h");
    let libs = [
        root.join("lib/libtorch.so"),
        root.join("lib/x86_64-linux-gnu/libtorch.so"),
    ];
    (header.is_file() && libs.iter().any(|l| l.is_file())).then_some(root)
}

#[test]
fn the_tch_network_learns_to_beat_a_random_player() -> anyhow::Result<()> {
    let Some(libtorch) = libtorch_found() else {
        if tools_required() {
            bail!(
                "libtorch is required (GANTRY_REQUIRE_TOOLS=1) but not installed (apt-get install libtorch-dev)"
            );
        }
        eprintln!(
            "note: libtorch is not installed (apt-get install libtorch-dev); skipping the tch learning check"
        );
        return Ok(());
    };
    let root = workspace();
    let target = root.join("target/zero-tch");
    let started = std::time::Instant::now();
    let build = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "gantry-zero",
            "--features",
            "tch",
        ])
        .arg("--target-dir")
        .arg(&target)
        .env("LIBTORCH", &libtorch)
        .status()
        .context("running cargo build")?;
    ensure!(
        build.success(),
        "cargo build --features tch failed: {build}"
    );
    eprintln!(
        "built gantry-zero --features tch in {:.0}s",
        started.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("zero");
    let started = std::time::Instant::now();
    let out = Command::new(target.join("release/gantry-zero"))
        .args(["learn-check", "--data"])
        .arg(&data)
        .output()
        .context("running gantry-zero learn-check")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The generations' lines are the report CI shows.
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("learn-check took {:.0}s", started.elapsed().as_secs_f64());
    ensure!(out.status.success(), "learn-check failed: {}", out.status);

    let report: Value = serde_json::from_slice(&std::fs::read(data.join("learn-check.json"))?)?;
    ensure!(report["model"] == "resnet", "{report}");
    ensure!(report["learned"] == true, "{report}");
    let wins = |key: &str| report[key]["wins"].as_u64().unwrap_or(0);
    let games = |key: &str| {
        let m = &report[key];
        ["wins", "losses", "draws"]
            .iter()
            .map(|k| m[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    ensure!(games("trained_vs_random") == 100 && games("untrained_vs_random") == 100);
    ensure!(wins("trained_vs_random") >= 90, "{report}");
    ensure!(wins("untrained_vs_random") < 90, "{report}");
    let generations = report["generations"].as_array().context("generations")?;
    ensure!(generations.len() == 2, "{report}");
    // Every model the loop wrote is a network checkpoint.
    for model in ["best.bin", "candidate.bin"] {
        let bytes = std::fs::read(data.join("models").join(model))?;
        ensure!(bytes.starts_with(NET_MAGIC), "{model} is not a network");
    }
    Ok(())
}
