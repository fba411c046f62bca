//! The history in chunks: many jobs of one write, found by id, run and
//! page; pruned a chunk at a time; an old per-record history moved in.

#![allow(clippy::unwrap_used)]

use gantry_scheduler::JobId;
use prost::Message;

use super::lock;
use super::tests::{HOUR, apply, fresh_with_a_node, hold, put_old_record, run_job, run_job_with};
use crate::command::Command;
use crate::domain::JobRecord;
use crate::state::{RetentionPolicy, StateMachine};
use crate::store::{Store, records};

/// `count` pipeline jobs run and succeeded (held back, not written), the
/// n-th submitted at `10 + n`, each in a run of its own.
fn run_jobs(sm: &mut StateMachine, store: &mut Store, index: &mut u64, count: u64) -> Vec<JobId> {
    (0..count)
        .map(|n| run_job_with(hold, sm, store, index, 10 + n))
        .collect()
}

/// Every job of the history, paged through `limit` at a time from
/// `since_ms`.
fn all_pages(store: &Store, since_ms: u64, limit: usize) -> Vec<JobRecord> {
    let mut jobs = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .history_page(since_ms, before, limit, |_| true)
            .unwrap();
        assert!(page.jobs.len() <= limit);
        jobs.extend(page.jobs);
        match page.next {
            Some(next) => before = Some(next),
            None => return jobs,
        }
    }
}

/// The newest-first order of pages.
fn newest_first(mut jobs: Vec<JobRecord>) -> Vec<JobRecord> {
    jobs.sort_by_key(|j| std::cmp::Reverse((j.updated_at_ms, j.id)));
    jobs
}

fn stored_bytes(jobs: &[JobRecord]) -> u64 {
    jobs.iter()
        .map(|j| records::job_to_storage(j).encoded_len() as u64)
        .sum()
}

#[test]
fn a_write_retiring_many_jobs_stores_chunks_found_by_id_run_and_page() {
    let (_dir, mut store, mut sm, mut index) = fresh_with_a_node();
    let ids = run_jobs(&mut sm, &mut store, &mut index, 600);
    let expected: Vec<JobRecord> = ids.iter().map(|id| sm.job(*id).unwrap().clone()).collect();
    // One write retires all of them.
    apply(
        &mut sm,
        &mut store,
        &mut index,
        Command::Retire { at_ms: 700 + HOUR },
    );
    assert_eq!(sm.jobs().count(), 0);
    let chunks = lock(&store.history).chunks().count();
    assert!(
        chunks > 1,
        "600 jobs are more than one value: {chunks} chunk"
    );
    assert_eq!(store.history_len().unwrap(), 600);
    for (n, job) in expected.iter().enumerate() {
        assert_eq!(store.history_job(job.id).unwrap().as_ref(), Some(job));
        assert_eq!(
            store.history_run("nightly", n as u32 + 1).unwrap(),
            vec![job.clone()]
        );
    }
    assert!(store.history_job(ids[599] + 1).unwrap().is_none());
    assert_eq!(all_pages(&store, 0, 7), newest_first(expected.clone()));
    assert_eq!(all_pages(&store, 0, 1_000), newest_first(expected.clone()));
    let since = expected[300].updated_at_ms;
    let recent: Vec<JobRecord> = expected
        .iter()
        .filter(|j| j.updated_at_ms >= since)
        .cloned()
        .collect();
    assert_eq!(all_pages(&store, since, 50), newest_first(recent));
    let bytes = store.history_bytes().unwrap();
    assert_eq!(bytes, stored_bytes(&expected));

    // Over the size cap (looked at a minute of command time later): the
    // oldest chunks leave, whole, until the history is under it.
    let policy = RetentionPolicy {
        history_max_bytes: bytes / 2,
        ..store_policy(&sm)
    };
    apply(
        &mut sm,
        &mut store,
        &mut index,
        Command::SetRetention {
            at_ms: 700 + HOUR + 60_000,
            policy,
        },
    );
    let left = all_pages(&store, 0, 100);
    assert!(!left.is_empty() && left.len() < 600);
    let kept_from = expected.len() - left.len();
    assert_eq!(left, newest_first(expected[kept_from..].to_vec()));
    assert!(
        store
            .history_job(expected[kept_from - 1].id)
            .unwrap()
            .is_none()
    );
    let bytes = store.history_bytes().unwrap();
    assert!(bytes <= policy.history_max_bytes);
    assert_eq!(bytes, stored_bytes(&expected[kept_from..]));
    assert!(lock(&store.history).chunks().count() < chunks);
}

fn store_policy(sm: &StateMachine) -> RetentionPolicy {
    *sm.retention()
}

/// A history stored a record per job is moved into chunks when the store
/// is opened; records left behind by a crash in the middle of a move
/// (chunks written, the rest not yet) are moved by the next open.
#[test]
fn an_old_history_is_moved_into_chunks_when_opened() {
    let (dir, mut store, mut sm, mut index) = fresh_with_a_node();
    let ids = run_jobs(&mut sm, &mut store, &mut index, 1_500);
    // Finish times in another order than ids.
    let old: Vec<JobRecord> = ids
        .iter()
        .map(|id| {
            let mut job = sm.job(*id).unwrap().clone();
            job.updated_at_ms = 5_000 + (job.id * 7_919) % 3_001;
            job
        })
        .collect();
    let (first, rest) = old.split_at(900);
    for (n, job) in first.iter().enumerate() {
        let value = if n % 5 == 0 {
            serde_json::to_vec(job).unwrap()
        } else {
            records::encode_job(job)
        };
        put_old_record(&store.db, job, value);
    }
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.history_len().unwrap(), 900);
    assert_eq!(store.history_bytes().unwrap(), stored_bytes(first));
    for job in rest {
        put_old_record(&store.db, job, records::encode_job(job));
    }
    drop(store);
    let store = Store::open(dir.path()).unwrap();

    let names = store.db.tree_names();
    for gone in ["history", "history_index"] {
        assert!(
            !names.iter().any(|n| n.as_ref() == gone.as_bytes()),
            "{gone}"
        );
    }
    assert_eq!(store.history_len().unwrap(), 1_500);
    assert_eq!(store.history_bytes().unwrap(), stored_bytes(&old));
    for job in &old {
        assert_eq!(store.history_job(job.id).unwrap().as_ref(), Some(job));
        assert_eq!(
            store.history_run("nightly", job.run).unwrap(),
            vec![job.clone()]
        );
    }
    assert_eq!(all_pages(&store, 0, 64), newest_first(old.clone()));
}

/// Jobs retired a few at a time join the newest chunk while it is small:
/// a history of many writes is still a few chunks (a lookup reads every
/// head), and each job is found.
#[test]
fn jobs_retired_one_at_a_time_fill_the_newest_chunk() {
    let (_dir, mut store, mut sm, mut index) = fresh_with_a_node();
    let mut retired = Vec::new();
    for n in 0..300 {
        let at = 10 + n * 10;
        let id = run_job_with(apply, &mut sm, &mut store, &mut index, at);
        retired.push(sm.job(id).unwrap().clone());
        apply(
            &mut sm,
            &mut store,
            &mut index,
            Command::Retire {
                at_ms: at + 2 + HOUR,
            },
        );
        assert!(sm.job(id).is_none(), "retired in its own write");
    }
    let chunks = lock(&store.history).chunks().count();
    let bytes = store.history_bytes().unwrap();
    assert_eq!(bytes, stored_bytes(&retired));
    assert!(
        (chunks as u64) <= bytes / (32 << 10) + 1,
        "{chunks} chunks for {bytes} bytes"
    );
    for job in &retired {
        assert_eq!(store.history_job(job.id).unwrap().as_ref(), Some(job));
    }
    assert_eq!(all_pages(&store, 0, 25), newest_first(retired));
}

/// A history in sled's chunks (layouts 3 and 4) is moved into the files
/// when the store is opened, its trees dropped; each job is found.
#[test]
fn a_history_in_sled_chunks_is_moved_into_files_when_opened() {
    let (dir, mut store, mut sm, mut index) = fresh_with_a_node();
    let ids = run_jobs(&mut sm, &mut store, &mut index, 30);
    let old: Vec<JobRecord> = ids.iter().map(|id| sm.job(*id).unwrap().clone()).collect();
    let (first, second) = old.split_at(12);
    for (seq, part) in [first, second].into_iter().enumerate() {
        let jobs = part.iter().map(records::job_to_storage).collect();
        super::migrate::put_old_chunk(&store.db, seq as u64, jobs);
    }
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let names = store.db.tree_names();
    for gone in ["history_chunks", "history_heads"] {
        assert!(
            !names.iter().any(|n| n.as_ref() == gone.as_bytes()),
            "{gone}"
        );
    }
    assert_eq!(store.history_len().unwrap(), 30);
    assert_eq!(store.history_bytes().unwrap(), stored_bytes(&old));
    assert_eq!(
        lock(&store.history).chunks().count(),
        2,
        "a chunk stays one"
    );
    for job in &old {
        assert_eq!(store.history_job(job.id).unwrap().as_ref(), Some(job));
    }
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.history_len().unwrap(), 30);
}

/// Copies `from` into `to`, recursively (files overwritten).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A crash after a write's pieces were synced to the history's files but
/// before sled flushed the write's transaction. The image: sled as of its
/// last flush, the history's files as of after the write. The reopened
/// store's history has none of the write's jobs (its pieces are cut off),
/// and the same entries applied again put each in it once.
#[test]
fn pieces_of_a_write_sled_lost_are_cut_off_and_written_once_again() {
    let (dir, mut store, mut sm, mut index) = fresh_with_a_node();
    let kept = run_job(&mut sm, &mut store, &mut index, 10);
    let retire = |at_ms| Command::Retire { at_ms };
    apply(&mut sm, &mut store, &mut index, retire(11 + HOUR));
    store.flush().unwrap();
    let image = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), image.path());
    let flushed = index;
    let lost = run_job(&mut sm, &mut store, &mut index, 20);
    apply(&mut sm, &mut store, &mut index, retire(21 + HOUR));
    assert!(store.history_job(lost).unwrap().is_some());
    copy_dir(&dir.path().join("history"), &image.path().join("history"));
    drop(store);

    let mut store = Store::open(image.path()).unwrap();
    assert_eq!(store.applied_index().unwrap(), flushed);
    assert!(store.history_job(kept).unwrap().is_some());
    assert!(store.history_job(lost).unwrap().is_none(), "cut off");
    let mut sm = store.load().unwrap();
    let mut index = flushed;
    assert_eq!(run_job(&mut sm, &mut store, &mut index, 20), lost);
    apply(&mut sm, &mut store, &mut index, retire(21 + HOUR));
    drop(store);
    let store = Store::open(image.path()).unwrap();
    let ids: Vec<JobId> = all_pages(&store, 0, 10).iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![lost, kept], "each once");
}
