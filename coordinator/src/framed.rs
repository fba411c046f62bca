//! Records framed by their length and CRC, in files numbered in hex: the
//! framing that the Raft log's segments ([`crate::raft::wal`]) and the
//! history's ([`crate::store`]'s history files) share.
//!
//! A frame is `len: u32 | crc32: u32 | body` (little-endian; the CRC is
//! the body's). A frame whose length is zero or past the bytes read, or
//! whose CRC does not match, ends the records: what a crash cut short is
//! never taken for a record.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes before a frame's body.
pub const FRAME_HEAD: usize = 8;

/// Appends one frame to `out`, its body the concatenation of `parts`.
/// A body is at most a batch of entries or a chunk of history, bounded far
/// below 4 GiB by its writers.
pub fn push_frame(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    let mut hasher = crc32fast::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// The frame at `at` in `bytes`: its body and the offset after it; `None`
/// at the end of the records (zeros, a frame cut short or past
/// `max_body`, a CRC that does not match).
pub fn next_frame(bytes: &[u8], at: usize, max_body: usize) -> Option<(&[u8], usize)> {
    let head = bytes.get(at..at.checked_add(FRAME_HEAD)?)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len == 0 || len > max_body {
        return None;
    }
    let start = at + FRAME_HEAD;
    let body = bytes.get(start..start + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some((body, start + len))
}

/// Writes `header` at the start of `file`, a new file in `dir`, and makes
/// both durable: the file synced, then `dir`, so that its name survives a
/// power cut.
pub fn write_header_durably(file: &File, header: &[u8], dir: &Path) -> std::io::Result<()> {
    file.write_all_at(header, 0)?;
    file.sync_all()?;
    File::open(dir)?.sync_all()
}

/// The name of file `number` with `suffix` (16 hex digits, so that names
/// sort as numbers).
pub fn numbered_name(number: u64, suffix: &str) -> String {
    format!("{number:016x}.{suffix}")
}

/// The files of `dir` named by [`numbered_name`] with `suffix`, by
/// number; other files are left alone.
pub fn numbered_files(dir: &Path, suffix: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let name = item.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|name| name.strip_suffix(suffix))
            .and_then(|name| name.strip_suffix('.'))
            .filter(|hex| hex.len() == 16)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        else {
            continue;
        };
        files.push((number, item.path()));
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn frames_come_back_until_one_is_cut_short_or_altered() {
        let mut bytes = Vec::new();
        push_frame(&mut bytes, &[b"a", b"bc"]);
        push_frame(&mut bytes, &[b"second"]);
        let (body, next) = next_frame(&bytes, 0, 100).unwrap();
        assert_eq!(body, b"abc");
        let (body, end) = next_frame(&bytes, next, 100).unwrap();
        assert_eq!(body, b"second");
        assert_eq!(end, bytes.len());
        assert!(next_frame(&bytes, end, 100).is_none());
        // Too long for the reader's bound, cut short, altered.
        assert!(next_frame(&bytes, next, 5).is_none());
        assert!(next_frame(&bytes[..bytes.len() - 1], next, 100).is_none());
        let mut altered = bytes.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(next_frame(&altered, next, 100).is_none());
        assert!(next_frame(&[0; 16], 0, 100).is_none());
    }

    #[test]
    fn numbered_files_are_listed_by_number_and_others_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            numbered_name(10, "wal"),
            numbered_name(2, "wal"),
            numbered_name(3, "hist"),
            "notes.wal".into(),
            "00000000000000zz.wal".into(),
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let numbers: Vec<u64> = numbered_files(dir.path(), "wal")
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(numbers, vec![2, 10]);
    }
}
