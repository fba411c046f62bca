//! Retention on three replicas with small settings (`--job-retention 2s
//! --max-retained-jobs 4`): finished jobs leave hard state on every
//! replica alike, an archived job still answers `gantry job ID`, `gantry
//! jobs --since` pages through the history, a job in the dead-letter queue
//! and a pending one stay, and `gantry watch --from` below the compaction
//! floor fails with one clear line.

use std::collections::BTreeSet;
use std::time::Duration;

use gantry_integration_tests::check::{check_replicas, read_replicas};
use gantry_integration_tests::{Sandbox, wait_until};

const T: Duration = Duration::from_secs(40);

#[test]
fn finished_jobs_retire_alike_on_every_replica_and_answer_from_history() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let mut set = sandbox.start_replicas(&["--job-retention", "2s", "--max-retained-jobs", "4"])?;
    let addrs = set.addrs();
    wait_until("a leader", T, || sandbox.leader_of(&set))?;
    let agent = sandbox.start_agent("node-a", &addrs, "2xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.wait_nodes_ready(&addrs, 1, T)?;

    // Never retired: a dead-lettered job and one that cannot be placed.
    let dead = sandbox.submit(&addrs, &["--name", "dead", "--", "false"])?;
    sandbox.wait_job_state(&addrs, dead, "deadlettered", T)?;
    let pending = sandbox.submit(&addrs, &["--name", "huge", "--gpus", "8", "--", "true"])?;
    let mut done = Vec::new();
    for i in 0..8 {
        let name = format!("done-{i}");
        done.push(sandbox.submit(&addrs, &["--name", &name, "--", "true"])?);
    }

    // A pipeline run: its first stage is held while the second waits on it.
    let spec = sandbox.path().join("pipeline.yaml");
    std::fs::write(
        &spec,
        "pipeline: nightly\njobs:\n  - {name: a, command: [true]}\n  - {name: b, after: [a], command: [true]}\n",
    )?;
    let run = sandbox.gantry_json(&addrs, &["submit", "-f", &spec.display().to_string()])?;
    let stages: Vec<u64> = run["job_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_u64())
        .collect();
    assert_eq!(stages.len(), 2);
    done.extend(&stages);

    // Every finished job leaves hard state and answers from the history.
    for id in &done {
        wait_until(&format!("job {id} archived"), T, || {
            let job = sandbox.job(&addrs, *id).ok()?;
            (job["archived"] == true).then_some(job)
        })?;
    }
    let out = sandbox.gantry(&addrs, &["job", &done[0].to_string()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("succeeded (archived"),
        "gantry job says archived: {}",
        out.stdout
    );
    // `gantry pipeline NAME --run N` still shows the retired run.
    let view = sandbox.gantry_json(&addrs, &["pipeline", "nightly", "--run", "1"])?;
    assert_eq!(view["run"], 1);
    let ids: Vec<u64> = view["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j["archived"] == true && j["state"] == "succeeded")
        .filter_map(|j| j["id"].as_u64())
        .collect();
    assert_eq!(ids, stages, "{view}");
    let latest = sandbox.gantry_json(&addrs, &["pipeline", "nightly"])?;
    assert_eq!(
        latest["run"], 1,
        "the latest run survives its jobs: {latest}"
    );
    for id in [dead, pending] {
        let job = sandbox.job(&addrs, id)?;
        assert_eq!(job["archived"], false, "never retired: {job}");
    }
    assert_eq!(sandbox.job(&addrs, pending)?["state"], "pending");

    // `gantry jobs --since` pages through the history, each job once.
    let mut seen = Vec::new();
    let mut page: Option<String> = None;
    for _ in 0..10 {
        let mut args = vec![
            "jobs",
            "--state",
            "succeeded",
            "--since",
            "1h",
            "--limit",
            "3",
        ];
        if let Some(token) = &page {
            args.extend(["--page", token.as_str()]);
        }
        let out = sandbox.gantry(&addrs, &[&args[..], &["-o", "json"]].concat());
        assert_eq!(out.code, 0, "{out:?}");
        let jobs = out.json()?;
        for job in jobs.as_array().cloned().unwrap_or_default() {
            assert_eq!(job["archived"], true, "{job}");
            seen.push(job["id"].as_u64().unwrap_or(0));
        }
        page = out
            .stderr
            .split("--page ")
            .nth(1)
            .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string());
        if page.is_none() {
            break;
        }
    }
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "no job twice: {seen:?}");
    assert_eq!(unique, done.iter().copied().collect(), "every archived job");

    // Below the event floor (4 events per retained job at most: it has
    // risen past the first events): one clear line, a non-zero exit.
    let out = sandbox.gantry_bounded(
        &["watch", "--from", "1", "--addr", &addrs],
        Duration::from_secs(20),
    );
    assert!(
        out.code > 0,
        "refused at once, not killed at the timeout: {out:?}"
    );
    let line = out.stderr.trim();
    assert_eq!(line.lines().count(), 1, "one line: {line}");
    assert!(
        line.contains("events before")
            && line.contains("compacted")
            && line.contains("gantry jobs")
            && line.contains("--from"),
        "names the floor and how to resynchronise: {line}"
    );
    let floor: u64 = line
        .split("events before ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(floor > 1, "{line}");
    // From the floor itself, the watch streams (it is killed at the timeout).
    let out = sandbox.gantry_bounded(
        &["watch", "--from", &floor.to_string(), "--addr", &addrs],
        Duration::from_secs(3),
    );
    assert!(
        out.stdout
            .lines()
            .next()
            .is_some_and(|l| l.trim_start().starts_with(&floor.to_string())),
        "the first event kept is the floor: {out:?}"
    );

    // Every replica applied the same commands and retired the same jobs.
    // (The agent stops first: nothing new is proposed while replicas stop.)
    sandbox.proc(agent).stop(Duration::from_secs(10));
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    sandbox.wait_applied(&set.urls, T)?;
    for id in (1..=3).filter(|id| *id != leader).chain([leader]) {
        sandbox.stop_replica(&mut set, id);
    }
    let replicas = read_replicas(&set.dirs)?;
    check_replicas(&replicas)?;
    let applied: BTreeSet<u64> = replicas.iter().map(|r| r.applied).collect();
    assert_eq!(applied.len(), 1, "compared at one index: {applied:?}");
    for replica in &replicas {
        let archived: BTreeSet<u64> = replica.history.iter().map(|j| j.id).collect();
        assert_eq!(
            archived,
            done.iter().copied().collect(),
            "{}",
            replica.dir.display()
        );
        assert!(replica.state().job(dead).is_some() && replica.state().job(pending).is_some());
    }
    Ok(())
}

#[test]
fn retention_flags_are_refused_with_the_flag_named() -> anyhow::Result<()> {
    let sandbox = Sandbox::new()?;
    let data = sandbox.path().join("data");
    let data = data.display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--job-retention", "0s"],
            "--job-retention: must be at least 1s",
        ),
        (&["--job-retention", "soon"], "--job-retention"),
        (
            &["--max-retained-jobs", "0"],
            "--max-retained-jobs: must be at least 1",
        ),
        (&["--max-retained-jobs=-3"], "--max-retained-jobs"),
        (
            &["--history-retention", "500ms"],
            "--history-retention: must be at least 1s",
        ),
        (
            &["--history-max-bytes", "1KiB"],
            "--history-max-bytes: must be at least 1MiB",
        ),
        (&["--history-max-bytes", "lots"], "--history-max-bytes"),
    ];
    for (flags, expected) in cases {
        let mut args = vec![
            "coordinator",
            "--data-dir",
            &data,
            "--grpc-addr",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(flags);
        let out = sandbox.gantry_bounded(&args, Duration::from_secs(20));
        assert!(out.code > 0, "{flags:?} refused: {out:?}");
        assert!(
            out.stderr.contains(expected),
            "{flags:?}: the error names the flag: {}",
            out.stderr
        );
        assert!(
            !std::path::Path::new(&data).exists(),
            "{flags:?}: nothing was created"
        );
    }
    Ok(())
}

/// A follower killed -9 three times while jobs end and retire: its store
/// lost what sled had not flushed, while the history's files kept the
/// pieces appended for it (past what sled recorded). Each restart cuts
/// those off and applies the entries again from the Raft log; every
/// replica's history then holds every retired job exactly once, alike
/// (`check_replicas`). Without the cut, the restarted replica's history
/// holds jobs twice.
#[test]
fn a_follower_killed_while_jobs_retire_keeps_each_archived_job_once() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let mut set = sandbox.start_replicas(&["--job-retention", "1s", "--max-retained-jobs", "2"])?;
    let addrs = set.addrs();
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    let agent = sandbox.start_agent("node-a", &addrs, "2xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.wait_nodes_ready(&addrs, 1, T)?;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");

    // Each round: jobs that end over about a second, retired as they end
    // (`--max-retained-jobs 2`), and the follower killed in the middle.
    let mut done = Vec::new();
    for round in 0..3 {
        for i in 0..15 {
            let name = format!("r{round}-{i}");
            let sleep = format!("{}", (i % 5) as f64 * 0.25);
            done.push(sandbox.submit(&addrs, &["--name", &name, "--", "sleep", &sleep])?);
        }
        std::thread::sleep(Duration::from_millis(700));
        let index = set.procs[follower - 1].take().expect("follower process");
        sandbox.proc(index).kill9();
        std::thread::sleep(Duration::from_millis(200));
        sandbox.start_replica(&mut set, follower)?;
    }
    // Process names end in their index among the sandbox's processes.
    let restarts_and_more = 16;
    for id in &done {
        wait_until(&format!("job {id} archived"), T, || {
            let job = sandbox.job(&addrs, *id).ok()?;
            (job["archived"] == true).then_some(())
        })?;
    }

    sandbox.proc(agent).stop(Duration::from_secs(10));
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    sandbox.wait_applied(&set.urls, T)?;
    for id in (1..=3).filter(|id| *id != leader).chain([leader]) {
        sandbox.stop_replica(&mut set, id);
    }
    // The fault was injected: a restart found pieces past what its store
    // had recorded (the proof is the check over the replicas below).
    let cut_off = (0..restarts_and_more)
        .map(|n| sandbox.log(&format!("replica-{follower}-{n}")))
        .any(|log| log.contains("history pieces past what the store recorded cut off"));
    assert!(
        cut_off,
        "no kill fell between a history append and its record"
    );
    let replicas = read_replicas(&set.dirs)?;
    check_replicas(&replicas)?;
    for replica in &replicas {
        let archived: Vec<u64> = replica.history.iter().map(|j| j.id).collect();
        let unique: BTreeSet<u64> = archived.iter().copied().collect();
        assert_eq!(unique.len(), archived.len(), "each job once: {archived:?}");
        assert_eq!(
            unique,
            done.iter().copied().collect(),
            "{}",
            replica.dir.display()
        );
    }
    Ok(())
}
