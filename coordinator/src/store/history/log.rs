//! The history's files: segments of pieces, appended and removed whole,
//! with an index of their chunks in memory.
//!
//! A piece ([`HistoryPiece`](st::HistoryPiece)) is the jobs one store
//! write retired (at most [`PIECE_BYTES`]; a write retiring more makes
//! several), framed by [`crate::framed`] in `history/<n>.hist`. Pieces are
//! numbered without gaps. Consecutive pieces make a chunk: a new piece
//! joins the newest chunk while that chunk is under [`MERGE_BELOW`] bytes
//! and in the segment being written, so a chunk is one byte range of one
//! file, and the index holds a few numbers per chunk whatever the history
//! holds (about 100 bytes per 32 KiB of history).
//!
//! The history was kept in sled until layout 5. sled held about as much
//! memory as the history it stored: `gantry-bench soak` grew 35-50 MiB
//! as its history filled to 64 MiB, and stayed flat without it.
//!
//! **Crash safety.** A write appends its pieces and syncs the file before
//! the store's sled transaction records [`Recorded`] (the next piece's
//! number, the first chunk kept, the bytes): whatever sled has durably
//! recorded is durably in the files. Opening reads every segment and cuts
//! off a piece at or past the recorded number (its write never committed,
//! and will be applied again from the Raft log) and whatever a crash left
//! half written; a segment of chunks below the first one kept is removed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use gantry_proto::storage as st;
use prost::Message;

use super::Head;
use crate::framed;
use crate::state::RetentionPolicy;
use crate::store::{StoreError, journal, records};

/// The directory's name in the store's directory.
pub const DIR_NAME: &str = "history";
/// The segments' file name suffix.
const SUFFIX: &str = "hist";
/// A segment's first bytes.
const MAGIC: &[u8; 8] = b"GHISTv1\0";
/// The header: [`MAGIC`], then the number of the next piece when the
/// segment was created (8 bytes, little-endian), so that a segment with
/// no piece yet still says how far the pieces went.
const HEADER_BYTES: usize = 16;
/// A segment takes pieces until it is this large (one piece past it
/// goes in the next), so a pruned history leaves at most about this much
/// on disk behind its chunks.
const SEGMENT_BYTES: u64 = 8 << 20;
/// Largest piece read back: a bound against a corrupt length (a piece is
/// [`PIECE_BYTES`] of jobs, or one larger job alone).
const MAX_PIECE_BYTES: usize = 256 << 20;

/// A piece's jobs' records at most (but a single larger job): the files
/// are not sled's, whose values are kept small ([`journal::VALUE_BYTES`]).
const PIECE_BYTES: usize = 64 << 10;

/// Between retirements, the history is checked for chunks past their
/// retention at most this often (in command time).
const PRUNE_INTERVAL_MS: u64 = 60_000;

/// At most this many chunks leave the history in one write (about 4 MiB).
const PRUNE_CHUNKS: usize = 64;

/// The newest chunk takes the next write's jobs while its records are
/// under this many bytes (half a piece).
pub(super) const MERGE_BELOW: u64 = 32 << 10;

/// What sled records of the history, in the transaction of the write that
/// changed it: opening the files goes by it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The number of the next piece (pieces at or past it are cut off).
    pub next_piece: u64,
    /// Chunks below it have left the history.
    pub first_chunk: u64,
    /// Bytes of the kept chunks' records, encoded.
    pub bytes: u64,
}

impl Recorded {
    /// Its value in sled: the three numbers, 8 bytes each, big-endian.
    pub fn encode(&self) -> [u8; 24] {
        let mut value = [0; 24];
        value[..8].copy_from_slice(&self.next_piece.to_be_bytes());
        value[8..16].copy_from_slice(&self.first_chunk.to_be_bytes());
        value[16..].copy_from_slice(&self.bytes.to_be_bytes());
        value
    }

    /// Reads [`encode`](Self::encode)'s value.
    pub fn decode(value: &[u8]) -> Result<Recorded, StoreError> {
        let Ok(value) = <[u8; 24]>::try_from(value) else {
            return Err(StoreError::History(format!(
                "the recorded history state has {} bytes, expected 24",
                value.len()
            )));
        };
        let number = |n: usize| crate::store::key_u64(&value[n * 8..n * 8 + 8]);
        Ok(Recorded {
            next_piece: number(0),
            first_chunk: number(1),
            bytes: number(2),
        })
    }
}

/// A chunk kept: where its pieces are and what they hold.
#[derive(Debug, Clone)]
pub(super) struct Chunk {
    /// Its segment's number.
    segment: u64,
    /// Its pieces' byte range in the segment.
    start: u64,
    end: u64,
    pub head: Head,
    /// Its jobs' pipeline runs, each once.
    pub runs: Vec<st::PipelineRun>,
}

/// The segment pieces are appended to.
struct Current {
    number: u64,
    file: File,
    len: u64,
}

/// The history's files and their index; owned by the store's writer while
/// it commits a write, read by the store after it drained the writer.
pub struct HistoryLog {
    dir: PathBuf,
    /// The chunks kept, by number.
    chunks: BTreeMap<u64, Chunk>,
    /// Every segment's number, with the highest chunk it has a piece of
    /// (`None`: none yet).
    segments: BTreeMap<u64, Option<u64>>,
    current: Option<Current>,
    recorded: Recorded,
    /// The number the next new chunk gets.
    next_chunk: u64,
    /// The chunk the next piece may join (the newest, in `current`).
    open_chunk: Option<u64>,
    /// A segment takes pieces until it is this large.
    segment_bytes: u64,
    /// Command time after which the history is next checked for chunks
    /// past their retention (it is checked at every retirement anyway).
    next_prune_ms: u64,
}

impl HistoryLog {
    /// Opens the files in `dir` (created if missing) as `recorded` says:
    /// see the module's docs.
    pub fn open(dir: &Path, recorded: Recorded) -> Result<HistoryLog, StoreError> {
        HistoryLog::open_sized(dir, recorded, SEGMENT_BYTES)
    }

    /// [`open`](Self::open) with segments of `segment_bytes` (tests make
    /// them small).
    pub(super) fn open_sized(
        dir: &Path,
        recorded: Recorded,
        segment_bytes: u64,
    ) -> Result<HistoryLog, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "create", &e))?;
        let mut log = HistoryLog {
            dir: dir.to_path_buf(),
            chunks: BTreeMap::new(),
            segments: BTreeMap::new(),
            current: None,
            recorded,
            next_chunk: recorded.first_chunk,
            open_chunk: None,
            segment_bytes,
            next_prune_ms: 0,
        };
        let files = framed::numbered_files(dir, SUFFIX).map_err(|e| io_error(dir, "list", &e))?;
        let mut cut = false;
        let mut pieces_found = 0;
        for (number, path) in files {
            if cut {
                // After a piece that never committed: all of it never did.
                remove_file(&path)?;
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| io_error(&path, "read", &e))?;
            if bytes.len() < HEADER_BYTES || bytes[..MAGIC.len()] != MAGIC[..] {
                tracing::warn!(path = %path.display(), "history segment without its header removed");
                remove_file(&path)?;
                continue;
            }
            let replayed = log.replay_segment(number, &bytes)?;
            cut = replayed.cut;
            if cut {
                tracing::info!(
                    segment = number,
                    from_byte = replayed.end,
                    recorded = recorded.next_piece,
                    "history pieces past what the store recorded cut off (a write the crash lost; it is applied again)"
                );
            }
            pieces_found = pieces_found.max(replayed.pieces_through);
            if replayed.end < bytes.len() {
                truncate(&path, replayed.end as u64)?;
            }
            log.segments.insert(number, replayed.last_chunk);
        }
        if pieces_found < recorded.next_piece {
            // Only a file lost or altered outside the store leads here: a
            // piece is synced before sled records it.
            tracing::warn!(
                found = pieces_found,
                recorded = recorded.next_piece,
                "the history's files end before the pieces recorded: the missing ones are lost"
            );
        }
        // The newest segment stays: pieces go on in it.
        let newest = log.segments.last_key_value().map(|(&number, _)| number);
        log.remove_pruned_segments(newest)?;
        if let Some((&number, _)) = log.segments.last_key_value() {
            let path = log.segment_path(number);
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io_error(&path, "open", &e))?;
            let len = file
                .metadata()
                .map_err(|e| io_error(&path, "read the size of", &e))?
                .len();
            log.current = Some(Current { number, file, len });
        }
        Ok(log)
    }

    /// Indexes one segment's pieces.
    fn replay_segment(&mut self, segment: u64, bytes: &[u8]) -> Result<Replayed, StoreError> {
        let mut header_piece = [0; 8];
        header_piece.copy_from_slice(&bytes[MAGIC.len()..HEADER_BYTES]);
        let mut replayed = Replayed {
            end: HEADER_BYTES,
            cut: false,
            last_chunk: None,
            pieces_through: u64::from_le_bytes(header_piece),
        };
        while let Some((body, next)) = framed::next_frame(bytes, replayed.end, MAX_PIECE_BYTES) {
            let piece = st::HistoryPieceIndex::decode(body)
                .map_err(|e| StoreError::History(format!("a piece does not decode: {e}")))?;
            if piece.number >= self.recorded.next_piece {
                replayed.cut = true;
                break;
            }
            replayed.pieces_through = piece.number + 1;
            self.next_chunk = self.next_chunk.max(piece.chunk + 1);
            replayed.last_chunk = Some(piece.chunk);
            if piece.chunk >= self.recorded.first_chunk {
                // A piece without a head holds nothing.
                let head = piece.head.unwrap_or_default();
                self.index_piece(
                    segment,
                    piece.chunk,
                    replayed.end as u64,
                    next as u64,
                    Head::from_piece(&head),
                    head.runs,
                );
            }
            replayed.end = next;
        }
        Ok(replayed)
    }

    /// Adds a piece at `start..end` of `segment` to chunk `chunk`'s range.
    fn index_piece(
        &mut self,
        segment: u64,
        chunk: u64,
        start: u64,
        end: u64,
        head: Head,
        runs: Vec<st::PipelineRun>,
    ) {
        match self.chunks.get_mut(&chunk) {
            Some(kept) if kept.segment == segment && kept.end == start => {
                kept.end = end;
                kept.head.absorb(&head);
                for run in runs {
                    if !kept.runs.contains(&run) {
                        kept.runs.push(run);
                    }
                }
            }
            Some(_) => {
                // Never written so: a chunk's pieces follow each other.
                tracing::warn!(
                    chunk,
                    segment,
                    "a history piece apart from its chunk skipped"
                );
            }
            None => {
                self.chunks.insert(
                    chunk,
                    Chunk {
                        segment,
                        start,
                        end,
                        head,
                        runs,
                    },
                );
            }
        }
    }

    /// The next piece starts a chunk of its own.
    pub fn close_chunk(&mut self) {
        self.open_chunk = None;
    }

    /// What sled is to record (as of the last write).
    pub fn recorded(&self) -> Recorded {
        self.recorded
    }

    /// The chunks kept, oldest first.
    pub(super) fn chunks(&self) -> impl DoubleEndedIterator<Item = (u64, &Chunk)> {
        self.chunks.iter().map(|(&number, chunk)| (number, chunk))
    }

    /// The history's part of one store write: the oldest chunks whose
    /// last job is past the retention as of `at_ms`, or while the history
    /// with the jobs `retired` is over its size cap, leave (looked for at
    /// every retirement, and at most every [`PRUNE_INTERVAL_MS`] of command
    /// time otherwise); then `retired` is appended ([`add`](Self::add)).
    /// Returns whether [`recorded`](Self::recorded) changed.
    pub fn write(
        &mut self,
        policy: &RetentionPolicy,
        retired: &[crate::domain::JobRecord],
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        if retired.is_empty() && at_ms < self.next_prune_ms {
            return Ok(false);
        }
        self.next_prune_ms = at_ms.saturating_add(PRUNE_INTERVAL_MS);
        let before = self.recorded;
        let jobs: Vec<st::JobRecord> = retired.iter().map(records::job_to_storage).collect();
        let mut kept_bytes = before.bytes;
        let new_bytes = jobs.iter().map(record_bytes).sum::<u64>();
        let mut first_chunk = before.first_chunk;
        for (&number, chunk) in self.chunks.iter().take(PRUNE_CHUNKS) {
            let expired = chunk
                .head
                .last_finished_ms
                .saturating_add(policy.history_retention_ms)
                <= at_ms;
            if !expired && kept_bytes + new_bytes <= policy.history_max_bytes {
                break;
            }
            kept_bytes = kept_bytes.saturating_sub(chunk.head.bytes);
            first_chunk = number + 1;
        }
        // A pruned open chunk is no longer in `chunks`: the next piece
        // starts a new one (`append`).
        self.chunks = self.chunks.split_off(&first_chunk);
        self.recorded.first_chunk = first_chunk;
        self.recorded.bytes = kept_bytes;
        self.add(jobs)?;
        self.remove_pruned_segments(self.current.as_ref().map(|c| c.number))?;
        Ok(self.recorded != before)
    }

    /// Appends `jobs` (sorted by id here) in pieces of at most
    /// [`PIECE_BYTES`] and syncs them.
    pub fn add(&mut self, jobs: Vec<st::JobRecord>) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        self.add_unsynced(jobs)?;
        self.sync_current()
    }

    /// [`add`](Self::add) without the sync: the caller syncs
    /// ([`sync_current`](Self::sync_current)) before sled records them.
    pub fn add_unsynced(&mut self, mut jobs: Vec<st::JobRecord>) -> Result<(), StoreError> {
        jobs.sort_unstable_by_key(|job| job.id);
        for group in journal::runs_of(jobs, PIECE_BYTES) {
            self.append(group)?;
        }
        Ok(())
    }

    /// Syncs the segment being written, if any (a segment rolled over
    /// from was synced then).
    pub fn sync_current(&self) -> Result<(), StoreError> {
        let Some(current) = &self.current else {
            return Ok(());
        };
        current
            .file
            .sync_data()
            .map_err(|e| io_error(&self.segment_path(current.number), "sync", &e))
    }

    /// Appends one piece of jobs (their records sorted by id).
    fn append(&mut self, jobs: Vec<st::JobRecord>) -> Result<(), StoreError> {
        let (head, runs) = Head::of(&jobs);
        let piece = st::HistoryPiece {
            number: self.recorded.next_piece,
            chunk: 0,
            head: Some(head.to_piece(runs.clone())),
            jobs,
        };
        // The chunk number, set below, adds at most 11 bytes.
        let frame_len = (piece.encoded_len() + framed::FRAME_HEAD + 16) as u64;
        let roll = match &self.current {
            None => true,
            Some(current) => {
                current.len > HEADER_BYTES as u64 && current.len + frame_len > self.segment_bytes
            }
        };
        if roll {
            self.start_segment()?;
        }
        let chunk = match self
            .open_chunk
            .and_then(|n| self.chunks.get(&n).map(|c| (n, c)))
        {
            Some((number, chunk)) if chunk.head.bytes < MERGE_BELOW => number,
            _ => {
                self.next_chunk += 1;
                self.next_chunk - 1
            }
        };
        let piece = st::HistoryPiece { chunk, ..piece };
        let mut frame = Vec::with_capacity(frame_len as usize);
        framed::push_frame(&mut frame, &[&piece.encode_to_vec()]);
        let path = self.current_path();
        let Some(current) = &mut self.current else {
            return Err(StoreError::History("no segment to append to".into()));
        };
        current
            .file
            .write_all_at(&frame, current.len)
            .map_err(|e| io_error(&path, "write", &e))?;
        let (segment, start) = (current.number, current.len);
        current.len += frame.len() as u64;
        let end = current.len;
        self.index_piece(segment, chunk, start, end, head, runs);
        self.segments.insert(segment, Some(chunk));
        self.open_chunk = Some(chunk);
        self.recorded.next_piece += 1;
        self.recorded.bytes += head.bytes;
        Ok(())
    }

    /// Syncs the segment being written and starts the next: its header
    /// written and synced, and the directory synced so that its name
    /// survives a power cut. The newest chunk takes no more pieces.
    fn start_segment(&mut self) -> Result<(), StoreError> {
        self.sync_current()?;
        let number = self.segments.last_key_value().map_or(0, |(&n, _)| n + 1);
        let path = self.segment_path(number);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error(&path, "create", &e))?;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&self.recorded.next_piece.to_le_bytes());
        framed::write_header_durably(&file, &header, &self.dir)
            .map_err(|e| io_error(&path, "write the header of", &e))?;
        self.segments.insert(number, None);
        self.current = Some(Current {
            number,
            file,
            len: HEADER_BYTES as u64,
        });
        self.open_chunk = None;
        Ok(())
    }

    /// Removes the segments, but `current`, that hold no kept chunk.
    fn remove_pruned_segments(&mut self, current: Option<u64>) -> Result<(), StoreError> {
        let first_chunk = self.recorded.first_chunk;
        let pruned: Vec<u64> = self
            .segments
            .iter()
            .filter(|&(&number, &last)| {
                Some(number) != current && last.is_none_or(|last| last < first_chunk)
            })
            .map(|(&number, _)| number)
            .collect();
        for number in pruned {
            remove_file(&self.segment_path(number))?;
            self.segments.remove(&number);
        }
        Ok(())
    }

    /// The jobs of chunk `number` (none when it has left), in the order
    /// they were appended.
    pub(super) fn chunk_jobs(&self, number: u64) -> Result<Vec<st::JobRecord>, StoreError> {
        let Some(chunk) = self.chunks.get(&number) else {
            return Ok(Vec::new());
        };
        let path = self.segment_path(chunk.segment);
        let mut bytes = vec![0; (chunk.end - chunk.start) as usize];
        File::open(&path)
            .and_then(|file| file.read_exact_at(&mut bytes, chunk.start))
            .map_err(|e| io_error(&path, "read", &e))?;
        let mut jobs = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let Some((body, next)) = framed::next_frame(&bytes, at, MAX_PIECE_BYTES) else {
                return Err(StoreError::History(format!(
                    "{}: chunk {number} does not read back whole at byte {}",
                    path.display(),
                    chunk.start + at as u64
                )));
            };
            let piece = st::HistoryPiece::decode(body)
                .map_err(|e| StoreError::History(format!("a piece does not decode: {e}")))?;
            jobs.extend(piece.jobs);
            at = next;
        }
        Ok(jobs)
    }

    /// Segment files on disk.
    #[cfg(test)]
    pub(super) fn segment_count(&self) -> usize {
        self.segments.len()
    }

    fn segment_path(&self, number: u64) -> PathBuf {
        self.dir.join(framed::numbered_name(number, SUFFIX))
    }

    fn current_path(&self) -> PathBuf {
        self.segment_path(self.current.as_ref().map_or(0, |c| c.number))
    }
}

/// What replaying one segment found.
struct Replayed {
    /// The offset after its last piece kept.
    end: usize,
    /// It holds a piece at or past the recorded number.
    cut: bool,
    /// The highest chunk it has a piece of.
    last_chunk: Option<u64>,
    /// One past the highest piece number kept.
    pieces_through: u64,
}

/// What a job counts for in the history's size.
pub(super) fn record_bytes(job: &st::JobRecord) -> u64 {
    job.encoded_len() as u64
}

fn truncate(path: &Path, len: u64) -> Result<(), StoreError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|file| file.set_len(len).and_then(|()| file.sync_all()))
        .map_err(|e| io_error(path, "cut off the end of", &e))
}

fn remove_file(path: &Path) -> Result<(), StoreError> {
    std::fs::remove_file(path).map_err(|e| io_error(path, "remove", &e))
}

fn io_error(path: &Path, what: &str, error: &std::io::Error) -> StoreError {
    StoreError::History(format!("cannot {what} {}: {error}", path.display()))
}

#[cfg(test)]
mod tests;
