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

use crate::explain::explain;
use crate::index::{FreeIndex, Group};
use crate::model::{GangRequest, HoldReason, Placement};
use crate::place::{Ask, find, take};
use crate::units::format_bytes;

/// Why a gang found no placement: the closest fit, to build its reason
/// for this gang or for a larger one of the same shape (which cannot fit
/// either, later in the same pass).
#[derive(Debug, Clone)]
pub(crate) struct GangMiss {
    /// Members the best group took.
    most: usize,
    /// That group's label value ("" = nodes without the label).
    value: String,
    /// When no node took even one member: why, for one member.
    one: Option<String>,
}

/// Places `members` (the whole gang, in rank order) or says how close it
/// came.
pub(crate) fn place_gang(
    index: &mut FreeIndex<'_>,
    members: &[Ask<'_>],
    gang: &GangRequest,
) -> Result<Vec<Placement>, GangMiss> {
    let size = members.len();
    let (table, values) = match &gang.same_label {
        None => (None, 1),
        Some(label) => {
            let (table, values) = index.group_table(label);
            (Some(table), values)
        }
    };
    // (members found, group) of the closest fit so far.
    let mut best: Option<(usize, Option<Group>)> = None;
    let mut found = Vec::with_capacity(size);
    for value in 0..values {
        let group = table.map(|t| (t, value));
        found.clear();
        for member in members {
            let mut ask = member.clone();
            ask.group = group;
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
            for (ask, f) in found.drain(..) {
                // Distinct nodes: one member's reservation never changes
                // another's fit, so every `take` succeeds.
                out.push(take(index, &ask, f).ok_or_else(|| GangMiss {
                    most: 0,
                    value: String::new(),
                    one: Some("a member's batch rule failed".into()),
                })?);
            }
            return Ok(out);
        }
        if best.as_ref().is_none_or(|(n, _)| found.len() > *n) {
            best = Some((found.len(), group));
        }
    }
    let (most, group) = best.unwrap_or((0, None));
    let value = group
        .map(|g| index.group_value(g).to_string())
        .unwrap_or_default();
    let one = (most == 0).then(|| match explain(index, &members[0]) {
        HoldReason::NoFit(t) => t,
        other => other.to_string(),
    });
    Err(GangMiss { most, value, one })
}

impl GangMiss {
    /// "gang of 4 needs 4 nodes with 2 GPUs x 40GiB free in one provider;
    /// best provider lambda has 3", and, when no node takes even one
    /// member, why.
    pub(crate) fn reason(&self, size: usize, member: &Ask<'_>, gang: &GangRequest) -> HoldReason {
        let what = match member.gpus {
            0 => "free host resources".to_string(),
            g => format!("{g} GPUs x {} free", format_bytes(member.need)),
        };
        let mut text = format!("gang of {size} needs {size} nodes with {what}");
        match &gang.same_label {
            Some(label) => {
                let shown = if self.value.is_empty() {
                    format!("nodes without {label}")
                } else {
                    format!("{label} {}", self.value)
                };
                text.push_str(&format!(" in one {label}; best {shown} has {}", self.most));
            }
            None => text.push_str(&format!("; {} have", self.most)),
        }
        if let Some(one) = &self.one {
            text.push_str(&format!(" ({one})"));
        }
        HoldReason::NoFit(text)
    }
}
