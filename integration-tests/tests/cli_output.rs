//! What `gantry` prints and how it ends: user strings escaped on a terminal
//! and exact in `-o json`; spec files bounded in size and nesting before any
//! parsing; a closed pipe ends a command quietly with exit 0; a pipeline of
//! thousands of stages prints at once.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gantry_integration_tests::{Sandbox, gantry_bin, wait_until};

/// The terminal attack of issue 16: set the window title, ring, clear the screen.
const HOSTILE: &str = "\u{1b}]0;pwned\u{7}\u{1b}[2J";

fn no_terminal_controls(what: &str, text: &str) {
    assert!(
        !text
            .chars()
            .any(|c| c.is_control() && c != '\n' || ('\u{202a}'..='\u{202e}').contains(&c)),
        "{what} printed raw control characters: {text:?}"
    );
}

#[test]
fn user_strings_are_escaped_on_terminals_and_exact_in_json() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    let spec = sandbox.path().join("hostile.yaml");
    // YAML double quotes spell ESC as \e and BEL as \a.
    std::fs::write(
        &spec,
        "name: hostile\n\
         command: [echo, \"\\e]0;pwned\\a\\e[2J\"]\n\
         env: {TITLE: \"\\e]0;env\\a\", RTL: \"abc\\u202Efed\"}\n\
         constraints: {labels: {zone: \"\\e[31mred\"}}\n",
    )?;
    let spec = spec.display().to_string();
    let submitted = sandbox.gantry_json(&url, &["submit", "-f", &spec])?;
    let id = submitted["job_ids"][0]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no id in {submitted}"))?;

    let shown = sandbox.gantry(&url, &["job", &id.to_string()]);
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    no_terminal_controls("gantry job", &shown.stdout);
    for visible in [
        r"command:   echo \e]0;pwned\x07\e[2J",
        r"TITLE=\e]0;env\x07",
        r"RTL=abc\u{202e}fed",
        r"zone=\e[31mred",
    ] {
        assert!(
            shown.stdout.contains(visible),
            "{visible:?} not in {:?}",
            shown.stdout
        );
    }

    let listed = sandbox.gantry(&url, &["jobs"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    no_terminal_controls("gantry jobs", &listed.stdout);

    let json = sandbox.job(&url, id)?;
    assert_eq!(json["command"][1], HOSTILE, "json is exact: {json}");
    assert_eq!(json["env"]["TITLE"], "\u{1b}]0;env\u{7}");

    // An error echoed from the server is escaped too.
    let missing = sandbox.gantry(&url, &["drain", "\u{1b}[2Jnode"]);
    assert_ne!(missing.code, 0);
    no_terminal_controls("an error", &missing.stderr);
    Ok(())
}

#[test]
fn spec_files_are_bounded_before_parsing() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    // No cluster: the file is refused before any connection.
    let zero = sandbox.gantry_bounded(
        &["submit", "-f", "/dev/zero", "--addr", "127.0.0.1:1"],
        Duration::from_secs(60),
    );
    assert_eq!(zero.code, 2, "{zero:?}");
    assert!(
        zero.stderr
            .contains("/dev/zero: larger than the 4MiB limit for a spec file"),
        "{}",
        zero.stderr
    );

    let levels = 100_000;
    let cases = [
        (
            "flow",
            format!("command: {}x{}\n", "[".repeat(levels), "]".repeat(levels)),
        ),
        ("block", format!("{}x\n", "- ".repeat(levels))),
    ];
    for (name, text) in cases {
        let path = sandbox.path().join(format!("deep-{name}.yaml"));
        std::fs::write(&path, text)?;
        let path = path.display().to_string();
        let started = Instant::now();
        let deep = sandbox.gantry_bounded(
            &["submit", "-f", &path, "--addr", "127.0.0.1:1"],
            Duration::from_secs(60),
        );
        let took = started.elapsed();
        eprintln!("{levels} levels of {name} nesting refused in {took:?}");
        assert_eq!(deep.code, 2, "{name}: {deep:?}");
        assert!(
            deep.stderr.contains("levels deep; the limit is 64"),
            "{name}: {}",
            deep.stderr
        );
        // A sanity bound only (the parser took 31 s on this before).
        assert!(took < Duration::from_secs(20), "{name} took {took:?}");
    }
    Ok(())
}

/// Runs `gantry ARGS`, reads one line of its stdout, closes the pipe, and
/// returns the exit code and stderr.
fn read_one_line_then_close(url: &str, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let mut child = Command::new(gantry_bin())
        .args(args)
        .env("GANTRY_ADDR", url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first)?;
    assert!(!first.is_empty(), "{args:?} printed nothing");
    // The reader is dropped here: the pipe is closed with output unread.
    let status = wait_until("gantry to exit", Duration::from_secs(30), || {
        child.try_wait().ok().flatten()
    });
    if status.is_err() {
        let _ = child.kill();
    }
    let output = child.wait_with_output()?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[test]
fn a_closed_pipe_ends_commands_quietly() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    // Well over a pipe's 64 KiB in every format: 1,500 rows of ~150 bytes,
    // and one job whose command alone is 100 KiB.
    let mut spec = String::new();
    for i in 0..1500 {
        spec.push_str(&format!(
            "- {{name: job-{i}-{}, command: [sleep, '1']}}\n",
            "n".repeat(100)
        ));
    }
    spec.push_str(&format!(
        "- {{name: long, command: [echo, {}]}}\n",
        "a".repeat(100 << 10)
    ));
    let path = sandbox.path().join("many.yaml");
    std::fs::write(&path, spec)?;
    let submitted = sandbox.gantry_json(&url, &["submit", "-f", &path.display().to_string()])?;
    let long = submitted["job_ids"][1500]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no id in {submitted}"))?
        .to_string();

    for args in [
        vec!["jobs", "--limit", "0"],
        vec!["jobs", "--limit", "0", "-o", "json"],
        vec!["job", &long],
        vec!["job", &long, "-o", "json"],
    ] {
        let (code, stderr) = read_one_line_then_close(&url, &args)?;
        assert_eq!(code, 0, "{args:?} exited {code}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    // The row limit is said, on stderr.
    let limited = sandbox.gantry(&url, &["jobs", "--limit", "10"]);
    assert_eq!(limited.code, 0, "{}", limited.stderr);
    assert_eq!(limited.stdout.lines().count(), 11, "{}", limited.stdout);
    assert!(
        limited
            .stderr
            .contains("showing 10 jobs, there are more: use --limit"),
        "{}",
        limited.stderr
    );
    let all = sandbox.gantry(&url, &["jobs", "--limit", "0", "-o", "json"]);
    assert_eq!(all.json()?.as_array().map(Vec::len), Some(1501));
    assert!(!all.stderr.contains("showing"), "{}", all.stderr);
    Ok(())
}

#[test]
fn a_long_pipeline_prints_fast_and_stays_readable() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    let stages = 10_000;
    let mut spec = String::from("pipeline: chain\njobs:\n");
    // Listed last stage first, so dependency order is not file order.
    for i in (0..stages).rev() {
        if i == 0 {
            spec.push_str("  - {name: s0, command: [sleep, '1']}\n");
        } else {
            spec.push_str(&format!(
                "  - {{name: s{i}, command: [sleep, '1'], after: [s{}]}}\n",
                i - 1
            ));
        }
    }
    let path = sandbox.path().join("chain.yaml");
    std::fs::write(&path, spec)?;
    sandbox.gantry_json(&url, &["submit", "-f", &path.display().to_string()])?;

    let started = Instant::now();
    let shown = sandbox.gantry(&url, &["pipeline", "chain"]);
    eprintln!(
        "gantry pipeline with {stages} stages: {:?}",
        started.elapsed()
    );
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    let lines: Vec<&str> = shown.stdout.lines().collect();
    assert_eq!(lines.len(), stages + 1, "a header and one line per stage");
    // Dependency order, and indentation that stops growing.
    assert!(lines[1].starts_with("s0 [job "), "{}", lines[1]);
    assert!(lines[2].starts_with("  s1 [job "), "{}", lines[2]);
    let last = lines[stages];
    assert!(
        last.trim_start()
            .starts_with(&format!("s{} [job ", stages - 1))
            && last.ends_with(&format!("<- s{}", stages - 2))
            || last.contains(&format!("<- s{}  (", stages - 2)),
        "{last}"
    );
    let widest = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    assert!(widest < 400, "a line of {widest} bytes");
    Ok(())
}
