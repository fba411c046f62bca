//! Job transitions and the indexes they keep (pending, active, by node,
//! back-off, reservations and locks), and the event history.

use gantry_scheduler::{JobId, LockMode};

use super::StateMachine;
use crate::domain::{EventRecord, JobState};

impl StateMachine {
    /// Moves a job to `state`, keeping the derived indexes and reservations in
    /// step (a reservation is released exactly once: when the job leaves the
    /// active set), and records an event.
    pub(super) fn transition(&mut self, at_ms: u64, id: JobId, state: JobState, message: String) {
        if let Some(job) = self.jobs.get(&id) {
            // Illegal transitions are bugs: tests run with debug assertions.
            debug_assert!(
                job.state.can_become(state),
                "illegal transition of job {id}: {} -> {state}",
                job.state
            );
        }
        self.unindex_job(id);
        if let Some(job) = self.jobs.get_mut(&id) {
            job.state = state;
            job.updated_at_ms = at_ms;
        }
        self.index_job(id);
        self.changes.jobs.insert(id);
        self.event(at_ms, id, message);
    }

    pub(super) fn event(&mut self, at_ms: u64, id: JobId, message: String) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let attempt = job.current_attempt();
        let event = EventRecord {
            index: self.next_event_index,
            at_ms,
            job_id: id,
            job_name: job.spec.name.clone(),
            kind: job.spec.kind,
            state: job.state,
            node: attempt.map(|a| a.node.clone()).unwrap_or_default(),
            attempt: attempt.map_or(0, |a| a.attempt),
            message,
            pipeline: job.pipeline.clone(),
        };
        self.next_event_index += 1;
        self.changes.jobs.insert(id);
        self.changes.events.push(event);
    }

    pub(super) fn index_job(&mut self, id: JobId) {
        self.index_finished(id);
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.state == JobState::Pending {
            self.pending.insert(id);
        }
        if job.state == JobState::Failed {
            self.backing_off.insert(id);
        }
        if job.gang.is_some() {
            let (gang, state) = (job.gang.clone(), job.state);
            self.index_gang(gang, state);
        }
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if !job.state.is_active() {
            return;
        }
        let Some(attempt) = job.current_attempt() else {
            return;
        };
        self.active.insert(id);
        self.by_node
            .entry(attempt.node.clone())
            .or_default()
            .insert(id);
        for gpu in &attempt.gpus {
            let usage = self
                .gpu_usage
                .entry((attempt.node.clone(), *gpu))
                .or_default();
            usage.reserved += attempt.gpu_memory;
            usage.jobs += 1;
            usage.exclusive |= attempt.exclusive_gpu;
        }
        let host = self.host_usage.entry(attempt.node.clone()).or_default();
        host.cpu_millis += job.spec.resources.cpu_millis;
        host.memory += job.spec.resources.memory;
        host.disk += job.spec.resources.disk;
        for lock in &job.spec.locks {
            let holders = self.locks.entry(lock.name.clone()).or_default();
            match lock.mode {
                LockMode::Exclusive => {
                    debug_assert!(holders.exclusive.is_none() && holders.shared.is_empty());
                    holders.exclusive = Some(id);
                }
                LockMode::Shared => {
                    debug_assert!(holders.exclusive.is_none());
                    holders.shared.insert(id);
                }
            }
        }
    }

    pub(super) fn unindex_job(&mut self, id: JobId) {
        self.unindex_finished(id);
        self.pending.remove(&id);
        self.backing_off.remove(&id);
        if let Some(job) = self.jobs.get(&id).filter(|j| j.gang.is_some()) {
            let (gang, state) = (job.gang.clone(), job.state);
            self.unindex_gang(gang, state);
        }
        if !self.active.remove(&id) {
            return;
        }
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let Some(attempt) = job.current_attempt() else {
            return;
        };
        if let Some(set) = self.by_node.get_mut(&attempt.node) {
            set.remove(&id);
        }
        for gpu in &attempt.gpus {
            let key = (attempt.node.clone(), *gpu);
            if let Some(usage) = self.gpu_usage.get_mut(&key) {
                usage.reserved -= attempt.gpu_memory;
                usage.jobs -= 1;
                if attempt.exclusive_gpu {
                    usage.exclusive = false;
                }
                if usage.jobs == 0 {
                    debug_assert_eq!(usage.reserved, 0);
                    self.gpu_usage.remove(&key);
                }
            }
        }
        if let Some(host) = self.host_usage.get_mut(&attempt.node) {
            host.cpu_millis -= job.spec.resources.cpu_millis;
            host.memory -= job.spec.resources.memory;
            host.disk -= job.spec.resources.disk;
        }
        for lock in &job.spec.locks {
            if let Some(holders) = self.locks.get_mut(&lock.name) {
                if holders.exclusive == Some(id) {
                    holders.exclusive = None;
                }
                holders.shared.remove(&id);
                if holders.exclusive.is_none() && holders.shared.is_empty() {
                    self.locks.remove(&lock.name);
                }
            }
        }
    }
}
