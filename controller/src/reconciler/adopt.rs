//! Adopt: ENIs a NodeENI's status lists that the inventory does not hold, because they
//! carry no ownership tags of this controller: those of the older Go controller (same
//! CRD, same finalizer, status written without tags on the ENIs). Such an ENI is tagged
//! and managed from then on when it sits where the status says (on the recorded
//! instance at the recorded device index) or is detached; otherwise it is left alone and
//! stays listed, with the finalizer, so it is never silently forgotten.

use std::collections::BTreeMap;

use eni_api::{ENIAttachment, NodeENI, condition, tags};
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::report::publish;
use super::{Context, Error, Outcome};
use crate::ec2::{Ec2, Eni, EniQuery, VPC_CNI_DESCRIPTION_PREFIX};
use crate::inventory::lock;

/// The tag the older Go controller put on every ENI it created.
const LEGACY_MARKER: (&str, &str) = ("kubernetes.io/cluster/managed-by", "nodeeni-controller");
/// The older controller's tag naming the NodeENI of an ENI.
const LEGACY_NODE_ENI: &str = "NodeENI";

/// Records an ENI the status lists that is left alone: it stays listed, and the
/// finalizer stays, until someone removes it.
fn not_adopted(outcome: &mut Outcome, a: &ENIAttachment, message: String) {
    warn!(%message);
    outcome.issues.push((message, condition::NOT_ADOPTED));
    outcome.unadopted.push(a.clone());
}

/// Who an ENI belongs to, by its tags.
#[derive(Debug, PartialEq, Eq)]
pub enum Ownership {
    /// This cluster (name and identity).
    Ours,
    /// This cluster's name without an identity: tagged before identities existed.
    OursUnidentified,
    /// Another cluster (another identity, or another name).
    Foreign,
    /// No cluster tag at all.
    Untagged,
}

/// Classifies `eni` for the cluster `name` with identity `id`.
pub fn ownership(eni: &Eni, name: &str, id: &str) -> Ownership {
    match (eni.tags.get(tags::CLUSTER), eni.tags.get(tags::CLUSTER_ID)) {
        (None, None) => Ownership::Untagged,
        (Some(n), Some(i)) if n == name && i == id => Ownership::Ours,
        (Some(n), None) if n == name => Ownership::OursUnidentified,
        _ => Ownership::Foreign,
    }
}

/// The tags that make an ENI this controller's, for a slot of `nodeeni`.
pub fn ownership_tags(
    cluster: &str,
    cluster_id: &str,
    nodeeni: &str,
    node: &str,
    instance: &str,
    device_index: i32,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (tags::CLUSTER.to_string(), cluster.to_string()),
        (tags::CLUSTER_ID.to_string(), cluster_id.to_string()),
        (tags::NODE_ENI.to_string(), nodeeni.to_string()),
        (tags::NODE.to_string(), node.to_string()),
        (tags::INSTANCE.to_string(), instance.to_string()),
        (tags::DEVICE_INDEX.to_string(), device_index.to_string()),
        (tags::NO_MANAGE.to_string(), "true".to_string()),
    ])
}

/// Adopts the ENIs `obj`'s status lists that the inventory does not know. Costs one
/// `DescribeNetworkInterfaces` by ID when there are any, and one `CreateTags` per ENI
/// adopted.
pub(super) async fn adopt<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    outcome: &mut Outcome,
) -> Result<(), Error> {
    let Some(status) = obj.status.as_ref() else {
        return Ok(());
    };
    let candidates: Vec<&ENIAttachment> = {
        let inventory = lock(&ctx.inventory);
        status
            .attachments
            .iter()
            .filter(|a| !a.eni_id.is_empty() && inventory.get(&a.eni_id).is_none())
            .collect()
    };
    if candidates.is_empty() {
        return Ok(());
    }
    let mut ids: Vec<String> = candidates.iter().map(|a| a.eni_id.clone()).collect();
    ids.sort();
    ids.dedup();
    let found = ctx.ec2.describe_enis(EniQuery::Ids(ids)).await?;
    let name = obj.name_any();
    let config = &ctx.config;
    for a in candidates {
        // Gone: nothing left to clean up.
        let Some(eni) = found.iter().find(|e| e.id == a.eni_id) else {
            continue;
        };
        match ownership(eni, &config.cluster_name, &config.cluster_id) {
            // Known to EC2 but not yet to the inventory (listing lag).
            Ownership::Ours => lock(&ctx.inventory).upsert(eni.clone()),
            // Ours from before identities (this NodeENI's status lists it).
            Ownership::OursUnidentified => {
                let identity = BTreeMap::from([
                    (tags::CLUSTER_ID.to_string(), config.cluster_id.clone()),
                    (tags::NO_MANAGE.to_string(), "true".to_string()),
                ]);
                if let Err(e) = ctx.ec2.tag_eni(eni.id.clone(), identity.clone()).await {
                    not_adopted(
                        outcome,
                        a,
                        format!(
                            "ENI {} listed in status: cannot tag it with the cluster identity: {e}",
                            eni.id
                        ),
                    );
                    continue;
                }
                let mut adopted = eni.clone();
                adopted.tags.extend(identity);
                lock(&ctx.inventory).upsert(adopted);
            }
            Ownership::Foreign => {
                let message = format!(
                    "ENI {} listed in status belongs to another cluster ({}): not managed",
                    eni.id,
                    eni.tags
                        .get(tags::CLUSTER)
                        .map(String::as_str)
                        .unwrap_or("?")
                );
                warn!(%message);
                publish(ctx, obj, EventType::Warning, "NotAdopted", "Adopt", message).await;
            }
            Ownership::Untagged => {
                // Only what the older controller made: its marker tag (and its NodeENI
                // tag, where set), never the primary ENI nor the VPC CNI's.
                let legacy = eni.tags.get(LEGACY_MARKER.0).map(String::as_str)
                    == Some(LEGACY_MARKER.1)
                    && eni.tags.get(LEGACY_NODE_ENI).is_none_or(|n| *n == name);
                let primary = eni
                    .attachment
                    .as_ref()
                    .is_some_and(|at| at.device_index == 0);
                if !legacy || primary || eni.description.starts_with(VPC_CNI_DESCRIPTION_PREFIX) {
                    not_adopted(
                        outcome,
                        a,
                        format!(
                            "ENI {} listed in status for node {} carries neither this controller's tags nor the older controller's ({}={}): not adopted; delete it yourself, or remove it from status",
                            eni.id, a.node_id, LEGACY_MARKER.0, LEGACY_MARKER.1
                        ),
                    );
                    continue;
                }
                // The older controller did not always record the device index (0 then).
                let placed = match &eni.attachment {
                    Some(at) => {
                        at.instance_id == a.instance_id
                            && (a.device_index == 0 || at.device_index == a.device_index)
                    }
                    // Detached: a leftover of the slot, to be deleted.
                    None => true,
                };
                let device_index = eni
                    .attachment
                    .as_ref()
                    .map(|at| at.device_index)
                    .unwrap_or(a.device_index);
                if !placed {
                    let at = eni.attachment.as_ref();
                    let message = format!(
                        "ENI {} listed in status for node {} (instance {}, device index {}) is attached to {} at device index {}: not adopted; detach or delete it, or remove it from status",
                        eni.id,
                        a.node_id,
                        a.instance_id,
                        a.device_index,
                        at.map(|t| t.instance_id.as_str()).unwrap_or("?"),
                        at.map(|t| t.device_index).unwrap_or_default(),
                    );
                    outcome.issues.push((message, condition::NOT_ADOPTED));
                    outcome.unadopted.push(a.clone());
                    continue;
                }
                let new_tags = ownership_tags(
                    &config.cluster_name,
                    &config.cluster_id,
                    &name,
                    &a.node_id,
                    &a.instance_id,
                    device_index,
                );
                if let Err(e) = ctx.ec2.tag_eni(eni.id.clone(), new_tags.clone()).await {
                    not_adopted(
                        outcome,
                        a,
                        format!("ENI {} of the older controller: cannot tag it: {e}", eni.id),
                    );
                    continue;
                }
                let mut adopted = eni.clone();
                adopted.tags.extend(new_tags);
                lock(&ctx.inventory).upsert(adopted);
                info!(eni = %eni.id, node = %a.node_id, "adopted an ENI of the older controller");
                publish(
                    ctx,
                    obj,
                    EventType::Normal,
                    "Adopted",
                    "CreateTags",
                    format!(
                        "adopted {} (node {}, device index {}): tagged as this controller's",
                        eni.id, a.node_id, device_index
                    ),
                )
                .await;
            }
        }
    }
    Ok(())
}
