//! The move of a history kept in sled by an earlier layout into the
//! history's files: a record per job (layout 2) or chunks (layouts 3 and
//! 4).
//!
//! Each step appends a batch of jobs to the files (synced), then removes
//! them from sled in one transaction with the files' new
//! [`Recorded`](super::log::Recorded) state: a crash in between leaves
//! the batch in sled and its pieces past what sled recorded, which the
//! next open cuts off before it moves the batch again.

use gantry_proto::storage as st;
use prost::Message;
use sled::Transactional;

use super::RECORDED_KEY;
use super::log::HistoryLog;
use crate::store::{StoreError, journal::record_error, key_u64, records, writer};

/// Old records (or old chunks) moved per transaction.
const MIGRATE_BATCH: usize = 1_000;

/// The trees of layout 2: `history` (job id -> record) and
/// `history_index` (`t` + finished at + id -> size and `p` key, and `p` +
/// pipeline run + id).
const OLD_RECORDS: &str = "history";
const OLD_INDEX: &str = "history_index";

/// The trees of layouts 3 and 4: `history_chunks` (sequence number ->
/// [`HistoryChunk`](st::HistoryChunk)) and `history_heads` (the same key ->
/// what the chunk holds).
const OLD_CHUNKS: &str = "history_chunks";
const OLD_HEADS: &str = "history_heads";

/// Moves any history sled holds into `log`, recording the files' state in
/// `recorded` (the `history_log` tree), and drops the old trees. Returns
/// the jobs moved (`None`: sled held no history).
pub(in crate::store) fn migrate(
    db: &sled::Db,
    log: &mut HistoryLog,
    recorded: &sled::Tree,
) -> Result<Option<usize>, StoreError> {
    let names = db.tree_names();
    let has = |name: &str| names.iter().any(|n| n.as_ref() == name.as_bytes());
    let (old_records, old_chunks) = (has(OLD_INDEX), has(OLD_CHUNKS));
    if !old_records && !old_chunks {
        return Ok(None);
    }
    let mut moved = 0;
    if old_records {
        moved += move_records(db, log, recorded)?;
    }
    if old_chunks {
        moved += move_chunks(db, log, recorded)?;
    }
    for name in [OLD_RECORDS, OLD_INDEX, OLD_CHUNKS, OLD_HEADS] {
        db.drop_tree(name)?;
    }
    db.flush()?;
    Ok(Some(moved))
}

/// Moves layout 2's records, oldest first.
fn move_records(
    db: &sled::Db,
    log: &mut HistoryLog,
    recorded: &sled::Tree,
) -> Result<usize, StoreError> {
    let old = db.open_tree(OLD_RECORDS)?;
    let index = db.open_tree(OLD_INDEX)?;
    let mut moved = 0;
    loop {
        let keys = index
            .range(b"t".to_vec()..b"u".to_vec())
            .take(MIGRATE_BATCH)
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Ok(moved);
        }
        let (mut old_removed, mut index_removed) = (sled::Batch::default(), sled::Batch::default());
        let mut jobs = Vec::with_capacity(keys.len());
        for (key, value) in &keys {
            let id = key_u64(key.get(9..17).unwrap_or_default());
            index_removed.remove(key.as_ref());
            if let Some(run_key) = value.get(8..).filter(|k| !k.is_empty()) {
                index_removed.remove(run_key);
            }
            old_removed.remove(&id.to_be_bytes());
            if let Some(record) = old.get(id.to_be_bytes())? {
                let job = records::decode_job(&record).map_err(|source| StoreError::Record {
                    tree: OLD_RECORDS,
                    source,
                })?;
                jobs.push(records::job_to_storage(&job));
            }
        }
        moved += jobs.len();
        log.add(jobs)?;
        remove_moved(
            log,
            recorded,
            [(&old, &old_removed), (&index, &index_removed)],
        )?;
    }
}

/// Moves layouts 3 and 4's chunks, oldest first.
fn move_chunks(
    db: &sled::Db,
    log: &mut HistoryLog,
    recorded: &sled::Tree,
) -> Result<usize, StoreError> {
    let chunks = db.open_tree(OLD_CHUNKS)?;
    let heads = db.open_tree(OLD_HEADS)?;
    let mut moved = 0;
    loop {
        let batch = chunks
            .iter()
            .take(MIGRATE_BATCH)
            .collect::<Result<Vec<_>, _>>()?;
        if batch.is_empty() {
            return Ok(moved);
        }
        let mut removed = sled::Batch::default();
        for (key, value) in batch {
            let jobs = st::HistoryChunk::decode(value.as_ref())
                .map_err(|error| record_error(OLD_CHUNKS, error))?
                .jobs;
            moved += jobs.len();
            // A chunk stays a chunk of its own.
            log.close_chunk();
            log.add_unsynced(jobs)?;
            removed.remove(key);
        }
        log.sync_current()?;
        remove_moved(log, recorded, [(&chunks, &removed), (&heads, &removed)])?;
    }
}

/// Removes a step's moved jobs from their old trees (each with its batch)
/// in one transaction with the files' new state (`log`'s, already synced).
fn remove_moved(
    log: &HistoryLog,
    recorded: &sled::Tree,
    old: [(&sled::Tree, &sled::Batch); 2],
) -> Result<(), StoreError> {
    let state = log.recorded().encode();
    let [(first, first_removed), (second, second_removed)] = old;
    (first, second, recorded)
        .transaction(|(first, second, recorded)| {
            first.apply_batch(first_removed)?;
            second.apply_batch(second_removed)?;
            recorded.insert(RECORDED_KEY, &state[..])?;
            Ok(())
        })
        .map_err(writer::transaction_failed)?;
    Ok(())
}

/// The pieces of an earlier layout's history as chunks: the jobs a
/// migration test puts in sled come back by id.
#[cfg(test)]
pub(in crate::store) fn put_old_chunk(db: &sled::Db, seq: u64, jobs: Vec<st::JobRecord>) {
    #![allow(clippy::unwrap_used)]
    let value = st::HistoryChunk { jobs }.encode_to_vec();
    db.open_tree(OLD_CHUNKS)
        .unwrap()
        .insert(seq.to_be_bytes(), value)
        .unwrap();
    // The head's content is never read by the move.
    db.open_tree(OLD_HEADS)
        .unwrap()
        .insert(seq.to_be_bytes(), &[0u8; 48][..])
        .unwrap();
}
