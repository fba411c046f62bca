//! The short nemesis (about 60 s of faults): a three-replica set behind
//! controllable proxies, four agents with fake GPUs, a steady load of
//! ledger jobs with cancels racing assignment and retry back-off, and
//! seeded faults (leader kills, partitions, agent kills alone and with the
//! leader; `GANTRY_NEMESIS_AGENT_KILLS=0` leaves agent kills out).
//! `tests/agent_restart.rs` proves the kill -9 adoption cases
//! deterministically. The checker must find
//! no double run, no leak, no lost or doubly ended job, no node left
//! suspect while its agent is dead. `GANTRY_NEMESIS_SEED` replays a run's
//! choices.

use gantry_integration_tests::nemesis::{
    NemesisConfig, agent_kills_from_env, describe, run, seed_from_env,
};

#[test]
fn faults_under_load_break_no_promise() -> anyhow::Result<()> {
    let config = NemesisConfig::short(seed_from_env()?, agent_kills_from_env(true)?);
    eprintln!("nemesis: {}", describe(&config));
    let report = run(&config)?;
    let classes: Vec<&str> = report.classes.iter().map(|k| k.name()).collect();
    eprintln!(
        "nemesis: seed {}, fault classes {classes:?}, {} faults, {} jobs ({} cancels, {} submit errors), {} processes, quiet {}, orphans killed {}, extra work {:?}",
        report.seed,
        report.fault_cycles(),
        report.jobs,
        report.cancels,
        report.submit_errors,
        report.executions,
        report.quiet,
        report.orphans_killed,
        report.verdict.extra,
    );
    assert!(report.fault_cycles() > 0 && report.jobs > 0, "nothing ran");
    assert!(
        report.verdict.violations.is_empty(),
        "seed {} (replay with GANTRY_NEMESIS_SEED={}), fault classes {classes:?}: {} violations:\n{}",
        report.seed,
        report.seed,
        report.verdict.violations.len(),
        report.violations_text()
    );
    Ok(())
}
