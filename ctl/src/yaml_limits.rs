//! Limits on YAML files read by the CLI, checked before the parser runs: a
//! hard size limit whatever the file is (a device such as `/dev/zero`, a
//! FIFO, stdin: its metadata length says nothing), and a nesting-depth limit
//! estimated by a linear pre-scan of the text (the YAML parser is quadratic
//! in nesting depth: 100,000 levels took it 31 s before failing). The scan
//! lives in the coordinator (`yaml_depth`), which parses YAML submit bodies
//! too.

use std::io::Read;
use std::path::Path;

pub use gantry_coordinator::yaml_depth::{MAX_YAML_DEPTH, check_depth};

/// Reads `path` (`-` = standard input) as UTF-8 text, refusing it once more
/// than `limit` bytes arrive: reads through `take(limit + 1)`, so nothing
/// larger is ever held in memory. `what` names the kind of file in errors.
pub fn read_limited(path: &str, limit: u64, what: &str) -> Result<String, String> {
    if path == "-" {
        return read_bounded(std::io::stdin(), "stdin", limit, what);
    }
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    read_bounded(file, path, limit, what)
}

/// Reads an operator's YAML file (settings, inventory, tokens) with the
/// size limit of [`read_limited`] and the depth limit of [`check_depth`].
pub fn read_yaml_file(path: &Path, limit: u64, what: &str) -> Result<String, String> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let text = read_bounded(file, &name, limit, what)?;
    check_depth(&text, MAX_YAML_DEPTH, &name)?;
    Ok(text)
}

fn read_bounded(reader: impl Read, name: &str, limit: u64, what: &str) -> Result<String, String> {
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "{name}: larger than the {} limit for {what}",
            gantry_scheduler::units::format_bytes(limit)
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "{name}: not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limit_holds_for_files_without_a_length() {
        // /dev/zero reports length 0 and never ends.
        let err = read_limited("/dev/zero", 1024, "a spec file").expect_err("too large");
        assert_eq!(err, "/dev/zero: larger than the 1KiB limit for a spec file");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spec.yaml");
        std::fs::write(&path, "a: 1\n").expect("write");
        let path = path.to_string_lossy().into_owned();
        assert_eq!(read_limited(&path, 5, "x"), Ok("a: 1\n".to_string()));
        assert!(read_limited(&path, 4, "x").is_err());
        std::fs::write(&path, b"a: \xff\n").expect("write");
        assert!(
            read_limited(&path, 100, "x")
                .expect_err("binary")
                .contains("not UTF-8")
        );
    }
}
