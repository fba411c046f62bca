//! Job spec files: read with the CLI's size limit, then parsed by the
//! coordinator's `spec_file` (one schema and one set of messages for
//! `gantry submit -f` and the HTTP API's `POST /v1/jobs`).

pub use gantry_coordinator::spec_file::{
    MAX_SPEC_FILE_BYTES, ParsedSpec, Size, SpecError, parse_timeout, parse_wire_bytes,
};

/// Reads and parses a spec file (`-` = standard input): at most
/// [`MAX_SPEC_FILE_BYTES`] are read whatever the file is (`/dev/zero` is
/// refused after 4 MiB), and the YAML's nesting is checked before parsing.
pub fn read_spec_file(path: &str) -> Result<ParsedSpec, SpecError> {
    let text = crate::yaml_limits::read_limited(path, MAX_SPEC_FILE_BYTES, "a spec file").map_err(
        |reason| SpecError {
            source: String::new(),
            field: String::new(),
            reason,
        },
    )?;
    gantry_coordinator::spec_file::parse_spec_text(&text, if path == "-" { "stdin" } else { path })
}
