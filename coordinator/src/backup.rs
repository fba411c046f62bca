//! Backups and disaster recovery: `gantry snapshot save FILE` and
//! `gantry coordinator --restore FILE --data-dir NEW`.
//!
//! A backup is the state machine's snapshot (the same bytes a Raft
//! snapshot carries: `Store::snapshot_bytes`) taken by the core in one
//! step together with its applied index, so it is a consistent copy of
//! hard state as of that index on the replica that took it (any replica:
//! a follower's copy is a prefix of the leader's). The file:
//!
//! ```text
//! gantry-backup v1\n
//! {"applied_index":N,"bytes":L,"sha256":"..","replica":ID,"taken_at_ms":T}\n
//! <L bytes of state snapshot: binary (`store::snapshot`), or JSON from an
//!  earlier version>
//! ```
//!
//! Restoring installs it as the Raft snapshot of a new single-voter
//! cluster (at index N, with a term at least the last leader term it
//! records, so the new leader's plans are not taken for a deposed
//! leader's); the coordinator then starts as after any snapshot install
//! (`raft::node::reconcile` restores the state machine from it), and agents
//! that reconnect are reconciled as after a failover. A restore refuses a
//! data dir that is not empty and a file whose checksum or length does not
//! match, changing nothing.
//!
//! The lost cluster may have given out job ids after the backup, and its
//! agents keep those jobs' attempts (an agent answers an assignment of an
//! attempt it already has with that attempt's status). A new job must
//! never get such an id, so the restore adds an id fence: a Cancelled job
//! [`ID_FENCE_GAP`] past the highest id in the backup, which new ids follow
//! (ids are one past the highest stored).

use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::domain::{JobRecord, JobSpec, JobState};
use crate::raft::snapfile::{DEFAULT_MAX_SNAPSHOT_BYTES, SnapshotDir};
use crate::raft::storage::{SledRaftStorage, snapshot_message};
use crate::store::{self, StateSnapshot, Store};

/// First line of every backup file.
const MAGIC: &str = "gantry-backup v1";

/// Longest header line accepted (it is a few fields).
const MAX_HEADER_BYTES: usize = 4096;

/// How far past the backup's highest job id a restored cluster's ids
/// start: more ids than the lost cluster can have given out between the
/// backup and its loss.
pub const ID_FENCE_GAP: u64 = 1_000_000_000;

/// Name of the job that holds the id fence.
pub const ID_FENCE_NAME: &str = "restore-id-fence";

/// What a backup file says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    /// The replica's applied index the state is as of.
    pub applied_index: u64,
    /// Length of the state that follows the header.
    pub bytes: u64,
    /// SHA-256 of the state, lowercase hex.
    pub sha256: String,
    /// The replica that took it.
    pub replica: u64,
    /// When it was taken (unix ms).
    pub taken_at_ms: u64,
}

/// Why a backup could not be read or restored (one line each).
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The file is not a backup, or is damaged.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The target data dir cannot take a restore.
    #[error("--data-dir {path}: {reason}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why not.
        reason: String,
    },
    /// Reading, writing or storage failed.
    #[error("{0}")]
    Io(String),
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The whole backup file for `state` (snapshot bytes) at `applied_index`.
pub fn encode(applied_index: u64, replica: u64, taken_at_ms: u64, state: &[u8]) -> Vec<u8> {
    let header = BackupHeader {
        applied_index,
        bytes: state.len() as u64,
        sha256: sha256_hex(state),
        replica,
        taken_at_ms,
    };
    // A struct of numbers and a hex string always serializes.
    let header = serde_json::to_string(&header).unwrap_or_default();
    let mut out = Vec::with_capacity(MAGIC.len() + header.len() + 2 + state.len());
    out.extend_from_slice(MAGIC.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(header.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(state);
    out
}

/// Splits and checks a backup file: its header, length and checksum.
/// `path` names the file in errors.
pub fn decode<'a>(path: &str, file: &'a [u8]) -> Result<(BackupHeader, &'a [u8]), BackupError> {
    let corrupt = |reason: String| BackupError::Corrupt {
        path: path.to_string(),
        reason,
    };
    let rest = file
        .strip_prefix(MAGIC.as_bytes())
        .and_then(|rest| rest.strip_prefix(b"\n"))
        .ok_or_else(|| corrupt(format!("not a gantry backup (no '{MAGIC}' line)")))?;
    let end = rest
        .iter()
        .take(MAX_HEADER_BYTES)
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt("no header line".into()))?;
    let header: BackupHeader = serde_json::from_slice(&rest[..end])
        .map_err(|e| corrupt(format!("unreadable header: {e}")))?;
    let state = &rest[end + 1..];
    if state.len() as u64 != header.bytes {
        return Err(corrupt(format!(
            "truncated or padded: the header says {} bytes of state, the file has {}",
            header.bytes,
            state.len()
        )));
    }
    let sum = sha256_hex(state);
    if sum != header.sha256 {
        return Err(corrupt(format!(
            "checksum mismatch (sha256 {sum}, the header says {}): the file is damaged",
            header.sha256
        )));
    }
    Ok((header, state))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it,
/// fsynced, renamed over `path`, and the directory fsynced. A crash leaves
/// either the old file or the new one, never a torn one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// What a restore installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The backup's header.
    pub header: BackupHeader,
    /// Jobs in it.
    pub jobs: usize,
    /// The Raft term the new cluster starts after.
    pub term: u64,
}

/// Installs the backup `file` into the empty (or missing) `data_dir` as
/// the starting snapshot of a single-voter cluster whose voter is `id`.
pub fn restore(file: &Path, data_dir: &Path, id: u64) -> Result<Restored, BackupError> {
    let dir_error = |reason: String| BackupError::DataDir {
        path: data_dir.display().to_string(),
        reason,
    };
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(dir_error(
                    "not empty: a restore starts a new cluster in an empty directory".into(),
                ));
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(dir_error(error.to_string())),
    }
    let path = file.display().to_string();
    let bytes = std::fs::read(file).map_err(|e| BackupError::Io(format!("{path}: {e}")))?;
    let (header, state) = decode(&path, &bytes)?;
    let mut snapshot: StateSnapshot =
        store::decode_snapshot(state).map_err(|e| BackupError::Corrupt {
            path: path.clone(),
            reason: format!("the state does not decode: {e}"),
        })?;
    let jobs = snapshot.jobs.len();
    snapshot.jobs.push(id_fence(&snapshot, &header, &path));
    std::fs::create_dir_all(data_dir).map_err(|e| dir_error(e.to_string()))?;
    let store = Store::open(data_dir).map_err(|e| dir_error(e.to_string()))?;
    let files = SnapshotDir::in_data_dir(data_dir, DEFAULT_MAX_SNAPSHOT_BYTES)
        .map_err(|e| dir_error(e.to_string()))?;
    let wal_dir = data_dir.join(crate::raft::wal::DIR_NAME);
    let mut storage = SledRaftStorage::open(store.db(), files, &wal_dir, store.syncer())
        .map_err(|e| BackupError::Io(e.to_string()))?;
    // Plans carry their leader's term and apply refuses one older than the
    // last it applied: the new cluster's terms must come after it.
    let term = snapshot.leader_term.max(1);
    let index = header.applied_index.max(1);
    let descriptor = storage
        .write_snapshot_file(index, term, &mut |out| {
            store::write_state_snapshot(&snapshot, out).map_err(|e| e.to_string())
        })
        .map_err(|e| BackupError::Io(format!("cannot write the restored state: {e}")))?;
    let raft_snapshot = snapshot_message(&descriptor, index, term, vec![id]);
    storage
        .apply_snapshot(&raft_snapshot)
        .and_then(|()| storage.flush())
        .map_err(|e| BackupError::Io(format!("cannot install the snapshot: {e}")))?;
    Ok(Restored { header, jobs, term })
}

/// The id fence (see the module docs): a Cancelled job whose reason says
/// where it comes from. Built from the minimal record so fields added to
/// jobs later keep their defaults.
fn id_fence(snapshot: &StateSnapshot, header: &BackupHeader, path: &str) -> JobRecord {
    // The highest job may have been retired: the next id counts it.
    let highest = snapshot
        .jobs
        .iter()
        .map(|j| j.id)
        .max()
        .unwrap_or(0)
        .max(snapshot.next_job_id.saturating_sub(1));
    let mut spec = JobSpec::for_test(ID_FENCE_NAME);
    spec.resources = Default::default();
    let mut fence = JobRecord::for_test(highest + ID_FENCE_GAP, spec);
    fence.state = JobState::Cancelled;
    fence.submitted_at_ms = header.taken_at_ms;
    fence.updated_at_ms = header.taken_at_ms;
    fence.terminal_reason = format!(
        "restored from {path} (index {}): new job ids start after this one, past any the lost cluster gave out",
        header.applied_index
    );
    fence
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_round_trips_and_damage_is_refused() {
        let state = br#"{"jobs":[]}"#;
        let file = encode(42, 2, 1000, state);
        let (header, body) = decode("b", &file).expect("decodes");
        assert_eq!(header.applied_index, 42);
        assert_eq!(header.replica, 2);
        assert_eq!(body, state);

        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"hello".to_vec(), "b: not a gantry backup"),
            (file[..file.len() - 1].to_vec(), "b: truncated or padded"),
            (
                {
                    let mut flipped = file.clone();
                    let last = flipped.len() - 2;
                    flipped[last] ^= 0x01;
                    flipped
                },
                "b: checksum mismatch",
            ),
            (
                format!("{MAGIC}\n{{\"applied_index\":1}}\n").into_bytes(),
                "b: unreadable header",
            ),
        ];
        for (bytes, want) in cases {
            let error = decode("b", &bytes).expect_err(want).to_string();
            assert!(error.starts_with(want), "{want}: {error}");
        }
    }

    #[test]
    fn writes_are_atomic_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backup.gz");
        write_atomically(&path, b"one").expect("write");
        write_atomically(&path, b"two").expect("overwrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_restore_needs_an_empty_data_dir_and_a_sound_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("backup");
        let state = serde_json::to_vec(&StateSnapshot {
            jobs: Vec::new(),
            nodes: Vec::new(),
            submissions: Vec::new(),
            estimates: Vec::new(),
            events: Vec::new(),
            leader_term: 7,
            next_job_id: 0,
            event_floor: 0,
            retention: None,
            pipeline_runs: Vec::new(),
        })
        .expect("encode");
        std::fs::write(&file, encode(10, 1, 0, &state)).expect("write");
        let busy = dir.path().join("busy");
        std::fs::create_dir_all(busy.join("db")).expect("mkdir");
        let error = restore(&file, &busy, 1).expect_err("not empty").to_string();
        assert!(error.contains("not empty"), "{error}");

        let target = dir.path().join("new");
        let restored = restore(&file, &target, 1).expect("restores");
        assert_eq!(restored.header.applied_index, 10);
        assert_eq!(restored.term, 7);
        let store = Store::open(&target).expect("open");
        let files = SnapshotDir::in_data_dir(&target, 1 << 30).expect("snapshot dir");
        let storage =
            SledRaftStorage::open(store.db(), files, &target.join("raft-wal"), store.syncer())
                .expect("raft storage");
        assert_eq!(storage.snapshot_index_term(), (10, 7));
        assert_eq!(storage.conf_state().voters, [1]);
        // The id fence: new ids start past any the lost cluster gave out.
        let installed = std::fs::read(storage.snapshot_file().expect("file")).expect("read");
        // A JSON backup (an earlier version's) is installed as a binary snapshot.
        assert!(installed.starts_with(store::snapshot::MAGIC));
        let state = store::decode_snapshot(&installed).expect("decode");
        let fence = state.jobs.last().expect("fence");
        assert_eq!((fence.id, fence.state), (ID_FENCE_GAP, JobState::Cancelled));
    }
}
