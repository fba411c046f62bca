//! The Python client (`clients/python`, issue 12) in the workspace's one
//! test command: its pytest suite against real `gantry` processes, `ruff`
//! and `mypy --strict`, run from the virtual environment `.ci/run` makes
//! (`GANTRY_PYTHON_VENV`). Without one the test says so and passes, unless
//! GANTRY_REQUIRE_TOOLS=1.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use gantry_integration_tests::{gantry_bin, tools_required};

/// The virtual environment with httpx, pytest, ruff and mypy, or `None`
/// (an error when tools are required).
fn venv() -> anyhow::Result<Option<PathBuf>> {
    // `.ci/run` makes it in target/python-venv; a plain `cargo test
    // --workspace` after that finds it there too.
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/python-venv");
    let found = std::env::var_os("GANTRY_PYTHON_VENV")
        .map(PathBuf::from)
        .or(Some(default))
        .filter(|dir| dir.join("bin/python").is_file());
    match found {
        Some(dir) => Ok(Some(dir)),
        None if tools_required() => bail!(
            "GANTRY_PYTHON_VENV does not name a virtual environment (GANTRY_REQUIRE_TOOLS=1); \
             .ci/run makes one"
        ),
        None => {
            eprintln!(
                "note: neither GANTRY_PYTHON_VENV nor target/python-venv is a virtual \
                 environment; skipping the \
                 Python client's tests (.ci/run makes one: python3 -m venv, pip install httpx \
                 pytest mypy ruff ./clients/python)"
            );
            Ok(None)
        }
    }
}

/// Runs `tool ARGS` from the venv in `clients/python`, with the sources
/// there first on the import path (the tree under test, not a stale
/// install), and fails with its output unless it succeeds.
fn run(venv: &Path, tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python");
    let output = Command::new(venv.join("bin").join(tool))
        .args(args)
        .current_dir(&package)
        .env("PYTHONPATH", package.join("src"))
        .env("MYPYPATH", package.join("src"))
        .env("GANTRY_BIN", gantry_bin())
        .env_remove("GANTRY_HTTP_ADDR")
        .env_remove("GANTRY_TOKEN")
        .env_remove("GANTRY_TLS_CA")
        .output()
        .with_context(|| format!("cannot run {tool} from {}", venv.display()))?;
    if !output.status.success() {
        bail!(
            "{tool} {} failed ({}):\n{}\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[test]
fn python_client_suite_lints_and_types() -> anyhow::Result<()> {
    let Some(venv) = venv()? else {
        return Ok(());
    };
    run(&venv, "ruff", &["check", "."])?;
    run(&venv, "ruff", &["format", "--check", "."])?;
    run(&venv, "mypy", &["--strict", "src", "tests", "examples"])?;
    run(
        &venv,
        "python",
        &["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
    )?;
    Ok(())
}
