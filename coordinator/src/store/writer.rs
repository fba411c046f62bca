//! The store's writer thread: sled's inserts of the applied state, off the
//! replica loop.
//!
//! A write of held-back changes (see [`Store::persist_applied`]) is
//! prepared on the loop, where the state is: the records it writes are
//! encoded there, and the decisions that need the store's base made there
//! ([`Store::prepare`]). The [`Prepared`] write, with handles on the trees
//! it goes to, is then committed here, in order, as one transaction; the
//! history's pruning and the removal of events below the floor read the
//! trees, so they are done here too, after every earlier write. The loop
//! goes on meanwhile: sled's per-record work (its tree updates, most of an
//! apply's cost) no longer holds up the next entry.
//!
//! Whatever reads the stored state first waits for the writes sent before
//! it ([`Writer::drain`]); at most [`MAX_QUEUED`] writes wait at a time, so
//! a slow disk slows the loop down rather than growing a queue. A failed
//! commit is kept and returned by every later send and drain: the replica
//! stops (the Raft log still holds every entry after the stored applied
//! index).

use std::sync::{Arc, Condvar, Mutex, mpsc};

use sled::Transactional;

use super::StoreError;
use super::history::{self, SharedLog};
use crate::domain::JobRecord;
use crate::state::RetentionPolicy;

/// Writes sent and not committed at most; a send past it waits.
const MAX_QUEUED: u64 = 2;

/// Handles on the trees a write goes to (a sled tree is a handle).
#[derive(Clone)]
pub(super) struct WriteTrees {
    /// The current generation's.
    pub state: super::base::Trees,
    /// The history's files.
    pub history: SharedLog,
    /// Where sled records how far they go (`history_log`).
    pub history_recorded: sled::Tree,
}

/// One write, its records encoded on the loop.
pub(super) struct Prepared {
    pub trees: WriteTrees,
    /// The journal values and their keys ([`super::journal`]).
    pub journal: Vec<(u64, Vec<u8>)>,
    /// The new events' values and their keys (each one's first index).
    pub events: Vec<(u64, Vec<u8>)>,
    /// The event floor rose from the first to the second index: the
    /// stored events below the second are removed (the event log's
    /// batches wholly below it).
    pub event_floor: Option<(u64, u64)>,
    pub meta: sled::Batch,
    /// Jobs retired: into the history.
    pub retired: Vec<JobRecord>,
    /// The history's retention, as of the write.
    pub policy: RetentionPolicy,
    /// The latest command's time (history pruning is decided from it).
    pub at_ms: u64,
}

impl Prepared {
    /// Commits the write as one transaction across the trees: after a
    /// crash either all of it is there or none.
    pub fn commit(self) -> Result<(), StoreError> {
        let Prepared {
            trees,
            journal,
            events: new_events,
            event_floor,
            meta,
            retired,
            policy,
            at_ms,
        } = self;
        let state = &trees.state;
        let mut events = sled::Batch::default();
        let mut event_log = sled::Batch::default();
        if let Some((from, to)) = event_floor {
            // Below the floor: out of hard state.
            for item in state.events.range(from.to_be_bytes()..to.to_be_bytes()) {
                let (key, _) = item?;
                events.remove(key);
            }
            for key in super::journal::batches_below(&state.event_log, to)? {
                event_log.remove(key);
            }
        }
        for (first, value) in new_events {
            event_log.insert(&first.to_be_bytes(), value);
        }
        let mut journal_batch = sled::Batch::default();
        for (key, value) in journal {
            journal_batch.insert(&key.to_be_bytes(), value);
        }
        // Held until the transaction records how far the files go.
        let mut log = history::lock(&trees.history);
        let mut recorded = sled::Batch::default();
        if log.write(&policy, &retired, at_ms)? {
            recorded.insert(history::RECORDED_KEY, &log.recorded().encode()[..]);
        }
        (
            &state.events,
            &state.event_log,
            &state.journal,
            &state.meta,
            &trees.history_recorded,
        )
            .transaction(|(t_events, t_event_log, t_journal, t_meta, t_recorded)| {
                t_events.apply_batch(&events)?;
                t_event_log.apply_batch(&event_log)?;
                t_journal.apply_batch(&journal_batch)?;
                t_meta.apply_batch(&meta)?;
                t_recorded.apply_batch(&recorded)?;
                Ok(())
            })
            .map_err(transaction_failed)?;
        Ok(())
    }
}

/// The store's error for a failed transaction (none of the store's
/// transactions aborts on its own).
pub(super) fn transaction_failed(error: sled::transaction::TransactionError<()>) -> StoreError {
    match error {
        sled::transaction::TransactionError::Storage(error) => StoreError::Sled(error),
        sled::transaction::TransactionError::Abort(()) => {
            StoreError::Sled(sled::Error::Unsupported("transaction aborted".into()))
        }
    }
}

/// Writes sent and committed, and the first failure.
#[derive(Default)]
struct Progress {
    sent: u64,
    done: u64,
    failure: Option<String>,
}

type Shared = Arc<(Mutex<Progress>, Condvar)>;

/// The writer thread and the way to it.
pub(super) struct Writer {
    sender: Option<mpsc::Sender<Prepared>>,
    progress: Shared,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread.
    pub fn start() -> Result<Writer, StoreError> {
        let (sender, receiver) = mpsc::channel::<Prepared>();
        let progress: Shared = Arc::default();
        let shared = progress.clone();
        let thread = std::thread::Builder::new()
            .name("gantry-store".into())
            .spawn(move || {
                for prepared in receiver {
                    // A panic is a failure like any other: a drain must not
                    // wait for a commit that will never be counted.
                    let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        prepared.commit()
                    }));
                    let failed = match committed {
                        Ok(Ok(())) => None,
                        Ok(Err(error)) => Some(error.to_string()),
                        Err(panic) => Some(format!(
                            "the store's writer panicked: {}",
                            crate::raft::node::panic_message(panic.as_ref())
                        )),
                    };
                    let (lock, wake) = &*shared;
                    let mut progress = lock.lock().unwrap_or_else(|p| p.into_inner());
                    progress.done += 1;
                    if progress.failure.is_none() {
                        progress.failure = failed;
                    }
                    wake.notify_all();
                }
            })
            .map_err(|error| {
                StoreError::Snapshot(format!("cannot start the store's writer thread: {error}"))
            })?;
        Ok(Writer {
            sender: Some(sender),
            progress,
            thread: Some(thread),
        })
    }

    /// Sends a write, after waiting while [`MAX_QUEUED`] are queued.
    pub fn send(&self, prepared: Prepared) -> Result<(), StoreError> {
        self.wait_until(|p| p.sent - p.done < MAX_QUEUED)?;
        let Some(sender) = &self.sender else {
            return Err(stopped());
        };
        {
            let (lock, _) = &*self.progress;
            lock.lock().unwrap_or_else(|p| p.into_inner()).sent += 1;
        }
        sender.send(prepared).map_err(|_| stopped())
    }

    /// Waits until every write sent is committed.
    pub fn drain(&self) -> Result<(), StoreError> {
        self.wait_until(|p| p.done == p.sent)
    }

    /// The first failed commit, if any (without waiting).
    pub fn failure(&self) -> Option<String> {
        let (lock, _) = &*self.progress;
        lock.lock()
            .unwrap_or_else(|p| p.into_inner())
            .failure
            .clone()
    }

    fn wait_until(&self, ready: impl Fn(&Progress) -> bool) -> Result<(), StoreError> {
        let (lock, wake) = &*self.progress;
        let mut progress = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(failure) = &progress.failure {
                return Err(StoreError::Write(failure.clone()));
            }
            if ready(&progress) {
                return Ok(());
            }
            progress = wake.wait(progress).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Write("the store's writer thread has stopped".into())
}

impl Drop for Writer {
    /// Lets the thread commit what was sent, then joins it.
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
