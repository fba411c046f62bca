//! Taking a snapshot without stalling the replica loop on its file.
//!
//! A snapshot used to be written from the state machine straight into its
//! file on the loop: encoding, SHA-256, the writes, the fsync, the rename
//! and the directory's fsync all held up every entry behind it (17-40 ms
//! at 2 MB under load, a submit p99 of 28 ms when the leader took one).
//! Now the loop only takes the snapshot (the application captures its
//! state: `ReplicatedStateMachine::snapshot`) and hands what it returned
//! to a thread of its own ([`spawn`]), which writes, hashes, fsyncs and
//! renames the file ([`SnapshotDir::write`]) while the loop goes on
//! applying.
//! The thread reports through the loop's inbox ([`Written`]); the loop
//! then records the file and compacts the log
//! ([`SledRaftStorage::record_snapshot`](super::storage::SledRaftStorage::record_snapshot))
//! and tells the application, whose stored state carries over what was
//! applied meanwhile (`snapshot_stored`).
//!
//! Invariants:
//! - at most one snapshot is in flight ([`Taking`]); none starts until it
//!   is recorded or dropped;
//! - nothing is compacted before the file is complete and synced: until
//!   then the previous snapshot and the whole log behind it stay;
//! - a peer's snapshot installed while one is in flight wins: the one in
//!   flight is dropped (its file removed), never recorded over it
//!   ([`Taking::restores`] against the driver's count);
//! - the configuration recorded with the snapshot is the one as of its
//!   index, read when it was taken.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::driver::Driver;
use super::node::Input;
use super::snapfile::{Descriptor, SnapshotDir};
use super::storage::SnapshotTarget;
use super::{RaftError, ReplicatedStateMachine, SnapshotWriter};

/// A snapshot whose file is being written.
pub(super) struct Taking {
    pub target: SnapshotTarget,
    /// Log entries before the snapshot's index kept at the compaction.
    pub keep: u64,
    /// The driver's count of installed snapshots when this one was taken:
    /// a different count when it is written means a peer's came in between.
    pub restores: u64,
    pub started: Instant,
    /// How long taking it took (on the loop).
    pub taken_in: Duration,
    thread: JoinHandle<()>,
}

impl Taking {
    /// Waits for the thread (a replica stopping with a snapshot in flight:
    /// its file is then left unrecorded, and removed as stale).
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!(
                index = self.target.index,
                "the snapshot writer thread panicked"
            );
        }
    }
}

/// The writer thread's report.
#[derive(Debug)]
pub(crate) struct Written {
    /// The snapshot's index.
    pub index: u64,
    /// The file and its descriptor, or why it could not be written.
    pub result: Result<(Descriptor, PathBuf), RaftError>,
}

/// Starts writing the snapshot taken at `target` (taking it began at
/// `started`) into a file of `files` with `writer`, on a thread of its
/// own; `report` gets the result.
fn spawn(
    files: SnapshotDir,
    target: SnapshotTarget,
    keep: u64,
    restores: u64,
    writer: SnapshotWriter,
    started: Instant,
    report: impl FnOnce(Written) + Send + 'static,
) -> Result<Taking, RaftError> {
    let taken_in = started.elapsed();
    let (index, term) = (target.index, target.term);
    let thread = std::thread::Builder::new()
        .name(format!("gantry-snapshot-{index}"))
        .spawn(move || {
            super::fault::snapshot_write_delay();
            // A panic is reported as a failure: a report that never came
            // would leave the loop waiting for it, taking no snapshot again.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                files.write(index, term, writer)
            }))
            .unwrap_or_else(|_| {
                Err(RaftError::SnapshotFile(format!(
                    "the snapshot writer at index {index} panicked"
                )))
            });
            report(Written { index, result });
        })
        .map_err(|error| {
            RaftError::SnapshotFile(format!("cannot start the snapshot writer thread: {error}"))
        })?;
    Ok(Taking {
        target,
        keep,
        restores,
        started,
        taken_in,
        thread,
    })
}

impl<A: ReplicatedStateMachine> Driver<A> {
    /// Takes a snapshot at the applied index: the application encodes its
    /// state here, a thread writes the file ([`spawn`]), and
    /// [`Driver::snapshot_written`] records it once written.
    pub(super) fn take_snapshot(&mut self) -> Result<(), RaftError> {
        let started = Instant::now();
        let applied = self.applied;
        let Some(target) = self.raw.store().snapshot_target(applied)? else {
            return Ok(());
        };
        // Never keep index 1: a replica with an empty log must get the
        // snapshot (which carries the configuration), not the log from 1.
        let keep = self.compact_keep.min(applied.saturating_sub(1));
        // A failed snapshot stops the replica: compacting the log behind
        // anything but the whole state would lose the rest for good (the
        // previous file stays the stored one).
        let writer = self.app.snapshot().map_err(|reason| RaftError::App {
            what: format!("take a snapshot at index {applied}"),
            reason,
        })?;
        let inbox = self.inbox.clone();
        let taking = spawn(
            self.raw.store().snapshot_dir().clone(),
            target,
            keep,
            self.restores,
            writer,
            started,
            move |written| {
                // A loop that stopped meanwhile joins the thread and
                // removes the file as stale.
                let _ = inbox.send(Input::SnapshotWritten(written));
            },
        )?;
        self.taking = Some(taking);
        Ok(())
    }

    /// The writer thread's report: the file is recorded as the latest
    /// snapshot and the log compacted behind it, then the application
    /// told; or, when a peer's snapshot was installed meanwhile, the file
    /// is dropped. A failed write stops the replica (as a failed flush
    /// does), unless a peer's install made it moot.
    pub(super) fn snapshot_written(&mut self, written: Written) -> Result<(), RaftError> {
        let Some(taking) = self.taking.take() else {
            return Err(RaftError::Inconsistent(format!(
                "a snapshot file at index {} was written that no snapshot in flight asked for",
                written.index
            )));
        };
        // It has sent its report: this returns at once.
        let _ = taking.thread.join();
        let index = taking.target.index;
        if index != written.index {
            return Err(RaftError::Inconsistent(format!(
                "the snapshot file written is at index {}, the snapshot in flight at {index}",
                written.index
            )));
        }
        let overtaken =
            taking.restores != self.restores || index <= self.raw.store().snapshot_index_term().0;
        if overtaken {
            // Whether written or not, it is of a state replaced since.
            if let Ok((_, path)) = &written.result
                && self.raw.store().snapshot_file() != Some(path.as_path())
            {
                let _ = std::fs::remove_file(path);
            }
            tracing::info!(
                id = self.id,
                index,
                "snapshot dropped: a peer's was installed while it was written"
            );
            return Ok(());
        }
        let (descriptor, path) = written.result?;
        let written_in = taking.started.elapsed();
        let bytes = descriptor.size;
        self.raw
            .mut_store()
            .record_snapshot(taking.target, descriptor, path, taking.keep)?;
        if let Some(file) = self.raw.store().snapshot_file() {
            let file = file.to_path_buf();
            self.app
                .snapshot_stored(index, &file)
                .map_err(|reason| RaftError::App {
                    what: format!("make the snapshot at index {index} the stored state's base"),
                    reason,
                })?;
        }
        tracing::info!(
            id = self.id,
            index,
            bytes,
            applied_since = self.applied.saturating_sub(index),
            take_ms = taking.taken_in.as_millis() as u64,
            written_ms = written_in.as_millis() as u64,
            record_ms = (taking.started.elapsed() - written_in).as_millis() as u64,
            "raft snapshot taken, log compacted"
        );
        Ok(())
    }

    /// A replica stopping with a snapshot in flight waits for its thread
    /// and removes the file it wrote (never recorded: the stored snapshot
    /// is still the previous one).
    pub(super) fn abandon_snapshot(&mut self) {
        if let Some(taking) = self.taking.take() {
            taking.join();
            self.raw.store().remove_stale_snapshots();
        }
    }
}
