//! The leader's flushes, off the replica loop.
//!
//! A leader may send its appends before its own entries are durable
//! (raft thesis 10.2.1), and with raft-rs's asynchronous `Ready`s it may
//! also go on with the loop while they are flushed: the loop writes the
//! entries into sled (in memory), hands the `Ready`'s number to this
//! thread, and handles the next inputs (followers' acknowledgements, the
//! next proposals) meanwhile. The thread flushes and reports the number
//! back through the loop's inbox; only then does the loop tell raft-rs
//! (`on_persist_ready`), so the leader counts its own copy towards a
//! quorum, and applies (and acknowledges) an entry, only once it is
//! fsynced. Numbers queued while a flush runs share the next one: a
//! flush covers every write made before it started.
//!
//! Followers flush on the loop as before: their acknowledgement must
//! follow their flush anyway, and a thread hop would only add to it.

use std::sync::mpsc;
use std::thread::JoinHandle;

use super::RaftError;

/// Tells the loop that every `Ready` up to `number` is durable, or that
/// the flush failed. False when the loop is gone.
pub(crate) type Report = Box<dyn Fn(u64, Result<(), sled::Error>) -> bool + Send>;

/// The flushing thread and the way to it. Dropping it stops the thread
/// and waits for it (the database must be released with the loop).
pub(crate) struct Flusher {
    requests: Option<mpsc::Sender<u64>>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts the thread for replica `id`, flushing `db` through `syncer`.
    pub(crate) fn start(
        id: u64,
        db: sled::Db,
        syncer: crate::durable::Syncer,
        report: Report,
    ) -> Result<Flusher, RaftError> {
        let (requests, receiver) = mpsc::channel::<u64>();
        let thread = std::thread::Builder::new()
            .name(format!("gantry-flush-{id}"))
            .spawn(move || {
                while let Ok(mut number) = receiver.recv() {
                    // Later requests are covered by the same flush.
                    while let Ok(later) = receiver.try_recv() {
                        number = later;
                    }
                    let flushed = syncer.flush(&db);
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

    /// Asks for a flush of everything written so far, to be reported as
    /// `number`. False when the thread has stopped (after a failed flush).
    pub(crate) fn request(&self, number: u64) -> bool {
        self.requests
            .as_ref()
            .is_some_and(|requests| requests.send(number).is_ok())
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
    /// flushed (here: the write is visible after reopening).
    #[test]
    fn reports_the_latest_number_after_flushing() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let reported = Arc::new(Mutex::new(Vec::new()));
        let seen = reported.clone();
        let flusher = Flusher::start(
            7,
            db.clone(),
            crate::durable::Syncer::open(dir.path()).unwrap(),
            Box::new(move |number, result| {
                result.unwrap();
                seen.lock().unwrap().push(number);
                true
            }),
        )
        .unwrap();
        db.insert(b"k", b"v").unwrap();
        assert!(flusher.request(1));
        assert!(flusher.request(2));
        drop(flusher);
        let reported = reported.lock().unwrap().clone();
        assert_eq!(reported.last(), Some(&2));
        assert!(reported.windows(2).all(|w| w[0] < w[1]), "{reported:?}");
        drop(db);
        // sled releases its file lock a moment after the close: the
        // store's open waits for it.
        let db = crate::store::open_db(dir.path()).unwrap();
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    }
}
