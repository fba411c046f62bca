//! Evaluation snapshots: private, consistent copies of files a job reads while
//! something else may rewrite them (an evaluation reading the model a training
//! run keeps saving).
//!
//! Before an attempt with `spec.snapshot` entries starts, each entry's `from`
//! (a file, or a directory copied recursively) is copied to
//! `<work_dir>/snapshot/<as_name>`, and the job gets `GANTRY_SNAPSHOT_DIR`.
//!
//! # Guarantees
//!
//! - **A copy, never a link.** A hard link shares the inode, so a writer that
//!   rewrites the file in place would change the job's "snapshot". Each file
//!   is cloned with `ioctl(FICLONE)` where the filesystem supports reflinks
//!   (btrfs, XFS, bcachefs: O(1), blocks shared copy-on-write), else copied
//!   byte for byte (`copy_file_range`, which the kernel may still turn into a
//!   clone).
//! - **One version per file.** The source is opened once and everything is
//!   read through that descriptor: a writer that replaces the file by
//!   `rename` cannot mix two versions into one copy. The copy is accepted only
//!   when its length equals the source's length as seen through the same
//!   descriptor and the source's size and times did not change while copying
//!   (an in-place rewrite); otherwise it is retried, then refused.
//! - **All or nothing per entry.** An entry is copied to a staging name next
//!   to the work directory and renamed into place when complete, so a
//!   failure never leaves a half copy under its final name; any failure
//!   fails the attempt (`SpawnFailed`) before the command runs.
//! - **Contained.** `as_name` must be relative without `..`; the destination
//!   is checked after joining. Everything the agent does under the work
//!   directory goes through directory descriptors opened with `O_NOFOLLOW`
//!   (parents created with `mkdirat`, the copy moved in with
//!   `renameat2(RENAME_NOREPLACE)`), so a symlink a job planted there, even
//!   one swapped in mid-copy, is never followed, and an existing name is not
//!   overwritten. Symlinks inside a source tree are followed (a snapshot
//!   holds contents, not links back to live files), up to a depth that stops
//!   loops.
//! - **The job's rights, not the agent's.** With `--run-as`, sources are
//!   opened and read by a helper process running as the job's user
//!   ([`as_user`]): the kernel decides what it may read, symlinks included,
//!   so a job gets through a snapshot only what it could read itself. What
//!   that user cannot read fails the attempt with
//!   `snapshot[0].from: /path: not readable by user nobody`.
//!
//! A directory is a set of consistent files, not an atomic picture of the
//! tree: a file added or removed mid-walk may or may not be included. Files
//! keep their permission bits; directories get the agent's default mode.
//!
//! Copying is synchronous; the executor runs it under `spawn_blocking` and can
//! interrupt it through a cancel flag (checked between chunks in process; a
//! helper process is killed).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};

use crate::config::RunAs;

pub mod as_user;

/// Name of the snapshot directory inside the attempt's work directory.
pub const SNAPSHOT_DIR: &str = "snapshot";
/// Name of the staging directory inside the attempt directory (beside `work/`,
/// so renames stay on one filesystem and the job never sees partial copies).
const STAGING_DIR: &str = "snapshot-staging";
/// Bytes copied between checks of the cancel flag.
const CHUNK: u64 = 64 << 20;
/// Deepest directory nesting followed; deeper means a symlink loop.
const MAX_DEPTH: usize = 64;
/// Copies of one file tried while its source keeps changing.
const TRIES: usize = 3;

/// One `JobSpec.snapshot` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Absolute path on the node: a file or a directory.
    pub from: String,
    /// Relative name inside the snapshot directory.
    pub as_name: String,
}

/// Copies every entry into `<work>/snapshot/`, staging under `attempt_dir`;
/// with `user`, the sources are read as that user ([`as_user`]). Returns the
/// snapshot directory. Errors name the entry, its field and the path, e.g.
/// `snapshot[0].from: /models/x.pt: No such file or directory`.
pub(crate) fn prepare(
    attempt_dir: &Path,
    work: &Path,
    entries: &[SnapshotEntry],
    cancel: &AtomicBool,
    user: Option<RunAs>,
) -> Result<PathBuf, String> {
    let root = work.join(SNAPSHOT_DIR);
    let staging = attempt_dir.join(STAGING_DIR);
    // Left over from an earlier agent process with the same ids: start clean,
    // and never write through whatever may stand at these names. (`work` and
    // `attempt_dir` themselves sit in directories only the agent writes.)
    for dir in [&root, &staging] {
        remove_any(dir)
            .map_err(|e| format!("cannot remove stale {}: {}", dir.display(), msg(&e)))?;
        std::fs::create_dir(dir)
            .map_err(|e| format!("cannot create {}: {}", dir.display(), msg(&e)))?;
    }
    let result = open_dir(&root)
        .map_err(|e| format!("cannot open {}: {}", root.display(), msg(&e)))
        .and_then(|root_fd| {
            if let Some(user) = user {
                as_user::prepare_staging(&staging, user)?;
            }
            entries.iter().enumerate().try_for_each(|(i, entry)| {
                let staged = staging.join(i.to_string());
                copy_entry(&root, &root_fd, &staged, entry, cancel, user).map_err(|e| e.in_entry(i))
            })
        });
    if let Err(e) = remove_any(&staging) {
        tracing::debug!(error = %e, "cannot remove snapshot staging directory");
    }
    result.map(|()| root)
}

/// `as_name` as a path of plain components: relative, non-empty, no `..`.
pub(crate) fn checked_name(as_name: &str) -> Result<PathBuf, String> {
    let bad = |why: &str| format!("as {as_name:?}: {why}");
    if as_name.is_empty() {
        return Err(bad("must not be empty"));
    }
    let path = Path::new(as_name);
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(bad("must not contain \"..\"")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad("must be a relative path"));
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(bad("names no file"));
    }
    Ok(out)
}

/// Why one entry failed: the field it is about decides the prefix.
enum EntryError {
    /// The entry as a whole, or its `as`: `snapshot[i]: ...`.
    Entry(String),
    /// Reading its source: `snapshot[i].from: ...`.
    From(String),
}

impl EntryError {
    fn in_entry(self, i: usize) -> String {
        match self {
            Self::Entry(e) => format!("snapshot[{i}]: {e}"),
            Self::From(e) => format!("snapshot[{i}].from: {e}"),
        }
    }
}

fn copy_entry(
    root: &Path,
    root_fd: &OwnedFd,
    staged: &Path,
    entry: &SnapshotEntry,
    cancel: &AtomicBool,
    user: Option<RunAs>,
) -> Result<(), EntryError> {
    let name = checked_name(&entry.as_name).map_err(EntryError::Entry)?;
    let from = Path::new(&entry.from);
    if !from.is_absolute() {
        return Err(EntryError::Entry(format!(
            "from {:?}: must be an absolute path",
            entry.from
        )));
    }
    let taken = || {
        EntryError::Entry(format!(
            "as {:?}: already taken by an earlier entry",
            entry.as_name
        ))
    };
    // `checked_name` returned plain components, so there is a last one.
    let file_name = name.file_name().ok_or_else(taken)?;
    let parent = make_parents(root, root_fd, &name)
        .map_err(|e| EntryError::Entry(format!("as {:?}: {e}", entry.as_name)))?;
    if rustix::fs::statat(&parent, file_name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        return Err(taken());
    }
    let copied = match user {
        None => copy_tree(from, staged, 0, cancel),
        Some(user) => as_user::copy(user, from, staged, cancel),
    };
    copied.map_err(|(path, e)| EntryError::From(describe(&path, &e, staged, user)))?;
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        staged,
        &parent,
        file_name,
        RenameFlags::NOREPLACE,
    )
    .map_err(|e| match e {
        rustix::io::Errno::EXIST => taken(),
        e => EntryError::Entry(format!(
            "cannot move copy to {}: {}",
            root.join(&name).display(),
            msg(&e.into())
        )),
    })
}

/// A copy error as `path: reason`; a source the job's user may not read
/// says so, since that is what the user has to fix.
fn describe(path: &Path, e: &io::Error, staged: &Path, user: Option<RunAs>) -> String {
    match user {
        Some(user) if e.kind() == io::ErrorKind::PermissionDenied && !path.starts_with(staged) => {
            format!(
                "{}: not readable by user {}",
                path.display(),
                as_user::user_name(user.uid)
            )
        }
        _ => format!("{}: {}", path.display(), msg(e)),
    }
}

/// Opens the directory `path` itself, refusing a symlink there.
fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    open_dir_at(rustix::fs::CWD, path)
}

/// Opens directory `name` under `dir` without following a symlink there.
fn open_dir_at(dir: impl AsFd, name: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(dir, name, flags, Mode::empty())?)
}

/// Creates the parent directories of `name` under `root`, one component at a
/// time through descriptors, refusing anything at those names that is not a
/// real directory. Returns the innermost one.
fn make_parents(root: &Path, root_fd: &OwnedFd, name: &Path) -> Result<OwnedFd, String> {
    let mut fd = root_fd
        .try_clone()
        .map_err(|e| format!("{}: {}", root.display(), msg(&e)))?;
    let Some(parent) = name.parent() else {
        return Ok(fd);
    };
    let mut dir = root.to_path_buf();
    for part in parent.components() {
        dir.push(part);
        let part = Path::new(part.as_os_str());
        let not_dir = || format!("{} is not a directory", dir.display());
        let opened = match open_dir_at(&fd, part) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                rustix::fs::mkdirat(&fd, part, Mode::from_raw_mode(0o755))
                    .map_err(|e| format!("cannot create {}: {}", dir.display(), msg(&e.into())))?;
                open_dir_at(&fd, part)
            }
            other => other,
        };
        fd = match opened {
            Ok(next) => next,
            Err(e) if matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::NOTDIR.raw_os_error() || code == rustix::io::Errno::LOOP.raw_os_error()) =>
            {
                return Err(not_dir());
            }
            Err(e) => return Err(format!("{}: {}", dir.display(), msg(&e))),
        };
    }
    Ok(fd)
}

/// Where a copy failed and why.
pub(crate) type CopyError = (PathBuf, io::Error);

/// Copies `src` (file or directory, symlinks followed) to the new path `dst`.
/// Runs in the agent, or in the [`as_user`] helper as the job's user.
fn copy_tree(src: &Path, dst: &Path, depth: usize, cancel: &AtomicBool) -> Result<(), CopyError> {
    let at = |e: io::Error| (src.to_path_buf(), e);
    if depth > MAX_DEPTH {
        return Err(at(io::Error::other(
            "directories nested too deeply (a symlink loop?)",
        )));
    }
    check_cancel(cancel).map_err(at)?;
    // Non-blocking so that a FIFO cannot hang the open; no effect on files.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(src)
        .map_err(at)?;
    let meta = file.metadata().map_err(at)?;
    if meta.is_file() {
        let out = copy_file(&file, dst, cancel).map_err(at)?;
        // Through the new file's descriptor: `dst` is never resolved again.
        return out.set_permissions(meta.permissions()).map_err(at);
    }
    if !meta.is_dir() {
        return Err(at(io::Error::other("not a regular file or directory")));
    }
    std::fs::create_dir(dst).map_err(|e| (dst.to_path_buf(), e))?;
    let mut children: Vec<_> = std::fs::read_dir(src)
        .map_err(at)?
        .map(|child| child.map(|c| c.file_name()))
        .collect::<Result<_, _>>()
        .map_err(at)?;
    children.sort();
    for child in children {
        copy_tree(&src.join(&child), &dst.join(&child), depth + 1, cancel)?;
    }
    // Directories keep the default mode: a read-only copy could not be
    // cleaned up (or replaced by a re-run of the same attempt ids).
    Ok(())
}

/// What identifies one version of a file's contents, as seen through its fd.
fn version(file: &File) -> io::Result<(u64, i64, i64, i64, i64)> {
    let m = file.metadata()?;
    Ok((
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// Copies the open `src` to the new file `dst`: a reflink when possible,
/// else bytes, accepted only when the source did not change meanwhile.
fn copy_file(src: &File, dst: &Path, cancel: &AtomicBool) -> io::Result<File> {
    for _ in 0..TRIES {
        let before = version(src)?;
        if std::fs::symlink_metadata(dst).is_ok() {
            std::fs::remove_file(dst)?;
        }
        let mut out = OpenOptions::new().write(true).create_new(true).open(dst)?;
        if let Err(e) = rustix::fs::ioctl_ficlone(&out, src) {
            // Not a reflink-capable filesystem (or another volume): copy.
            tracing::trace!(error = %e, "reflink unavailable, copying bytes");
            copy_bytes(src, &mut out, cancel)?;
        }
        let copied = out.metadata()?.len();
        let after = version(src)?;
        if before == after && copied == after.0 {
            return Ok(out);
        }
        tracing::debug!(path = %dst.display(), "source changed while being copied; retrying");
    }
    Err(io::Error::other(format!(
        "changed while being copied, {TRIES} times in a row; is it still being written?"
    )))
}

/// Copies all of `src` from its start, through the same descriptor.
fn copy_bytes(mut src: &File, out: &mut File, cancel: &AtomicBool) -> io::Result<()> {
    // A retry starts over; the clone attempt does not move the offset.
    src.seek(io::SeekFrom::Start(0))?;
    loop {
        check_cancel(cancel)?;
        // Between files, `io::copy` uses copy_file_range where it can.
        if io::copy(&mut src.take(CHUNK), out)? == 0 {
            return Ok(());
        }
    }
}

fn check_cancel(cancel: &AtomicBool) -> io::Result<()> {
    if cancel.load(Ordering::Relaxed) {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "snapshot cancelled",
        ));
    }
    Ok(())
}

/// Removes whatever is at `path` without following a symlink there.
fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// An I/O error as a sentence: `No such file or directory`, without the
/// `(os error 2)` suffix users do not need.
fn msg(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_string(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_stay_inside() {
        for (name, ok) in [
            ("model.pt", Some("model.pt")),
            ("a/b/c.pt", Some("a/b/c.pt")),
            ("./a//b", Some("a/b")),
            ("", None),
            (".", None),
            ("../escape", None),
            ("a/../../escape", None),
            ("a/..", None),
            ("/abs", None),
        ] {
            let got = checked_name(name).ok();
            assert_eq!(got.as_deref(), ok.map(Path::new), "{name:?}");
        }
    }

    #[test]
    fn io_messages_lose_the_os_error_suffix() {
        let e = io::Error::from_raw_os_error(2);
        assert_eq!(msg(&e), "No such file or directory");
        assert_eq!(msg(&io::Error::other("plain")), "plain");
    }

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let attempt = dir.path().join("attempt");
        let work = attempt.join("work");
        std::fs::create_dir_all(&work).unwrap();
        (dir, attempt, work)
    }

    fn entry(from: &Path, as_name: &str) -> SnapshotEntry {
        SnapshotEntry {
            from: from.display().to_string(),
            as_name: as_name.into(),
        }
    }

    #[test]
    fn copies_files_and_trees_following_symlinks() {
        let (dir, attempt, work) = setup();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("tree/sub")).unwrap();
        std::fs::write(src.join("model.pt"), b"weights").unwrap();
        std::fs::write(src.join("tree/a"), b"A").unwrap();
        std::fs::write(src.join("tree/sub/b"), b"B").unwrap();
        std::os::unix::fs::symlink(src.join("model.pt"), src.join("tree/link")).unwrap();
        let cancel = AtomicBool::new(false);
        let root = prepare(
            &attempt,
            &work,
            &[
                entry(&src.join("model.pt"), "models/m.pt"),
                entry(&src.join("tree"), "tree"),
            ],
            &cancel,
            None,
        )
        .unwrap();
        assert_eq!(root, work.join(SNAPSHOT_DIR));
        let read = |p: &str| std::fs::read(root.join(p)).unwrap();
        assert_eq!(read("models/m.pt"), b"weights");
        assert_eq!(read("tree/a"), b"A");
        assert_eq!(read("tree/sub/b"), b"B");
        assert_eq!(read("tree/link"), b"weights");
        let link = std::fs::symlink_metadata(root.join("tree/link")).unwrap();
        assert!(link.is_file(), "symlinks are copied as contents");
        assert!(!attempt.join(STAGING_DIR).exists());
    }

    #[test]
    fn refuses_bad_entries_with_their_index() {
        let (dir, attempt, work) = setup();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let cancel = AtomicBool::new(false);
        let missing = dir.path().join("missing.pt");
        for (entries, expect) in [
            (
                vec![entry(&missing, "m.pt")],
                format!(
                    "snapshot[0].from: {}: No such file or directory",
                    missing.display()
                ),
            ),
            (
                vec![entry(&file, "ok"), entry(&file, "../escape")],
                "snapshot[1]: as \"../escape\": must not contain \"..\"".into(),
            ),
            (
                vec![entry(&file, "/abs")],
                "snapshot[0]: as \"/abs\": must be a relative path".into(),
            ),
            (
                vec![entry(Path::new("rel/path"), "x")],
                "snapshot[0]: from \"rel/path\": must be an absolute path".into(),
            ),
            (
                vec![entry(&file, "same"), entry(&file, "same")],
                "snapshot[1]: as \"same\": already taken by an earlier entry".into(),
            ),
            (
                vec![entry(&file, "a"), entry(&file, "a/b")],
                format!(
                    "snapshot[1]: as \"a/b\": {} is not a directory",
                    work.join("snapshot/a").display()
                ),
            ),
        ] {
            let err = prepare(&attempt, &work, &entries, &cancel, None).unwrap_err();
            assert_eq!(err, expect);
        }
    }

    #[test]
    fn stale_symlinks_at_the_destination_are_not_followed() {
        let (dir, attempt, work) = setup();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, work.join(SNAPSHOT_DIR)).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let cancel = AtomicBool::new(false);
        prepare(&attempt, &work, &[entry(&file, "f")], &cancel, None).unwrap();
        assert!(
            std::fs::symlink_metadata(work.join(SNAPSHOT_DIR))
                .unwrap()
                .is_dir()
        );
        assert!(!outside.join("f").exists(), "wrote through a symlink");
    }

    #[test]
    fn cancel_stops_the_copy() {
        let (dir, attempt, work) = setup();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let cancel = AtomicBool::new(true);
        let err = prepare(&attempt, &work, &[entry(&file, "f")], &cancel, None).unwrap_err();
        assert!(err.contains("snapshot cancelled"), "{err}");
    }

    use crate::jobfs::nobody;

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Whether any regular file under `dir` (links not followed) holds `data`.
    fn holds(dir: &Path, data: &[u8]) -> bool {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let meta = std::fs::symlink_metadata(e.path()).unwrap();
                (meta.is_dir() && holds(&e.path(), data))
                    || (meta.is_file() && std::fs::read(e.path()).unwrap() == data)
            })
    }

    #[test]
    fn as_a_user_sources_are_read_with_its_rights() {
        let Some(user) = nobody() else { return };
        let (dir, attempt, work) = setup();
        // The user may walk to its copies and to the public sources.
        chmod(dir.path(), 0o755);
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"root only").unwrap();
        chmod(&secret, 0o600);
        let public = dir.path().join("public");
        std::fs::create_dir(&public).unwrap();
        std::fs::write(public.join("a"), b"A").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("a"), b"A").unwrap();
        std::os::unix::fs::symlink(&secret, tree.join("z-link")).unwrap();
        let closed = dir.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::write(closed.join("inside"), b"root only").unwrap();
        chmod(&closed, 0o700);
        let cancel = AtomicBool::new(false);

        let root = prepare(
            &attempt,
            &work,
            &[entry(&public, "p"), entry(&public.join("a"), "deep/er/a")],
            &cancel,
            Some(user),
        )
        .unwrap();
        assert_eq!(std::fs::read(root.join("p/a")).unwrap(), b"A");
        assert_eq!(std::fs::read(root.join("deep/er/a")).unwrap(), b"A");
        let copy = std::fs::metadata(root.join("p/a")).unwrap();
        assert_eq!(
            (copy.uid(), copy.gid()),
            (user.uid, user.gid),
            "copied as the user"
        );

        let refused = |path: &Path| {
            format!(
                "snapshot[1].from: {}: not readable by user nobody",
                path.display()
            )
        };
        for (from, expect) in [
            (&secret, refused(&secret)),
            (&link, refused(&link)),
            (&tree, refused(&tree.join("z-link"))),
            (&closed, refused(&closed)),
        ] {
            let entries = [entry(&public, "p"), entry(from, "m")];
            let err = prepare(&attempt, &work, &entries, &cancel, Some(user)).unwrap_err();
            assert_eq!(err, expect);
            assert!(!holds(&work, b"root only"), "{from:?} leaked into {work:?}");
            assert!(
                !holds(&attempt, b"root only"),
                "{from:?} leaked into {attempt:?}"
            );
        }
        assert!(!attempt.join(STAGING_DIR).exists());
    }

    #[test]
    fn as_a_user_a_cancel_stops_the_helper() {
        let Some(user) = nobody() else { return };
        let (dir, attempt, work) = setup();
        chmod(dir.path(), 0o755);
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let cancel = AtomicBool::new(true);
        let err = prepare(&attempt, &work, &[entry(&file, "f")], &cancel, Some(user)).unwrap_err();
        assert!(err.contains("snapshot cancelled"), "{err}");
    }
}
