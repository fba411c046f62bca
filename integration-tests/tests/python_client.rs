//! The Python client (`clients/python`, issue 12) in the workspace's one
//! test command: its pytest suite against real `gantry` processes, `ruff`
//! and `mypy --strict`, run from a virtual environment it makes in
//! `target/python-venv` when missing (or `GANTRY_PYTHON_VENV`). When it
//! cannot be made the test says so and passes, unless
//! GANTRY_REQUIRE_TOOLS=1.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use gantry_integration_tests::{gantry_bin, tools_required};

/// The virtual environment with httpx, pytest, ruff and mypy:
/// `GANTRY_PYTHON_VENV`, else `target/python-venv`, made there (python3 -m
/// venv, pip install -r clients/python/requirements-dev.txt) when missing,
/// so the README's one test command runs the Python suite too. `None` when
/// it cannot be made (no python3 or no package index): the test says so and
/// passes, unless GANTRY_REQUIRE_TOOLS=1.
fn venv() -> anyhow::Result<Option<PathBuf>> {
    if let Some(dir) = std::env::var_os("GANTRY_PYTHON_VENV")
        .map(PathBuf::from)
        .filter(|dir| dir.join("bin/python").is_file())
    {
        return Ok(Some(dir));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("target/python-venv");
    if dir.join("bin/python").is_file() && dir.join("bin/pytest").is_file() {
        return Ok(Some(dir));
    }
    match make_venv(&root, &dir) {
        Ok(()) => Ok(Some(dir)),
        Err(error) if tools_required() => Err(error.context(
            "cannot make the Python client's virtual environment (GANTRY_REQUIRE_TOOLS=1)",
        )),
        Err(error) => {
            eprintln!(
                "note: skipping the Python client's tests: cannot make {}: {error:#}",
                dir.display()
            );
            Ok(None)
        }
    }
}

/// `python3 -m venv DIR`, then the pinned tools and the package into it.
fn make_venv(root: &Path, dir: &Path) -> anyhow::Result<()> {
    let step = |program: &Path, args: &[&str]| -> anyhow::Result<()> {
        let output = Command::new(program)
            .args(args)
            .current_dir(root)
            .output()
            .with_context(|| format!("cannot run {}", program.display()))?;
        if !output.status.success() {
            bail!(
                "{} {} failed ({}): {}",
                program.display(),
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    };
    let dir_arg = dir.to_string_lossy();
    step(Path::new("python3"), &["-m", "venv", &dir_arg])?;
    step(
        &dir.join("bin/pip"),
        &[
            "install",
            "-q",
            "-r",
            "clients/python/requirements-dev.txt",
            "./clients/python",
        ],
    )
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
