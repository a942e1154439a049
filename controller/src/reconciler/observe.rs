//! Observe: which Nodes a NodeENI selects, their instances, and the slots (Node, subnet,
//! device index) the spec asks for.
//!
//! Everything here is read from the reflector store, the instance cache and the name
//! resolver; a failure to resolve one subnet or security group holds back only the
//! ENIs that need it (their slots are neither created nor removed), never the rest.

use std::collections::{BTreeMap, BTreeSet};

use eni_api::{NodeENI, NodeENISpec, condition};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use super::{Context, Error, Outcome, description, instance_id};
use crate::ec2::{Ec2, Subnet};
use crate::plan::{Held, Settings, Slot};
use crate::resolve::ResolveError;

/// A Node selected by a NodeENI, with its instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) node: String,
    pub(super) instance_id: String,
    /// The Node has a deletionTimestamp (being drained): its ENIs stay while its pods
    /// drain, but it gets no new ones.
    pub(super) draining: bool,
}

/// What the spec asks for, as far as it could be resolved.
#[derive(Debug, Default)]
pub(super) struct Observed {
    /// Every wanted slot with the settings of its VPC.
    pub(super) slots: Vec<(Slot, Settings)>,
    /// ENIs to keep as they are: on draining Nodes, or at an index whose subnet or
    /// whose security groups could not be resolved this pass.
    pub(super) held: Held,
}

/// The Nodes `spec` selects, sorted by name, and a message for each selected Node that
/// has no usable providerID.
pub(super) fn select_targets(
    spec: &NodeENISpec,
    nodes: &Store<Node>,
) -> (Vec<Target>, Vec<(String, &'static str)>) {
    let mut targets = Vec::new();
    let mut issues = Vec::new();
    for node in nodes.state() {
        if !spec.selects(node.labels()) {
            continue;
        }
        let provider = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .unwrap_or("");
        match instance_id(provider) {
            Some(instance_id) => targets.push(Target {
                node: node.name_any(),
                instance_id,
                draining: node.metadata.deletion_timestamp.is_some(),
            }),
            None => issues.push((
                format!(
                    "node {} has no AWS providerID ({:?})",
                    node.name_any(),
                    provider
                ),
                condition::INVALID_PROVIDER_ID,
            )),
        }
    }
    targets.sort_by(|a, b| a.node.cmp(&b.node));
    (targets, issues)
}

/// Resolves the spec against the selected Nodes: instances, subnets and security groups
/// per VPC, and the slots. The device index of the subnet at position `k` of the spec's
/// list (IDs first, then names) is `deviceIndex + k` on every Node; a subnet outside a
/// Node's zone leaves its index unused there.
pub(super) async fn observe<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    outcome: &mut Outcome,
) -> Result<Observed, Error> {
    let mut observed = Observed::default();
    if obj.metadata.deletion_timestamp.is_some() {
        return Ok(observed);
    }
    let (targets, issues) = select_targets(&obj.spec, &ctx.nodes);
    outcome.issues.extend(issues);

    // A draining Node's instance is looked at again each pass: once it stops running,
    // its ENIs are released.
    for t in targets.iter().filter(|t| t.draining) {
        ctx.instances.invalidate(&t.instance_id);
    }
    let instance_ids: Vec<String> = targets.iter().map(|t| t.instance_id.clone()).collect();
    if !instance_ids.is_empty() {
        ctx.instances.ensure(&ctx.ec2, &instance_ids).await?;
    }
    let mut live = Vec::new();
    for t in targets {
        match ctx.instances.get(&t.instance_id) {
            // Terminating: EC2 releases the ENIs; nothing to keep or create.
            Some(i) if i.is_terminating() => {}
            Some(i) => live.push((t, i)),
            // Not found is not gone (a wrong providerID, or EC2's eventual consistency
            // right after launch): keep whatever the Node has, create nothing.
            None => {
                observed.held.nodes.insert(t.node.clone());
                outcome.issues.push((
                    format!(
                        "node {}: instance {} not found in EC2",
                        t.node, t.instance_id
                    ),
                    condition::INSTANCE_NOT_FOUND,
                ));
            }
        }
    }

    let subnet_ids = obj.spec.subnet_ids();
    let subnet_names = obj.spec.subnet_names();
    let vpcs: BTreeSet<String> = live.iter().map(|(_, i)| i.vpc_id.clone()).collect();
    let mut per_vpc: BTreeMap<String, VpcView> = BTreeMap::new();
    for vpc in vpcs {
        let subnets = ctx
            .resolver
            .subnet_list(&ctx.ec2, &subnet_ids, &subnet_names, &vpc)
            .await;
        let groups = ctx
            .resolver
            .security_groups(
                &ctx.ec2,
                &obj.spec.security_group_ids,
                &obj.spec.security_group_names,
                &vpc,
            )
            .await;
        for s in subnets.iter().flatten() {
            outcome.subnets.insert(s.id.clone(), s.clone());
            if !outcome.subnet_ids.contains(&s.id) {
                outcome.subnet_ids.push(s.id.clone());
            }
        }
        if let Ok(groups) = &groups {
            for g in groups {
                if !outcome.security_groups.contains(g) {
                    outcome.security_groups.push(g.clone());
                }
            }
        }
        for e in subnets
            .iter()
            .filter_map(|r| r.as_ref().err())
            .chain(groups.as_ref().err())
        {
            outcome.resolve_error(e);
        }
        per_vpc.insert(vpc, VpcView { subnets, groups });
    }

    let description = description(obj);
    for (t, inst) in &live {
        let Some(view) = per_vpc.get(&inst.vpc_id) else {
            continue;
        };
        let settings = view.groups.as_ref().ok().map(|groups| Settings {
            security_groups: groups.clone(),
            description: description.clone(),
            delete_on_termination: obj.spec.delete_on_termination,
        });
        if t.draining {
            observed.held.nodes.insert(t.node.clone());
        }
        let mut in_zone = false;
        let mut seen: Vec<&str> = Vec::new();
        for (k, entry) in view.subnets.iter().enumerate() {
            let index = obj.spec.device_index + k as i32;
            match entry {
                // The same subnet twice (by ID and by name): one ENI, the first index.
                Ok(s) if seen.contains(&s.id.as_str()) => {}
                Ok(s) if s.availability_zone != inst.availability_zone => {
                    seen.push(&s.id);
                }
                Ok(s) => {
                    seen.push(&s.id);
                    in_zone = true;
                    let slot = Slot {
                        node: t.node.clone(),
                        instance_id: t.instance_id.clone(),
                        subnet_id: s.id.clone(),
                        device_index: index,
                        network_card_index: 0,
                    };
                    match &settings {
                        Some(settings) if !t.draining => {
                            observed.slots.push((slot, settings.clone()));
                        }
                        // Unknown security groups or a draining Node: keep what is there.
                        _ => {
                            observed.held.indexes.insert((t.node.clone(), index));
                        }
                    }
                }
                Err(_) => {
                    in_zone = true;
                    observed.held.indexes.insert((t.node.clone(), index));
                }
            }
        }
        if !in_zone && !view.subnets.is_empty() {
            outcome.issues.push((
                format!(
                    "node {}: none of the subnets is in its zone {}",
                    t.node, inst.availability_zone
                ),
                condition::NO_SUBNET_IN_ZONE,
            ));
        }
    }
    Ok(observed)
}

/// Resolution results for one VPC.
#[derive(Debug)]
struct VpcView {
    /// One result per entry of the spec's subnet list.
    subnets: Vec<Result<Subnet, ResolveError>>,
    groups: Result<Vec<String>, ResolveError>,
}
