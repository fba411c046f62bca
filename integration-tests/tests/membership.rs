//! Membership at run time (issue 15, item 1): a dead replica of three is
//! replaced under a submit load (kill -9, `gantry raft remove`, a fresh
//! replica on a new data dir and address started with `--join`, `gantry
//! raft add`): it is a learner until it has caught up, then a voter whose
//! vote the cluster needs once another original replica dies; nothing
//! acknowledged is lost (every replica's storage through the checker). A
//! replica restarted with a stale `--peers` follows the stored membership.
//! A cluster restored from a backup grows by `gantry raft add`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::ensure;
use gantry_integration_tests::check::{check_replicas, read_replicas};
use gantry_integration_tests::{ReplicaSet, Sandbox, free_port, run_gantry, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// `gantry raft members -o json` through any of `addrs`.
fn members(sandbox: &Sandbox, addrs: &str) -> Option<Value> {
    sandbox.gantry_json(addrs, &["raft", "members"]).ok()
}

fn role_of(view: &Value, id: u64) -> Option<String> {
    view["members"]
        .as_array()?
        .iter()
        .find(|m| m["id"] == id)
        .and_then(|m| m["role"].as_str())
        .map(str::to_string)
}

fn ids(view: &Value) -> BTreeSet<u64> {
    view["members"]
        .as_array()
        .map(|ms| ms.iter().filter_map(|m| m["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// Starts `gantry coordinator --id ID --join` on a new address and data
/// dir; returns (process index, URL, data dir).
fn start_joiner(
    sandbox: &mut Sandbox,
    id: u64,
    extra: &[&str],
) -> anyhow::Result<(usize, String, PathBuf)> {
    let port = free_port("127.0.0.1")?;
    let id_text = id.to_string();
    let mut args = vec!["--id", &id_text, "--join"];
    args.extend_from_slice(extra);
    let handle = sandbox.start_coordinator_at(&format!("joiner-{id}"), port, &args)?;
    Ok((handle.index, handle.url, handle.data_dir))
}

/// A submit loop on its own thread until `stop`: every acknowledged id.
fn submit_load(addrs: &str, stop: &AtomicBool, acknowledged: &Mutex<Vec<u64>>) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("load-{i}");
        let args = [
            "submit", "-o", "json", "--key", &key, "--gpus", "0", "--", "true",
        ];
        for _ in 0..5 {
            let out = run_gantry(addrs, &[], &args);
            if let Some(id) = out.json().ok().and_then(|v| v["job_ids"][0].as_u64()) {
                acknowledged.lock().expect("lock").push(id);
                break;
            }
        }
        i += 1;
    }
}

/// The checker over every replica's storage in `dirs`, then: each
/// acknowledged id is a job in every replica `keep` selects.
fn check_none_lost(
    dirs: &[PathBuf],
    acknowledged: &[u64],
    keep: impl Fn(&std::path::Path) -> bool,
) -> anyhow::Result<()> {
    let replicas = read_replicas(dirs)?;
    check_replicas(&replicas)?;
    for replica in replicas.iter().filter(|r| keep(&r.dir)) {
        let have: BTreeSet<u64> = replica.jobs.iter().map(|j| j.id).collect();
        let lost: Vec<u64> = acknowledged
            .iter()
            .copied()
            .filter(|id| !have.contains(id))
            .collect();
        ensure!(lost.is_empty(), "{}: lost {lost:?}", replica.dir.display());
    }
    Ok(())
}

#[test]
fn a_dead_replica_is_replaced_under_load_and_the_new_one_votes() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    // Small snapshots: the new replica catches up from one.
    let mut set = sandbox.start_replicas(&["--raft-compact-after", "50"])?;
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    let followers: Vec<usize> = (1..=3).filter(|id| *id != leader).collect();
    let (victim, second) = (followers[0], followers[1]);
    let live = |ids: &[usize], set: &ReplicaSet| {
        ids.iter()
            .map(|id| set.urls[id - 1].clone())
            .collect::<Vec<_>>()
            .join(",")
    };
    let stop = AtomicBool::new(false);
    let acknowledged = Mutex::new(Vec::new());
    let load_addrs = live(&[leader, second], &set);

    let (joiner, joiner_url, joiner_dir) = std::thread::scope(|scope| {
        scope.spawn(|| submit_load(&load_addrs, &stop, &acknowledged));
        let result = (|| -> anyhow::Result<(usize, String, PathBuf)> {
            wait_until("some load", T, || {
                (acknowledged.lock().expect("lock").len() >= 20).then_some(())
            })?;
            // kill -9 a follower; the leader still lists it, silent.
            let index = set.procs[victim - 1].take().expect("running");
            sandbox.proc(index).kill9();
            let addrs = live(&[leader, second], &set);
            // The leader counts it dead once silent for an election
            // timeout (1 s); it is still a voter.
            let view = wait_until("the leader to see the replica silent", T, || {
                let view = members(&sandbox, &addrs)?;
                let silent = view["members"].as_array()?.iter().any(|m| {
                    m["id"] == victim as u64 && m["last_contact_ms"].as_u64().unwrap_or(0) > 2000
                });
                silent.then_some(view)
            })?;
            ensure!(
                role_of(&view, victim as u64).as_deref() == Some("voter"),
                "{view}"
            );

            // A fresh replica waits to be contacted; it does not lead.
            let (joiner, joiner_url, joiner_dir) =
                start_joiner(&mut sandbox, 4, &["--raft-compact-after", "50"])?;
            let status = sandbox.gantry_json(&joiner_url, &["status"])?;
            ensure!(status["is_leader"] == false, "{status}");

            // Adding it while the dead one is still a voter would leave 2
            // of 4 alive: allowed (it is a learner), but removing another
            // live voter is refused with the quorum reason.
            let out = sandbox.gantry(&addrs, &["raft", "remove", &second.to_string()]);
            ensure!(
                out.code != 0 && out.stderr.contains("would lose quorum"),
                "{}",
                out.stderr
            );

            let out = sandbox.gantry(&addrs, &["raft", "remove", &victim.to_string()]);
            ensure!(out.code == 0, "{}", out.stderr);
            let view = wait_until("members", T, || members(&sandbox, &addrs))?;
            ensure!(!ids(&view).contains(&(victim as u64)), "{view}");

            // A duplicate address is refused.
            let url_of_second = set.urls[second - 1].clone();
            let out = sandbox.gantry(&addrs, &["raft", "add", "5", &url_of_second]);
            ensure!(
                out.code != 0 && out.stderr.contains("already replica"),
                "{}",
                out.stderr
            );

            let added = sandbox.gantry_json(&addrs, &["raft", "add", "4", &joiner_url])?;
            ensure!(role_of(&added, 4).as_deref() == Some("learner"), "{added}");
            let target = added["last_index"].as_u64().unwrap_or(0);
            // Learner until caught up: every observation before the first
            // as a voter shows a learner, and by then it has applied what
            // the leader had when it was added.
            let mut seen = Vec::new();
            wait_until("the new replica to be promoted", T, || {
                let view = members(&sandbox, &addrs)?;
                let role = role_of(&view, 4)?;
                seen.push(role.clone());
                (role == "voter").then_some(())
            })?;
            ensure!(
                seen.iter().rev().skip(1).all(|r| r == "learner"),
                "{seen:?}"
            );
            let status = sandbox.gantry_json(&joiner_url, &["status"])?;
            ensure!(
                status["applied_index"].as_u64().unwrap_or(0) >= target,
                "promoted before catching up to {target}: {status}"
            );
            let count = acknowledged.lock().expect("lock").len();
            wait_until("submits after the promotion", T, || {
                (acknowledged.lock().expect("lock").len() >= count + 10).then_some(())
            })?;
            Ok((joiner, joiner_url, joiner_dir))
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;

    // Kill another original: commits now need the new replica's vote.
    let index = set.procs[second - 1].take().expect("running");
    sandbox.proc(index).kill9();
    let addrs = format!("{},{joiner_url}", set.urls[leader - 1]);
    let id = sandbox.submit(&addrs, &["--gpus", "0", "--", "true"])?;
    let mut acknowledged = acknowledged.into_inner().expect("lock");
    acknowledged.push(id);
    eprintln!("membership: {} submits acknowledged", acknowledged.len());

    // Nothing acknowledged lost, on either live replica; every replica's
    // storage agrees (the checker).
    sandbox.wait_applied(&[set.urls[leader - 1].clone(), joiner_url], T)?;
    sandbox.stop_replica(&mut set, leader);
    sandbox.proc(joiner).stop(Duration::from_secs(10));
    let mut dirs = set.dirs.clone();
    dirs.push(joiner_dir.clone());
    check_none_lost(&dirs, &acknowledged, |dir| {
        dir == joiner_dir || dir == set.dirs[leader - 1]
    })?;
    Ok(())
}

#[test]
fn a_stale_peers_flag_on_restart_is_ignored() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let mut set = sandbox.start_replicas(&[])?;
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    let gone = (1..=3).find(|id| *id != leader).expect("a follower");
    let restarted = (1..=3)
        .find(|id| *id != leader && *id != gone)
        .expect("a follower");
    sandbox.stop_replica(&mut set, gone);
    let addrs = set.urls[leader - 1].clone();
    let out = sandbox.gantry(&addrs, &["raft", "remove", &gone.to_string()]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    // Restarted with the old --peers plus an id that never existed.
    set.peers[restarted - 1] = format!("{},9=http://127.0.0.99:1", set.peers[restarted - 1]);
    sandbox.stop_replica(&mut set, restarted);
    sandbox.start_replica(&mut set, restarted)?;
    sandbox.submit(&set.addrs(), &["--gpus", "0", "--", "true"])?;
    let commit = sandbox.gantry_json(&addrs, &["status"])?["commit_index"]
        .as_u64()
        .unwrap_or(0);
    let url = set.urls[restarted - 1].clone();
    wait_until("the restarted replica to catch up", T, || {
        let status = sandbox.gantry_json(&url, &["status"]).ok()?;
        (status["applied_index"].as_u64()? >= commit).then_some(())
    })?;
    let view = wait_until("members", T, || members(&sandbox, &set.addrs()))?;
    let want: BTreeSet<u64> = (1..=3u64).filter(|id| *id != gone as u64).collect();
    assert_eq!(ids(&view), want, "{view}");
    let index = set.procs[restarted - 1].expect("running");
    let name = sandbox.proc(index).name.clone();
    assert!(
        sandbox.log(&name).contains("--peers ignored"),
        "the restarted replica says it ignored --peers"
    );
    Ok(())
}

#[test]
fn a_restored_cluster_grows_by_raft_add() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let first = sandbox.start_coordinator_with("first", &[])?;
    let mut submitted = Vec::new();
    for _ in 0..30 {
        submitted.push(sandbox.submit(&first.url, &["--gpus", "0", "--", "true"])?);
    }
    let file = sandbox.path().join("backup.gantry");
    let out = sandbox.gantry(
        &first.url,
        &["snapshot", "save", &file.display().to_string()],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    sandbox.proc(first.index).stop(Duration::from_secs(10));

    let restored =
        sandbox.start_coordinator_with("restored", &["--restore", &file.display().to_string()])?;
    let (joiner, joiner_url, joiner_dir) = start_joiner(&mut sandbox, 2, &[])?;
    let out = sandbox.gantry(&restored.url, &["raft", "add", "2", &joiner_url]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let started = Instant::now();
    wait_until("the added replica to be promoted", T, || {
        let view = members(&sandbox, &restored.url)?;
        (role_of(&view, 2)? == "voter").then_some(())
    })?;
    eprintln!("restore then add: promoted after {:?}", started.elapsed());
    // It holds the restored jobs.
    sandbox.proc(joiner).stop(Duration::from_secs(10));
    let replicas = read_replicas(&[joiner_dir])?;
    let have: BTreeSet<u64> = replicas[0].jobs.iter().map(|j| j.id).collect();
    for id in &submitted {
        assert!(have.contains(id), "job {id} missing on the added replica");
    }
    Ok(())
}

/// `gantry raft remove` of the leader: refused in one line while another
/// voter is dead (the two left would have one live voter), and under a
/// submit load once it is back: the leader hands leadership to another
/// voter first, which removes it; nothing acknowledged is lost and the two
/// left keep serving.
#[test]
fn removing_the_leader_hands_leadership_over_first() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let mut set = sandbox.start_replicas(&[])?;
    let old = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    let others: Vec<usize> = (1..=3).filter(|id| *id != old).collect();
    let old_url = set.urls[old - 1].clone();

    let dead = others[0];
    let index = set.procs[dead - 1].take().expect("running");
    sandbox.proc(index).kill9();
    wait_until("the leader to see a follower silent", T, || {
        let view = members(&sandbox, &old_url)?;
        let silent = view["members"]
            .as_array()?
            .iter()
            .any(|m| m["id"] == dead as u64 && m["last_contact_ms"].as_u64().unwrap_or(0) > 2000);
        silent.then_some(())
    })?;
    let out = sandbox.gantry(&old_url, &["raft", "remove", &old.to_string()]);
    ensure!(
        out.code != 0
            && out.stderr.contains("would lose quorum")
            && out.stderr.trim().lines().count() == 1,
        "{out:?}"
    );
    ensure!(
        sandbox.leader_of(&set) == Some(old),
        "the refusal moved leadership"
    );
    sandbox.start_replica(&mut set, dead)?;
    // The leader retries a dead peer with a back-off of up to a second:
    // the removal below needs it to have heard from the restarted one.
    wait_until("the leader to hear from the restarted follower", T, || {
        let view = members(&sandbox, &old_url)?;
        let heard = view["members"].as_array()?.iter().any(|m| {
            m["id"] == dead as u64 && m["last_contact_ms"].as_u64().is_some_and(|ms| ms < 500)
        });
        heard.then_some(())
    })?;

    let others_addrs = others
        .iter()
        .map(|id| set.urls[id - 1].clone())
        .collect::<Vec<_>>()
        .join(",");
    let stop = AtomicBool::new(false);
    let acknowledged = Mutex::new(Vec::new());
    let all = set.addrs();
    std::thread::scope(|scope| {
        scope.spawn(|| submit_load(&all, &stop, &acknowledged));
        let result = (|| -> anyhow::Result<()> {
            wait_until("some load", T, || {
                (acknowledged.lock().expect("lock").len() >= 20).then_some(())
            })?;
            let out = sandbox.gantry(&all, &["raft", "remove", &old.to_string()]);
            ensure!(out.code == 0, "{out:?}");
            ensure!(
                out.stdout.contains(&format!("removed replica {old}")),
                "{}",
                out.stdout
            );
            let view = wait_until("members", T, || members(&sandbox, &others_addrs))?;
            let want: BTreeSet<u64> = others.iter().map(|id| *id as u64).collect();
            ensure!(ids(&view) == want, "{view}");
            let leads = view["members"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["leader"] == true)
                .and_then(|m| m["id"].as_u64());
            ensure!(leads.is_some_and(|id| want.contains(&id)), "{view}");
            let count = acknowledged.lock().expect("lock").len();
            wait_until("submits after the removal", T, || {
                (acknowledged.lock().expect("lock").len() >= count + 10).then_some(())
            })?;
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    let acknowledged = acknowledged.into_inner().expect("lock");
    eprintln!(
        "leader removal: {} submits acknowledged",
        acknowledged.len()
    );

    // Nothing acknowledged lost on the replicas left; every replica's
    // storage agrees.
    let left: Vec<String> = (1..=3)
        .filter(|id| *id != old)
        .map(|id| set.urls[id - 1].clone())
        .collect();
    sandbox.wait_applied(&left, T)?;
    for id in 1..=3 {
        sandbox.stop_replica(&mut set, id);
    }
    check_none_lost(&set.dirs, &acknowledged, |dir| dir != set.dirs[old - 1])?;
    Ok(())
}

/// `gantry raft replace OLD NEW URL` of a dead voter under a submit load:
/// the new replica is a learner until it has caught up, then one joint
/// change (the leader's log shows the joint configuration, old voters
/// outgoing) makes it a voter and removes the dead one; nothing
/// acknowledged is lost.
#[test]
fn a_dead_voter_is_replaced_in_one_joint_change() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let mut set = sandbox.start_replicas(&["--raft-compact-after", "50"])?;
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    let followers: Vec<usize> = (1..=3).filter(|id| *id != leader).collect();
    let (victim, second) = (followers[0], followers[1]);
    let addrs = format!("{},{}", set.urls[leader - 1], set.urls[second - 1]);
    let stop = AtomicBool::new(false);
    let acknowledged = Mutex::new(Vec::new());
    let (joiner, joiner_url, joiner_dir) = std::thread::scope(|scope| {
        scope.spawn(|| submit_load(&addrs, &stop, &acknowledged));
        let result = (|| -> anyhow::Result<(usize, String, PathBuf)> {
            wait_until("some load", T, || {
                (acknowledged.lock().expect("lock").len() >= 20).then_some(())
            })?;
            let index = set.procs[victim - 1].take().expect("running");
            sandbox.proc(index).kill9();
            wait_until("the leader to see the replica silent", T, || {
                let view = members(&sandbox, &addrs)?;
                let silent = view["members"].as_array()?.iter().any(|m| {
                    m["id"] == victim as u64 && m["last_contact_ms"].as_u64().unwrap_or(0) > 2000
                });
                silent.then_some(())
            })?;
            let (joiner, joiner_url, joiner_dir) =
                start_joiner(&mut sandbox, 4, &["--raft-compact-after", "50"])?;
            let out = sandbox.gantry(
                &addrs,
                &["raft", "replace", &victim.to_string(), "4", &joiner_url],
            );
            ensure!(out.code == 0, "{out:?}");
            ensure!(
                out.stdout
                    .contains(&format!("replaced replica {victim} by 4")),
                "{}",
                out.stdout
            );
            let want: BTreeSet<u64> = [leader as u64, second as u64, 4].into();
            wait_until("the joint configuration to be left", T, || {
                let view = members(&sandbox, &addrs)?;
                (ids(&view) == want
                    && role_of(&view, 4).as_deref() == Some("voter")
                    && view["changing"] == false)
                    .then_some(())
            })?;
            let count = acknowledged.lock().expect("lock").len();
            wait_until("submits after the replacement", T, || {
                (acknowledged.lock().expect("lock").len() >= count + 10).then_some(())
            })?;
            Ok((joiner, joiner_url, joiner_dir))
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    // One joint change: the new voter and the old ones, outgoing, at once
    // (a promotion then a removal would show no outgoing voters).
    let index = set.procs[leader - 1].expect("leader runs");
    let log = gantry_integration_tests::plain(&sandbox.log(&format!("replica-{leader}-{index}")));
    let want: BTreeSet<u64> = [leader as u64, second as u64, 4].into();
    let joint = |line: &str| {
        let voters: Option<BTreeSet<u64>> = line
            .split("voters=[")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .map(|list| list.split(", ").filter_map(|id| id.parse().ok()).collect());
        line.contains("membership changed")
            && line.contains("outgoing=[1, 2, 3]")
            && voters.as_ref() == Some(&want)
    };
    ensure!(
        log.lines().any(joint),
        "no joint configuration {want:?} / [1, 2, 3] in the leader's log: {:?}",
        log.lines()
            .filter(|l| l.contains("membership changed"))
            .collect::<Vec<_>>()
    );
    ensure!(
        !log.lines().any(|l| l.contains("promoting it to voter")),
        "the learner was promoted alone"
    );

    let acknowledged = acknowledged.into_inner().expect("lock");
    let mut live: Vec<String> = (1..=3)
        .filter(|id| *id != victim)
        .map(|id| set.urls[id - 1].clone())
        .collect();
    live.push(joiner_url);
    sandbox.wait_applied(&live, T)?;
    for id in 1..=3 {
        sandbox.stop_replica(&mut set, id);
    }
    sandbox.proc(joiner).stop(Duration::from_secs(10));
    let mut dirs = set.dirs.clone();
    dirs.push(joiner_dir.clone());
    check_none_lost(&dirs, &acknowledged, |dir| dir != set.dirs[victim - 1])?;
    Ok(())
}
