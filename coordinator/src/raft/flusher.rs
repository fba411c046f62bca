//! The leader's flushes, off the replica loop.
//!
//! A leader may send its appends before its own entries are durable
//! (raft thesis 10.2.1), and with raft-rs's asynchronous `Ready`s it may
//! also go on with the loop while they are flushed: the loop writes the
//! entries into the log's current segment file (into the kernel, not yet
//! synced, [`super::wal`]), hands the `Ready`'s number and that file to
//! this thread, and handles the next inputs (followers' acknowledgements, the
//! next proposals) meanwhile. The thread flushes and reports the number
//! back through the loop's inbox; only then does the loop tell raft-rs
//! (`on_persist_ready`), so the leader counts its own copy towards a
//! quorum, and applies (and acknowledges) an entry, only once it is
//! fsynced. Numbers queued while a flush runs share the next one: a
//! flush covers every write made before it started.
//!
//! Followers flush on the loop as before: their acknowledgement must
//! follow their flush anyway, and a thread hop would only add to it.

use std::fs::File;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::RaftError;

/// Tells the loop that every `Ready` up to `number` is durable, or that
/// the flush failed. False when the loop is gone.
pub(crate) type Report = Box<dyn Fn(u64, Result<(), RaftError>) -> bool + Send>;

/// A flush to do: every `Ready` up to the number, written into the file
/// (`None`: nothing was ever written, nothing to sync).
type Request = (u64, Option<Arc<File>>);

/// The flushing thread and the way to it. Dropping it stops the thread
/// and waits for it.
pub(crate) struct Flusher {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts the thread for replica `id`.
    pub(crate) fn start(id: u64, report: Report) -> Result<Flusher, RaftError> {
        let (requests, receiver) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name(format!("gantry-flush-{id}"))
            .spawn(move || {
                while let Ok(mut request) = receiver.recv() {
                    // Later requests are covered by the same flush: their
                    // records are in the latest file (an earlier segment
                    // was synced when it was closed).
                    while let Ok(later) = receiver.try_recv() {
                        request = later;
                    }
                    let (number, file) = request;
                    let flushed = match file {
                        Some(file) => file.sync_data().map_err(|error| {
                            RaftError::Wal(format!("cannot sync the log's segment: {error}"))
                        }),
                        None => Ok(()),
                    };
                    let failed = flushed.is_err();
                    if !report(number, flushed) || failed {
                        break;
                    }
                }
            })
            .map_err(|error| {
                RaftError::Config(format!("cannot start the raft flush thread: {error}"))
            })?;
        Ok(Flusher {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Asks for a flush of everything written so far (into `file` and
    /// earlier, synced segments), to be reported as `number`. False when
    /// the thread has stopped (after a failed flush).
    pub(crate) fn request(&self, number: u64, file: Option<Arc<File>>) -> bool {
        self.requests
            .as_ref()
            .is_some_and(|requests| requests.send((number, file)).is_ok())
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::{Arc, Mutex};

    /// Every request is reported, in order, the last one at least; a
    /// report names a number only once what was written before it was
    /// synced (here: the write is read back from another handle).
    #[test]
    fn reports_the_latest_number_after_flushing() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal =
            super::super::wal::Wal::open(dir.path(), 1 << 20, &mut |_, _| Ok(())).unwrap();
        let reported = Arc::new(Mutex::new(Vec::new()));
        let seen = reported.clone();
        let flusher = Flusher::start(
            7,
            Box::new(move |number, result| {
                result.unwrap();
                seen.lock().unwrap().push(number);
                true
            }),
        )
        .unwrap();
        assert!(
            flusher.request(1, wal.sync_target().unwrap()),
            "nothing written"
        );
        wal.push_entry(&raft::eraftpb::Entry {
            index: 1,
            term: 1,
            ..Default::default()
        })
        .unwrap();
        assert!(flusher.request(2, wal.sync_target().unwrap()));
        drop(flusher);
        let reported = reported.lock().unwrap().clone();
        assert_eq!(reported.last(), Some(&2));
        assert!(reported.windows(2).all(|w| w[0] < w[1]), "{reported:?}");
        drop(wal);
        let mut read = Vec::new();
        super::super::wal::Wal::open(dir.path(), 1 << 20, &mut |record, _| {
            read.push(record);
            Ok(())
        })
        .unwrap();
        assert_eq!(read.len(), 2, "the head hard state and the entry: {read:?}");
    }
}
