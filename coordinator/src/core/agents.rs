//! Agent sessions: registration (its decisions are in
//! [`crate::decide::reconcile`]), messages on an established stream, log
//! reads and RTT probes.

use gantry_proto as pb;
use gantry_scheduler::JobId;

use super::{
    AgentSender, Core, LogWaiter, PING_INTERVAL, PendingRegistration, Reply, Session, now_ms,
};
use crate::convert;
use crate::decide::{self, Registration};
use crate::error::CoordinatorError;

impl Core {
    /// Starts an agent's registration: its RegisterNode is proposed, and the
    /// rest happens in [`Core::complete_registration`] once it is applied.
    pub(super) fn register(
        &mut self,
        now: u64,
        session: u64,
        register: Registration,
        sender: AgentSender,
        reply: Reply<()>,
    ) {
        let name = register.node.clone();
        if !self.leader {
            let leader = self.raft.leader_url.clone();
            let _ = reply.send(Err(CoordinatorError::NotLeader { leader }));
            return;
        }
        if self.config.strict_inventory && !self.config.inventory.iter().any(|h| h.name == name) {
            tracing::warn!(node = %name, address = %register.address, "agent refused: not in the inventory (--strict-inventory)");
            let _ = reply.send(Err(CoordinatorError::PermissionDenied(format!(
                "node {name:?} is not in the inventory and the coordinator runs with --strict-inventory"
            ))));
            return;
        }
        let command = decide::reconcile::register_command(&register, now);
        self.health
            .on_register(&name, register.reported(), register.disk_total, now);
        // A previous stream of this node is replaced now: its messages are stale.
        self.sessions.remove(&name);
        let pending = PendingRegistration {
            session,
            register,
            sender,
            reply,
        };
        if let Some(old) = self.registering.insert(name, pending) {
            let _ = old.reply.send(Err(CoordinatorError::Unavailable(
                "replaced by a newer registration".into(),
            )));
        }
        self.propose(command);
    }

    /// Reconciles a registered agent's running attempts against hard state
    /// ([`decide::reconcile::registered`]), then opens its session:
    /// Registered first, then re-sent assignments and cancels.
    pub(super) fn complete_registration(&mut self, name: &str) {
        let Some(PendingRegistration {
            session,
            register,
            sender,
            reply,
        }) = self.registering.remove(name)
        else {
            return;
        };
        let tunables = self.tunables();
        let interval = self.heartbeat_interval_ms();
        let decisions = decide::reconcile::registered(
            &self.state,
            &mut self.soft,
            &tunables,
            &register,
            interval,
            now_ms(),
        );
        self.dirty = true;
        for command in decisions.propose {
            self.propose(command);
        }
        // Every message of a registration is for its own stream, which is
        // not yet a session: nothing can overtake Registered.
        for outgoing in &decisions.send {
            debug_assert_eq!(outgoing.node, name);
            let message = convert::agent::to_agent(&outgoing.message);
            let _ = sender.send(Box::new(pb::CoordinatorMessage { msg: Some(message) }));
        }
        // Only now does the session exist for everyone else (pings, dispatch),
        // so nothing can overtake Registered.
        self.sessions.insert(
            name.to_string(),
            Session {
                id: session,
                sender,
                ping: None,
                // Probe soon after registering, not a whole interval later.
                last_ping: std::time::Instant::now()
                    .checked_sub(PING_INTERVAL)
                    .unwrap_or_else(std::time::Instant::now),
                heard_heartbeat_seq: 0,
            },
        );
        tracing::info!(node = %name, running = register.running.len(), "agent registered");
        let _ = reply.send(Ok(()));
    }

    pub(super) fn agent_message(
        &mut self,
        now: u64,
        session: u64,
        node: &str,
        message: pb::AgentMessage,
    ) {
        if self.sessions.get(node).is_none_or(|s| s.id != session) {
            return; // a replaced session: its messages are stale
        }
        match message.msg {
            Some(pb::agent_message::Msg::Heartbeat(hb)) => {
                if let Some(session) = self.sessions.get_mut(node) {
                    session.heard_heartbeat_seq = session.heard_heartbeat_seq.max(hb.seq);
                }
                let beat = convert::agent::heartbeat(&hb);
                if self.health.on_heartbeat(node, &beat, now) {
                    self.dirty = true;
                }
                for command in decide::gpu_health::heartbeat(&self.state, node, &beat, now) {
                    self.propose(command);
                }
            }
            Some(pb::agent_message::Msg::JobEvent(event)) => self.job_event(now, node, event),
            Some(pb::agent_message::Msg::LogData(data)) => {
                if let Some(waiter) = self.log_waiters.remove(&data.request_id) {
                    let ended = waiter.ended;
                    let _ = waiter.reply.send(Ok((data, ended)));
                }
            }
            Some(pb::agent_message::Msg::Pong(pong)) => {
                let sample = self
                    .sessions
                    .get_mut(node)
                    .and_then(|session| match session.ping {
                        Some((nonce, sent)) if nonce == pong.nonce => {
                            session.ping = None;
                            Some(sent.elapsed().as_secs_f64() * 1000.0)
                        }
                        _ => None,
                    });
                if let Some(rtt_ms) = sample {
                    self.health.on_rtt_sample(node, rtt_ms);
                }
            }
            Some(pb::agent_message::Msg::Register(_)) | None => {
                tracing::warn!(node = %node, "unexpected message on an established agent stream");
            }
        }
    }

    pub(super) fn job_event(&mut self, now: u64, node: &str, event: pb::JobEvent) {
        let span = self.job_span(event.job_id);
        let _entered = span.enter();
        let Some(command) =
            convert::agent::job_event(node, event, now, &self.config.oom_signatures)
        else {
            return;
        };
        self.propose(command);
    }

    pub(super) fn read_log(
        &mut self,
        job: JobId,
        attempt: u32,
        stream: String,
        offset: u64,
        reply: Reply<(pb::LogData, bool)>,
    ) {
        let Some(record) = self.state.job(job) else {
            let _ = reply.send(Err(CoordinatorError::NotFound(format!(
                "job {job} not found"
            ))));
            return;
        };
        let chosen = if attempt == 0 {
            record.current_attempt()
        } else {
            record.attempts.iter().find(|a| a.attempt == attempt)
        };
        let Some(chosen) = chosen else {
            let message = if attempt == 0 {
                format!("job {job} has not been placed yet ({})", record.state)
            } else {
                format!("job {job} has no attempt {attempt}")
            };
            let _ = reply.send(Err(CoordinatorError::NotFound(message)));
            return;
        };
        let node = chosen.node.clone();
        let Some(session) = self.sessions.get(&node) else {
            let _ = reply.send(Err(CoordinatorError::Unavailable(format!(
                "node {node} holding the output of job {job} is not connected"
            ))));
            return;
        };
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let ended = chosen.ended_at_ms > 0 || record.state.is_terminal();
        let message = pb::LogRead {
            request_id,
            job_id: job,
            attempt: chosen.attempt,
            stream,
            offset,
            max_bytes: 256 << 10,
        };
        let session_id = session.id;
        if session
            .sender
            .send(Box::new(pb::CoordinatorMessage {
                msg: Some(pb::coordinator_message::Msg::LogRead(message)),
            }))
            .is_err()
        {
            let _ = reply.send(Err(CoordinatorError::Unavailable(format!(
                "node {node} disconnected"
            ))));
            return;
        }
        self.log_waiters.insert(
            request_id,
            LogWaiter {
                session: session_id,
                ended,
                reply,
            },
        );
    }

    pub(super) fn send_pings(&mut self) {
        let now = std::time::Instant::now();
        let mut nonce = self.next_request_id;
        for session in self.sessions.values_mut() {
            if now.duration_since(session.last_ping) < PING_INTERVAL {
                continue;
            }
            nonce += 1;
            session.last_ping = now;
            session.ping = Some((nonce, now));
            let ping = pb::coordinator_message::Msg::Ping(pb::Ping {
                nonce,
                heard_heartbeat_seq: session.heard_heartbeat_seq,
            });
            let _ = session
                .sender
                .send(Box::new(pb::CoordinatorMessage { msg: Some(ping) }));
        }
        self.next_request_id = nonce + 1;
    }
}
