//! Decision cases through the harness: each is a list of steps and what
//! must hold after them. A field bug becomes a case here before it is fixed
//! (the numbers are issue 10's findings).

use super::harness::{GIB, Step, Step::*, Want, check, job};
use crate::domain::JobState;

/// Job 1 (`attempts` attempts) placed on n1, the only node, and running.
fn running(attempts: u32) -> Vec<Step> {
    vec![
        Register("n1", &[]),
        Submit(vec![job("a", attempts)]),
        Advance(500),
        Started("n1", 1, 1),
    ]
}

#[test]
fn a_placed_job_is_sent_to_its_agent_and_its_reservation_freed_at_exit() {
    check(
        [running(1), vec![Exited("n1", 1, 1, 0)]].concat(),
        &[
            Want::Recorded("send n1 assign 1#1"),
            Want::Starts(1, 1),
            Want::Recorded("send n1 end recorded 1#1"),
            Want::Job(1, JobState::Succeeded),
            Want::Reserved("n1", 0),
        ],
    );
}

/// A silent node goes Down and its job is retried elsewhere; finding 3:
/// also when the leader changed meanwhile (the new leader starts the
/// silence clock of every node in hard state at its election, so a node
/// that died with the old leader goes Down on time and its reservation is
/// released).
#[test]
fn a_silent_node_goes_down_and_its_job_is_retried_elsewhere() {
    let failovers = [vec![], vec![Failover, Register("n2", &[])]];
    for failover in failovers {
        let steps = [
            running(1),
            vec![Register("n2", &[]), Kill("n1")],
            failover,
            vec![Advance(16_000)],
        ];
        check(
            steps.concat(),
            &[
                Want::Down("n1", true),
                Want::Recorded("send n2 assign 1#2"),
                Want::Reserved("n1", 0),
                Want::Reserved("n2", 40 * GIB),
            ],
        );
    }
}

/// The clock a new leader starts does not mark nodes that reconnect Down.
#[test]
fn nodes_that_reconnect_after_a_failover_stay_up() {
    check(
        vec![
            Register("n1", &[]),
            Register("n2", &[]),
            Failover,
            Advance(2_000),
            Register("n1", &[]),
            Register("n2", &[]),
            Advance(30_000),
        ],
        &[Want::Down("n1", false), Want::NotRecorded("SetNodeDown")],
    );
}

/// Finding 4: an unreported attempt's grace runs from the first
/// registration that failed to report it; a flapping agent cannot keep a
/// vanished attempt (and its reservation) for ever.
#[test]
fn a_flapping_agent_does_not_restart_an_unreported_attempts_grace() {
    let mut steps = running(1);
    for _ in 0..4 {
        steps.extend([Kill("n1"), Register("n1", &[]), Advance(6_000)]);
    }
    check(
        steps,
        &[
            Want::Recorded("AttemptLost 1#1 (the agent no longer runs it)"),
            Want::Recorded("send n1 assign 1#2"),
        ],
    );
}

/// A registration that reports the attempt again confirms it: it is not
/// declared lost (and run a second time) while it still runs.
#[test]
fn an_attempt_reported_again_is_not_declared_lost() {
    check(
        [
            running(1),
            vec![
                Kill("n1"),
                Register("n1", &[]),
                Advance(1_000),
                Kill("n1"),
                Register("n1", &[(1, 1)]),
                Advance(20_000),
            ],
        ]
        .concat(),
        &[
            Want::NotRecorded("AttemptLost"),
            Want::Job(1, JobState::Running),
            Want::Starts(1, 1),
        ],
    );
}

/// Finding 5a: cancelling a job in retry back-off ends it; it is never
/// requeued, placed and refused in a loop, with this leader or a new one.
#[test]
fn a_job_cancelled_in_back_off_is_cancelled_at_once() {
    let failovers = [vec![], vec![Failover, Register("n1", &[])]];
    for failover in failovers {
        let steps = [
            running(3),
            vec![Exited("n1", 1, 1, 1), Cancel(1)],
            failover,
            vec![Advance(40_000)],
        ];
        check(
            steps.concat(),
            &[
                Want::Job(1, JobState::Cancelled),
                Want::NotRecorded("refused"),
                Want::NotRecorded("Requeue"),
                Want::Starts(1, 1),
                Want::ProposedAtMost(8),
            ],
        );
    }
}

/// Finding 5b: a job cancelled while its assignment never reached its
/// agent is not started when the agent re-registers, with this leader or a
/// new one.
#[test]
fn a_cancelled_undelivered_assignment_is_not_sent_again() {
    for failover in [vec![], vec![Failover]] {
        let steps = [
            vec![
                Register("n1", &[]),
                Submit(vec![job("a", 1)]),
                Deafen("n1"),
                Advance(500),
                Cancel(1),
                Kill("n1"),
            ],
            failover,
            vec![Register("n1", &[]), Advance(1_000)],
        ];
        check(
            steps.concat(),
            &[
                Want::Recorded("lost n1 assign 1#1"),
                Want::NotRecorded("send n1 assign"),
                Want::Starts(1, 0),
                Want::Job(1, JobState::Cancelled),
                Want::Reserved("n1", 0),
            ],
        );
    }
}

/// A cancelled attempt that its agent did start (the cancel was lost) is
/// told to stop when the agent reports it.
#[test]
fn a_cancelled_attempt_reported_at_registration_is_told_to_stop() {
    check(
        vec![
            Register("n1", &[]),
            Submit(vec![job("a", 1)]),
            Advance(500),
            Deafen("n1"),
            Cancel(1),
            Kill("n1"),
            Register("n1", &[(1, 1)]),
        ],
        &[
            Want::Recorded("lost n1 cancel 1#1"),
            Want::Recorded("send n1 cancel 1#1"),
            Want::Starts(1, 1),
        ],
    );
}

/// Job 1 placed on n1 and cancelled while its assignment is still on the
/// wire to the agent.
fn cancelled_in_flight() -> Vec<Step> {
    vec![
        Register("n1", &[]),
        Hold("n1"),
        Submit(vec![job("a", 1)]),
        Advance(500),
        Cancel(1),
    ]
}

/// A cancel racing an assignment already on the wire (the short nemesis
/// found a start 13 ms after the acknowledgement): the agent receives the
/// assignment, starts the attempt, then receives the cancel and stops it.
/// The cancel is acknowledged only once the agent reports the attempt
/// ended, so nothing of the job starts after the acknowledgement.
#[test]
fn a_cancel_racing_an_assignment_in_flight_is_acknowledged_once_the_agent_stopped_it() {
    check(
        [
            cancelled_in_flight(),
            vec![Release("n1"), Started("n1", 1, 1), Exited("n1", 1, 1, 143)],
        ]
        .concat(),
        &[
            Want::Recorded("n1 receives assign 1#1"),
            Want::Recorded("n1 receives cancel 1#1"),
            Want::Starts(1, 1),
            Want::Recorded("acknowledged cancel 1"),
            Want::Job(1, JobState::Cancelled),
            Want::Reserved("n1", 0),
        ],
    );
}

/// The same race with the agent dying before it received anything: its
/// node goes Down and the attempt is lost, so the job ends Cancelled and
/// its reservation is freed (no endless "cancelling"), but the cancel is
/// never acknowledged as settled: nobody confirmed the assignment did not
/// start.
#[test]
fn a_cancel_whose_agent_is_unreachable_ends_the_job_but_is_not_confirmed() {
    check(
        [cancelled_in_flight(), vec![Kill("n1"), Advance(30_000)]].concat(),
        &[
            Want::Down("n1", true),
            Want::Job(1, JobState::Cancelled),
            Want::Reserved("n1", 0),
            Want::NotRecorded("acknowledged cancel 1"),
        ],
    );
}

/// Cancel of a pending job ends it at once and sends nothing.
#[test]
fn a_pending_job_is_cancelled_at_once() {
    check(
        vec![
            Submit(vec![job("a", 1)]),
            Cancel(1),
            Register("n1", &[]),
            Advance(1_000),
        ],
        &[
            Want::Job(1, JobState::Cancelled),
            Want::NotRecorded("assign"),
            Want::Starts(1, 0),
        ],
    );
}

/// Finding 2, the coordinator's side: an agent that re-registers without
/// reporting a still-Assigned attempt gets the *same* attempt again (never
/// a new number on another node); the agent answers an attempt it already
/// has instead of starting it, so attempt 1 has one process.
#[test]
fn an_unreported_assigned_attempt_is_sent_again_with_its_own_number() {
    check(
        vec![
            Register("n1", &[]),
            Submit(vec![job("a", 1)]),
            Advance(500),
            Kill("n1"),
            Register("n1", &[]),
        ],
        &[
            Want::Recorded("send n1 assign 1#1"),
            Want::NotRecorded("assign 1#2"),
            Want::Starts(1, 1),
            Want::Job(1, JobState::Assigned),
        ],
    );
}

/// A node back from Down with its lost attempt keeps it when the
/// replacement has not started: the replacement is withdrawn and stopped.
#[test]
fn a_lost_attempt_that_comes_back_first_is_kept() {
    check(
        [
            running(1),
            vec![
                Register("n2", &[]),
                Kill("n1"),
                Advance(16_000),
                Register("n1", &[(1, 1)]),
            ],
        ]
        .concat(),
        &[
            Want::Recorded("send n2 assign 1#2"),
            Want::Recorded("ReviveAttempt 1#1@n1"),
            Want::Recorded("send n2 cancel 1#2"),
            Want::Job(1, JobState::Running),
            Want::Reserved("n2", 0),
            Want::Reserved("n1", 40 * GIB),
        ],
    );
}

/// ... and is stopped when the replacement started first.
#[test]
fn a_lost_attempt_that_comes_back_after_its_replacement_started_is_stopped() {
    check(
        [
            running(1),
            vec![
                Register("n2", &[]),
                Kill("n1"),
                Advance(16_000),
                Started("n2", 1, 2),
                Register("n1", &[(1, 1)]),
            ],
        ]
        .concat(),
        &[
            Want::Recorded("send n1 cancel 1#1"),
            Want::NotRecorded("cancel 1#2"),
            Want::Job(1, JobState::Running),
            Want::Reserved("n1", 0),
        ],
    );
}

/// An attempt hard state does not know is stopped at registration.
#[test]
fn an_unknown_attempt_is_stopped_at_registration() {
    check(
        vec![Register("n1", &[(9, 1)])],
        &[Want::Recorded("send n1 registered stop [9#1]")],
    );
}

/// Finding 5b, the other half: an attempt ended because it was cancelled
/// before its agent reported it is told to stop when the agent reports it
/// after all.
#[test]
fn a_cancelled_attempt_reported_late_is_told_to_stop() {
    check(
        vec![
            Register("n1", &[]),
            Submit(vec![job("a", 1)]),
            Advance(500),
            Kill("n1"),
            Cancel(1),
            Register("n1", &[]),
            Started("n1", 1, 1),
        ],
        &[
            Want::Recorded("drop n1 cancel 1#1"),
            Want::Recorded("AttemptLost 1#1 (cancelled before its agent started it)"),
            Want::Recorded("send n1 cancel 1#1"),
            Want::Job(1, JobState::Cancelled),
            Want::Reserved("n1", 0),
        ],
    );
}

/// A one-attempt job of `priority` taking a whole 80 GiB GPU.
fn whole(name: &str, priority: i32) -> crate::domain::JobSpec {
    let mut spec = job(name, 1);
    spec.resources.gpu_memory = Some(80 * GIB);
    spec.priority = priority;
    spec
}

/// Priority preemption: a job that fits nowhere stops a lower-priority one
/// (a command through Raft, then a cancel with the victim's grace), the
/// freed GPU is held for it (a later job of even higher priority does not
/// slip in), and the victim goes back to pending without using an attempt
/// and runs again when the GPU frees.
#[test]
fn a_high_priority_job_preempts_and_the_victim_runs_again() {
    let mut urgent = whole("urgent", 10);
    urgent.preemptible = Some(false);
    urgent.preemption_grace_ms = Some(5_000);
    check(
        vec![
            Register("n1", &[]),
            Submit(vec![whole("low", 0)]),
            Advance(500),
            Started("n1", 1, 1),
            Submit(vec![urgent]),
            Advance(500),
            // Higher still, but after the preemption: must not take the GPU.
            Submit(vec![whole("later", 50)]),
            Advance(500),
            Exited("n1", 1, 1, 143),
            Advance(500),
            Started("n1", 2, 1),
            Advance(1_000),
            Exited("n1", 2, 1, 0),
            Advance(500),
        ],
        &[
            Want::Recorded("propose Preempt 2@n1 victims [1]"),
            Want::Recorded("send n1 cancel 1#1 \"preempted by job 2 (priority 10)\""),
            Want::Recorded("send n1 assign 2#1"),
            // Not preemptible: `later` waits for it instead.
            Want::NotRecorded("propose Preempt 3"),
            Want::Recorded("send n1 assign 3#1"),
            Want::Job(1, JobState::Pending),
            Want::Starts(1, 1),
        ],
    );
}

/// With `low` alone behind `urgent`, the victim is placed again (attempt 2,
/// its first failure budget untouched: max_attempts 1 still allows it).
#[test]
fn a_preempted_job_does_not_use_an_attempt() {
    check(
        vec![
            Register("n1", &[]),
            Submit(vec![whole("low", 0)]),
            Advance(500),
            Started("n1", 1, 1),
            Submit(vec![whole("urgent", 10)]),
            Advance(500),
            Exited("n1", 1, 1, 143),
            Advance(500),
            Started("n1", 2, 1),
            Exited("n1", 2, 1, 0),
            Advance(500),
        ],
        &[
            Want::Job(2, JobState::Succeeded),
            Want::Recorded("send n1 assign 1#2"),
            Want::Starts(1, 2),
            Want::NotRecorded("deadletter"),
        ],
    );
}

/// A gang of `nodes` members on one GPU each (no provider labels in the
/// harness: one group), `attempts` attempts.
fn gang(name: &str, attempts: u32, nodes: u32) -> crate::domain::JobSpec {
    let mut spec = job(name, attempts);
    spec.gang = Some(crate::domain::GangSpec {
        nodes,
        same_label: Some("provider".into()),
    });
    spec
}

/// A gang of 2 (jobs 1 and 2) placed on n1 and n2 of three nodes, running.
fn gang_running(attempts: u32) -> Vec<Step> {
    vec![
        Register("n1", &[]),
        Register("n2", &[]),
        Register("n3", &[]),
        Submit(vec![gang("train", attempts, 2)]),
        Advance(500),
        Started("n1", 1, 1),
        Started("n2", 2, 1),
    ]
}

#[test]
fn a_gang_is_placed_whole_and_succeeds_when_every_member_exits_0() {
    check(
        [
            gang_running(1),
            vec![Exited("n1", 1, 1, 0), Exited("n2", 2, 1, 0), Advance(1_000)],
        ]
        .concat(),
        &[
            Want::Recorded("Assign 1@n1 2@n2"),
            Want::Job(1, JobState::Succeeded),
            Want::Job(2, JobState::Succeeded),
            Want::NotRecorded("GangStop"),
            Want::Reserved("n1", 0),
        ],
    );
}

/// One member fails: the other is stopped (not counted against it), and
/// after the failed member's back-off the gang is placed again as a whole
/// with attempt 2 for every member.
#[test]
fn a_failed_member_stops_the_gang_and_it_is_retried_as_a_whole() {
    check(
        [
            gang_running(2),
            vec![
                Exited("n2", 2, 1, 1),
                Advance(500),
                Exited("n1", 1, 1, 143),
                Advance(40_000),
            ],
        ]
        .concat(),
        &[
            Want::Recorded("GangStop"),
            Want::Recorded("send n1 cancel 1#1 \"gang 1: member rank 1 (job 2) is failed\""),
            Want::Recorded("send n1 assign 1#2"),
            Want::Recorded("send n2 assign 2#2"),
            Want::Job(1, JobState::Assigned),
            Want::Job(2, JobState::Assigned),
            Want::Starts(1, 2),
            Want::Starts(2, 2),
        ],
    );
}

/// A member that succeeded runs again when another member of its attempt
/// fails afterwards: the gang succeeds only when all exit 0 together.
#[test]
fn a_member_that_succeeded_runs_again_when_its_gang_fails() {
    check(
        [
            gang_running(2),
            vec![
                Exited("n1", 1, 1, 0),
                Exited("n2", 2, 1, 1),
                Advance(40_000),
            ],
        ]
        .concat(),
        &[
            Want::Recorded("send n1 assign 1#2"),
            Want::Job(1, JobState::Assigned),
        ],
    );
}

/// A member's node is lost: the gang is stopped and placed again on the
/// nodes left (n1 and n3) with attempt 2; when n2's agent comes back
/// reporting the old member still running, it is fenced (told to stop),
/// never revived alone.
#[test]
fn a_lost_member_moves_the_whole_gang_and_its_stale_attempt_is_fenced() {
    check(
        [
            gang_running(1),
            vec![
                Kill("n2"),
                Advance(16_000),
                Exited("n1", 1, 1, 143),
                Advance(1_000),
                Register("n2", &[(2, 1)]),
                Advance(500),
            ],
        ]
        .concat(),
        &[
            Want::Recorded("SetNodeDown n2 true"),
            Want::Recorded("send n1 cancel 1#1"),
            Want::Recorded("send n1 assign 1#2"),
            Want::Recorded("send n3 assign 2#2"),
            Want::Recorded("propose ReviveAttempt 2#1@n2"),
            Want::Recorded("send n2 cancel 2#1"),
            Want::NotRecorded("withdrawn"),
            Want::Job(2, JobState::Assigned),
            Want::Reserved("n2", 0),
        ],
    );
}

/// A member out of attempts ends the gang: the other is stopped, then
/// blocked by it (`dlq retry` of the dead-lettered member unblocks it).
#[test]
fn a_dead_lettered_member_blocks_the_rest_of_its_gang() {
    check(
        [
            gang_running(1),
            vec![
                Exited("n1", 1, 1, 3),
                Advance(500),
                Exited("n2", 2, 1, 143),
                Advance(1_000),
            ],
        ]
        .concat(),
        &[
            Want::Job(1, JobState::DeadLettered),
            Want::Job(2, JobState::Blocked),
            Want::Recorded("send n2 cancel 2#1"),
            Want::Reserved("n2", 0),
        ],
    );
}
