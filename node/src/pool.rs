//! Pod address pools (NodeENI `ipam`) on this node. The daemon never calls EC2: the
//! controller publishes each ENI's pool in `status.attachments[].ipam`; the daemon copies
//! it into the state file (`enis.json` `pools`) for cni-helper and reports what is in use
//! and what it has let go of (`nodeReports[].interfaces[].ipam`), all from one snapshot
//! taken under the allocation lock.
//!
//! Releasing is a handshake: an address or prefix the controller lists in `releasing` is
//! no longer in the published pool, so once the daemon has rewritten the state file under
//! the lock, cni-helper cannot hand it out any more; the daemon then reports it
//! `released` if no allocation uses it, and only then does the controller unassign it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use eni_api::{AttachmentStatus, InterfaceIpam, NodeENI};
use eni_state::PodPool;
use eni_state::alloc::{Allocation, Allocations};

/// One ENI's pool as the controller published it for this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolWant {
    /// NodeENI name.
    pub node_eni: String,
    /// ENI id.
    pub eni_id: String,
    /// The pool to hand out.
    pub pool: PodPool,
    /// Addresses or prefixes the controller wants back.
    pub releasing: Vec<String>,
}

/// The VPC router of a subnet: its base address + 1.
pub fn gateway(cidr: &str) -> Option<String> {
    let (base, len) = cidr.split_once('/')?;
    let base: Ipv4Addr = base.parse().ok()?;
    let len: u32 = len.parse().ok().filter(|l| *l <= 30)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some(Ipv4Addr::from((u32::from(base) & mask) + 1).to_string())
}

/// The pools published for `node`'s attached ENIs.
pub fn wants_from_nodeenis<'a>(
    nodeenis: impl IntoIterator<Item = &'a NodeENI>,
    node: &str,
) -> Vec<PoolWant> {
    let mut out = Vec::new();
    for ne in nodeenis {
        let Some(name) = ne.metadata.name.as_deref() else {
            continue;
        };
        let Some(status) = &ne.status else { continue };
        for a in &status.attachments {
            if a.node_id != node
                || a.status != AttachmentStatus::Attached.as_str()
                || a.eni_id.is_empty()
            {
                continue;
            }
            let Some(ipam) = &a.ipam else { continue };
            let cidr = a.subnet_cidr.clone().unwrap_or_default();
            out.push(PoolWant {
                node_eni: name.to_string(),
                eni_id: a.eni_id.clone(),
                pool: PodPool {
                    gateway: gateway(&cidr).unwrap_or_default(),
                    subnet_cidr: cidr,
                    addresses: ipam.addresses.clone(),
                    prefixes: ipam.prefixes.clone(),
                },
                releasing: ipam.releasing.clone(),
            });
        }
    }
    out.sort_by(|a, b| a.eni_id.cmp(&b.eni_id));
    out
}

/// Whether `address` lies in `unit` (an address or a prefix).
fn within(unit: &str, address: &str) -> bool {
    match unit.split_once('/') {
        None => unit == address,
        Some(_) => {
            let p = PodPool {
                prefixes: vec![unit.to_string()],
                ..PodPool::default()
            };
            address
                .parse::<Ipv4Addr>()
                .is_ok_and(|a| p.expand().contains(&a))
        }
    }
}

/// The pools for the state file and each ENI's report (pure): `in_use` is what the
/// allocations hold on the ENI, `released` the releasing units none of them uses.
pub fn plan(
    wants: &[PoolWant],
    allocations: &Allocations,
) -> (BTreeMap<String, PodPool>, BTreeMap<String, InterfaceIpam>) {
    let mut pools = BTreeMap::new();
    let mut reports = BTreeMap::new();
    for w in wants {
        let held = allocations.held(&w.eni_id);
        let released = w
            .releasing
            .iter()
            .filter(|u| !held.iter().any(|a| within(u, a)))
            .cloned()
            .collect();
        let mut pool_units: Vec<String> = w.pool.addresses.clone();
        pool_units.extend(w.pool.prefixes.iter().cloned());
        reports.insert(
            w.eni_id.clone(),
            InterfaceIpam {
                pool: pool_units,
                in_use: held.into_iter().collect(),
                released,
            },
        );
        pools.insert(w.eni_id.clone(), w.pool.clone());
    }
    (pools, reports)
}

/// A pod on this node as the API server lists it: namespace, name, and the UIDs an
/// allocation may have recorded for it (its own and, for a static pod's mirror pod, the
/// static pod's, which the kubelet passes to CNI).
pub type LivePod = (String, String, Vec<String>);

/// Allocations of Kubernetes pods that no longer exist: the allocation names a pod
/// (`podName` set) and no live pod has its namespace and name, or the pod with that name
/// is another one (its UID differs from the recorded one). Allocations without a pod name
/// (runtimes that do not say) are never orphaned here: CNI DEL and GC return those.
pub fn orphaned(allocations: &Allocations, live: &[LivePod]) -> Vec<Allocation> {
    allocations
        .allocations
        .iter()
        .filter(|a| {
            !a.pod_name.is_empty()
                && !live.iter().any(|(ns, name, uids)| {
                    *ns == a.pod_namespace
                        && *name == a.pod_name
                        && (a.pod_uid.is_empty() || uids.contains(&a.pod_uid))
                })
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_is_the_vpc_router() {
        assert_eq!(gateway("10.0.1.0/24").as_deref(), Some("10.0.1.1"));
        assert_eq!(gateway("10.0.1.77/26").as_deref(), Some("10.0.1.65"));
        assert_eq!(gateway("nonsense"), None);
    }

    #[test]
    fn wants_come_from_this_nodes_attached_enis_with_a_pool() {
        let ne: NodeENI = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
            "metadata": {"name": "multus"},
            "spec": {"nodeSelector": {}},
            "status": {"attachments": [
                {"nodeID": "n1", "instanceID": "i-1", "eniID": "eni-a", "deviceIndex": 2, "status": "Attached",
                 "subnetCIDR": "10.0.1.0/24",
                 "ipam": {"mode": "secondaryIPs", "addresses": ["10.0.1.20"], "releasing": ["10.0.1.21"]}},
                {"nodeID": "n1", "instanceID": "i-1", "eniID": "eni-b", "deviceIndex": 3, "status": "Attached"},
                {"nodeID": "n2", "instanceID": "i-2", "eniID": "eni-c", "deviceIndex": 2, "status": "Attached",
                 "ipam": {"mode": "secondaryIPs", "addresses": ["10.0.1.30"]}}
            ]}
        }))
        .expect("nodeeni");
        let w = wants_from_nodeenis([&ne], "n1");
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].eni_id, "eni-a");
        assert_eq!(w[0].pool.gateway, "10.0.1.1");
        assert_eq!(w[0].pool.addresses, ["10.0.1.20"]);
        assert_eq!(w[0].releasing, ["10.0.1.21"]);
    }

    #[test]
    fn released_only_when_no_allocation_uses_it() {
        let wants = vec![PoolWant {
            node_eni: "ne".into(),
            eni_id: "eni-a".into(),
            pool: PodPool {
                addresses: vec!["10.0.1.20".into()],
                ..PodPool::default()
            },
            releasing: vec![
                "10.0.1.21".into(),
                "10.0.1.22".into(),
                "10.0.1.32/28".into(),
                "10.0.1.48/28".into(),
            ],
        }];
        let mut allocs = Allocations::default();
        for a in ["10.0.1.21", "10.0.1.40", "10.0.1.20"] {
            allocs.allocations.push(Allocation {
                eni_id: "eni-a".into(),
                address: a.into(),
                container_id: format!("c-{a}"),
                ..Allocation::default()
            });
        }
        let (pools, reports) = plan(&wants, &allocs);
        assert_eq!(pools["eni-a"].addresses, ["10.0.1.20"]);
        let r = &reports["eni-a"];
        assert_eq!(r.released, ["10.0.1.22", "10.0.1.48/28"]);
        assert_eq!(r.in_use, ["10.0.1.20", "10.0.1.21", "10.0.1.40"]);
        assert_eq!(r.pool, ["10.0.1.20"]);
    }

    #[test]
    fn orphaned_allocations_are_those_of_pods_gone_or_replaced() {
        let alloc = |address: &str, ns: &str, name: &str, uid: &str| Allocation {
            eni_id: "eni-1".into(),
            address: address.into(),
            container_id: format!("c-{address}"),
            if_name: "net1".into(),
            network: "vpc".into(),
            pod_namespace: ns.into(),
            pod_name: name.into(),
            pod_uid: uid.into(),
        };
        let allocations = Allocations {
            allocations: vec![
                alloc("10.0.1.20", "default", "alive", "u1"),
                alloc("10.0.1.21", "default", "gone", "u2"),
                alloc("10.0.1.22", "default", "recreated", "old-uid"),
                alloc("10.0.1.23", "default", "no-uid", ""),
                alloc("10.0.1.24", "", "", ""),
                alloc("10.0.1.25", "kube-system", "static", "config-hash"),
                alloc("10.0.1.26", "other", "alive", "u1"),
            ],
            ..Allocations::default()
        };
        let live: Vec<LivePod> = vec![
            ("default".into(), "alive".into(), vec!["u1".into()]),
            ("default".into(), "recreated".into(), vec!["new-uid".into()]),
            ("default".into(), "no-uid".into(), vec!["u3".into()]),
            (
                "kube-system".into(),
                "static".into(),
                vec!["mirror-uid".into(), "config-hash".into()],
            ),
        ];
        let gone: Vec<String> = orphaned(&allocations, &live)
            .into_iter()
            .map(|a| a.address)
            .collect();
        assert_eq!(gone, ["10.0.1.21", "10.0.1.22", "10.0.1.26"]);
    }
}
