//! Raft snapshots as files (issue 11).
//!
//! A snapshot is one file in the replica's snapshot directory
//! (`<data dir>/raft-snapshots`), named by its index, term and the first
//! bytes of its SHA-256: `snap-<index>-<term>-<sha8>.snap`. What raft-rs
//! carries as the snapshot's data is only the file's [`Descriptor`] (size
//! and SHA-256), so the state is never one in-memory value and never one
//! gRPC message.
//!
//! **Writing** ([`SnapshotDir::write`]): the application serialises
//! straight into a temporary file (`*.tmp`) through a buffer that hashes
//! what passes; the file is fsynced, renamed to its final name and the
//! directory fsynced. Until the rename the previous snapshot is the one
//! the Raft storage names, so a crash mid-write leaves it usable; the
//! leftover temporary file is removed on the next start
//! ([`SnapshotDir::remove_except`]).
//!
//! **Receiving** ([`Incoming`]): a follower writes a leader's chunks to a
//! temporary file, refusing any byte past the declared size; at the end
//! the size and the SHA-256 must match the descriptor, then the same
//! fsync, rename and directory fsync. A transfer that stops half-way
//! (the peer died, a bad chunk) leaves only a temporary file, removed when
//! the [`Incoming`] is dropped or on the next start.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ring::digest::{Context, SHA256};

use super::RaftError;

/// Default size of the chunks a snapshot is sent in.
pub const DEFAULT_CHUNK_BYTES: usize = 4 << 20;
/// Largest chunk a receiver accepts (and largest `--raft-snapshot-chunk`).
pub const MAX_CHUNK_BYTES: usize = 16 << 20;
/// Default largest snapshot a replica writes or accepts.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: u64 = 8 << 30;

/// The snapshot directory's name inside a coordinator's data dir.
pub const DIR_NAME: &str = "raft-snapshots";

const MAGIC: &[u8; 8] = b"GSNAPv1\0";
const DESCRIPTOR_LEN: usize = 8 + 8 + 32;
const WRITE_BUFFER: usize = 1 << 20;

/// What raft-rs carries as a snapshot's data: the file's size and SHA-256
/// (its index and term are in the snapshot's metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Bytes in the file.
    pub size: u64,
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
}

impl Descriptor {
    /// The bytes put in `Snapshot::data`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DESCRIPTOR_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.sha256);
        out
    }

    /// Reads a descriptor; anything else (wrong length or magic) is an
    /// error naming what was found.
    pub fn decode(bytes: &[u8]) -> Result<Descriptor, String> {
        if bytes.len() != DESCRIPTOR_LEN || &bytes[..8] != MAGIC {
            return Err(format!(
                "snapshot data is not a snapshot file descriptor ({} bytes)",
                bytes.len()
            ));
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&bytes[8..16]);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&bytes[16..]);
        Ok(Descriptor {
            size: u64::from_be_bytes(size),
            sha256,
        })
    }

    /// Whether `bytes` looks like a descriptor (a snapshot stored before
    /// snapshots were files holds the whole state instead).
    pub fn is_descriptor(bytes: &[u8]) -> bool {
        bytes.len() == DESCRIPTOR_LEN && &bytes[..8] == MAGIC
    }

    fn short_hex(&self) -> String {
        self.sha256[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The directory of one replica's snapshot files.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
    /// Largest file written or accepted.
    max_bytes: u64,
}

impl SnapshotDir {
    /// Opens (creating) the directory.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<SnapshotDir, RaftError> {
        std::fs::create_dir_all(dir).map_err(|e| file_error(dir, "create", &e))?;
        Ok(SnapshotDir {
            dir: dir.to_path_buf(),
            max_bytes,
        })
    }

    /// Opens (creating) the snapshot directory of the data dir `data_dir`.
    pub fn in_data_dir(data_dir: &Path, max_bytes: u64) -> Result<SnapshotDir, RaftError> {
        SnapshotDir::open(&data_dir.join(DIR_NAME), max_bytes)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Largest snapshot written or accepted.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Where the snapshot at `index`/`term` with this descriptor lives.
    pub fn path_of(&self, index: u64, term: u64, descriptor: &Descriptor) -> PathBuf {
        self.dir.join(format!(
            "snap-{index:020}-{term:020}-{}.snap",
            descriptor.short_hex()
        ))
    }

    /// Writes a snapshot: `fill` serialises into the file (through a
    /// buffer; it must write the whole state or fail), called once (a
    /// `SnapshotWriter` is one). The file is complete, fsynced and in
    /// place (directory fsynced) when this returns; on any error only a
    /// temporary file may be left.
    pub fn write(
        &self,
        index: u64,
        term: u64,
        fill: impl FnOnce(&mut dyn Write) -> Result<(), String>,
    ) -> Result<(Descriptor, PathBuf), RaftError> {
        let temp = self.dir.join(format!("snap-{index:020}-{term:020}.tmp"));
        let file = create(&temp)?;
        let mut out = BufWriter::with_capacity(
            WRITE_BUFFER,
            Hashing {
                inner: file,
                digest: Context::new(&SHA256),
                bytes: 0,
                limit: self.max_bytes,
            },
        );
        let filled = fill(&mut out);
        let flushed = out.flush();
        let hashing = match (filled, flushed) {
            (Ok(()), Ok(())) => out
                .into_inner()
                .map_err(|e| file_error(&temp, "write", e.error()))?,
            (Err(reason), _) => {
                let _ = std::fs::remove_file(&temp);
                return Err(RaftError::SnapshotFile(format!(
                    "{}: the application could not write its snapshot: {reason}",
                    temp.display()
                )));
            }
            (Ok(()), Err(error)) => {
                let _ = std::fs::remove_file(&temp);
                return Err(file_error(&temp, "write", &error));
            }
        };
        let descriptor = Descriptor {
            size: hashing.bytes,
            sha256: finish_digest(hashing.digest),
        };
        let path = self.path_of(index, term, &descriptor);
        hashing
            .inner
            .sync_all()
            .map_err(|e| file_error(&temp, "fsync", &e))?;
        self.commit(&temp, &path)?;
        Ok((descriptor, path))
    }

    /// Starts receiving the snapshot at `index`/`term` described by
    /// `descriptor` (refused past the size limit).
    pub fn receive(
        &self,
        index: u64,
        term: u64,
        descriptor: Descriptor,
    ) -> Result<Incoming, RaftError> {
        if descriptor.size > self.max_bytes {
            return Err(RaftError::SnapshotFile(format!(
                "snapshot of {} bytes is over the limit of {} bytes (--raft-max-snapshot)",
                descriptor.size, self.max_bytes
            )));
        }
        let temp = self.dir.join(format!("recv-{index:020}-{term:020}.tmp"));
        let file = create(&temp)?;
        Ok(Incoming {
            file: Some(file),
            temp,
            target: self.path_of(index, term, &descriptor),
            dir: self.dir.clone(),
            digest: Context::new(&SHA256),
            written: 0,
            descriptor,
        })
    }

    /// Checks that the snapshot file at `index`/`term` exists with the
    /// descriptor's size (its hash was checked when it was written or
    /// received); returns its path.
    pub fn existing(
        &self,
        index: u64,
        term: u64,
        descriptor: &Descriptor,
    ) -> Result<PathBuf, RaftError> {
        let path = self.path_of(index, term, descriptor);
        let metadata = std::fs::metadata(&path).map_err(|e| file_error(&path, "read", &e))?;
        if metadata.len() != descriptor.size {
            return Err(RaftError::SnapshotFile(format!(
                "{} has {} bytes, its descriptor says {}",
                path.display(),
                metadata.len(),
                descriptor.size
            )));
        }
        Ok(path)
    }

    /// Removes every snapshot and temporary file but `keep` (old snapshots
    /// once a newer one is durable, leftovers of an interrupted write or
    /// transfer). Failures are logged: a file left behind costs space, not
    /// correctness.
    pub fn remove_except(&self, keep: Option<&Path>) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(dir = %self.dir.display(), %error, "cannot list snapshot files");
                return;
            }
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let ours = name.ends_with(".snap") || name.ends_with(".tmp");
            if !ours || Some(path.as_path()) == keep {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::debug!(path = %path.display(), "old snapshot file removed"),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot remove an old snapshot file");
                }
            }
        }
    }

    /// fsync'ed rename of a complete temporary file into place.
    fn commit(&self, temp: &Path, path: &Path) -> Result<(), RaftError> {
        std::fs::rename(temp, path).map_err(|e| file_error(path, "rename into", &e))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| file_error(&self.dir, "fsync", &e))
    }
}

/// A snapshot being received from a leader, chunk by chunk.
pub struct Incoming {
    /// `None` once finished (nothing to remove on drop).
    file: Option<File>,
    temp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    digest: Context,
    written: u64,
    descriptor: Descriptor,
}

impl Incoming {
    /// Appends a chunk; refuses bytes past the declared size.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<(), RaftError> {
        let Some(file) = self.file.as_mut() else {
            return Err(RaftError::SnapshotFile("transfer already finished".into()));
        };
        let after = self.written + data.len() as u64;
        if after > self.descriptor.size {
            return Err(RaftError::SnapshotFile(format!(
                "snapshot chunks run past the declared {} bytes (at least {after})",
                self.descriptor.size
            )));
        }
        file.write_all(data)
            .map_err(|e| file_error(&self.temp, "write", &e))?;
        self.digest.update(data);
        self.written = after;
        Ok(())
    }

    /// Bytes received so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks size and SHA-256, then fsyncs and renames the file into
    /// place; returns its path. On a mismatch the temporary file is removed.
    pub fn finish(mut self) -> Result<PathBuf, RaftError> {
        let Some(file) = self.file.take() else {
            return Err(RaftError::SnapshotFile("transfer already finished".into()));
        };
        let result = self.check_and_commit(file);
        if result.is_err() {
            let _ = std::fs::remove_file(&self.temp);
        }
        result
    }

    fn check_and_commit(&mut self, file: File) -> Result<PathBuf, RaftError> {
        if self.written != self.descriptor.size {
            return Err(RaftError::SnapshotFile(format!(
                "snapshot transfer ended after {} of {} bytes",
                self.written, self.descriptor.size
            )));
        }
        let digest = finish_digest(std::mem::replace(&mut self.digest, Context::new(&SHA256)));
        if digest != self.descriptor.sha256 {
            return Err(RaftError::SnapshotFile(
                "snapshot checksum mismatch: the received bytes' SHA-256 is not the declared one"
                    .into(),
            ));
        }
        file.sync_all()
            .map_err(|e| file_error(&self.temp, "fsync", &e))?;
        drop(file);
        std::fs::rename(&self.temp, &self.target)
            .map_err(|e| file_error(&self.target, "rename into", &e))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| file_error(&self.dir, "fsync", &e))?;
        Ok(self.target.clone())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// A writer that hashes and counts what passes, refusing bytes past a limit.
struct Hashing {
    inner: File,
    digest: Context,
    bytes: u64,
    limit: u64,
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes + buf.len() as u64 > self.limit {
            return Err(std::io::Error::other(format!(
                "snapshot is over the limit of {} bytes (--raft-max-snapshot)",
                self.limit
            )));
        }
        let written = self.inner.write(buf)?;
        self.digest.update(&buf[..written]);
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn create(path: &Path) -> Result<File, RaftError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| file_error(path, "create", &e))
}

fn finish_digest(context: Context) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

fn file_error(path: &Path, what: &str, error: &std::io::Error) -> RaftError {
    RaftError::SnapshotFile(format!("cannot {what} {}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn write_bytes(dir: &SnapshotDir, index: u64, data: &[u8]) -> (Descriptor, PathBuf) {
        dir.write(index, 1, |out| {
            out.write_all(data).map_err(|e| e.to_string())
        })
        .unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn descriptors_round_trip_and_refuse_other_bytes() {
        let descriptor = Descriptor {
            size: 12345,
            sha256: [7; 32],
        };
        let bytes = descriptor.encode();
        assert!(Descriptor::is_descriptor(&bytes));
        assert_eq!(Descriptor::decode(&bytes).unwrap(), descriptor);
        for bad in [&b"{\"jobs\":[]}"[..], &bytes[..47], b""] {
            assert!(!Descriptor::is_descriptor(bad));
            assert!(
                Descriptor::decode(bad)
                    .unwrap_err()
                    .contains("not a snapshot file descriptor")
            );
        }
    }

    #[test]
    fn a_written_snapshot_is_hashed_and_in_place() {
        let temp = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(&temp.path().join("snaps"), 1 << 20).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (descriptor, path) = write_bytes(&dir, 7, &data);
        assert_eq!(descriptor.size, data.len() as u64);
        let want = ring::digest::digest(&SHA256, &data);
        assert_eq!(&descriptor.sha256[..], want.as_ref());
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(dir.existing(7, 1, &descriptor).unwrap(), path);
        // No temporary file is left.
        assert_eq!(names(dir.path()).len(), 1);
    }

    #[test]
    fn a_failed_or_oversized_write_leaves_the_previous_snapshot() {
        let temp = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(temp.path(), 1000).unwrap();
        let (first, path) = write_bytes(&dir, 1, b"state one");
        // The application fails half-way.
        let error = dir
            .write(2, 1, |out| {
                out.write_all(b"half").map_err(|e| e.to_string())?;
                Err("disk gone".into())
            })
            .unwrap_err();
        assert!(error.to_string().contains("disk gone"), "{error}");
        // Over the size limit.
        let error = dir
            .write(3, 1, |out| {
                out.write_all(&[0u8; 2000]).map_err(|e| e.to_string())
            })
            .unwrap_err();
        assert!(error.to_string().contains("over the limit"), "{error}");
        assert_eq!(dir.existing(1, 1, &first).unwrap(), path);
        assert_eq!(std::fs::read(&path).unwrap(), b"state one");
        let files = names(dir.path());
        assert_eq!(files, [path.file_name().unwrap().to_string_lossy()]);
    }

    /// The receiver's checks, as a table: chunks, then what `finish` says.
    #[test]
    fn received_chunks_are_checked_before_they_are_in_place() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let good = Descriptor {
            size: data.len() as u64,
            sha256: finish_digest({
                let mut c = Context::new(&SHA256);
                c.update(&data);
                c
            }),
        };
        let mut flipped = data.clone();
        flipped[5000] ^= 1;
        type Case<'a> = (&'a str, Descriptor, Vec<&'a [u8]>, Result<(), &'a str>);
        let cases: Vec<Case> = vec![
            ("in 64-byte chunks", good, data.chunks(64).collect(), Ok(())),
            ("one chunk", good, vec![&data[..]], Ok(())),
            (
                "a flipped bit",
                good,
                flipped.chunks(1000).collect(),
                Err("checksum mismatch"),
            ),
            (
                "cut short",
                good,
                vec![&data[..9000]],
                Err("ended after 9000 of 10000 bytes"),
            ),
            (
                "past the declared size",
                Descriptor { size: 100, ..good },
                vec![&data[..64], &data[64..128]],
                Err("run past the declared 100 bytes"),
            ),
        ];
        for (name, descriptor, chunks, want) in cases {
            let temp = tempfile::tempdir().unwrap();
            let dir = SnapshotDir::open(temp.path(), 1 << 20).unwrap();
            let mut incoming = dir.receive(9, 2, descriptor).unwrap();
            let mut result = Ok(());
            for chunk in chunks {
                if let Err(error) = incoming.write_chunk(chunk) {
                    result = Err(error);
                    break;
                }
            }
            let result = match result {
                Ok(()) => incoming.finish().map(|path| {
                    assert_eq!(std::fs::read(path).unwrap(), data, "{name}");
                }),
                Err(error) => {
                    drop(incoming);
                    Err(error)
                }
            };
            match (result, want) {
                (Ok(()), Ok(())) => {
                    assert!(dir.existing(9, 2, &descriptor).unwrap().exists());
                }
                (Err(error), Err(fragment)) => {
                    assert!(error.to_string().contains(fragment), "{name}: {error}");
                    assert!(names(dir.path()).is_empty(), "{name}: nothing left");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
        let temp = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(temp.path(), 100).unwrap();
        let error = dir.receive(1, 1, good).err().unwrap();
        assert!(error.to_string().contains("over the limit"), "{error}");
    }

    #[test]
    fn remove_except_keeps_one_and_spares_other_files() {
        let temp = tempfile::tempdir().unwrap();
        let dir = SnapshotDir::open(temp.path(), 1 << 20).unwrap();
        let (_, old) = write_bytes(&dir, 1, b"old");
        let (_, new) = write_bytes(&dir, 2, b"new");
        std::fs::write(temp.path().join("snap-3-1.tmp"), b"half").unwrap();
        std::fs::write(temp.path().join("notes.txt"), b"mine").unwrap();
        dir.remove_except(Some(&new));
        assert!(!old.exists());
        assert_eq!(
            names(temp.path()),
            [
                "notes.txt".to_string(),
                new.file_name().unwrap().to_string_lossy().into_owned()
            ]
        );
    }
}
