//! Files that appear whole or not at all: written to a temporary name in the
//! same directory, flushed, then renamed over the final name (or linked to
//! it when it must not be replaced). A reader never sees half a game, half a
//! tensor file or half a model, and a crash leaves at most a stray
//! temporary file (named `.NAME.tmp-PID-N`), never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary name beside `path`, unique in this process.
fn temp_beside(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(path.with_file_name(format!(
        ".{}.tmp-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Writes `bytes` to a temporary file beside `path` and flushes it.
fn write_temp(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let temp = temp_beside(path)?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&temp);
        return Err(err);
    }
    Ok(temp)
}

/// Flushes a directory so that a rename in it survives a crash.
fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// Replaces `path` with `bytes` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = write_temp(path, bytes)?;
    if let Err(err) = fs::rename(&temp, path) {
        let _ = fs::remove_file(&temp);
        return Err(err);
    }
    sync_dir(path)
}

/// Creates `path` with `bytes` atomically; returns `false` and changes
/// nothing when it already exists (two writers: one wins, whole).
pub fn create_new(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let temp = write_temp(path, bytes)?;
    let linked = fs::hard_link(&temp, path);
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => sync_dir(path).map(|()| true),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_write_replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.bin");
        write(&path, b"first version, longer").expect("write");
        write(&path, b"second").expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"second");
        assert_eq!(names(dir.path()), ["model.bin"]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.bin");
        write(&path, b"old").expect("write");
        // A directory in the way of the rename: the write fails, the old
        // contents and no temporary remain.
        let blocked = dir.path().join("blocked");
        fs::create_dir_all(blocked.join("inside")).expect("mkdir");
        assert!(write(&blocked, b"new").is_err());
        assert!(write(&dir.path().join("missing/x"), b"new").is_err());
        assert_eq!(fs::read(&path).expect("read"), b"old");
        assert_eq!(names(dir.path()), ["blocked", "model.bin"]);
    }

    #[test]
    fn create_new_never_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("best.bin");
        assert!(create_new(&path, b"one").expect("create"));
        assert!(!create_new(&path, b"two").expect("create"));
        assert_eq!(fs::read(&path).expect("read"), b"one");
        assert_eq!(names(dir.path()), ["best.bin"]);
    }
}
