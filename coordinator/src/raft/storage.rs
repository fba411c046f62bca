//! The Raft log, hard state and latest snapshot, implementing
//! [`raft::Storage`].
//!
//! - **Entries and hard state** are records of the log's segment files
//!   ([`super::wal`]); in memory each entry after the compaction point
//!   has its term and place, and the newest are held decoded up to a
//!   budget ([`entries`]); a flush is one `fdatasync` of the current
//!   segment.
//! - **The rest** is in sled's `raft_meta` tree (in the coordinator's
//!   database), flushed and synced at once when it changes (snapshots,
//!   compactions, membership: rare): `conf_state`, `snapshot_meta` and
//!   `snapshot_data` (the latest snapshot's file [`Descriptor`]: the state
//!   itself is a file in the snapshot directory, [`super::snapfile`], kept
//!   to send to followers that are too far behind), and `truncated` (index and term of the last entry
//!   removed by compaction; the log starts right after it), and
//!   `cluster_id` (8 bytes, big endian; fixed when the cluster is created).
//!   `hard_state` is only read, from storage written before the log had
//!   files of its own, as is the `raft_log` tree, whose entries move into
//!   the files at the first open.
//!
//! The store's own writes (applied commands, in the same database) are not
//! flushed with the log: sled writes them out within its flush interval,
//! and a replica killed before that applies the log's entries again from
//! its store's applied index. A snapshot's record flushes the database,
//! so the store is durable at least up to any compaction point.
//!
//! The applied index is not stored here: the application owns it
//! ([`ReplicatedStateMachine::applied_index`](super::ReplicatedStateMachine::applied_index)),
//! and the driver checks on start that it agrees with this log.
//!
//! Log writes are queued; [`SledRaftStorage::flush`] (or the leader's flush
//! thread, given [`SledRaftStorage::sync_target`]) makes them durable, and
//! the driver calls it before sending any message that must follow
//! persistence. Only the driver thread holds this value, so the log and
//! metadata it caches need no lock.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use super::RaftError;
use super::snapfile::{Descriptor, SnapshotDir};
use super::wal::Wal;
use crate::durable::Syncer;
use entries::{CACHE_BYTES, LogEntries};
use replay::{Replay, migrate_sled_log};

const LOG_TREE: &str = "raft_log";
const META_TREE: &str = "raft_meta";
const HARD_STATE_KEY: &[u8] = b"hard_state";
const CONF_STATE_KEY: &[u8] = b"conf_state";
const SNAPSHOT_META_KEY: &[u8] = b"snapshot_meta";
const SNAPSHOT_DATA_KEY: &[u8] = b"snapshot_data";
const TRUNCATED_KEY: &[u8] = b"truncated";
const CLUSTER_ID_KEY: &[u8] = b"cluster_id";

/// The Raft log in its segment files, its metadata in a sled tree of the
/// coordinator's database.
pub struct SledRaftStorage {
    db: sled::Db,
    /// Makes the metadata's flushes durable ([`crate::durable`]).
    syncer: Syncer,
    meta: sled::Tree,
    /// The entries' and hard state's files.
    wal: Wal,
    /// The entries after `truncated` ([`entries`]).
    log: LogEntries,
    /// The compaction point as last synced in `meta`: segments at or
    /// below it may be removed.
    durable_truncated: u64,
    /// `meta` was written since its last sync.
    meta_dirty: bool,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the latest snapshot (0, 0 when there is none).
    snapshot: (u64, u64),
    /// The latest snapshot's file, when there is one.
    snapshot_file: Option<(Descriptor, PathBuf)>,
    /// Where snapshot files live.
    files: SnapshotDir,
    /// Index and term of the last entry removed from the log; the log starts
    /// at `truncated.0 + 1`. Equal to the snapshot after a snapshot install;
    /// behind it after a local compaction that keeps a tail of entries.
    truncated: (u64, u64),
    /// The cluster's id, once stored (storage written before cluster ids
    /// existed has none until the driver stores one).
    cluster_id: Option<u64>,
}

/// The raft-rs snapshot message of the snapshot file `descriptor`, a
/// state at `index`/`term` whose voters are `voters`: what
/// [`SledRaftStorage::apply_snapshot`] installs when the state comes from
/// outside the log (a restored backup).
pub fn snapshot_message(
    descriptor: &Descriptor,
    index: u64,
    term: u64,
    voters: Vec<u64>,
) -> Snapshot {
    Snapshot {
        data: descriptor.encode().into(),
        metadata: Some(SnapshotMetadata {
            conf_state: Some(ConfState {
                voters,
                ..Default::default()
            })
            .into(),
            index,
            term,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// A snapshot being taken: the applied index, its term and the
/// configuration as of it ([`SledRaftStorage::snapshot_target`]).
#[derive(Debug, Clone)]
pub struct SnapshotTarget {
    /// The index the application's state is at.
    pub index: u64,
    /// The term of the entry at `index`.
    pub term: u64,
    conf_state: ConfState,
}

impl SledRaftStorage {
    /// Opens the Raft log in `wal_dir` and its metadata in `db`, with
    /// snapshot files in `files`; checks that the log is contiguous and
    /// agrees with the hard state and snapshot, whose file must be there;
    /// a storage that does not pass is refused with
    /// [`RaftError::Inconsistent`]. Leftovers (older snapshots, temporary
    /// files of a write or transfer a crash cut short) are removed; a log
    /// still in sled (written before the log had files) moves to them.
    pub fn open(
        db: &sled::Db,
        files: SnapshotDir,
        wal_dir: &Path,
        syncer: Syncer,
    ) -> Result<SledRaftStorage, RaftError> {
        Self::open_sized(
            db,
            files,
            wal_dir,
            super::wal::DEFAULT_SEGMENT_BYTES,
            syncer,
        )
    }

    /// [`Self::open`] with segments of `segment_bytes` (tests roll over
    /// small ones).
    pub fn open_sized(
        db: &sled::Db,
        files: SnapshotDir,
        wal_dir: &Path,
        segment_bytes: u64,
        syncer: Syncer,
    ) -> Result<SledRaftStorage, RaftError> {
        let meta = db.open_tree(META_TREE)?;
        let conf_state: ConfState = read_message(&meta, CONF_STATE_KEY)?.unwrap_or_default();
        let snapshot = read_message::<SnapshotMetadata>(&meta, SNAPSHOT_META_KEY)?
            .map(|m| (m.index, m.term))
            .unwrap_or((0, 0));
        let truncated = match meta.get(TRUNCATED_KEY)? {
            None => (0, 0),
            Some(bytes) if bytes.len() == 16 => (be_u64(&bytes[..8]), be_u64(&bytes[8..])),
            Some(bytes) => {
                return Err(RaftError::Inconsistent(format!(
                    "raft_meta/truncated has {} bytes, expected 16",
                    bytes.len()
                )));
            }
        };
        let mut replay = Replay::new(truncated.0);
        let mut wal = Wal::open(wal_dir, segment_bytes, &mut |record, place| {
            replay.record(record, place)
        })?;
        if db
            .tree_names()
            .iter()
            .any(|name| name == LOG_TREE.as_bytes())
        {
            let old_log = db.open_tree(LOG_TREE)?;
            migrate_sled_log(db, &syncer, &old_log, &meta, &mut wal, &mut replay)?;
        }
        let Replay {
            log,
            hard_state: wal_hard_state,
            ..
        } = replay;
        let mut hard_state = match wal_hard_state {
            Some(hard_state) => hard_state,
            None => read_message(&meta, HARD_STATE_KEY)?.unwrap_or_default(),
        };
        let last = log.last().unwrap_or(truncated);
        if snapshot.0 < truncated.0 || snapshot.0 > last.0 {
            return Err(RaftError::Inconsistent(format!(
                "snapshot at index {} is outside the log [{}, {}]",
                snapshot.0, truncated.0, last.0
            )));
        }
        if hard_state.commit > last.0 {
            return Err(RaftError::Inconsistent(format!(
                "commit index {} is beyond the last log index {}",
                hard_state.commit, last.0
            )));
        }
        // The compaction point is synced before the log's records of a
        // snapshot install (see `apply_snapshot`): a crash between them
        // leaves the older commit index, and what is compacted was
        // committed.
        hard_state.commit = hard_state.commit.max(truncated.0);
        if hard_state.term < truncated.1 {
            // Likewise the install's term: it never voted in that term, or
            // its hard state would be at least there.
            hard_state.term = truncated.1;
            hard_state.vote = 0;
        }
        wal.set_head(&hard_state);
        let cluster_id = match meta.get(CLUSTER_ID_KEY)? {
            None => None,
            Some(bytes) if bytes.len() == 8 && be_u64(&bytes) != 0 => Some(be_u64(&bytes)),
            Some(bytes) => {
                return Err(RaftError::Inconsistent(format!(
                    "raft_meta/cluster_id is unreadable ({} bytes, expected a non-zero 8-byte id)",
                    bytes.len()
                )));
            }
        };
        let snapshot_file = if snapshot == (0, 0) {
            None
        } else {
            Some(snapshot_file(db, &syncer, &meta, &files, snapshot)?)
        };
        files.remove_except(snapshot_file.as_ref().map(|(_, path)| path.as_path()));
        Ok(SledRaftStorage {
            db: db.clone(),
            syncer,
            meta,
            wal,
            log,
            durable_truncated: truncated.0,
            meta_dirty: false,
            hard_state,
            conf_state,
            snapshot,
            snapshot_file,
            files,
            truncated,
            cluster_id,
        })
    }

    /// Where snapshot files live.
    pub fn snapshot_dir(&self) -> &SnapshotDir {
        &self.files
    }

    /// The latest snapshot's file, when there is one.
    pub fn snapshot_file(&self) -> Option<&Path> {
        self.snapshot_file.as_ref().map(|(_, path)| path.as_path())
    }

    /// Removes every snapshot file but the latest one (called once the
    /// latest is durably named by the storage, after a flush).
    pub fn remove_stale_snapshots(&self) {
        self.files.remove_except(self.snapshot_file());
    }

    /// The stored cluster id (`None` for storage written before cluster ids
    /// existed, or a fresh one).
    pub fn cluster_id(&self) -> Option<u64> {
        self.cluster_id
    }

    /// Stores the cluster id. Called once, when the cluster is created (or
    /// its storage predates cluster ids); later starts read it back, whatever
    /// the flags say. Not durable until [`flush`](Self::flush).
    pub fn set_cluster_id(&mut self, id: u64) -> Result<(), RaftError> {
        if id == 0 {
            return Err(RaftError::Config("cluster id must not be 0".into()));
        }
        self.meta.insert(CLUSTER_ID_KEY, &id.to_be_bytes())?;
        self.meta_dirty = true;
        self.cluster_id = Some(id);
        Ok(())
    }

    /// Whether nothing was ever stored (no hard state, voters, log or snapshot).
    pub fn is_fresh(&self) -> bool {
        self.hard_state == HardState::default()
            && self.conf_state == ConfState::default()
            && self.last() == (0, 0)
    }

    /// Sets the voters of a fresh storage. Every replica of a new cluster
    /// must be initialised with the same voters.
    pub fn initialize(&mut self, voters: Vec<u64>) -> Result<(), RaftError> {
        let conf_state = ConfState {
            voters,
            ..Default::default()
        };
        self.meta
            .insert(CONF_STATE_KEY, encode(&conf_state, "conf state")?)?;
        self.meta_dirty = true;
        self.conf_state = conf_state;
        Ok(())
    }

    /// Replaces the configuration when a conf change applies
    /// ([`super::membership`]), durably at once: a leader's flushes cover
    /// only the log's files.
    pub fn set_conf_state(&mut self, conf_state: ConfState) -> Result<(), RaftError> {
        self.meta
            .insert(CONF_STATE_KEY, encode(&conf_state, "conf state")?)?;
        self.conf_state = conf_state;
        self.sync_meta()
    }

    /// The stored hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The stored voters and learners.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Index and term of the latest snapshot ((0, 0) when there is none).
    pub fn snapshot_index_term(&self) -> (u64, u64) {
        self.snapshot
    }

    /// Index of the first entry still in the log.
    pub fn first_index(&self) -> u64 {
        self.truncated.0 + 1
    }

    /// Index of the last entry (the snapshot's index when the log is empty).
    pub fn last_index(&self) -> u64 {
        self.last().0
    }

    /// The latest snapshot, if there is one; its data is the file's
    /// [`Descriptor`] (the state is in [`snapshot_file`](Self::snapshot_file)).
    pub fn load_snapshot(&self) -> Result<Option<Snapshot>, RaftError> {
        let Some(metadata) = read_message::<SnapshotMetadata>(&self.meta, SNAPSHOT_META_KEY)?
        else {
            return Ok(None);
        };
        let Some((descriptor, _)) = &self.snapshot_file else {
            return Err(RaftError::Inconsistent(format!(
                "snapshot metadata at index {} but no snapshot file",
                metadata.index
            )));
        };
        Ok(Some(Snapshot {
            data: descriptor.encode().into(),
            metadata: Some(metadata).into(),
            ..Default::default()
        }))
    }

    /// Appends entries, replacing any conflicting suffix (entries at or after
    /// the first new index). Not durable until [`flush`](Self::flush).
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), RaftError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index <= self.truncated.0 {
            return Err(RaftError::Inconsistent(format!(
                "cannot overwrite compacted entries: append from {} but the log was truncated at {}",
                first.index, self.truncated.0
            )));
        }
        if first.index > self.last().0 + 1 {
            return Err(RaftError::Inconsistent(format!(
                "append from index {} would leave a gap after the last index {}",
                first.index,
                self.last().0
            )));
        }
        // On replay, an entry replaces any at or after its index, so a
        // conflicting suffix needs no record of its own; a crash in the
        // middle of the write leaves a prefix of the new entries after the
        // kept ones, never older-term entries after new ones.
        let places = self.wal.append_entries(entries)?;
        self.log.truncate_from(first.index);
        for (entry, place) in entries.iter().zip(places) {
            self.log.push(entry.clone(), place)?;
        }
        Ok(())
    }

    /// Stores a new hard state. Not durable until [`flush`](Self::flush).
    pub fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), RaftError> {
        self.wal.push_hard_state(hard_state)?;
        self.hard_state = hard_state.clone();
        Ok(())
    }

    /// Stores a new commit index (from a `LightReady`).
    pub fn set_commit(&mut self, commit: u64) -> Result<(), RaftError> {
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = commit;
        self.set_hard_state(&hard_state)
    }

    /// Installs a snapshot received from the leader: it replaces the whole
    /// log, the voters and the commit index. Its data is a file
    /// [`Descriptor`] and the file must already be in the snapshot
    /// directory (received, or written with
    /// [`write_snapshot_file`](Self::write_snapshot_file)). Not durable
    /// until [`flush`](Self::flush); the older files stay until
    /// [`remove_stale_snapshots`](Self::remove_stale_snapshots).
    pub fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), RaftError> {
        let metadata = snapshot.get_metadata();
        let (index, term) = (metadata.index, metadata.term);
        if index < self.snapshot.0 {
            return Err(RaftError::Inconsistent(format!(
                "snapshot at index {index} is older than the stored one at {}",
                self.snapshot.0
            )));
        }
        let descriptor = Descriptor::decode(&snapshot.data).map_err(RaftError::SnapshotFile)?;
        let path = self.files.existing(index, term, &descriptor)?;
        self.meta.insert(SNAPSHOT_DATA_KEY, descriptor.encode())?;
        self.meta
            .insert(SNAPSHOT_META_KEY, encode(metadata, "snapshot metadata")?)?;
        self.meta
            .insert(TRUNCATED_KEY, index_term_bytes(index, term).to_vec())?;
        self.meta.insert(
            CONF_STATE_KEY,
            encode(metadata.get_conf_state(), "conf state")?,
        )?;
        self.truncated = (index, term);
        // The metadata first: a crash before the log's reset is written
        // leaves entries past the snapshot that Raft overwrites, where the
        // other order could leave a commit index past the log's end.
        self.sync_meta()?;
        self.wal.push_reset(index);
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(term);
        hard_state.commit = index;
        self.set_hard_state(&hard_state)?;
        // Everything at or before the snapshot is compacted; what is past
        // it may conflict with the leader's log.
        self.log = LogEntries::new(index + 1, CACHE_BYTES);
        self.snapshot = (index, term);
        self.snapshot_file = Some((descriptor, path));
        self.conf_state = metadata.get_conf_state().clone();
        Ok(())
    }

    /// Writes a snapshot file for `index`/`term` (see
    /// [`SnapshotDir::write`]) without recording it: for a state installed
    /// from outside the log (a backup's restore), which then calls
    /// [`apply_snapshot`](Self::apply_snapshot) with the descriptor.
    pub fn write_snapshot_file(
        &self,
        index: u64,
        term: u64,
        fill: &mut dyn FnMut(&mut dyn Write) -> Result<(), String>,
    ) -> Result<Descriptor, RaftError> {
        Ok(self.files.write(index, term, fill)?.0)
    }

    /// Records a snapshot of the application taken at `index` (which must be
    /// applied, hence in the log; `fill` writes the state into its file)
    /// and compacts the log, keeping the `keep` entries before `index` so
    /// that slightly lagging followers still catch up from the log. The
    /// file is complete and the storage naming it flushed before any entry
    /// or older file is removed; returns the file's descriptor (`None`
    /// when a snapshot at `index` exists already). The replica loop does
    /// the same in two steps, the file written off the loop in between:
    /// [`Self::snapshot_target`], [`SnapshotDir::write`],
    /// [`Self::record_snapshot`].
    pub fn create_snapshot(
        &mut self,
        index: u64,
        fill: &mut dyn FnMut(&mut dyn Write) -> Result<(), String>,
        keep: u64,
    ) -> Result<Option<Descriptor>, RaftError> {
        let Some(target) = self.snapshot_target(index)? else {
            return Ok(None);
        };
        let (descriptor, path) = self.files.write(index, target.term, fill)?;
        self.record_snapshot(target, descriptor, path, keep)?;
        Ok(Some(descriptor))
    }

    /// A snapshot at `index` to be taken now (the applied index: the
    /// configuration is read as of it), `None` when one at or past `index`
    /// exists already; `index` must be in the log.
    pub fn snapshot_target(&self, index: u64) -> Result<Option<SnapshotTarget>, RaftError> {
        if index <= self.snapshot.0 {
            return Ok(None);
        }
        if index > self.last().0 {
            return Err(RaftError::Inconsistent(format!(
                "snapshot at index {index} is beyond the last log index {}",
                self.last().0
            )));
        }
        Ok(Some(SnapshotTarget {
            index,
            term: self.term_of(index)?,
            conf_state: self.conf_state.clone(),
        }))
    }

    /// Records the snapshot file `path` (complete and synced, see
    /// [`SnapshotDir::write`]) of `target` as the latest snapshot,
    /// flushes, then removes the older files and compacts the log, keeping
    /// the `keep` entries before its index. A file no longer newer than
    /// the stored snapshot (a peer's was installed meanwhile) is refused,
    /// and the caller removes it.
    pub fn record_snapshot(
        &mut self,
        target: SnapshotTarget,
        descriptor: Descriptor,
        path: PathBuf,
        keep: u64,
    ) -> Result<(), RaftError> {
        let SnapshotTarget {
            index,
            term,
            conf_state,
        } = target;
        if index <= self.snapshot.0 || self.term_of(index)? != term {
            return Err(RaftError::Inconsistent(format!(
                "snapshot at index {index} (term {term}) is no longer newer than the stored one at index {}",
                self.snapshot.0
            )));
        }
        if index > self.hard_state.commit {
            // Applied means committed; the stored commit index only lagged.
            self.set_commit(index)?;
        }
        let metadata = SnapshotMetadata {
            conf_state: Some(conf_state).into(),
            index,
            term,
            ..Default::default()
        };
        self.meta.insert(SNAPSHOT_DATA_KEY, descriptor.encode())?;
        self.meta
            .insert(SNAPSHOT_META_KEY, encode(&metadata, "snapshot metadata")?)?;
        self.snapshot = (index, term);
        self.snapshot_file = Some((descriptor, path));
        self.compact(index.saturating_sub(keep))?;
        // One sync for the snapshot's record, the compaction point and the
        // store's writes so far (the same database): the store is durable
        // past any index the log no longer holds.
        self.sync_meta()?;
        self.remove_stale_snapshots();
        Ok(())
    }

    /// Compacts the log through `through` (never past the snapshot: what is
    /// removed must be covered by it): from now on it starts after it. Its
    /// files leave with the next calls of [`Self::compact_step`], once the
    /// compaction point is synced.
    pub fn compact(&mut self, through: u64) -> Result<(), RaftError> {
        let through = through.min(self.snapshot.0);
        if through <= self.truncated.0 {
            return Ok(());
        }
        let term = self.term_of(through)?;
        self.meta
            .insert(TRUNCATED_KEY, index_term_bytes(through, term).to_vec())?;
        self.meta_dirty = true;
        self.truncated = (through, term);
        self.log.compact_through(through);
        Ok(())
    }

    /// Removes one segment file the compaction point passed (syncing the
    /// point first when it is not yet); true while another may go. The
    /// loop calls it once a round.
    pub fn compact_step(&mut self) -> Result<bool, RaftError> {
        if self.durable_truncated < self.truncated.0 {
            self.sync_meta()?;
        }
        self.wal.remove_one_through(self.durable_truncated)
    }

    /// The number of the log's segment files.
    pub fn segment_files(&self) -> usize {
        self.wal.segments()
    }

    /// Makes every write so far durable: the log's records (one
    /// `fdatasync`), and the metadata when it changed.
    pub fn flush(&mut self) -> Result<(), RaftError> {
        self.wal.sync()?;
        if self.meta_dirty {
            self.sync_meta()?;
        }
        Ok(())
    }

    /// Writes out the log's queued records and returns the file whose
    /// `fdatasync` makes every record so far durable (the leader's flush
    /// thread syncs it, [`super::flusher`]); `None` when nothing was ever
    /// written. The metadata is synced where it changes.
    pub fn sync_target(&mut self) -> Result<Option<Arc<File>>, RaftError> {
        self.wal.sync_target()
    }

    /// Flushes and syncs the database: the metadata (and the store's
    /// writes so far).
    fn sync_meta(&mut self) -> Result<(), RaftError> {
        self.syncer.flush(&self.db)?;
        self.meta_dirty = false;
        self.durable_truncated = self.truncated.0;
        Ok(())
    }

    fn term_of(&self, index: u64) -> Result<u64, RaftError> {
        if index == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if index == self.snapshot.0 {
            return Ok(self.snapshot.1);
        }
        self.log.term(index).ok_or_else(|| {
            RaftError::Inconsistent(format!("raft log has no entry at index {index}"))
        })
    }

    /// Index and term of the last entry (`truncated` when the log is
    /// empty).
    fn last(&self) -> (u64, u64) {
        self.log.last().unwrap_or(self.truncated)
    }
}

impl raft::Storage for SledRaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last().0 + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let mut entries = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        for index in low..high {
            let Some(entry_size) = self.log.size(index) else {
                break;
            };
            size += entry_size;
            // Always at least one entry, as the trait requires.
            if !entries.is_empty() && size > max_size {
                break;
            }
            match self.log.get(index) {
                Some(Ok(entry)) => entries.push(entry),
                Some(Err(error)) => return Err(to_raft(error)),
                None => break,
            }
        }
        if entries.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if idx < self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last().0 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        self.term_of(idx).map_err(to_raft)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last().0)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        match self.load_snapshot().map_err(to_raft)? {
            Some(snapshot) if snapshot.get_metadata().index >= request_index => Ok(snapshot),
            // No snapshot yet, or an older one than asked for: the next
            // compaction makes one; Raft asks again later.
            _ => Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            )),
        }
    }
}

/// The file of the stored snapshot at `(index, term)`. A snapshot stored
/// before snapshots were files holds the whole state in `snapshot_data`:
/// it is written to a file and replaced by the file's descriptor (flushed)
/// once, here.
fn snapshot_file(
    db: &sled::Db,
    syncer: &Syncer,
    meta: &sled::Tree,
    files: &SnapshotDir,
    (index, term): (u64, u64),
) -> Result<(Descriptor, PathBuf), RaftError> {
    let data = meta.get(SNAPSHOT_DATA_KEY)?.ok_or_else(|| {
        RaftError::Inconsistent(format!(
            "snapshot metadata at index {index} but no snapshot data"
        ))
    })?;
    if Descriptor::is_descriptor(&data) {
        let descriptor = Descriptor::decode(&data).map_err(RaftError::SnapshotFile)?;
        let path = files.existing(index, term, &descriptor).map_err(|error| {
            RaftError::Inconsistent(format!("the snapshot at index {index}: {error}"))
        })?;
        return Ok((descriptor, path));
    }
    let (descriptor, path) = files.write(index, term, |out| {
        out.write_all(&data).map_err(|error| error.to_string())
    })?;
    meta.insert(SNAPSHOT_DATA_KEY, descriptor.encode())?;
    syncer.flush(db)?;
    tracing::info!(
        index,
        bytes = descriptor.size,
        "stored raft snapshot moved to a file"
    );
    Ok((descriptor, path))
}

fn to_raft(error: RaftError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(error)))
}

fn read_message<M: protobuf::Message>(
    tree: &sled::Tree,
    key: &'static [u8],
) -> Result<Option<M>, RaftError> {
    match tree.get(key)? {
        None => Ok(None),
        Some(bytes) => Ok(Some(decode(&bytes, "raft_meta")?)),
    }
}

fn decode<M: protobuf::Message>(bytes: &[u8], what: &'static str) -> Result<M, RaftError> {
    M::parse_from_bytes(bytes).map_err(|source| RaftError::Decode { what, source })
}

fn encode<M: protobuf::Message>(message: &M, what: &'static str) -> Result<Vec<u8>, RaftError> {
    message
        .write_to_bytes()
        .map_err(|source| RaftError::Encode { what, source })
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(buf)
}

fn index_term_bytes(index: u64, term: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&index.to_be_bytes());
    out[8..].copy_from_slice(&term.to_be_bytes());
    out
}

mod entries;
mod replay;
#[cfg(test)]
mod tests;
