//! What the agent, often root, does in places a job can write: handing the
//! work directory to the job's user and opening output files. Nothing here
//! follows a symlink or trusts a name twice, so a link a job planted (in its
//! work directory, by an earlier run with the same ids, or swapped in while
//! the agent works) never makes root chown, create, truncate or read another
//! file.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::config::RunAs;

/// `O_NOFOLLOW` for `OpenOptionsExt::custom_flags`: opening a symlink fails.
pub(crate) const NOFOLLOW: i32 = OFlags::NOFOLLOW.bits() as i32;
/// Deepest agent-made directory nesting handed over.
const MAX_DEPTH: usize = 256;

/// Hands `work` and what the agent made under it (directories, symlinks and
/// singly linked files owned by the agent) to `user`.
///
/// - Symlinks are handed over themselves, never their targets, and never
///   walked into: every entry is opened `O_PATH | O_NOFOLLOW` and changed
///   through that descriptor, so a name swapped meanwhile changes nothing.
/// - What the agent did not make (owned by anyone else, the job's own files
///   from an earlier run included) is left alone and not walked into.
/// - A file with other hard links is left alone: the other name may be
///   outside the work directory (`/etc/shadow` linked in by a job).
pub(crate) fn hand_over(work: &Path, user: RunAs) -> Result<(), String> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir = rustix::fs::open(work, flags, Mode::empty())
        .map_err(|e| format!("cannot open {}: {}", work.display(), io::Error::from(e)))?;
    rustix::fs::fchown(&dir, Some(uid(user)), Some(gid(user)))
        .map_err(|e| cannot_hand(work, user, e.into()))?;
    hand_over_under(&dir, work, user, nix::unistd::geteuid().as_raw(), 0)
}

fn hand_over_under(
    dir: &OwnedFd,
    path: &Path,
    user: RunAs,
    agent: u32,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{}: nested too deeply", path.display()));
    }
    let list =
        |e: rustix::io::Errno| format!("cannot list {}: {}", path.display(), io::Error::from(e));
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir).map_err(list)? {
        let name = entry.map_err(list)?.file_name().to_owned();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name);
        }
    }
    for name in names {
        let child = path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        let entry = match rustix::fs::openat(
            dir,
            name.as_c_str(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            // Removed meanwhile: nothing to hand over.
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => {
                return Err(format!(
                    "cannot open {}: {}",
                    child.display(),
                    io::Error::from(e)
                ));
            }
        };
        let stat = rustix::fs::fstat(&entry)
            .map_err(|e| format!("cannot stat {}: {}", child.display(), io::Error::from(e)))?;
        let kind = FileType::from_raw_mode(stat.st_mode);
        if stat.st_uid != agent {
            continue;
        }
        if kind == FileType::RegularFile && stat.st_nlink > 1 {
            tracing::warn!(path = %child.display(), "not handing over a file with other hard links");
            continue;
        }
        rustix::fs::chownat(
            &entry,
            c"",
            Some(uid(user)),
            Some(gid(user)),
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| cannot_hand(&child, user, e.into()))?;
        if kind == FileType::Directory {
            let sub = rustix::fs::openat(
                &entry,
                c".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| format!("cannot open {}: {}", child.display(), io::Error::from(e)))?;
            hand_over_under(&sub, &child, user, agent, depth + 1)?;
        }
    }
    Ok(())
}

fn uid(user: RunAs) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(user.uid)
}

fn gid(user: RunAs) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(user.gid)
}

fn cannot_hand(path: &Path, user: RunAs, e: io::Error) -> String {
    format!("cannot hand {} to uid {}: {e}", path.display(), user.uid)
}

/// The job user of tests that switch users or hand files over; `None`
/// (the test is skipped) unless the tests run as root, the only agent that
/// can.
#[cfg(test)]
pub(crate) fn nobody() -> Option<RunAs> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return None;
    }
    Some(RunAs::resolve("nobody").expect("the nobody user"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn owner(path: &Path) -> (u32, u32) {
        let meta = std::fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid())
    }

    #[test]
    fn hand_over_gives_what_the_agent_made_and_follows_nothing() {
        let Some(user) = nobody() else { return };
        let root = (0, 0);
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let victim = outside.join("victim");
        std::fs::write(&victim, b"root's").unwrap();
        let linked = outside.join("linked");
        std::fs::write(&linked, b"root's too").unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir_all(work.join("snapshot/models")).unwrap();
        std::fs::write(work.join("snapshot/models/m.pt"), b"copy").unwrap();
        // Planted by a job (an earlier run with the same ids): links to a
        // file and to a directory outside, a hard link to a root file, and
        // a file of another user.
        std::os::unix::fs::symlink(&victim, work.join("file-link")).unwrap();
        std::os::unix::fs::symlink(&outside, work.join("dir-link")).unwrap();
        std::fs::hard_link(&linked, work.join("hard-link")).unwrap();
        let theirs = work.join("theirs");
        std::fs::write(&theirs, b"").unwrap();
        std::os::unix::fs::lchown(&theirs, Some(1234), Some(1234)).unwrap();
        let job = (user.uid, user.gid);

        hand_over(&work, user).unwrap();
        for (path, expect) in [
            (work.clone(), job),
            (work.join("snapshot"), job),
            (work.join("snapshot/models"), job),
            (work.join("snapshot/models/m.pt"), job),
            (work.join("file-link"), job),
            (work.join("dir-link"), job),
            (victim.clone(), root),
            (outside.clone(), root),
            (linked.clone(), root),
            (theirs.clone(), (1234, 1234)),
        ] {
            assert_eq!(owner(&path), expect, "{}", path.display());
        }
    }

    #[test]
    fn hand_over_refuses_a_linked_work_directory() {
        let Some(user) = nobody() else { return };
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let work = dir.path().join("work");
        std::os::unix::fs::symlink(&target, &work).unwrap();
        let err = hand_over(&work, user).unwrap_err();
        assert!(
            err.starts_with(&format!("cannot open {}", work.display())),
            "{err}"
        );
        assert_eq!(owner(&target), (0, 0));
    }
}
