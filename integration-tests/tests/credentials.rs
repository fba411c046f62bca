//! Credentials without restarts and job ownership (issue 15, item 6):
//! SIGHUP and `gantry reload-credentials` re-read the token file; a revoked
//! token is refused from then on and the streams it held open (`gantry
//! watch`, HTTP events and followed logs) are closed; a file that does not
//! load changes nothing. Jobs record the token
//! that submitted them; a `user` token cancels, retries and drops only its
//! own jobs, an `admin` token any.

use std::time::Duration;

use std::io::{BufRead, BufReader, Read};

use gantry_integration_tests::{CliOutput, Sandbox, http_send, read_http_head, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(30);
const ALICE: &str = "alice-secret-0123456789";
const BOB: &str = "bob-secret-0123456789ab";
const ROOT: &str = "root-secret-0123456789a";

fn tokens_file(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(name, token, role)| format!("- {{name: {name}, token: {token}, role: {role}}}\n"))
        .collect()
}

/// The token file with Alice, Bob (users) and root (admin).
fn all_three() -> String {
    tokens_file(&[
        ("alice", ALICE, "user"),
        ("bob", BOB, "user"),
        ("root", ROOT, "admin"),
    ])
}

/// Runs `gantry ARGS` with `token`.
fn as_token(sandbox: &Sandbox, url: &str, token: &str, args: &[&str]) -> CliOutput {
    // Before any `--`, so it never lands in a job's command.
    let mut all: Vec<&str> = args.to_vec();
    let at = all.iter().position(|a| *a == "--").unwrap_or(all.len());
    all.splice(at..at, ["--token", token]);
    sandbox.gantry(url, &all)
}

fn expect_refused(out: &CliOutput, code: i32, text: &str, case: &str) {
    assert_eq!(out.code, code, "{case}: {out:?}");
    assert!(out.stderr.contains(text), "{case}: {}", out.stderr);
    assert_eq!(
        out.stderr.trim().lines().count(),
        1,
        "{case}: one line: {}",
        out.stderr
    );
}

#[test]
fn owners_change_only_their_own_jobs_and_revoked_tokens_lose_their_streams() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let tokens = sandbox.path().join("tokens.yaml");
    std::fs::write(&tokens, all_three())?;
    let tokens_arg = tokens.display().to_string();
    let coordinator = sandbox.start_coordinator_with("coordinator", &["--tokens", &tokens_arg])?;
    let url = coordinator.url.clone();
    sandbox.start_agent("node-a", &url, "1xH100-80GiB", "127.0.0.1", &[])?;

    // Each user submits a job that runs until cancelled.
    let alices = submit_with(&sandbox, &url, ALICE, "sleep 600")?;
    let bobs = submit_with(&sandbox, &url, BOB, "sleep 600")?;

    // The owner is recorded and shown; --mine lists only the caller's jobs.
    let out = as_token(
        &sandbox,
        &url,
        ALICE,
        &["job", &alices.to_string(), "-o", "json"],
    );
    assert_eq!(out.json()?["owner"], "alice", "{out:?}");
    let out = as_token(&sandbox, &url, ALICE, &["job", &alices.to_string()]);
    assert!(out.stdout.contains("owner:     alice"), "{out:?}");
    let out = as_token(&sandbox, &url, BOB, &["jobs", "--mine", "-o", "json"]);
    let mine: Vec<u64> = out
        .json()?
        .as_array()
        .map(|jobs| jobs.iter().filter_map(|j| j["id"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(mine, [bobs], "{out:?}");
    let (status, body) = http_with_token(&coordinator.http, "/v1/jobs", ROOT)?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"owner\":\"alice\""), "{body}");

    // Bob may not cancel, retry or drop Alice's job; nothing changes.
    let alices_text = alices.to_string();
    expect_refused(
        &as_token(&sandbox, &url, BOB, &["cancel", &alices_text]),
        4,
        &format!(
            "cancel job {alices}: the job belongs to 'alice'; token 'bob' (role user) may cancel only its own jobs"
        ),
        "bob cancels alice's job",
    );
    expect_refused(
        &as_token(&sandbox, &url, BOB, &["dlq", "retry", &alices_text]),
        4,
        "may retry only its own jobs",
        "bob retries alice's job",
    );
    expect_refused(
        &as_token(&sandbox, &url, BOB, &["dlq", "drop", &alices_text]),
        4,
        "may drop only its own jobs",
        "bob drops alice's job",
    );
    let out = as_token(&sandbox, &url, ROOT, &["job", &alices_text, "-o", "json"]);
    assert_eq!(out.json()?["cancel_requested"], false, "{out:?}");
    // Bob cancels his own; the admin cancels Alice's.
    let out = as_token(&sandbox, &url, BOB, &["cancel", &bobs.to_string()]);
    assert_eq!(out.code, 0, "{out:?}");
    let out = as_token(&sandbox, &url, ROOT, &["cancel", &alices_text]);
    assert_eq!(out.code, 0, "{out:?}");

    // Only Alice (or an admin) stops Alice's loop.
    let spec = sandbox.path().join("loop.yaml");
    std::fs::write(
        &spec,
        "pipeline: alices-loop\nrepeat: forever\njobs:\n  - {name: s, command: [sleep, '600']}\n",
    )?;
    let spec = spec.display().to_string();
    let out = as_token(
        &sandbox,
        &url,
        ALICE,
        &["submit", "-f", &spec, "-o", "json"],
    );
    anyhow::ensure!(out.code == 0, "submit: {out:?}");
    let stage = out.json()?["job_ids"][0].as_u64().unwrap_or(0);
    expect_refused(
        &as_token(&sandbox, &url, BOB, &["pipeline", "stop", "alices-loop"]),
        4,
        "the job belongs to 'alice'; token 'bob' (role user) may stop the pipeline of only its own jobs",
        "bob stops alice's loop",
    );
    let out = as_token(
        &sandbox,
        &url,
        ALICE,
        &["pipeline", "alices-loop", "-o", "json"],
    );
    assert_eq!(out.json()?["loop_status"], "repeating", "{out:?}");
    let out = as_token(&sandbox, &url, ALICE, &["pipeline", "stop", "alices-loop"]);
    assert_eq!(out.code, 0, "{out:?}");
    let out = as_token(&sandbox, &url, ROOT, &["cancel", &stage.to_string()]);
    assert_eq!(out.code, 0, "{out:?}");

    // Bob holds a watch open, over gRPC and as HTTP Server-Sent Events,
    // and follows his running job's log over HTTP; revoking his token by
    // SIGHUP closes all three.
    let talker = submit_with(&sandbox, &url, BOB, "echo started; sleep 600")?;
    wait_until("bob's job to print", WAIT, || {
        let out = as_token(&sandbox, &url, BOB, &["logs", &talker.to_string()]);
        out.stdout.contains("started").then_some(())
    })?;
    let watch =
        sandbox.start_client("watch-bob", &url, &["watch", "--from", "1", "--token", BOB])?;
    // A line of history: the stream is open.
    sandbox.proc(watch).wait_line("", WAIT)?;
    assert!(sandbox.proc(watch).is_running());
    let bearer = format!("Bearer {BOB}");
    let auth = [("Authorization", bearer.as_str())];
    let events = http_send(&coordinator.http, "GET", "/v1/events?from=1", &auth, b"")?;
    events.set_read_timeout(Some(WAIT))?;
    let mut events = BufReader::new(events);
    let (status, _) = read_http_head(&mut events)?;
    assert_eq!(status, 200, "bob's event stream");
    let mut first = String::new();
    events.read_line(&mut first)?;
    assert!(!first.is_empty(), "an event of history");
    let log_path = format!("/v1/jobs/{talker}/logs?follow=true");
    let mut followed = http11_stream(&coordinator.http, &log_path, BOB, false)?;
    let mut head = [0u8; 512];
    let read = followed.read(&mut head)?;
    let head = String::from_utf8_lossy(&head[..read]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    std::fs::write(
        &tokens,
        tokens_file(&[("alice", ALICE, "user"), ("root", ROOT, "admin")]),
    )?;
    let pid = sandbox
        .proc(coordinator.index)
        .pid()
        .expect("coordinator pid");
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP)?;
    let status = sandbox
        .proc(watch)
        .wait_exit(WAIT)
        .ok_or_else(|| anyhow::anyhow!("bob's watch still runs after his token was revoked"))?;
    assert_eq!(status.code(), Some(4), "watch exit");
    let log = sandbox.log("watch-bob");
    assert!(log.contains("bearer token not recognised"), "{log}");
    // The SSE stream's last event says why; then it ends (keep-alives
    // would hold an open one forever: the deadline bounds the wait).
    let deadline = std::time::Instant::now() + WAIT;
    let mut rest = String::new();
    while std::time::Instant::now() < deadline {
        let mut line = String::new();
        if events.read_line(&mut line)? == 0 {
            break;
        }
        rest.push_str(&line);
    }
    let last = rest
        .lines()
        .skip_while(|line| *line != "event: error")
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        last.contains("bearer token not recognised") && last.contains(r#""status":401"#),
        "no final error event before the stream ended: {rest}"
    );
    // The followed log is cut: a chunked body without its last chunk.
    let mut body = Vec::new();
    let _ = followed.read_to_end(&mut body);
    let body = String::from_utf8_lossy(&body);
    assert!(
        !body.ends_with("0\r\n\r\n"),
        "the log ended cleanly: {body:?}"
    );
    expect_refused(
        &as_token(&sandbox, &url, BOB, &["jobs"]),
        4,
        "bearer token not recognised",
        "revoked token",
    );
    assert_eq!(as_token(&sandbox, &url, ALICE, &["jobs"]).code, 0);

    // The admin call reloads too; a user may not make it.
    expect_refused(
        &as_token(&sandbox, &url, ALICE, &["reload-credentials"]),
        4,
        "reload credentials needs the admin role",
        "user reload",
    );
    std::fs::write(&tokens, all_three())?;
    let out = as_token(&sandbox, &url, ROOT, &["reload-credentials"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("credentials reloaded: 3 client tokens"),
        "{out:?}"
    );
    assert_eq!(
        as_token(&sandbox, &url, BOB, &["jobs"]).code,
        0,
        "bob is back"
    );

    // A file that does not load changes nothing, by either path.
    std::fs::write(&tokens, "- {name: alice, token: short, role: user}\n")?;
    let out = as_token(&sandbox, &url, ROOT, &["reload-credentials"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("reload refused, the previous credentials stay in force")
            && out.stderr.contains("[0].token: too short"),
        "{out:?}"
    );
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP)?;
    wait_until("the coordinator to log the failed reload", WAIT, || {
        sandbox
            .log("coordinator")
            .contains("credentials not reloaded")
            .then_some(())
    })?;
    assert_eq!(
        as_token(&sandbox, &url, BOB, &["jobs"]).code,
        0,
        "still in force"
    );
    Ok(())
}

/// Submits `sh -c SCRIPT` as `token`; the job id.
fn submit_with(sandbox: &Sandbox, url: &str, token: &str, script: &str) -> anyhow::Result<u64> {
    let out = as_token(
        sandbox,
        url,
        token,
        &["submit", "-o", "json", "--", "sh", "-c", script],
    );
    anyhow::ensure!(out.code == 0, "submit: {out:?}");
    out.json()?["job_ids"][0]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no job id: {}", out.stdout))
}

/// Opens an HTTP/1.1 GET of `path` with a bearer token (so a streamed
/// body is chunked, and a cut one tells from a finished one); `close`
/// asks the server to close the connection after the answer.
fn http11_stream(
    base: &str,
    path: &str,
    token: &str,
    close: bool,
) -> anyhow::Result<std::net::TcpStream> {
    use std::io::Write;
    let host = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(WAIT))?;
    let connection = if close { "Connection: close\r\n" } else { "" };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n{connection}\r\n"
    )?;
    Ok(stream)
}

/// GET `path` with a bearer token; (status, body).
fn http_with_token(base: &str, path: &str, token: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = http11_stream(base, path, token, true)?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// Points the client environment at the certificates and admin token of
/// one `gantry certs init` directory.
fn use_certs(sandbox: &mut Sandbox, dir: &std::path::Path) -> anyhow::Result<()> {
    let path = |name: &str| dir.join(name).display().to_string();
    sandbox.set_client_env("GANTRY_TLS_CA", &path("ca.pem"));
    sandbox.set_client_env("GANTRY_TLS_CERT", &path("client.pem"));
    sandbox.set_client_env("GANTRY_TLS_KEY", &path("client-key.pem"));
    let tokens = std::fs::read_to_string(dir.join("tokens.yaml"))?;
    let admin = tokens
        .lines()
        .find(|l| l.contains("role: admin"))
        .and_then(|l| l.split("token: ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .ok_or_else(|| anyhow::anyhow!("no admin token in {tokens}"))?;
    sandbox.set_client_env("GANTRY_TOKEN", admin);
    Ok(())
}

#[test]
fn tls_certificates_are_reloaded_for_new_connections() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let first = sandbox.certs_init("first", &[])?;
    let second = sandbox.certs_init("second", &[])?;
    let live = sandbox.path().join("live");
    let install = |from: &std::path::Path| -> anyhow::Result<()> {
        std::fs::create_dir_all(&live)?;
        for name in [
            "coordinator.pem",
            "coordinator-key.pem",
            "ca.pem",
            "tokens.yaml",
        ] {
            std::fs::copy(from.join(name), live.join(name))?;
        }
        Ok(())
    };
    install(&first)?;
    let arg = |name: &str| live.join(name).display().to_string();
    let args = [
        "--tls-cert".to_string(),
        arg("coordinator.pem"),
        "--tls-key".into(),
        arg("coordinator-key.pem"),
        "--tls-client-ca".into(),
        arg("ca.pem"),
        "--tokens".into(),
        arg("tokens.yaml"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let coordinator = sandbox.start_coordinator_with("coordinator", &args)?;
    let url = coordinator.url.replace("http://", "https://");
    use_certs(&mut sandbox, &first)?;
    assert_eq!(sandbox.gantry(&url, &["jobs"]).code, 0, "first CA");

    // New CA, certificate and tokens on disk; the admin call puts them in
    // force (it reaches the coordinator over the old certificates).
    install(&second)?;
    let out = sandbox.gantry(&url, &["reload-credentials"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("TLS certificates"), "{}", out.stdout);
    // A client that trusts only the old CA no longer connects; one with
    // the new CA, certificate and token does.
    let out = sandbox.gantry(&url, &["jobs"]);
    assert_eq!(out.code, 3, "old CA after the reload: {out:?}");
    use_certs(&mut sandbox, &second)?;
    let out = sandbox.gantry(&url, &["jobs"]);
    assert_eq!(out.code, 0, "new CA after the reload: {out:?}");
    Ok(())
}
