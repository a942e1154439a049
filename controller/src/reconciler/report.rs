//! Report: status, conditions, events, finalizer and gauges.

use std::collections::{BTreeMap, BTreeSet};

use eni_api::{
    AttachmentStatus, ENIAttachment, FINALIZER, NodeENI, NodeENIStatus, condition, tags,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use tracing::debug;

use super::{Context, Error, Outcome, slot_key};
use crate::ec2::{AttachmentState, Ec2};
use crate::inventory::lock;
use crate::metrics::StateLabels;
use crate::plan::{self, Blocked, Plan, Step};

/// Publishes an event about the NodeENI; failures are logged, never fatal.
pub async fn publish<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        debug!(error = %e, "could not publish event");
    }
}

pub(super) async fn add_finalizer(api: &Api<NodeENI>, obj: &NodeENI) -> Result<(), kube::Error> {
    let mut finalizers = obj.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let patch = serde_json::json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": obj.resource_version(),
        }
    });
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Removes the finalizer with a JSON patch that tests the finalizer list it edits, so
/// it needs no resourceVersion (the status write just changed it) and still never drops
/// a finalizer someone added meanwhile.
pub(super) async fn remove_finalizer(api: &Api<NodeENI>, obj: &NodeENI) -> Result<(), kube::Error> {
    let current = obj.finalizers().to_vec();
    let Some(at) = current.iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": format!("/metadata/finalizers/{at}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{at}")},
    ]))
    .map_err(kube::Error::SerdeError)?;
    ignore_gone(
        api.patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await,
    )
}

/// A write to a NodeENI deleted meanwhile has nothing left to do.
pub(super) fn ignore_gone<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Field manager of the controller's status writes (server-side apply).
pub(super) const FIELD_MANAGER: &str = "eni-controller";

/// Builds the status and writes it with server-side apply when it differs from `last`
/// (what this pass wrote before) or else from `obj` (so the
/// controller owns its fields and condition, and node daemons their `nodeReports`
/// entries); drops the `nodeReports` of Nodes that no longer exist. Returns the object
/// as written, when it wrote one.
pub(super) async fn write_status<E: Ec2>(
    ctx: &Context<E>,
    api: &Api<NodeENI>,
    obj: &NodeENI,
    last: Option<&NodeENI>,
    plan: Option<&Plan>,
    outcome: &Outcome,
) -> Result<Option<NodeENI>, kube::Error> {
    // Compare with what this pass wrote last, not with the object it started from.
    let old = last
        .and_then(|l| l.status.clone())
        .or_else(|| obj.status.clone())
        .unwrap_or_default();
    let mut latest = prune_node_reports(ctx, api, obj).await?;
    let status = build_status(ctx, obj, plan, outcome, &old);
    // Only the fields this controller owns (other managers' conditions and the node
    // daemons' reports are theirs).
    let mine = |s: &NodeENIStatus| NodeENIStatus {
        node_reports: Vec::new(),
        conditions: s
            .conditions
            .iter()
            .filter(|c| c.type_ == condition::READY || c.type_ == condition::IPAM)
            .cloned()
            .collect(),
        ..s.clone()
    };
    if mine(&status) == mine(&old) {
        return Ok(latest);
    }
    let body = serde_json::json!({
        "apiVersion": NodeENI::api_version(&()),
        "kind": NodeENI::kind(&()),
        "metadata": { "name": obj.name_any() },
        "status": {
            "observedGeneration": status.observed_generation,
            "conditions": status.conditions,
            "desiredAttachments": status.desired_attachments,
            "readyAttachments": status.ready_attachments,
            "subnetIDs": status.subnet_ids,
            "securityGroupIDs": status.security_group_ids,
            "attachments": status.attachments,
        }
    });
    match api
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        Ok(o) => latest = Some(o),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e),
    }
    Ok(latest)
}

/// Removes the `nodeReports` entries of Nodes that are gone (node churn would grow the
/// list forever). Each removal tests the entry's name first, so a concurrent change
/// fails the patch instead of removing the wrong entry.
async fn prune_node_reports<E: Ec2>(
    ctx: &Context<E>,
    api: &Api<NodeENI>,
    obj: &NodeENI,
) -> Result<Option<NodeENI>, kube::Error> {
    let Some(status) = obj.status.as_ref() else {
        return Ok(None);
    };
    let nodes: BTreeSet<String> = ctx.nodes.state().iter().map(|n| n.name_any()).collect();
    let mut ops = Vec::new();
    for (i, r) in status.node_reports.iter().enumerate().rev() {
        if !nodes.contains(&r.node_name) {
            ops.push(serde_json::json!({"op": "test", "path": format!("/status/nodeReports/{i}/nodeName"), "value": r.node_name}));
            ops.push(
                serde_json::json!({"op": "remove", "path": format!("/status/nodeReports/{i}")}),
            );
        }
    }
    if ops.is_empty() {
        return Ok(None);
    }
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(ops)).map_err(kube::Error::SerdeError)?;
    match api
        .patch_status(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(o) => {
            debug!("dropped the reports of Nodes that are gone");
            Ok(Some(o))
        }
        // Someone changed the list meanwhile, or the object is gone: next pass.
        Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) fn build_status<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    plan: Option<&Plan>,
    outcome: &Outcome,
    old: &NodeENIStatus,
) -> NodeENIStatus {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let inventory = lock(&ctx.inventory);
    let mut attachments: Vec<ENIAttachment> = Vec::new();
    let dpdk = obj.spec.dpdk();
    let entry = |node: &str,
                 instance: &str,
                 subnet: &str,
                 index: i32,
                 eni_id: Option<&str>,
                 status: AttachmentStatus| {
        let eni = eni_id.and_then(|id| inventory.get(id));
        let report = old
            .node_reports
            .iter()
            .find(|r| r.node_name == node)
            .and_then(|r| {
                r.interfaces
                    .iter()
                    .find(|i| Some(i.eni_id.as_str()) == eni_id)
            });
        ENIAttachment {
            node_id: node.to_string(),
            instance_id: instance.to_string(),
            eni_id: eni_id.unwrap_or_default().to_string(),
            attachment_id: eni
                .and_then(|e| e.attachment.as_ref())
                .map(|a| a.id.clone())
                .unwrap_or_default(),
            subnet_id: subnet.to_string(),
            subnet_cidr: outcome.subnets.get(subnet).map(|s| s.cidr.clone()),
            vpc_id: outcome.subnets.get(subnet).map(|s| s.vpc_id.clone()),
            device_index: index,
            network_card_index: Some(0),
            mtu: obj.spec.mtu,
            mac_address: eni.and_then(|e| e.mac_address.clone()),
            private_ip_address: eni.and_then(|e| e.private_ip.clone()),
            status: status.as_str().to_string(),
            last_updated: None,
            dpdk_enabled: dpdk,
            dpdk_bound: report.is_some_and(|r| r.dpdk_bound),
            dpdk_driver: dpdk.then(|| obj.spec.dpdk_driver().to_string()),
            dpdk_resource_name: dpdk.then(|| obj.spec.dpdk_resource_name().to_string()),
            client_token: None,
            ipam: eni_id.and_then(|id| outcome.pools.get(id).cloned()),
            dpdk_pci_address: report
                .and_then(|r| r.pci_address.clone())
                .or_else(|| obj.spec.dpdk_pci_address.clone().filter(|_| dpdk)),
        }
    };
    let mut ready = 0;
    let mut blocked: Vec<(String, &'static str)> = Vec::new();
    if let Some(plan) = plan {
        for (slot, sp) in &plan.slots {
            if sp.status == AttachmentStatus::Attached {
                ready += 1;
            }
            if let Step::Blocked(b) = &sp.step {
                blocked.push(match b {
                    Blocked::DeviceIndexInUse { eni_id, holder } => (
                        format!(
                            "node {}: device index {} is in use by {eni_id}, {holder}",
                            slot.node, slot.device_index
                        ),
                        condition::DEVICE_INDEX_IN_USE,
                    ),
                    Blocked::InstanceLimit {
                        instance_type,
                        max_enis,
                    } => (
                        format!(
                            "node {}: instance type {instance_type} takes at most {max_enis} network interfaces",
                            slot.node
                        ),
                        condition::INSTANCE_ENI_LIMIT,
                    ),
                });
            }
            let mut a = entry(
                &slot.node,
                &slot.instance_id,
                &slot.subnet_id,
                slot.device_index,
                sp.eni_id.as_deref(),
                sp.status,
            );
            let key = slot_key(slot);
            // The token that made the slot's ENI, or the one its next create uses; an
            // old token whose ENI is gone is never carried over.
            a.client_token = outcome.tokens.get(&key).cloned().or_else(|| {
                old.attachments
                    .iter()
                    .find(|p| {
                        (p.node_id.as_str(), p.subnet_id.as_str(), p.device_index)
                            == (key.0.as_str(), key.1.as_str(), key.2)
                    })
                    .filter(|p| p.eni_id.is_empty() || p.eni_id == a.eni_id)
                    .and_then(|p| p.client_token.clone())
            });
            attachments.push(a);
        }
        // ENIs no slot claims: on their way out, or held as they are. Their slot is read
        // from their tags.
        let unclaimed = plan
            .removals
            .iter()
            .map(|(id, _)| {
                (
                    id,
                    plan::removal_status as fn(&crate::ec2::Eni) -> AttachmentStatus,
                )
            })
            .chain(plan.held.iter().map(|id| {
                (
                    id,
                    plan::observed_status as fn(&crate::ec2::Eni) -> AttachmentStatus,
                )
            }));
        for (id, status) in unclaimed {
            if let Some(e) = inventory.get(id) {
                attachments.push(entry(
                    e.tags.get(tags::NODE).map(String::as_str).unwrap_or(""),
                    e.tags.get(tags::INSTANCE).map(String::as_str).unwrap_or(""),
                    &e.subnet_id,
                    e.tags
                        .get(tags::DEVICE_INDEX)
                        .and_then(|i| i.parse().ok())
                        .unwrap_or_default(),
                    Some(id),
                    status(e),
                ));
            }
        }
        // ENIs the status lists that could not be adopted stay listed until they go.
        attachments.extend(outcome.unadopted.iter().cloned());
    } else {
        // Resolution failed: keep reporting what exists.
        attachments = old.attachments.clone();
    }
    attachments.sort_by(|a, b| {
        (a.node_id.as_str(), a.device_index, a.eni_id.as_str()).cmp(&(
            b.node_id.as_str(),
            b.device_index,
            b.eni_id.as_str(),
        ))
    });
    for a in &mut attachments {
        // Keep the old timestamp when nothing else changed, so status only changes
        // when something did.
        let prev = old.attachments.iter().find(|p| {
            p.node_id == a.node_id && p.device_index == a.device_index && p.eni_id == a.eni_id
        });
        a.last_updated = match prev {
            Some(p)
                if ENIAttachment {
                    last_updated: None,
                    ..p.clone()
                } == *a =>
            {
                p.last_updated.clone()
            }
            _ => Some(now.clone()),
        };
    }
    let desired = plan
        .map(|p| p.slots.len())
        .unwrap_or(old.desired_attachments as usize);

    // Resolution problems first: they are the user's to fix and explain the rest.
    let mut problems: Vec<(String, &'static str)> = outcome.resolve_errors.clone();
    problems.extend(outcome.slot_errors.iter().map(|(_, m, r)| (m.clone(), *r)));
    problems.extend(blocked);
    problems.extend(outcome.issues.iter().cloned());
    let (status, reason, message) = ready_verdict(&Verdict {
        deleting: obj.metadata.deletion_timestamp.is_some(),
        listed: attachments.len(),
        problems: &problems,
        converged: plan.is_some_and(Plan::converged),
        ready,
        desired,
    });
    let generation = obj.metadata.generation;
    let previous = old.conditions.iter().find(|c| c.type_ == condition::READY);
    let transition = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => now.clone(),
    };
    let ready_condition = Condition {
        type_: condition::READY.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: transition,
    };
    let mut conditions = vec![ready_condition];
    if let Some((ok, reason, message)) = &outcome.ipam {
        let status = if *ok { "True" } else { "False" };
        let previous = old.conditions.iter().find(|c| c.type_ == condition::IPAM);
        let transition = match previous {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => now.clone(),
        };
        conditions.push(Condition {
            type_: condition::IPAM.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: message.clone(),
            observed_generation: generation,
            last_transition_time: transition,
        });
    }
    NodeENIStatus {
        observed_generation: generation,
        conditions,
        desired_attachments: desired as i32,
        ready_attachments: ready,
        subnet_ids: if outcome.subnet_ids.is_empty() {
            old.subnet_ids.clone()
        } else {
            outcome.subnet_ids.clone()
        },
        security_group_ids: if outcome.security_groups.is_empty() {
            old.security_group_ids.clone()
        } else {
            let mut g = outcome.security_groups.clone();
            g.sort();
            g
        },
        attachments,
        node_reports: old.node_reports.clone(),
    }
}

pub(super) fn update_gauges<E: Ec2>(ctx: &Context<E>) {
    let inventory = lock(&ctx.inventory);
    let mut counts: BTreeMap<&'static str, i64> = BTreeMap::from([
        ("Attached", 0),
        ("Attaching", 0),
        ("Detaching", 0),
        ("Available", 0),
    ]);
    for e in inventory.all() {
        let state = match e.attachment.as_ref().map(|a| a.state) {
            Some(AttachmentState::Attached) => "Attached",
            Some(AttachmentState::Attaching) => "Attaching",
            Some(_) => "Detaching",
            None => "Available",
        };
        *counts.entry(state).or_default() += 1;
    }
    for (state, n) in counts {
        ctx.metrics
            .managed_enis
            .get_or_create(&StateLabels {
                state: state.to_string(),
            })
            .set(n);
    }
}

/// What the Ready condition is decided from.
#[derive(Debug)]
pub(super) struct Verdict<'a> {
    /// The NodeENI is being deleted.
    pub(super) deleting: bool,
    /// Attachments listed in status.
    pub(super) listed: usize,
    /// (message, reason), most important first.
    pub(super) problems: &'a [(String, &'static str)],
    /// Every slot attached, nothing being removed.
    pub(super) converged: bool,
    /// Slots attached.
    pub(super) ready: i32,
    /// Slots wanted.
    pub(super) desired: usize,
}

/// The Ready condition's (status, reason, message) (pure).
pub(super) fn ready_verdict(v: &Verdict<'_>) -> (&'static str, &'static str, String) {
    let (ready, desired) = (v.ready, v.desired);
    if v.deleting {
        return (
            "False",
            condition::DELETING,
            format!("removing {} ENI(s)", v.listed),
        );
    }
    if let Some((_, first)) = v.problems.first() {
        let shown: Vec<&str> = v.problems.iter().take(5).map(|(m, _)| m.as_str()).collect();
        let more = v.problems.len().saturating_sub(5);
        let mut message = format!("{ready} of {desired} ENIs attached; {}", shown.join("; "));
        if more > 0 {
            message.push_str(&format!("; and {more} more"));
        }
        // Nodes without an AWS providerID cannot get ENIs; the others are fine.
        let only_provider_ids = v
            .problems
            .iter()
            .all(|(_, r)| *r == condition::INVALID_PROVIDER_ID);
        let status = if v.converged && only_provider_ids {
            "True"
        } else {
            "False"
        };
        return (status, first, message);
    }
    match (v.converged, desired) {
        (true, 0) => (
            "True",
            condition::NO_MATCHING_NODES,
            "no Node matches the nodeSelector".to_string(),
        ),
        (true, _) => (
            "True",
            condition::ALL_ATTACHED,
            format!("{ready} of {desired} ENIs attached"),
        ),
        (false, _) => (
            "False",
            condition::PROGRESSING,
            format!("{ready} of {desired} ENIs attached"),
        ),
    }
}

/// Field manager of the Ready condition written when a reconcile fails before its
/// status write (its own manager, so it never removes the fields the main one owns).
const ERROR_FIELD_MANAGER: &str = "eni-controller-errors";

/// Reports a failed reconcile: a Warning event and Ready=False with the error, so a
/// failure before the status write (e.g. AccessDenied on a describe) is seen on the
/// NodeENI and not only in the controller's log.
pub(super) async fn report_failure<E: Ec2>(ctx: &Context<E>, obj: &NodeENI, err: &Error) {
    let reason = match err {
        Error::Ec2(_) => condition::EC2_ERROR,
        Error::Kube(_) => condition::API_ERROR,
    };
    let message = err.to_string();
    publish(
        ctx,
        obj,
        EventType::Warning,
        "ReconcileFailed",
        "Reconcile",
        message.clone(),
    )
    .await;
    let old = obj
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::READY));
    if old.is_some_and(|c| c.status == "False" && c.reason == reason && c.message == message) {
        return;
    }
    let transition = match old {
        Some(c) if c.status == "False" => c.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::now()),
    };
    let body = serde_json::json!({
        "apiVersion": NodeENI::api_version(&()),
        "kind": NodeENI::kind(&()),
        "metadata": { "name": obj.name_any() },
        "status": { "conditions": [Condition {
            type_: condition::READY.to_string(),
            status: "False".to_string(),
            reason: reason.to_string(),
            message,
            observed_generation: obj.metadata.generation,
            last_transition_time: transition,
        }]},
    });
    let api: Api<NodeENI> = Api::all(ctx.client.clone());
    if let Err(e) = api
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(ERROR_FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        debug!(error = %e, "could not report the failure in status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(
        problems: &[(String, &'static str)],
        converged: bool,
    ) -> (&'static str, &'static str, String) {
        ready_verdict(&Verdict {
            deleting: false,
            listed: 2,
            problems,
            converged,
            ready: 2,
            desired: 3,
        })
    }

    #[test]
    fn ready_condition_reasons() {
        assert_eq!(verdict(&[], true).1, condition::ALL_ATTACHED);
        assert_eq!(verdict(&[], false).0, "False");
        assert_eq!(verdict(&[], false).1, condition::PROGRESSING);
        let missing = (
            "node n: instance i-1 not found in EC2".to_string(),
            condition::INSTANCE_NOT_FOUND,
        );
        let (status, reason, message) = verdict(std::slice::from_ref(&missing), true);
        assert_eq!((status, reason), ("False", condition::INSTANCE_NOT_FOUND));
        assert!(
            message.starts_with("2 of 3 ENIs attached; node n"),
            "{message}"
        );
        // A Node without a providerID alone leaves the others Ready.
        let pid = (
            "node x has no AWS providerID".to_string(),
            condition::INVALID_PROVIDER_ID,
        );
        assert_eq!(verdict(std::slice::from_ref(&pid), true).0, "True");
        assert_eq!(verdict(&[pid, missing], true).0, "False");
        let many: Vec<(String, &'static str)> = (0..7)
            .map(|i| (format!("p{i}"), condition::EC2_ERROR))
            .collect();
        assert!(verdict(&many, false).2.ends_with("; and 2 more"));
        let deleting = ready_verdict(&Verdict {
            deleting: true,
            listed: 4,
            problems: &many,
            converged: false,
            ready: 0,
            desired: 0,
        });
        assert_eq!(deleting.1, condition::DELETING);
        assert_eq!(deleting.2, "removing 4 ENI(s)");
    }
}
