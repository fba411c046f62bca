//! Why a job waits: after a failed search, relax one filter at a time to
//! find the one that blocks it, and name the closest miss. Runs once per
//! failing job shape per pass, so it may afford a scan of the nodes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::filter::{LabelChecker, NodeRefusal, NodeStateChecker};
use crate::index::{Dir, FreeIndex, Query};
use crate::model::{HoldReason, JobRequest};
use crate::place::{Ask, find};
use crate::units::format_bytes;

/// Items of a list (wanted labels, GPU models) a hold reason names before it
/// counts the rest: the reason is rebuilt every pass and shown in every
/// listing, so it must not grow with the job's spec.
const ITEMS_SHOWN: usize = 3;
/// Characters of one listed item before it is cut.
const ITEM_CHARS: usize = 64;

/// The first [`ITEMS_SHOWN`] items joined by `sep`, each cut at
/// [`ITEM_CHARS`], then "and N more": `zone=east, gpu=h100, rack=7 and 97 more`.
pub(crate) fn first_few<I>(items: I, sep: &str) -> String
where
    I: ExactSizeIterator,
    I::Item: AsRef<str>,
{
    let total = items.len();
    let shown: Vec<String> = items
        .take(ITEMS_SHOWN)
        .map(|item| {
            let item = item.as_ref();
            match item.char_indices().nth(ITEM_CHARS) {
                None => item.to_string(),
                Some((cut, _)) => format!("{}...", &item[..cut]),
            }
        })
        .collect();
    let mut text = shown.join(sep);
    if total > ITEMS_SHOWN {
        let _ = write!(text, " and {} more", total - ITEMS_SHOWN);
    }
    text
}

/// The reason `ask` found no placement in the current state of `index`.
pub(crate) fn explain(index: &mut FreeIndex<'_>, ask: &Ask<'_>) -> HoldReason {
    let job = ask.job;
    if index.pressure.applies_to(job.kind) {
        let mut relaxed = ask.clone();
        relaxed.filters.pressure = false;
        if find(index, &relaxed).is_some() {
            let (pressured, eligible) = pressure_counts(index, ask);
            return HoldReason::DiskBackpressure {
                pressured,
                eligible,
            };
        }
    }
    let mut relaxed = ask.clone();
    relaxed.filters.resources = false;
    if find(index, &relaxed).is_some() {
        return HoldReason::NoFit(host_text(job));
    }
    if ask.gpus > 0 {
        // The roomiest candidate, whatever its disk or host resources.
        relaxed.filters.pressure = false;
        relaxed.need = 0;
        relaxed.need_largest = None;
        let restrict = index.restriction(&relaxed);
        let roomiest = Query {
            need: 0,
            dir: Dir::MostFree,
        };
        if let Some(found) = index.search(&relaxed, roomiest, &restrict) {
            let free = found
                .slots
                .iter()
                .map(|&s| index.gpu(s).free)
                .min()
                .unwrap_or(0);
            return HoldReason::NoFit(format!(
                "no node with {} (best: {}, {})",
                gpu_text(ask),
                index.node(found.node).view.name,
                format_bytes(free)
            ));
        }
    }
    HoldReason::NoFit(empty_fleet_text(index, ask))
}

/// Eligible nodes for the job's labels and GPU shape, and how many of them
/// are disk-pressured for its kind.
fn pressure_counts(index: &FreeIndex<'_>, ask: &Ask<'_>) -> (usize, usize) {
    let job = ask.job;
    let (mut pressured, mut eligible) = (0, 0);
    let accepted = index.accepted_models(&job.constraints.gpu_models);
    for (n, node) in index.nodes().iter().enumerate() {
        if !LabelChecker::matches(node.view, &job.constraints.labels)
            || !index.has_gpus(n as u32, &accepted, ask.gpus)
        {
            continue;
        }
        eligible += 1;
        let blocked = if index.pressure.uses_node_flag(job.kind) {
            node.view.disk_pressure
        } else {
            index.pressure.blocks(node.view, job.kind)
        };
        pressured += usize::from(blocked);
    }
    (pressured, eligible)
}

/// "an" before words read with a leading vowel sound (including letters
/// spelled out, as in "an H100", "an RTX4090").
fn article(word: &str) -> &'static str {
    match word.chars().next() {
        Some(c) if "aeiouAEFHILMNORSX".contains(c) => "an",
        _ => "a",
    }
}

/// "40GiB free on an H100", "4 idle A100 GPUs with 40GiB free each".
fn gpu_text(ask: &Ask<'_>) -> String {
    let models = &ask.job.constraints.gpu_models;
    let model = if models.is_empty() {
        String::new()
    } else {
        format!("{} ", first_few(models.iter(), "/"))
    };
    let idle = if ask.exclusive { "idle " } else { "" };
    let need = format_bytes(ask.need);
    if ask.gpus == 1 {
        let noun = if models.is_empty() {
            format!("{idle}GPU")
        } else {
            format!("{idle}{}", first_few(models.iter(), "/"))
        };
        format!("{need} free on {} {noun}", article(&noun))
    } else {
        format!("{} {idle}{model}GPUs with {need} free each", ask.gpus)
    }
}

/// "4 CPUs, 16GiB RAM and 20GiB disk".
fn host_text(job: &JobRequest) -> String {
    let r = &job.resources;
    let mut parts = Vec::new();
    if r.cpu_millis > 0 {
        let cores = r.cpu_millis as f64 / 1000.0;
        parts.push(format!("{cores} CPUs"));
    }
    if r.memory > 0 {
        parts.push(format!("{} RAM", format_bytes(r.memory)));
    }
    if r.disk > 0 {
        parts.push(format!("{} disk", format_bytes(r.disk)));
    }
    let list = match parts.len() {
        0 => "room".to_string(),
        1 => parts.remove(0),
        _ => {
            let last = parts.pop().unwrap_or_default();
            format!("{} and {last}", parts.join(", "))
        }
    };
    if job.resources.gpus == 0 {
        format!("no eligible node has {list} free")
    } else {
        format!("no node with the GPUs free also has {list} free")
    }
}

/// When no candidate exists at all: which filter emptied the fleet.
fn empty_fleet_text(index: &FreeIndex<'_>, ask: &Ask<'_>) -> String {
    let snapshot = index.snapshot;
    let job = ask.job;
    if index.nodes().is_empty() {
        let mut refused: BTreeMap<NodeRefusal, usize> = BTreeMap::new();
        for node in &snapshot.nodes {
            if let Err(r) = NodeStateChecker::admits(node, snapshot.now_ms) {
                *refused.entry(r).or_default() += 1;
            }
        }
        let mut text = String::from("no node takes new work (");
        for (i, (r, n)) in refused.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(text, "{sep}{n} {r}");
        }
        text.push(')');
        return text;
    }
    let labeled = |n: &u32| LabelChecker::matches(index.node(*n).view, &job.constraints.labels);
    let nodes = 0..index.nodes().len() as u32;
    if !nodes.clone().any(|n| labeled(&n)) {
        let wanted = job
            .constraints
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"));
        return format!("no eligible node has labels {}", first_few(wanted, ", "));
    }
    let models = if job.constraints.gpu_models.is_empty() {
        String::new()
    } else {
        format!("{} ", first_few(job.constraints.gpu_models.iter(), "/"))
    };
    let accepted = index.accepted_models(&job.constraints.gpu_models);
    if !nodes
        .filter(labeled)
        .any(|n| index.has_gpus(n, &accepted, ask.gpus))
    {
        return format!("no eligible node has {} {models}GPU(s)", ask.gpus);
    }
    if ask.exclusive {
        format!("no eligible node has {} idle {models}GPU(s)", ask.gpus)
    } else {
        format!(
            "no eligible node has {} {models}GPU(s) free of exclusive jobs",
            ask.gpus
        )
    }
}

#[cfg(test)]
mod tests {
    use super::first_few;

    #[test]
    fn lists_are_cut_to_a_few_items() {
        let long = "x".repeat(100);
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec![], ""),
            (vec!["a=1"], "a=1"),
            (vec!["a=1", "b=2", "c=3"], "a=1, b=2, c=3"),
            (
                vec!["a=1", "b=2", "c=3", "d=4", "e=5"],
                "a=1, b=2, c=3 and 2 more",
            ),
        ];
        for (items, expect) in cases {
            assert_eq!(first_few(items.iter(), ", "), expect, "{items:?}");
        }
        assert_eq!(
            first_few([long.as_str()].iter(), ", "),
            format!("{}...", "x".repeat(64))
        );
    }
}
