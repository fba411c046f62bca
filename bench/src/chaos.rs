//! `gantry-bench chaos`: the nemesis of `integration-tests` (seeded agent
//! kills and restarts, leader kills, partitions, cancels racing assignment
//! and back-off, under a steady load of ledger jobs) run for as long as
//! asked, then judged by the same checker. It reports fault cycles, jobs,
//! double runs and leaked reservations (goal 0 each), how long an agent's
//! jobs took to run again after it was killed and to be re-adopted after it
//! restarted, and the extra work the faults caused.

use std::collections::BTreeMap;
use std::time::Duration;

use gantry_integration_tests::nemesis::{NemesisConfig, NemesisReport, describe};
use serde_json::json;

use crate::stats::Latencies;

/// Violations listed in the human report (the JSON has them all).
const SHOWN_VIOLATIONS: usize = 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// How long faults are injected.
    pub duration: Duration,
    /// Seed of every random choice.
    pub seed: u64,
    /// Agents (2 fake H100s each).
    pub agents: usize,
    /// Jobs submitted per second.
    pub jobs_per_second: f64,
    /// Whether agents are killed.
    pub agent_kills: bool,
    /// RUST_LOG of the daemons.
    pub log_level: String,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct ChaosReport {
    /// The nemesis's own report.
    pub run: NemesisReport,
    /// Agent kill to its jobs running again.
    pub kill_to_running: Latencies,
    /// Agent restart to its jobs re-adopted.
    pub restart_to_adopted: Latencies,
}

/// Runs the nemesis for `config.duration`.
pub fn run(config: &ChaosConfig) -> anyhow::Result<ChaosReport> {
    let nemesis = NemesisConfig {
        seed: config.seed,
        faults_for: config.duration,
        agents: config.agents,
        fake_gpus: "2xH100-80GiB".into(),
        jobs_per_second: config.jobs_per_second,
        agent_kills: config.agent_kills,
        settle: Duration::from_secs(120),
        log_filter: config.log_level.clone(),
        progress: false,
    };
    eprintln!("gantry-bench chaos: {}", describe(&nemesis));
    let run = gantry_integration_tests::nemesis::run(&nemesis)?;
    Ok(ChaosReport {
        kill_to_running: Latencies::new(run.kill_to_running.clone()),
        restart_to_adopted: Latencies::new(run.restart_to_adopted.clone()),
        run,
    })
}

impl ChaosReport {
    /// Jobs run twice (at once, one attempt twice, to completion twice, or
    /// after their cancel).
    pub fn double_runs(&self) -> usize {
        self.run.verdict.double_runs()
    }

    /// Reservations held by jobs that no process runs.
    pub fn leaks(&self) -> usize {
        self.run.verdict.leaks()
    }

    /// The human summary; the first line is the headline.
    pub fn human(&self) -> String {
        let r = &self.run;
        let extra = &r.verdict.extra;
        let classes: Vec<&str> = r.classes.iter().map(|k| k.name()).collect();
        let mut lines = vec![
            format!(
                "chaos: {} double runs, {} leaked reservations, {} violations in all; {} fault cycles, {} jobs (seed {})",
                self.double_runs(),
                self.leaks(),
                r.verdict.violations.len(),
                r.fault_cycles(),
                r.jobs,
                r.seed
            ),
            format!(
                "  faults: {} ({classes:?}); {} cancels, {} submit errors, {} processes; quiet at the end: {}",
                fault_counts(r)
                    .iter()
                    .map(|(kind, n)| format!("{n} {kind}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.cancels,
                r.submit_errors,
                r.executions,
                r.quiet
            ),
            format!(
                "  agent kill -> its jobs running again: p50 {:.0} ms, p99 {:.0} ms ({} jobs)",
                self.kill_to_running.ms(0.5),
                self.kill_to_running.ms(0.99),
                self.kill_to_running.len()
            ),
            format!(
                "  agent restart -> its jobs re-adopted: p50 {:.0} ms, p99 {:.0} ms ({} re-adopted, {} not)",
                self.restart_to_adopted.ms(0.5),
                self.restart_to_adopted.ms(0.99),
                self.restart_to_adopted.len(),
                r.not_adopted
            ),
            format!(
                "  extra work: {} extra processes ({:.1} s), {} jobs started more than needed, {} completed more than once; {} orphans killed at the end",
                extra.extra_executions,
                extra.extra_ms as f64 / 1e3,
                extra.started_more_than_once,
                extra.completed_more_than_once,
                r.orphans_killed
            ),
        ];
        for violation in r.verdict.violations.iter().take(SHOWN_VIOLATIONS) {
            lines.push(format!("  - {violation}"));
        }
        if r.verdict.violations.len() > SHOWN_VIOLATIONS {
            lines.push(format!(
                "  ... and {} more (--json lists all)",
                r.verdict.violations.len() - SHOWN_VIOLATIONS
            ));
        }
        lines.join("\n")
    }

    /// One JSON record.
    pub fn to_json(&self) -> serde_json::Value {
        let r = &self.run;
        let extra = &r.verdict.extra;
        json!({
            "scenario": "chaos",
            "seed": r.seed,
            "fault_classes": r.classes.iter().map(|k| k.name()).collect::<Vec<_>>(),
            "fault_cycles": r.fault_cycles(),
            "faults": fault_counts(r),
            "jobs": r.jobs,
            "cancels": r.cancels,
            "submit_errors": r.submit_errors,
            "processes": r.executions,
            "quiet": r.quiet,
            "double_runs": self.double_runs(),
            "leaked_reservations": self.leaks(),
            "violations": r.verdict.violations.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "kill_to_running_ms": {
                "p50": self.kill_to_running.ms(0.5),
                "p99": self.kill_to_running.ms(0.99),
                "count": self.kill_to_running.len(),
            },
            "restart_to_adopted_ms": {
                "p50": self.restart_to_adopted.ms(0.5),
                "p99": self.restart_to_adopted.ms(0.99),
                "count": self.restart_to_adopted.len(),
                "not_adopted": r.not_adopted,
            },
            "extra_work": {
                "processes": extra.extra_executions,
                "seconds": extra.extra_ms as f64 / 1e3,
                "jobs_started_more_than_needed": extra.started_more_than_once,
                "jobs_completed_more_than_once": extra.completed_more_than_once,
            },
            "orphans_killed": r.orphans_killed,
            "elapsed_s": r.elapsed.as_secs_f64(),
        })
    }
}

/// Faults injected, by class.
fn fault_counts(run: &NemesisReport) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for fault in &run.faults {
        *counts.entry(fault.kind.name()).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_integration_tests::ledger::Execution;
    use gantry_integration_tests::nemesis::{Fault, FaultKind};
    use gantry_integration_tests::verdict::{ExtraWork, Verdict, Violation};

    fn completed(pid: i32, started: u64) -> Execution {
        Execution {
            job: 7,
            attempt: 1,
            pid,
            ticks: 1,
            node: "node-1".into(),
            started_ms: started,
            ended: Some((started + 10, 0)),
            dead_by_ms: None,
            alive_at_end: false,
        }
    }

    #[test]
    fn the_headline_counts_double_runs_and_leaks() {
        let violation = Violation::CompletedTwice {
            job: 7,
            runs: vec![completed(10, 0), completed(11, 100)],
        };
        let run = NemesisReport {
            seed: 5,
            classes: vec![FaultKind::AgentKill],
            faults: vec![Fault {
                kind: FaultKind::AgentKill,
                at_ms: 0,
                target: "node-1".into(),
                outage: None,
            }],
            jobs: 3,
            cancels: 0,
            submit_errors: 0,
            executions: 4,
            quiet: true,
            verdict: Verdict {
                violations: vec![violation],
                extra: ExtraWork {
                    extra_executions: 1,
                    extra_ms: 10,
                    ..ExtraWork::default()
                },
            },
            kill_to_running: vec![Duration::from_millis(900)],
            restart_to_adopted: vec![],
            not_adopted: 1,
            orphans_killed: 0,
            elapsed: Duration::from_secs(1),
        };
        let report = ChaosReport {
            kill_to_running: Latencies::new(run.kill_to_running.clone()),
            restart_to_adopted: Latencies::new(vec![]),
            run,
        };
        let human = report.human();
        assert!(
            human.starts_with("chaos: 1 double runs, 0 leaked reservations, 1 violations in all; 1 fault cycles, 3 jobs (seed 5)"),
            "{human}"
        );
        assert!(
            human.contains("p50 900 ms") && human.contains("pid 11"),
            "{human}"
        );
        let json = report.to_json();
        assert_eq!(json["double_runs"], 1);
        assert_eq!(json["faults"]["agent-kill"], 1);
        assert_eq!(json["restart_to_adopted_ms"]["not_adopted"], 1);
        assert_eq!(json["violations"].as_array().map(Vec::len), Some(1));
    }
}
