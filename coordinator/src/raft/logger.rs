//! raft-rs logs through `slog`; this drain forwards its records to `tracing`
//! (target `raft`), so one subscriber (`RUST_LOG`, `--log-format json`)
//! sees everything. A few lines instead of slog-term/slog-async and
//! slog-stdlog: no extra threads, no second formatting stack.

use std::fmt::{self, Write as _};

use slog::{Drain, KV, Key, Level, OwnedKVList, Record};

/// A `slog::Drain` that forwards each record to `tracing` at the same level.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let enabled = match record.level() {
            Level::Critical | Level::Error => {
                tracing::enabled!(target: "raft", tracing::Level::ERROR)
            }
            Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            Level::Info => tracing::enabled!(target: "raft", tracing::Level::INFO),
            Level::Debug => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut text = KvText(String::new());
        // Formatting into a String cannot fail.
        let _ = record.kv().serialize(record, &mut text);
        let _ = values.serialize(record, &mut text);
        let message = record.msg();
        let fields = text.0;
        match record.level() {
            Level::Critical | Level::Error => {
                tracing::error!(target: "raft", "{message}{fields}")
            }
            Level::Warning => tracing::warn!(target: "raft", "{message}{fields}"),
            Level::Info => tracing::info!(target: "raft", "{message}{fields}"),
            Level::Debug => tracing::debug!(target: "raft", "{message}{fields}"),
            Level::Trace => tracing::trace!(target: "raft", "{message}{fields}"),
        }
        Ok(())
    }
}

/// The root logger handed to `RawNode`, tagged with the replica's id.
pub fn raft_logger(id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("raft_id" => id))
}

/// Collects key-value pairs as ` key=value`.
struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: Key, value: &fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_through_tracing_without_a_subscriber() {
        let logger = raft_logger(7);
        slog::info!(logger, "became leader"; "term" => 3);
        slog::debug!(logger, "ignored");
    }
}
