//! Gang placement (`nodes: N`): all members of a gang at once, on N
//! distinct nodes, or none.
//!
//! Members carry the same resources, so a node either takes one member or
//! it does not, whatever the other members took elsewhere: the search
//! finds a node for each member in rank order (the ordinary best-fit
//! search, with the nodes already chosen marked `taken_by_gang` so it
//! skips them), and only when all N
//! are found are they reserved. Nothing is reserved for a gang that does
//! not fit, so no rollback is needed. With `same_label` the members stay
//! within one value of that label: the groups are tried in name order and
//! the first that takes the whole gang wins; the group that took the most
//! members is the closest fit named in the hold reason.

use std::collections::BTreeSet;

use crate::explain::explain;
use crate::filter::LabelChecker;
use crate::index::FreeIndex;
use crate::model::{GangRequest, HoldReason, Placement};
use crate::place::{Ask, find, take};
use crate::units::format_bytes;

/// Places `members` (the whole gang, in rank order) or explains why not.
pub(crate) fn place_gang(
    index: &mut FreeIndex<'_>,
    members: &[Ask<'_>],
    gang: &GangRequest,
) -> Result<Vec<Placement>, HoldReason> {
    let size = members.len();
    let groups: Vec<Option<(String, String)>> = match &gang.same_label {
        None => vec![None],
        Some(label) => {
            let values: BTreeSet<&str> = index
                .nodes()
                .iter()
                .map(|n| LabelChecker::value(n.view, label).unwrap_or(""))
                .collect();
            values
                .into_iter()
                .map(|v| Some((label.clone(), v.to_string())))
                .collect()
        }
    };
    // (members found, group value) of the closest fit so far.
    let mut best: Option<(usize, String)> = None;
    for group in groups {
        let mut found = Vec::with_capacity(size);
        for member in members {
            let mut ask = member.clone();
            ask.group = group.clone();
            let Some(f) = find(index, &ask) else {
                break;
            };
            index.set_taken_by_gang(f.node, true);
            found.push((ask, f));
        }
        for (_, f) in &found {
            index.set_taken_by_gang(f.node, false);
        }
        if found.len() == size {
            let mut out = Vec::with_capacity(size);
            for (ask, f) in found {
                // Distinct nodes: one member's reservation never changes
                // another's fit, so every `take` succeeds.
                out.push(take(index, &ask, f).ok_or_else(|| {
                    HoldReason::NoFit("gang: a member's batch rule failed".into())
                })?);
            }
            return Ok(out);
        }
        let value = group.map(|(_, v)| v).unwrap_or_default();
        if best.as_ref().is_none_or(|(n, _)| found.len() > *n) {
            best = Some((found.len(), value));
        }
    }
    Err(reason(index, members, gang, best.unwrap_or((0, String::new()))))
}

/// "gang of 4 needs 4 nodes with 2 GPUs x 40GiB free in one provider; best
/// provider lambda has 3", and, when no node takes even one member, why.
fn reason(
    index: &mut FreeIndex<'_>,
    members: &[Ask<'_>],
    gang: &GangRequest,
    (most, value): (usize, String),
) -> HoldReason {
    let size = members.len();
    let first = &members[0];
    let what = match first.gpus {
        0 => "free host resources".to_string(),
        g => format!("{g} GPUs x {} free", format_bytes(first.need)),
    };
    let mut text = format!("gang of {size} needs {size} nodes with {what}");
    match &gang.same_label {
        Some(label) => {
            text.push_str(&format!(" in one {label}"));
            let shown = if value.is_empty() {
                format!("nodes without {label}")
            } else {
                format!("{label} {value}")
            };
            text.push_str(&format!("; best {shown} has {most}"));
        }
        None => text.push_str(&format!("; {most} have")),
    }
    if most == 0 {
        let one = match explain(index, first) {
            HoldReason::NoFit(t) => t,
            other => other.to_string(),
        };
        text.push_str(&format!(" ({one})"));
    }
    HoldReason::NoFit(text)
}
