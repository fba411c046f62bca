//! The `after:` edges of one submission: names resolved to positions, with
//! duplicate names, unknown names and cycles refused. Every step is linear in
//! the number of jobs and edges (a 10,000-job submit with 30 unknown names
//! each once took 8-14 s of core time here, comparing every duplicate name
//! against every edge).
//!
//! Used twice: by [`crate::convert`], so a bad graph is refused before it
//! reaches the Raft log, and by `StateMachine::apply`, which must still
//! decide entries already in a log on its own.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::domain::JobSpec;

/// Names shown in a cycle before the rest is counted.
const CYCLE_NAMES_SHOWN: usize = 8;

/// Why a submission's `after:` graph is refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DependencyError {
    /// `after:` names a job that is not in the submission.
    UnknownDependency {
        /// Position of the job.
        index: usize,
        /// Missing name.
        name: String,
    },
    /// `after:` edges form a cycle.
    Cycle {
        /// Position of a job on the cycle.
        index: usize,
        /// The cycle, as names (`a -> b -> a`), shortened when long.
        path: String,
    },
    /// Two jobs of one submission share a name that `after:` refers to (or
    /// any name, in a pipeline).
    DuplicateName {
        /// Position of the second use.
        index: usize,
        /// The name.
        name: String,
    },
}

impl DependencyError {
    /// The field at fault, e.g. `jobs[3].after`.
    pub fn field(&self) -> String {
        match self {
            DependencyError::UnknownDependency { index, .. }
            | DependencyError::Cycle { index, .. } => format!("jobs[{index}].after"),
            DependencyError::DuplicateName { index, .. } => format!("jobs[{index}].name"),
        }
    }

    /// Why, without the field.
    pub fn reason(&self) -> String {
        match self {
            DependencyError::UnknownDependency { name, .. } => {
                format!("no job named {name:?} in this submission")
            }
            DependencyError::Cycle { path, .. } => format!("dependency cycle through {path}"),
            DependencyError::DuplicateName { name, .. } => {
                format!("{name:?} is used twice in this submission")
            }
        }
    }
}

impl fmt::Display for DependencyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field(), self.reason())
    }
}

impl std::error::Error for DependencyError {}

/// Resolves each job's `after:` names to the positions of the jobs it waits
/// for. In a pipeline every name must be unique; elsewhere only names that
/// some `after:` refers to.
pub fn resolve_after(
    specs: &[JobSpec],
    pipeline: bool,
) -> Result<Vec<Vec<usize>>, DependencyError> {
    let referenced: HashSet<&str> = specs
        .iter()
        .flat_map(|s| s.after.iter().map(String::as_str))
        .collect();
    let mut by_name: HashMap<&str, usize> = HashMap::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        if by_name.insert(spec.name.as_str(), index).is_some()
            && (pipeline || referenced.contains(spec.name.as_str()))
        {
            return Err(DependencyError::DuplicateName {
                index,
                name: spec.name.clone(),
            });
        }
    }
    let mut edges: Vec<Vec<usize>> = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let mut deps = Vec::with_capacity(spec.after.len());
        for name in &spec.after {
            let dep =
                *by_name
                    .get(name.as_str())
                    .ok_or_else(|| DependencyError::UnknownDependency {
                        index,
                        name: name.clone(),
                    })?;
            deps.push(dep);
        }
        edges.push(deps);
    }
    if let Some(cycle) = find_cycle(&edges) {
        let shown: Vec<&str> = cycle
            .iter()
            .take(CYCLE_NAMES_SHOWN)
            .map(|i| specs[*i].name.as_str())
            .collect();
        let mut path = shown.join(" -> ");
        if cycle.len() > CYCLE_NAMES_SHOWN {
            path.push_str(&format!(" -> ... ({} jobs)", cycle.len() - 1));
        }
        return Err(DependencyError::Cycle {
            index: cycle[0],
            path,
        });
    }
    Ok(edges)
}

/// Returns one cycle (as node indexes, the first repeated at the end) in a
/// graph given as adjacency lists.
fn find_cycle(edges: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut marks = vec![Mark::New; edges.len()];
    for start in 0..edges.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // Iterative DFS keeping the path, so deep pipelines cannot overflow the stack.
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::Open;
        while let Some((node, next)) = path.last_mut() {
            let node = *node;
            if let Some(&child) = edges[node].get(*next) {
                *next += 1;
                match marks[child] {
                    Mark::Open => {
                        let from = path.iter().position(|(n, _)| *n == child).unwrap_or(0);
                        let mut cycle: Vec<usize> = path[from..].iter().map(|(n, _)| *n).collect();
                        cycle.push(child);
                        return Some(cycle);
                    }
                    Mark::New => {
                        marks[child] = Mark::Open;
                        path.push((child, 0));
                    }
                    Mark::Done => {}
                }
            } else {
                marks[node] = Mark::Done;
                path.pop();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, after: &[&str]) -> JobSpec {
        JobSpec {
            after: after.iter().map(|a| a.to_string()).collect(),
            ..JobSpec::for_test(name)
        }
    }

    #[test]
    fn graphs_resolve_or_name_the_fault() {
        type Expect = Result<Vec<Vec<usize>>, &'static str>;
        let cases: Vec<(&str, Vec<JobSpec>, bool, Expect)> = vec![
            (
                "chain",
                vec![job("a", &[]), job("b", &["a"]), job("c", &["a", "b"])],
                false,
                Ok(vec![vec![], vec![0], vec![0, 1]]),
            ),
            (
                "unreferenced duplicates are fine outside a pipeline",
                vec![job("x", &[]), job("x", &[])],
                false,
                Ok(vec![vec![], vec![]]),
            ),
            (
                "any duplicate in a pipeline",
                vec![job("x", &[]), job("x", &[])],
                true,
                Err("jobs[1].name: \"x\" is used twice in this submission"),
            ),
            (
                "referenced duplicate",
                vec![job("x", &[]), job("x", &[]), job("y", &["x"])],
                false,
                Err("jobs[1].name: \"x\" is used twice in this submission"),
            ),
            (
                "unknown",
                vec![job("a", &[]), job("b", &["c"])],
                false,
                Err("jobs[1].after: no job named \"c\" in this submission"),
            ),
            (
                "cycle",
                vec![job("a", &["c"]), job("b", &["a"]), job("c", &["b"])],
                false,
                Err("jobs[0].after: dependency cycle through a -> c -> b -> a"),
            ),
        ];
        for (what, specs, pipeline, expect) in cases {
            let got = resolve_after(&specs, pipeline).map_err(|e| e.to_string());
            assert_eq!(got, expect.map_err(String::from), "{what}");
        }
    }

    #[test]
    fn a_long_cycle_is_named_in_a_short_line() {
        let n = 10_000;
        let specs: Vec<JobSpec> = (0..n)
            .map(|i| {
                let name = format!("j{i}");
                let next = format!("j{}", (i + 1) % n);
                job(&name, &[next.as_str()])
            })
            .collect();
        let err = resolve_after(&specs, true).expect_err("cycle");
        let text = err.to_string();
        assert!(text.len() < 200, "{text}");
        assert!(text.ends_with("(10000 jobs)"), "{text}");
    }

    #[test]
    fn many_shared_names_with_unknown_edges_are_refused_at_the_first_unknown() {
        // The case: 10,000 jobs sharing one name, 30 unknown names
        // each. Linear now; the time is not asserted, the answer is.
        let unknown: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
        let unknown: Vec<&str> = unknown.iter().map(String::as_str).collect();
        let specs: Vec<JobSpec> = (0..10_000).map(|_| job("same", &unknown)).collect();
        assert_eq!(
            resolve_after(&specs, false),
            Err(DependencyError::UnknownDependency {
                index: 0,
                name: "u0".into()
            })
        );
    }
}
