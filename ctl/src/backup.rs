//! `gantry snapshot save FILE`: a backup of the hard state of the replica
//! at `--addr` (any replica), checked end to end and written atomically
//! (`gantry_coordinator::backup`; restored by `gantry coordinator
//! --restore`).

use std::path::Path;
use std::time::Instant;

use gantry_coordinator::backup;
use gantry_proto as pb;
use tokio_stream::StreamExt;

use crate::client::{self, CliError};
use crate::output::{Format, outln};

/// Largest backup accepted (the state of a very large cluster is a few GiB).
const MAX_BACKUP_BYTES: u64 = 64 << 30;

/// `gantry snapshot save FILE`.
pub async fn save(file: &Path, opts: crate::ClientOpts) -> Result<(), CliError> {
    let started = Instant::now();
    let mut client = client::connect_any(&opts).await?;
    let mut chunks = client
        .snapshot_save(pb::SnapshotSaveRequest {})
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    let mut total = None;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        if total.is_none() {
            if chunk.total_bytes > MAX_BACKUP_BYTES {
                return Err(CliError::failed(format!(
                    "the backup would be {} bytes, more than the {MAX_BACKUP_BYTES} this client takes",
                    chunk.total_bytes
                )));
            }
            total = Some(chunk.total_bytes);
            bytes.reserve(chunk.total_bytes as usize);
        }
        bytes.extend_from_slice(&chunk.data);
    }
    if total != Some(bytes.len() as u64) {
        return Err(CliError::failed(format!(
            "the backup stream ended early: {} of {} bytes (nothing written)",
            bytes.len(),
            total.unwrap_or(0)
        )));
    }
    // Checked here too, so a file on disk is never one that will not restore.
    let header = backup::decode("the received backup", &bytes)
        .map_err(|e| CliError::failed(format!("{e} (nothing written)")))?
        .0;
    backup::write_atomically(file, &bytes)
        .map_err(|e| CliError::failed(format!("{}: {e}", file.display())))?;
    let seconds = started.elapsed().as_secs_f64();
    match opts.output {
        Format::Json => crate::print_json(&serde_json::json!({
            "file": file.display().to_string(),
            "applied_index": header.applied_index,
            "bytes": bytes.len(),
            "sha256": header.sha256,
            "replica": header.replica,
            "seconds": seconds,
        })),
        Format::Table => outln!(
            "saved {}: state of replica {} at index {}, {} bytes, sha256 {} ({seconds:.1} s)",
            file.display(),
            header.replica,
            header.applied_index,
            bytes.len(),
            header.sha256
        ),
    }
    Ok(())
}
