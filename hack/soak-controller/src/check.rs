//! Invariants, checked against ground truth: EC2 (moto, asked directly, not through the
//! controller or the fault layer) and the API server.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::NetworkInterface;
use eni_api::{FINALIZER, tags};
use eni_testkit::faults::Stats;
use kube::ResourceExt;
use kube::api::ListParams;

use crate::Error;
use crate::ops::{self, NODEENIS};
use crate::world::{CLUSTER, World, description, foreign_of, groups_of, tag_value};

/// One ENI the model wants.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WantedSlot {
    /// NodeENI.
    pub ne: u8,
    /// Node name.
    pub node: String,
    /// Instance.
    pub instance_id: String,
    /// Subnet ID.
    pub subnet_id: String,
    /// Device index.
    pub device_index: i32,
}

/// How a check went.
#[derive(Debug, Default)]
pub struct CheckResult {
    /// Broken invariants, one line each.
    pub violations: Vec<String>,
    /// Individual assertions evaluated.
    pub assertions: u64,
    /// Slots wanted (unblocked).
    pub slots: usize,
    /// Slots blocked by a foreign ENI.
    pub blocked: usize,
}

impl CheckResult {
    fn assert(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        self.assertions += 1;
        if !ok {
            self.violations.push(msg());
        }
    }
}

/// Settings of the checks.
#[derive(Clone, Debug)]
pub struct CheckConfig {
    /// Whether a draining Node (deletionTimestamp set, object still there) keeps the ENIs
    /// it has and gets no new ones (issue 12, defect 14; docs/nodeeni-reference.md). Off:
    /// it is treated as gone.
    pub draining_keeps_enis: bool,
    /// Mutating EC2 calls that reached EC2 (not throttled, not injected) one ENI may cost
    /// over its life, before edits and out-of-band detaches add to it.
    pub eni_call_budget: u64,
    /// How long after being cut off from the API server a replica may still start
    /// mutating EC2 calls (its Lease runs out; issue 12, defect 5).
    pub lease_loss_grace: std::time::Duration,
}

/// The ENIs the model wants: every selected Node that is not draining x every subnet of
/// every NodeENI.
pub fn wanted(world: &World) -> Vec<WantedSlot> {
    let mut out = Vec::new();
    for (ne, spec) in &world.model.nodeenis {
        for (node, n) in &world.model.nodes {
            // A draining Node's ENIs are held as they are, not wanted (see `held`).
            if !n.labels.contains(ne) || n.draining {
                continue;
            }
            for (k, s) in spec.subnets.iter().enumerate() {
                out.push(WantedSlot {
                    ne: *ne,
                    node: ops::node_name(*node),
                    instance_id: n.instance_id.clone(),
                    subnet_id: world.subnets[*s as usize].1.clone(),
                    device_index: spec.device_index(*ne) + k as i32,
                });
            }
        }
    }
    out.sort();
    out
}

fn attached_at(e: &NetworkInterface) -> Option<(&str, i32)> {
    let a = e.attachment()?;
    Some((a.instance_id()?, a.device_index()?))
}

fn claims(e: &NetworkInterface, s: &WantedSlot) -> bool {
    tag_value(e, tags::NODE_ENI) == Some(ops::nodeeni_name(s.ne).as_str())
        && tag_value(e, tags::NODE) == Some(s.node.as_str())
        && tag_value(e, tags::INSTANCE) == Some(s.instance_id.as_str())
        && tag_value(e, tags::DEVICE_INDEX) == Some(s.device_index.to_string().as_str())
        && e.subnet_id() == Some(s.subnet_id.as_str())
}

/// Checks every invariant once.
pub async fn check(world: &mut World, cfg: &CheckConfig) -> Result<CheckResult, Error> {
    let mut r = CheckResult::default();
    let all = world.all_enis().await?;
    let by_id: BTreeMap<&str, &NetworkInterface> = all
        .iter()
        .map(|e| (e.network_interface_id().unwrap_or_default(), e))
        .collect();
    let foreign_ids: BTreeSet<&str> = world.model.foreign.iter().map(|f| f.id.as_str()).collect();
    let ours: Vec<&NetworkInterface> = all
        .iter()
        .filter(|e| tag_value(e, tags::CLUSTER) == Some(CLUSTER))
        .filter(|e| !foreign_ids.contains(e.network_interface_id().unwrap_or_default()))
        .collect();
    // Ours carry no_manage=true (the VPC CNI leaves them alone) and never the VPC CNI's
    // instance_id tag (its leaked-ENI cleanup would delete them).
    for e in &ours {
        let id = e.network_interface_id().unwrap_or_default();
        r.assert(tag_value(e, tags::NO_MANAGE) == Some("true"), || {
            format!("{id} lacks {}=true", tags::NO_MANAGE)
        });
        r.assert(
            tag_value(e, "node.k8s.amazonaws.com/instance_id").is_none(),
            || format!("{id} carries the VPC CNI's instance_id tag"),
        );
    }
    for e in &ours {
        world.model.seen_enis.insert(
            e.network_interface_id().unwrap_or_default().to_string(),
            tag_value(e, tags::NODE_ENI).unwrap_or_default().to_string(),
        );
    }

    // Foreign ENIs are exactly as created.
    let mut foreign_at: BTreeSet<(String, i32)> = BTreeSet::new();
    for f in &world.model.foreign {
        let now = by_id.get(f.id.as_str()).map(|e| foreign_of(e));
        r.assert(now.as_ref() == Some(f), || {
            format!("foreign ENI {} was touched: was {f:?}, now {now:?}", f.id)
        });
        if let (Some(i), Some(d)) = (&f.instance_id, f.device_index) {
            foreign_at.insert((i.clone(), d));
        }
    }

    // Every wanted slot has exactly one ENI at the right place with the right settings.
    let slots = wanted(world);
    let mut used: BTreeSet<&str> = BTreeSet::new();
    let mut serving: BTreeMap<&WantedSlot, &NetworkInterface> = BTreeMap::new();
    for s in &slots {
        let blocked = foreign_at.contains(&(s.instance_id.clone(), s.device_index));
        let name = ops::nodeeni_name(s.ne);
        if blocked {
            r.blocked += 1;
            // At most one ENI claims it, and it waits unattached.
            let claimants: Vec<&&NetworkInterface> = ours.iter().filter(|e| claims(e, s)).collect();
            r.assert(claimants.len() <= 1, || {
                format!(
                    "{s:?} (blocked by a foreign ENI) has {} ENIs",
                    claimants.len()
                )
            });
            for c in &claimants {
                r.assert(c.attachment().is_none(), || {
                    format!(
                        "{s:?} is blocked but {} is attached: {:?}",
                        c.network_interface_id().unwrap_or_default(),
                        c.attachment()
                    )
                });
                used.insert(c.network_interface_id().unwrap_or_default());
            }
            continue;
        }
        r.slots += 1;
        let here: Vec<&&NetworkInterface> = ours
            .iter()
            .filter(|e| attached_at(e) == Some((s.instance_id.as_str(), s.device_index)))
            .collect();
        r.assert(here.len() == 1, || {
            format!(
                "{name} on {} index {}: want exactly one ENI attached, found {:?}",
                s.node,
                s.device_index,
                here.iter()
                    .map(|e| e.network_interface_id().unwrap_or_default())
                    .collect::<Vec<_>>()
            )
        });
        let Some(e) = here.first() else { continue };
        let id = e.network_interface_id().unwrap_or_default();
        used.insert(id);
        serving.insert(s, e);
        let spec = &world.model.nodeenis[&s.ne];
        r.assert(tag_value(e, tags::NODE_ENI) == Some(name.as_str()), || {
            format!(
                "{id} at {} index {} is not tagged for {name}",
                s.node, s.device_index
            )
        });
        r.assert(e.subnet_id() == Some(s.subnet_id.as_str()), || {
            format!(
                "{id} ({name} on {} index {}) is in {:?}, want {}",
                s.node,
                s.device_index,
                e.subnet_id(),
                s.subnet_id
            )
        });
        let mut want_groups: Vec<String> = spec
            .groups
            .iter()
            .map(|g| world.groups[*g as usize].1.clone())
            .collect();
        want_groups.sort();
        let have_groups = groups_of(e);
        r.assert(have_groups == want_groups, || {
            format!(
                "{id} ({name} on {}) has groups {have_groups:?}, want {want_groups:?}",
                s.node
            )
        });
        let want_desc = spec
            .description
            .map(description)
            .unwrap_or_else(|| format!("aws-multi-eni: NodeENI {name}"));
        r.assert(e.description() == Some(want_desc.as_str()), || {
            format!(
                "{id} ({name} on {}) has description {:?}, want {want_desc:?}",
                s.node,
                e.description()
            )
        });
        let state = e
            .attachment()
            .and_then(|a| a.status())
            .map(|s| s.as_str().to_string());
        r.assert(state.as_deref() == Some("attached"), || {
            format!("{id} ({name} on {}) attachment is {state:?}", s.node)
        });
    }

    // A draining Node keeps what it has: at most one ENI per NodeENI and index.
    let draining: BTreeSet<String> = if cfg.draining_keeps_enis {
        world
            .model
            .nodes
            .iter()
            .filter(|(_, n)| n.draining)
            .map(|(k, _)| ops::node_name(*k))
            .collect()
    } else {
        BTreeSet::new()
    };
    let mut held: BTreeMap<(String, String, String), &str> = BTreeMap::new();
    for e in &ours {
        let Some(node) = tag_value(e, tags::NODE).filter(|n| draining.contains(*n)) else {
            continue;
        };
        let id = e.network_interface_id().unwrap_or_default();
        let key = (
            node.to_string(),
            tag_value(e, tags::NODE_ENI).unwrap_or_default().to_string(),
            tag_value(e, tags::DEVICE_INDEX)
                .unwrap_or_default()
                .to_string(),
        );
        if let Some(other) = held.insert(key.clone(), id) {
            r.assert(false, || {
                format!("draining {key:?} holds two ENIs: {other} and {id}")
            });
        }
        used.insert(id);
    }

    // No ENI of this cluster that no slot wants.
    for e in &ours {
        let id = e.network_interface_id().unwrap_or_default();
        r.assert(used.contains(id), || {
            format!(
                "leaked ENI {id}: nodeeni={:?} node={:?} index={:?} attachment={:?} status={:?}",
                tag_value(e, tags::NODE_ENI),
                tag_value(e, tags::NODE),
                tag_value(e, tags::DEVICE_INDEX),
                attached_at(e),
                e.status()
            )
        });
    }

    // NodeENIs: the ones the model wants exist, none is stuck terminating, status is EC2.
    let objs = world.nodeenis().list(&ListParams::default()).await?;
    let mut seen = BTreeSet::new();
    for obj in &objs.items {
        let name = obj.name_any();
        seen.insert(name.clone());
        r.assert(obj.metadata.deletion_timestamp.is_none(), || {
            format!(
                "NodeENI {name} is stuck terminating (finalizers {:?})",
                obj.finalizers()
            )
        });
        let Some(ne) = (0..NODEENIS).find(|n| ops::nodeeni_name(*n) == name) else {
            continue;
        };
        let wanted_here = world.model.nodeenis.contains_key(&ne);
        r.assert(wanted_here, || {
            format!("NodeENI {name} exists but was deleted")
        });
        if !wanted_here {
            continue;
        }
        r.assert(obj.finalizers().iter().any(|f| f == FINALIZER), || {
            format!("NodeENI {name} has no finalizer")
        });
        let status = obj.status.clone().unwrap_or_default();
        r.assert(
            status.observed_generation == obj.metadata.generation,
            || {
                format!(
                    "NodeENI {name}: observedGeneration {:?} != generation {:?}",
                    status.observed_generation, obj.metadata.generation
                )
            },
        );
        let mine: Vec<&WantedSlot> = slots.iter().filter(|s| s.ne == ne).collect();
        let ready: Vec<&&WantedSlot> = mine.iter().filter(|s| serving.contains_key(**s)).collect();
        r.assert(status.desired_attachments as usize == mine.len(), || {
            format!(
                "NodeENI {name}: desiredAttachments {} but {} slots are wanted",
                status.desired_attachments,
                mine.len()
            )
        });
        r.assert(status.ready_attachments as usize == ready.len(), || {
            format!(
                "NodeENI {name}: readyAttachments {} but {} ENIs are attached",
                status.ready_attachments,
                ready.len()
            )
        });
        let listed: Vec<&eni_api::ENIAttachment> = status
            .attachments
            .iter()
            .filter(|a| !draining.contains(&a.node_id))
            .collect();
        r.assert(listed.len() == mine.len(), || {
            format!(
                "NodeENI {name}: {} status attachments for {} slots: {:?}",
                listed.len(),
                mine.len(),
                listed
                    .iter()
                    .map(|a| (&a.node_id, a.device_index, &a.eni_id, &a.status))
                    .collect::<Vec<_>>()
            )
        });
        for s in &mine {
            let entry = status
                .attachments
                .iter()
                .find(|a| a.node_id == s.node && a.device_index == s.device_index);
            let Some(a) = entry else {
                r.assert(false, || {
                    format!(
                        "NodeENI {name}: no status entry for {} index {}",
                        s.node, s.device_index
                    )
                });
                continue;
            };
            if let Some(e) = serving.get(*s) {
                let id = e.network_interface_id().unwrap_or_default();
                let att = e
                    .attachment()
                    .and_then(|a| a.attachment_id())
                    .unwrap_or_default();
                r.assert(
                    a.eni_id == id
                        && a.attachment_id == att
                        && a.status == "Attached"
                        && a.instance_id == s.instance_id
                        && a.subnet_id == s.subnet_id,
                    || {
                        format!(
                            "NodeENI {name}: status for {} index {} is {:?}/{:?}/{:?}, EC2 has {id}/{att}/attached",
                            s.node, s.device_index, a.eni_id, a.attachment_id, a.status
                        )
                    },
                );
            } else {
                r.assert(a.status != "Attached", || {
                    format!(
                        "NodeENI {name}: status says {} index {} is Attached; it is blocked",
                        s.node, s.device_index
                    )
                });
            }
        }
        if !mine.is_empty() {
            let cond = status.conditions.iter().find(|c| c.type_ == "Ready");
            let want = if ready.len() == mine.len() {
                "True"
            } else {
                "False"
            };
            r.assert(cond.is_some_and(|c| c.status == want), || {
                format!(
                    "NodeENI {name}: Ready is {:?}, want {want}",
                    cond.map(|c| (&c.status, &c.reason))
                )
            });
        }
    }
    for ne in world.model.nodeenis.keys() {
        let name = ops::nodeeni_name(*ne);
        r.assert(seen.contains(&name), || {
            format!("NodeENI {name} is missing")
        });
    }

    // Mutating calls per ENI stay within the budget.
    for (key, calls, budget) in over_budget(world, &world.faults.stats(), cfg) {
        r.assert(false, || {
            format!("{key}: {calls} mutating EC2 calls reached EC2, budget {budget}")
        });
    }
    r.assertions += 1;

    // A replica cut off from the API server stops mutating EC2 once its lease is lost.
    let stats = world.faults.stats();
    for (key, at) in &world.model.cut {
        let last = stats
            .clients
            .get(key)
            .map(|c| c.last_mutating_unix_ms)
            .unwrap_or(0);
        let deadline = at + cfg.lease_loss_grace.as_millis() as u64;
        r.assert(last <= deadline, || {
            format!(
                "{key} was cut off from the API server but made a mutating EC2 call {:.1}s later (allowed: {:?})",
                (last - at) as f64 / 1000.0,
                cfg.lease_loss_grace
            )
        });
    }

    // No controller panicked.
    for p in world.panics() {
        r.assert(false, || format!("controller panicked: {p}"));
    }
    Ok(r)
}

/// Calls that reached EC2's logic (not throttled, not injected).
pub fn effective(s: &eni_testkit::faults::ActionStats) -> u64 {
    s.requests.saturating_sub(s.throttled + s.injected)
}

/// ENIs (or create tokens) over their call budget: (key, calls, budget).
pub fn over_budget(world: &World, stats: &Stats, cfg: &CheckConfig) -> Vec<(String, u64, u64)> {
    let foreign: BTreeSet<&str> = world.model.foreign.iter().map(|f| f.id.as_str()).collect();
    let all_edits: u64 = world.model.edits.values().map(|e| u64::from(*e)).sum();
    let mut out = Vec::new();
    for (key, s) in &stats.enis {
        if foreign.contains(key.as_str()) {
            continue;
        }
        let edits = world
            .model
            .seen_enis
            .get(key)
            .and_then(|name| (0..NODEENIS).find(|n| &ops::nodeeni_name(*n) == name))
            .map(|ne| u64::from(world.model.edits.get(&ne).copied().unwrap_or(0)))
            .unwrap_or(all_edits);
        let oob = u64::from(world.model.oob_detaches.get(key).copied().unwrap_or(0));
        let budget = cfg.eni_call_budget + 2 * edits + 2 * oob;
        let calls = effective(s);
        if calls > budget {
            out.push((key.clone(), calls, budget));
        }
    }
    out
}
