//! Gangs in the state machine: submission as one job per member, the
//! all-or-nothing Assign re-checked at apply, MASTER_PORT choice, and
//! `GangStop` (what it stops, and that a duplicate changes nothing).

use gantry_coordinator::Command;
use gantry_coordinator::domain::{GangSpec, JobSpec, JobState, MASTER_PORTS_LABEL};
use gantry_coordinator::state::{GangSettle, Outcome, StateMachine};
use gantry_scheduler::{LockMode, LockRequest, Placement};

const GIB: u64 = 1 << 30;

fn gang(name: &str, nodes: u32) -> JobSpec {
    let mut spec = JobSpec::for_test(name);
    spec.gang = Some(GangSpec {
        nodes,
        same_label: Some("provider".into()),
    });
    spec
}

fn cluster(nodes: &[&str]) -> StateMachine {
    let mut sm = StateMachine::new();
    for n in nodes {
        sm.apply(Command::register_for_test(n, 1, 80 * GIB))
            .expect("register");
    }
    sm
}

fn submit(sm: &mut StateMachine, specs: Vec<JobSpec>) -> Vec<u64> {
    match sm.apply(Command::Submit {
        at_ms: 10,
        key: None,
        jobs: specs,
        pipeline: None,
        owner: None,
    }) {
        Ok(Outcome::Submitted(ids)) => ids,
        other => panic!("unexpected {other:?}"),
    }
}

fn place(job: u64, node: &str) -> Placement {
    Placement {
        job,
        node: node.into(),
        gpus: vec![0],
        gpu_memory: 10 * GIB,
        batch_size: None,
        exclusive_gpu: false,
    }
}

/// (applied jobs, refused jobs) of one Assign.
fn assign(sm: &mut StateMachine, placements: Vec<Placement>) -> (Vec<u64>, Vec<(u64, String)>) {
    match sm.apply(Command::Assign {
        at_ms: 20,
        placements,
        term: 1,
    }) {
        Ok(Outcome::Assigned { applied, refused }) => {
            (applied.into_iter().map(|(j, _)| j).collect(), refused)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_gang_is_submitted_as_one_job_per_member_and_its_dependants_wait_for_all() {
    let mut sm = cluster(&[]);
    let mut train = gang("train", 3);
    train.locks.push(LockRequest {
        name: "model/x".into(),
        mode: LockMode::Exclusive,
    });
    let mut eval = JobSpec::for_test("eval");
    eval.after = vec!["train".into()];
    // The answer names each spec's first job.
    assert_eq!(submit(&mut sm, vec![train, eval]), vec![1, 4]);
    for (id, rank) in [(1, 0), (2, 1), (3, 2)] {
        let job = sm.job(id).expect("member");
        let g = job.gang.as_ref().expect("gang member");
        assert_eq!((g.first, g.rank, g.size), (1, rank, 3));
        // Rank 0 holds the gang's locks.
        assert_eq!(job.spec.locks.len(), usize::from(rank == 0));
    }
    assert_eq!(sm.job(4).expect("eval").depends_on, vec![1, 2, 3]);
}

#[test]
fn assign_places_every_member_or_refuses_them_all() {
    let cases: Vec<(&str, Vec<Placement>, &str)> = vec![
        (
            "a member missing from the plan",
            vec![place(1, "a"), place(2, "b")],
            "needs all 3 members placed at once, plan has 2",
        ),
        (
            "two members on one node",
            vec![place(1, "a"), place(2, "b"), place(3, "b")],
            "members share a node",
        ),
        (
            "a member on a full GPU",
            vec![place(1, "a"), place(2, "b"), place(3, "full")],
            "GPU full/0 is not free",
        ),
    ];
    for (what, plan, reason) in cases {
        let mut sm = cluster(&["a", "b", "c", "full"]);
        submit(
            &mut sm,
            vec![JobSpec {
                exclusive_gpu: Some(true),
                ..JobSpec::for_test("hog")
            }],
        );
        assert_eq!(
            assign(
                &mut sm,
                vec![Placement {
                    exclusive_gpu: true,
                    ..place(1, "full")
                }]
            )
            .0,
            vec![1]
        );
        submit(&mut sm, vec![gang("train", 3)]);
        let plan: Vec<Placement> = plan
            .into_iter()
            .map(|p| Placement {
                job: p.job + 1,
                ..p
            })
            .collect();
        let (applied, refused) = assign(&mut sm, plan.clone());
        assert!(applied.is_empty(), "{what}: applied {applied:?}");
        assert_eq!(refused.len(), plan.len(), "{what}: {refused:?}");
        assert!(
            refused.iter().all(|(_, r)| r.contains(reason)),
            "{what}: {refused:?}"
        );
        for id in 2..=4 {
            assert_eq!(
                sm.job(id).map(|j| j.state),
                Some(JobState::Pending),
                "{what}"
            );
        }
        assert_eq!(sm.gpu_usage("a", 0).jobs, 0, "{what}: nothing reserved");
    }
}

#[test]
fn master_ports_differ_for_gangs_whose_rank_0_shares_a_node() {
    let mut sm = cluster(&["a", "b", "c"]);
    submit(&mut sm, vec![gang("one", 2), gang("two", 2)]);
    let (applied, refused) = assign(
        &mut sm,
        vec![place(1, "a"), place(2, "b"), place(3, "a"), place(4, "c")],
    );
    assert_eq!((applied, refused), (vec![1, 2, 3, 4], vec![]));
    let port = |id| sm.job(id).and_then(|j| j.gang.as_ref()).map(|g| g.port);
    assert_eq!(
        [port(1), port(2), port(3), port(4)],
        [Some(29_500), Some(29_500), Some(29_501), Some(29_501)]
    );
}

/// A node registered with the port range its agent was given
/// (`--master-port-range`, carried as a label).
fn register_with_ports(sm: &mut StateMachine, name: &str, range: &str) {
    let mut command = Command::register_for_test(name, 1, 80 * GIB);
    if let Command::RegisterNode { labels, .. } = &mut command {
        labels.insert(MASTER_PORTS_LABEL.into(), range.into());
    }
    sm.apply(command).expect("register");
}

#[test]
fn master_ports_come_from_rank_0s_node_range() {
    let mut sm = cluster(&["b", "c", "d"]);
    register_with_ports(&mut sm, "a", "40000-40000");
    register_with_ports(&mut sm, "e", "29500");
    submit(
        &mut sm,
        vec![gang("one", 2), gang("two", 2), gang("three", 2)],
    );
    let (applied, refused) = assign(&mut sm, vec![place(1, "a"), place(2, "b")]);
    assert_eq!((applied, refused), (vec![1, 2], vec![]));
    let port = |sm: &StateMachine, id| sm.job(id).and_then(|j| j.gang.as_ref()).map(|g| g.port);
    assert_eq!([port(&sm, 1), port(&sm, 2)], [Some(40_000), Some(40_000)]);
    // The one port is taken: a second gang with rank 0 there is refused whole.
    let (applied, refused) = assign(&mut sm, vec![place(3, "a"), place(4, "c")]);
    assert!(applied.is_empty(), "{applied:?}");
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[0].1.contains("no free MASTER_PORT left on node a"),
        "{refused:?}"
    );
    // Rank 0 elsewhere: the default range.
    let (applied, _) = assign(&mut sm, vec![place(3, "c"), place(4, "a")]);
    assert_eq!(applied, vec![3, 4]);
    assert_eq!(port(&sm, 3), Some(29_500));
    // A range that cannot be read refuses the gang naming the label.
    let (applied, refused) = assign(&mut sm, vec![place(5, "e"), place(6, "d")]);
    assert!(applied.is_empty(), "{applied:?}");
    assert!(
        refused[0]
            .1
            .contains("node e's MASTER_PORT range: label gantry-master-port-range"),
        "{refused:?}"
    );
}

#[test]
fn gang_stop_stops_the_running_members_once() {
    let mut sm = cluster(&["a", "b", "c"]);
    submit(&mut sm, vec![gang("train", 3)]);
    assign(&mut sm, vec![place(1, "a"), place(2, "b"), place(3, "c")]);
    assert!(
        GangSettle::of(&sm, 1).is_empty(),
        "a whole gang has nothing to settle"
    );
    sm.apply(Command::AttemptLost {
        at_ms: 30,
        job: 2,
        attempt: 1,
        reason: "node b is down".into(),
    })
    .expect("lost");
    let settle = GangSettle::of(&sm, 1);
    assert_eq!(settle.stop, vec![1, 3]);
    let stop = |sm: &mut StateMachine| match sm.apply(Command::GangStop { at_ms: 40, gang: 1 }) {
        Ok(Outcome::GangStopped { stop }) => stop,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        stop(&mut sm),
        vec![("a".to_string(), 1, 1), ("c".to_string(), 3, 1)]
    );
    // A duplicate (or late) GangStop changes nothing.
    assert_eq!(stop(&mut sm), vec![]);
    assert!(GangSettle::of(&sm, 1).is_empty());
    // Reservations stay until the members' agents report them ended.
    assert_eq!(sm.gpu_usage("a", 0).jobs, 1);
}
