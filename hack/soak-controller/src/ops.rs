//! The operations a soak applies, and their seeded generator.
//!
//! A run is a list of operations generated up front from the seed, so the same seed gives
//! the same list and any prefix (or sub-list) of it can be replayed against a fresh
//! world. The generator tracks a small shadow model so that most operations apply; an
//! operation whose precondition does not hold when it is applied (possible in a shrunk
//! sub-list) is skipped and counted.

use std::collections::BTreeSet;
use std::fmt;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Node names `node-0` .. `node-{NODES-1}`.
pub const NODES: u8 = 4;
/// NodeENI names `ne-0` .. `ne-{NODEENIS-1}`.
pub const NODEENIS: u8 = 3;
/// Subnets in the nodes' zone (`soak-net-N`).
pub const SUBNETS: u8 = 3;
/// Security groups (`soak-sg-N`).
pub const GROUPS: u8 = 3;
/// Controller replicas.
pub const REPLICAS: u8 = 2;

/// First device index of NodeENI `ne`. Each NodeENI owns a band of four indexes (its base
/// index may move by one and it has at most two subnets), so NodeENIs never contend for
/// an index with each other; contention comes only from foreign ENIs, on purpose.
pub fn band(ne: u8) -> i32 {
    1 + 4 * i32::from(ne)
}

/// Name of NodeENI `ne`.
pub fn nodeeni_name(ne: u8) -> String {
    format!("ne-{ne}")
}

/// Name of Node `node`.
pub fn node_name(node: u8) -> String {
    format!("node-{node}")
}

/// The label that makes NodeENI `ne` select a Node.
pub fn label_key(ne: u8) -> String {
    format!("soak.k8s.aws/ne-{ne}")
}

/// A NodeENI spec, in terms of the world's subnet and security-group pools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// Subnet pool indexes, in spec order (1 or 2, distinct).
    pub subnets: Vec<u8>,
    /// Name subnets by their Name tag instead of by ID.
    pub subnets_by_name: bool,
    /// Security-group pool indexes (1 or 2, distinct).
    pub groups: Vec<u8>,
    /// Name security groups by group name instead of by ID.
    pub groups_by_name: bool,
    /// Device index = band + this (0 or 1).
    pub index_offset: i32,
    /// Description variant (`None`: the controller's default description).
    pub description: Option<u8>,
}

impl Spec {
    fn random(rng: &mut StdRng) -> Self {
        let pick = |rng: &mut StdRng, pool: u8| {
            let n = rng.random_range(1..=2usize);
            let mut all: Vec<u8> = (0..pool).collect();
            let mut out = Vec::new();
            for _ in 0..n {
                let i = rng.random_range(0..all.len());
                out.push(all.remove(i));
            }
            out
        };
        let subnets = pick(rng, SUBNETS);
        let groups = pick(rng, GROUPS);
        Self {
            subnets,
            subnets_by_name: rng.random_bool(0.3),
            groups,
            groups_by_name: rng.random_bool(0.3),
            index_offset: rng.random_range(0..=1),
            description: rng.random_bool(0.5).then(|| rng.random_range(0..3)),
        }
    }

    /// Device index of the first subnet for NodeENI `ne`.
    pub fn device_index(&self, ne: u8) -> i32 {
        band(ne) + self.index_offset
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "subnets={:?}{} sgs={:?}{} +{} desc={:?}",
            self.subnets,
            if self.subnets_by_name { "(names)" } else { "" },
            self.groups,
            if self.groups_by_name { "(names)" } else { "" },
            self.index_offset,
            self.description
        )
    }
}

/// Kinds of operation, for enabling and disabling them.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Add a NodeENI's label to a Node.
    Label,
    /// Remove a NodeENI's label from a Node.
    Unlabel,
    /// Launch an instance and create its Node.
    NodeCreate,
    /// Delete a Node object at once.
    NodeDelete,
    /// Delete a Node that carries a finalizer: it keeps a deletionTimestamp while it
    /// "drains" (what Karpenter and cluster-autoscaler do).
    NodeDrain,
    /// Release the finalizer of a draining Node: it is gone.
    NodeRelease,
    /// Create a NodeENI.
    NodeeniCreate,
    /// Change a NodeENI's subnets, security groups, device index or description.
    NodeeniEdit,
    /// Delete a NodeENI.
    NodeeniDelete,
    /// Delete a NodeENI and create it again under the same name once it is gone.
    NodeeniRecreate,
    /// kill -9 a controller replica.
    Kill,
    /// Start a controller replica.
    Start,
    /// kill -9 the replica holding the leader Lease.
    KillLeader,
    /// Cut the leader off from the API server (it keeps EC2): it must stop mutating EC2
    /// once its lease is lost, and the other replica must take over.
    LeaderCut,
    /// EC2 throttling storm (buckets 20x smaller) until the next quiet period.
    Throttle,
    /// EC2 5xx burst (30% InternalError) until the next quiet period.
    Errors,
    /// EC2 latency spike (0.2-1.5 s per call) until the next quiet period.
    Latency,
    /// Detaches hang (stay `detaching`) until forced, until the next quiet period.
    HungDetach,
    /// Detach one of the cluster's ENIs behind the controller's back.
    OobDetach,
    /// Detach and delete one of the cluster's ENIs behind the controller's back.
    OobDelete,
    /// Attach a foreign ENI at a device index a NodeENI may want (at the middle of a band:
    /// a twin cluster's ENI, with this cluster's name and another identity).
    ForeignAttach,
    /// Detach and delete a foreign ENI (unblocks the index).
    ForeignRemove,
}

impl Kind {
    /// Every kind.
    pub fn all() -> Vec<Kind> {
        use clap::ValueEnum;
        Kind::value_variants().to_vec()
    }

    fn weight(self) -> u32 {
        match self {
            Kind::Label => 12,
            Kind::Unlabel => 8,
            Kind::NodeDelete => 3,
            Kind::NodeDrain => 3,
            Kind::NodeRelease => 4,
            // Weighted by how many are missing, in `generate`.
            Kind::NodeCreate | Kind::NodeeniCreate => 0,
            Kind::NodeeniEdit => 10,
            Kind::NodeeniDelete => 3,
            Kind::NodeeniRecreate => 3,
            Kind::Kill => 3,
            Kind::Start => 5,
            Kind::KillLeader => 2,
            Kind::LeaderCut => 2,
            Kind::Throttle => 2,
            Kind::Errors => 2,
            Kind::Latency => 2,
            Kind::HungDetach => 2,
            Kind::OobDetach => 3,
            Kind::OobDelete => 3,
            Kind::ForeignAttach => 2,
            Kind::ForeignRemove => 2,
        }
    }
}

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// Label `node` for `ne`.
    Label {
        /// Node.
        node: u8,
        /// NodeENI.
        ne: u8,
    },
    /// Unlabel `node` for `ne`.
    Unlabel {
        /// Node.
        node: u8,
        /// NodeENI.
        ne: u8,
    },
    /// New instance + Node with the labels of these NodeENIs.
    NodeCreate {
        /// Node.
        node: u8,
        /// NodeENIs whose labels it carries.
        labels: Vec<u8>,
    },
    /// Delete the Node object.
    NodeDelete {
        /// Node.
        node: u8,
    },
    /// Finalizer + delete: the Node keeps a deletionTimestamp.
    NodeDrain {
        /// Node.
        node: u8,
    },
    /// Remove the finalizer of a draining Node.
    NodeRelease {
        /// Node.
        node: u8,
    },
    /// Create NodeENI `ne`.
    NodeeniCreate {
        /// NodeENI.
        ne: u8,
        /// Its spec.
        spec: Spec,
    },
    /// Replace the spec of NodeENI `ne`.
    NodeeniEdit {
        /// NodeENI.
        ne: u8,
        /// New spec.
        spec: Spec,
    },
    /// Delete NodeENI `ne`.
    NodeeniDelete {
        /// NodeENI.
        ne: u8,
    },
    /// Delete NodeENI `ne`, create it again with `spec` once gone.
    NodeeniRecreate {
        /// NodeENI.
        ne: u8,
        /// Spec of the new object.
        spec: Spec,
    },
    /// kill -9 a replica.
    Kill {
        /// Replica.
        replica: u8,
    },
    /// Start a replica.
    Start {
        /// Replica.
        replica: u8,
    },
    /// kill -9 the leader.
    KillLeader,
    /// Cut the leader off from the API server.
    LeaderCut,
    /// Throttling storm.
    Throttle,
    /// 5xx burst.
    Errors,
    /// Latency spike.
    Latency,
    /// Hung detaches.
    HungDetach,
    /// Out-of-band detach of the `pick`-th cluster ENI that is attached.
    OobDetach {
        /// Which one (modulo the count at the time).
        pick: u32,
    },
    /// Out-of-band delete of the `pick`-th cluster ENI.
    OobDelete {
        /// Which one (modulo the count at the time).
        pick: u32,
    },
    /// Foreign ENI on `node` at `band(ne) + offset`.
    ForeignAttach {
        /// Node.
        node: u8,
        /// Whose band.
        ne: u8,
        /// 0..=2.
        offset: i32,
    },
    /// Remove the `pick`-th foreign ENI.
    ForeignRemove {
        /// Which one (modulo the count at the time).
        pick: u32,
    },
    /// Faults off, wait for convergence, check every invariant.
    Quiet,
}

impl Op {
    /// The op's kind (`None` for a quiet period).
    pub fn kind(&self) -> Option<Kind> {
        Some(match self {
            Op::Label { .. } => Kind::Label,
            Op::Unlabel { .. } => Kind::Unlabel,
            Op::NodeCreate { .. } => Kind::NodeCreate,
            Op::NodeDelete { .. } => Kind::NodeDelete,
            Op::NodeDrain { .. } => Kind::NodeDrain,
            Op::NodeRelease { .. } => Kind::NodeRelease,
            Op::NodeeniCreate { .. } => Kind::NodeeniCreate,
            Op::NodeeniEdit { .. } => Kind::NodeeniEdit,
            Op::NodeeniDelete { .. } => Kind::NodeeniDelete,
            Op::NodeeniRecreate { .. } => Kind::NodeeniRecreate,
            Op::Kill { .. } => Kind::Kill,
            Op::Start { .. } => Kind::Start,
            Op::KillLeader => Kind::KillLeader,
            Op::LeaderCut => Kind::LeaderCut,
            Op::Throttle => Kind::Throttle,
            Op::Errors => Kind::Errors,
            Op::Latency => Kind::Latency,
            Op::HungDetach => Kind::HungDetach,
            Op::OobDetach { .. } => Kind::OobDetach,
            Op::OobDelete { .. } => Kind::OobDelete,
            Op::ForeignAttach { .. } => Kind::ForeignAttach,
            Op::ForeignRemove { .. } => Kind::ForeignRemove,
            Op::Quiet => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Label { node, ne } => write!(f, "label node-{node} for ne-{ne}"),
            Op::Unlabel { node, ne } => write!(f, "unlabel node-{node} for ne-{ne}"),
            Op::NodeCreate { node, labels } => {
                write!(
                    f,
                    "create node-{node} (new instance) labelled for {labels:?}"
                )
            }
            Op::NodeDelete { node } => write!(f, "delete node-{node}"),
            Op::NodeDrain { node } => {
                write!(
                    f,
                    "drain node-{node} (finalizer + delete: deletionTimestamp)"
                )
            }
            Op::NodeRelease { node } => write!(f, "release node-{node} (finalizer removed)"),
            Op::NodeeniCreate { ne, spec } => write!(f, "create ne-{ne}: {spec}"),
            Op::NodeeniEdit { ne, spec } => write!(f, "edit ne-{ne}: {spec}"),
            Op::NodeeniDelete { ne } => write!(f, "delete ne-{ne}"),
            Op::NodeeniRecreate { ne, spec } => write!(f, "re-create ne-{ne}: {spec}"),
            Op::Kill { replica } => write!(f, "kill -9 replica-{replica}"),
            Op::Start { replica } => write!(f, "start replica-{replica}"),
            Op::KillLeader => write!(f, "kill -9 the leader"),
            Op::LeaderCut => write!(f, "cut the leader off from the API server"),
            Op::Throttle => write!(f, "EC2 throttling storm"),
            Op::Errors => write!(f, "EC2 5xx burst"),
            Op::Latency => write!(f, "EC2 latency spike"),
            Op::HungDetach => write!(f, "EC2 detaches hang"),
            Op::OobDetach { pick } => write!(f, "out-of-band detach of attached ENI #{pick}"),
            Op::OobDelete { pick } => write!(f, "out-of-band delete of ENI #{pick}"),
            Op::ForeignAttach { node, ne, offset } => write!(
                f,
                "foreign ENI on node-{node} at index {}",
                band(*ne) + offset
            ),
            Op::ForeignRemove { pick } => write!(f, "remove foreign ENI #{pick}"),
            Op::Quiet => write!(f, "QUIET: faults off, converge, check invariants"),
        }
    }
}

/// Node lifecycle in the generator's shadow model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeState {
    Absent,
    Present,
    Draining,
}

/// Generates `count` operations from `seed`, using only `enabled` kinds. A quiet period
/// comes every 5-12 operations and always last.
pub fn generate(seed: u64, count: usize, enabled: &BTreeSet<Kind>) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut nodes = [NodeState::Absent; NODES as usize];
    let mut labels: Vec<BTreeSet<u8>> = vec![BTreeSet::new(); NODES as usize];
    let mut nes = [false; NODEENIS as usize];
    // Replica 0 runs from the start.
    let mut replicas = [true, false];
    let mut foreign = 0usize;
    let mut ops = Vec::with_capacity(count);
    let mut until_quiet = rng.random_range(5..=12);
    while ops.len() + 1 < count.max(1) {
        if until_quiet == 0 {
            ops.push(Op::Quiet);
            // A quiet period starts replica 0 if no replica runs.
            if !replicas.contains(&true) {
                replicas[0] = true;
            }
            until_quiet = rng.random_range(5..=12);
            continue;
        }
        until_quiet -= 1;
        let present: Vec<u8> = (0..NODES)
            .filter(|n| nodes[*n as usize] != NodeState::Absent)
            .collect();
        let applicable: Vec<Kind> = enabled
            .iter()
            .copied()
            .filter(|k| match k {
                Kind::Label => present
                    .iter()
                    .any(|n| labels[*n as usize].len() < NODEENIS as usize),
                Kind::Unlabel => present.iter().any(|n| !labels[*n as usize].is_empty()),
                Kind::NodeCreate => nodes.contains(&NodeState::Absent),
                Kind::NodeDelete | Kind::NodeDrain => nodes.contains(&NodeState::Present),
                Kind::NodeRelease => nodes.contains(&NodeState::Draining),
                Kind::NodeeniCreate => nes.contains(&false),
                Kind::NodeeniEdit | Kind::NodeeniDelete | Kind::NodeeniRecreate => {
                    nes.contains(&true)
                }
                Kind::Kill | Kind::KillLeader | Kind::LeaderCut => replicas.contains(&true),
                Kind::Start => replicas.contains(&false),
                Kind::ForeignAttach => nodes.contains(&NodeState::Present),
                Kind::ForeignRemove => foreign > 0,
                _ => true,
            })
            .collect();
        // Creates are likelier the fewer objects exist, so the world fills up early.
        let absent_nodes = nodes.iter().filter(|n| **n == NodeState::Absent).count() as u32;
        let absent_nes = nes.iter().filter(|n| !**n).count() as u32;
        let weight = |k: &Kind| match k {
            Kind::NodeCreate => 4 * absent_nodes,
            Kind::NodeeniCreate => 4 * absent_nes,
            other => other.weight(),
        };
        let Ok(kind) = applicable.choose_weighted(&mut rng, weight) else {
            until_quiet = 0;
            continue;
        };
        let pick_node = |rng: &mut StdRng, want: &[NodeState]| -> u8 {
            let c: Vec<u8> = (0..NODES)
                .filter(|n| want.contains(&nodes[*n as usize]))
                .collect();
            *c.choose(rng).unwrap_or(&0)
        };
        let pick_ne = |rng: &mut StdRng, want: bool| -> u8 {
            let c: Vec<u8> = (0..NODEENIS).filter(|n| nes[*n as usize] == want).collect();
            *c.choose(rng).unwrap_or(&0)
        };
        let op = match *kind {
            Kind::Label => {
                let c: Vec<u8> = present
                    .iter()
                    .copied()
                    .filter(|n| labels[*n as usize].len() < NODEENIS as usize)
                    .collect();
                let node = *c.choose(&mut rng).unwrap_or(&0);
                let free: Vec<u8> = (0..NODEENIS)
                    .filter(|e| !labels[node as usize].contains(e))
                    .collect();
                let ne = *free.choose(&mut rng).unwrap_or(&0);
                labels[node as usize].insert(ne);
                Op::Label { node, ne }
            }
            Kind::Unlabel => {
                let c: Vec<u8> = present
                    .iter()
                    .copied()
                    .filter(|n| !labels[*n as usize].is_empty())
                    .collect();
                let node = *c.choose(&mut rng).unwrap_or(&0);
                let have: Vec<u8> = labels[node as usize].iter().copied().collect();
                let ne = *have.choose(&mut rng).unwrap_or(&0);
                labels[node as usize].remove(&ne);
                Op::Unlabel { node, ne }
            }
            Kind::NodeCreate => {
                let node = pick_node(&mut rng, &[NodeState::Absent]);
                let l: BTreeSet<u8> = (0..NODEENIS).filter(|_| rng.random_bool(0.5)).collect();
                labels[node as usize] = l.clone();
                nodes[node as usize] = NodeState::Present;
                Op::NodeCreate {
                    node,
                    labels: l.into_iter().collect(),
                }
            }
            Kind::NodeDelete => {
                let node = pick_node(&mut rng, &[NodeState::Present]);
                nodes[node as usize] = NodeState::Absent;
                labels[node as usize].clear();
                Op::NodeDelete { node }
            }
            Kind::NodeDrain => {
                let node = pick_node(&mut rng, &[NodeState::Present]);
                nodes[node as usize] = NodeState::Draining;
                Op::NodeDrain { node }
            }
            Kind::NodeRelease => {
                let node = pick_node(&mut rng, &[NodeState::Draining]);
                nodes[node as usize] = NodeState::Absent;
                labels[node as usize].clear();
                Op::NodeRelease { node }
            }
            Kind::NodeeniCreate => {
                let ne = pick_ne(&mut rng, false);
                nes[ne as usize] = true;
                Op::NodeeniCreate {
                    ne,
                    spec: Spec::random(&mut rng),
                }
            }
            Kind::NodeeniEdit => Op::NodeeniEdit {
                ne: pick_ne(&mut rng, true),
                spec: Spec::random(&mut rng),
            },
            Kind::NodeeniDelete => {
                let ne = pick_ne(&mut rng, true);
                nes[ne as usize] = false;
                Op::NodeeniDelete { ne }
            }
            Kind::NodeeniRecreate => Op::NodeeniRecreate {
                ne: pick_ne(&mut rng, true),
                spec: Spec::random(&mut rng),
            },
            Kind::Kill => {
                let c: Vec<u8> = (0..REPLICAS).filter(|r| replicas[*r as usize]).collect();
                let replica = *c.choose(&mut rng).unwrap_or(&0);
                replicas[replica as usize] = false;
                Op::Kill { replica }
            }
            Kind::Start => {
                let c: Vec<u8> = (0..REPLICAS).filter(|r| !replicas[*r as usize]).collect();
                let replica = *c.choose(&mut rng).unwrap_or(&0);
                replicas[replica as usize] = true;
                Op::Start { replica }
            }
            Kind::KillLeader | Kind::LeaderCut => {
                // Which one is leader is known only at run time; the shadow model
                // assumes the first running one (only used for applicability).
                if let Some(r) = replicas.iter_mut().find(|r| **r) {
                    *r = false;
                }
                if *kind == Kind::KillLeader {
                    Op::KillLeader
                } else {
                    Op::LeaderCut
                }
            }
            Kind::Throttle => Op::Throttle,
            Kind::Errors => Op::Errors,
            Kind::Latency => Op::Latency,
            Kind::HungDetach => Op::HungDetach,
            Kind::OobDetach => Op::OobDetach { pick: rng.random() },
            Kind::OobDelete => Op::OobDelete { pick: rng.random() },
            Kind::ForeignAttach => {
                foreign += 1;
                Op::ForeignAttach {
                    node: pick_node(&mut rng, &[NodeState::Present]),
                    ne: rng.random_range(0..NODEENIS),
                    offset: rng.random_range(0..=2),
                }
            }
            Kind::ForeignRemove => {
                foreign -= 1;
                Op::ForeignRemove { pick: rng.random() }
            }
        };
        ops.push(op);
    }
    ops.push(Op::Quiet);
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_ops_and_quiet_last() {
        let all: BTreeSet<Kind> = Kind::all().into_iter().collect();
        let a = generate(7, 200, &all);
        let b = generate(7, 200, &all);
        assert_eq!(a, b);
        assert_eq!(a.len(), 200);
        assert_eq!(a.last(), Some(&Op::Quiet));
        assert_ne!(a, generate(8, 200, &all));
        let kinds: BTreeSet<Kind> = a.iter().filter_map(Op::kind).collect();
        assert!(kinds.len() > 10, "{kinds:?}");
    }

    #[test]
    fn disabled_kinds_never_appear() {
        let some: BTreeSet<Kind> = [Kind::Label, Kind::Unlabel, Kind::NodeCreate]
            .into_iter()
            .collect();
        let ops = generate(1, 100, &some);
        assert!(ops.iter().filter_map(Op::kind).all(|k| some.contains(&k)));
    }

    #[test]
    fn bands_do_not_overlap() {
        for ne in 0..NODEENIS - 1 {
            // base + offset 1 + two subnets stays below the next band.
            assert!(band(ne) + 1 + 1 < band(ne + 1));
        }
        assert!(band(NODEENIS - 1) + 2 <= eni_api::MAX_DEVICE_INDEX);
    }
}
