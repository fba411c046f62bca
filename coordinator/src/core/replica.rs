//! The core as the replica loop's application: the loop that owns the Raft
//! node calls [`Core`] directly to apply committed entries (the commands
//! of one entry in order, each with its own typed outcome for its
//! proposer, all of an entry's changes in one storage batch), to snapshot
//! and restore, to answer [`Request`]s and to run its tick; it takes the
//! commands the core proposes from its outbox.

use std::path::Path;

use crate::command::Command;
use crate::convert;
use crate::raft::{RaftStatus, ReplicatedStateMachine, SnapshotWriter};
use crate::state::{ApplyError, ChangeSet, Outcome};
use crate::store::{self, StateSnapshot, codec};

use super::{Core, Request, now_ms};

impl ReplicatedStateMachine for Core {
    type Command = Command;
    type Outcome = Result<Outcome, ApplyError>;
    type Request = Request;

    fn encode(command: &Command) -> Result<Vec<u8>, String> {
        Ok(codec::encode_command(command))
    }

    /// Applies each command (state machine, the leader's effects), then
    /// writes what all of them changed with the entry's index in one
    /// storage batch (the Raft log is the durable record, so no flush),
    /// then publishes their events.
    ///
    /// A command that does not decode is fatal (`Err`), found before any
    /// command of the entry is applied: skipping it would let this replica
    /// diverge from those that can read it.
    fn apply(&mut self, index: u64, commands: &[&[u8]]) -> Result<Vec<Self::Outcome>, String> {
        let commands = commands
            .iter()
            .enumerate()
            .map(|(i, data)| {
                codec::decode_command(data)
                    .map_err(|error| format!("entry {index}: command {i} does not decode: {error}"))
            })
            .collect::<Result<Vec<Command>, String>>()?;
        let mut written = ChangeSet::default();
        let outcomes = commands
            .into_iter()
            .map(|command| self.apply_one(command, &mut written))
            .collect();
        for event in &written.events {
            let _ = self.events.send(convert::event_to_proto(event));
        }
        // Fatal when it fails: the replica must not go on as if it had applied.
        self.store
            .persist_applied(&self.state, written, index)
            .map_err(|error| format!("cannot persist index {index}: {error}"))?;
        Ok(outcomes)
    }

    /// The state's records are encoded here, on the loop; the stored
    /// events are decoded into the file by the writer, off the loop.
    fn snapshot(&mut self) -> Result<SnapshotWriter, String> {
        let (taken, mark) = self
            .store
            .write_pending(&self.state)
            .and_then(|()| self.store.take_snapshot(&self.state))
            .map_err(|error| format!("cannot take a state snapshot: {error}"))?;
        self.snapshot_mark = Some(mark);
        Ok(Box::new(move |out| {
            taken
                .write(out)
                .map_err(|error| format!("cannot write a state snapshot: {error}"))
        }))
    }

    /// The snapshot becomes the stored state's base: the store's journal
    /// starts again from it, with the writes made since it was taken.
    fn snapshot_stored(&mut self, index: u64, file: &Path) -> Result<(), String> {
        let mark = self
            .snapshot_mark
            .take()
            .ok_or_else(|| format!("the snapshot at index {index} was not taken by this core"))?;
        self.store
            .rebase(file, index, mark, &self.state)
            .map_err(|error| error.to_string())
    }

    fn snapshot_wanted(&self) -> bool {
        self.store.rebase_due()
    }

    fn write_behind(&mut self) -> Result<(), String> {
        if let Some(error) = self.store_failure.take() {
            return Err(error);
        }
        self.store
            .write_due(&self.state)
            .map_err(|error| format!("cannot write the applied state: {error}"))
    }

    /// Decodes the snapshot without touching the state: a peer's snapshot
    /// that would not restore is refused before raft-rs installs it (a
    /// restore that fails after is fatal). The decoded state is kept for
    /// the restore of the same round.
    fn check_snapshot(&mut self, file: &Path) -> Result<(), String> {
        self.checked_snapshot = None;
        let snapshot = read_snapshot(file)?;
        self.checked_snapshot = Some((file.to_path_buf(), snapshot));
        Ok(())
    }

    fn restore(&mut self, index: u64, file: &Path) -> Result<(), String> {
        let snapshot = match self.checked_snapshot.take() {
            Some((checked, snapshot)) if checked == file => snapshot,
            _ => read_snapshot(file)?,
        };
        // What was held back goes first: its retired jobs' history is this
        // replica's own and outlives the install.
        self.store
            .write_pending(&self.state)
            .map_err(|error| error.to_string())?;
        // A snapshot of our own still being written is of the state replaced.
        self.snapshot_mark = None;
        self.state = self
            .store
            .install(file, snapshot, index)
            .map_err(|error| error.to_string())?;
        self.dirty = true;
        Ok(())
    }

    fn applied_index(&self) -> Result<u64, String> {
        self.store
            .applied_index()
            .map_err(|error| error.to_string())
    }

    fn handle(&mut self, request: Request) {
        Core::handle(self, request);
    }

    fn tick(&mut self, status: &RaftStatus) {
        if self.raft != *status {
            self.raft = status.clone();
        }
        // A checked snapshot raft-rs did not install is not kept.
        self.checked_snapshot = None;
        Core::tick(self);
    }

    fn take_proposals(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.outbox)
    }

    fn stop(&mut self) {
        let written = self.store.write_pending(&self.state);
        match written.and_then(|()| self.store.flush()) {
            Ok(()) => tracing::info!("coordinator core stopped; storage flushed"),
            Err(error) => tracing::error!(%error, "final flush failed"),
        }
    }
}

impl Core {
    /// Applies one command of an entry: the state machine, the circuit
    /// breaker's evidence, then the leader's effects, with the state as
    /// this command left it. What it changed is added to `written` for the
    /// entry's one storage batch.
    fn apply_one(
        &mut self,
        command: Command,
        written: &mut ChangeSet,
    ) -> Result<Outcome, ApplyError> {
        // Lines about one job carry its span (id, attempt, kind, node).
        let span = command
            .job()
            .map_or_else(tracing::Span::none, |job| self.job_span(job));
        let _entered = span.enter();
        let effects = effects_copy(&command);
        let result = self.state.apply(command);
        let command = effects;
        let changes = self.state.take_changes();
        if self.leader {
            for quarantine in self.breaker.observe(&changes.jobs, &self.state, now_ms()) {
                self.propose(quarantine);
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            for event in &changes.events {
                let log = || tracing::debug!(index = event.index, state = %event.state, detail = %event.message, "job transition");
                if command.job() == Some(event.job_id) {
                    log();
                    continue;
                }
                tracing::info_span!(
                    "job",
                    job_id = event.job_id,
                    attempt = event.attempt,
                    kind = event.kind.as_str(),
                    node = %event.node,
                )
                .in_scope(log);
            }
        }
        self.dirty |= !changes.jobs.is_empty() || !changes.nodes.is_empty();
        written.absorb(changes);
        if let Ok(outcome) = &result {
            self.after_apply(&command, outcome);
        }
        result
    }
}

/// What the leader's effects see of a command the state machine takes
/// by value: a clone, except that a submit's specs (the bulk of the log,
/// moved into the job records) are left out; no effect reads them.
fn effects_copy(command: &Command) -> Command {
    match command {
        Command::Submit {
            at_ms,
            key,
            pipeline,
            owner,
            ..
        } => Command::Submit {
            at_ms: *at_ms,
            key: key.clone(),
            jobs: Vec::new(),
            pipeline: pipeline.clone(),
            owner: owner.clone(),
        },
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests;

/// Decodes a snapshot file (binary, or JSON from an earlier version),
/// streamed.
fn read_snapshot(file: &Path) -> Result<StateSnapshot, String> {
    let input = std::fs::File::open(file)
        .map_err(|error| format!("cannot open {}: {error}", file.display()))?;
    store::read_snapshot(input).map_err(|error| format!("undecodable snapshot: {error}"))
}
