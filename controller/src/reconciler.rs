//! NodeENI reconcile: observe -> [`plan`] -> execute -> report.
//!
//! One reconcile handles one NodeENI. It reads the selected Nodes from the reflector
//! store and the ENIs from the in-memory [`Inventory`], so a pass with nothing to do
//! makes no EC2 call. Actions run as per-ENI chains (create -> attach -> modify) with
//! bounded parallelism; a pass stops starting new chains after a time budget so status
//! is written regularly while a large NodeENI converges.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use eni_api::{
    AttachmentStatus, ENIAttachment, FINALIZER, NodeENI, NodeENIStatus, condition, tags,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::ec2::{Attachment, AttachmentState, Ec2, Ec2Error, ErrorKind, NewEni, Subnet};
use crate::inventory::{Instances, SharedInventory, lock, merged_attachments};
use crate::metrics::{Metrics, StateLabels};
use crate::plan::{self, Action, Blocked, InstanceView, Plan, Settings, Slot, SlotPlan, Step};
use crate::resolve::{ResolveError, Resolver};

/// Errors that fail a reconcile (and requeue it with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// EC2 failed in a way that is not the user's to fix.
    #[error("EC2: {0}")]
    Ec2(#[from] Ec2Error),
}

/// Reconciler settings.
#[derive(Clone, Debug)]
pub struct ReconcilerConfig {
    /// Value of the cluster ownership tag.
    pub cluster_name: String,
    /// Requeue period of a converged NodeENI.
    pub resync_period: Duration,
    /// How long a detach may take before it is forced.
    pub detach_timeout: Duration,
    /// EC2 action chains run at once within one NodeENI.
    pub parallel_operations: usize,
    /// Removal chains run at once within one NodeENI.
    pub parallel_cleanups: usize,
    /// While a long pass runs (bulk provisioning), status is written this often.
    pub status_interval: Duration,
}

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context<E: Ec2> {
    /// Kubernetes client.
    pub client: kube::Client,
    /// EC2.
    pub ec2: E,
    /// Settings.
    pub config: ReconcilerConfig,
    /// Managed ENIs.
    pub inventory: SharedInventory,
    /// Instances of selected Nodes.
    pub instances: Instances,
    /// Name lookups.
    pub resolver: Resolver,
    /// Nodes (stripped to metadata and providerID).
    pub nodes: Store<Node>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    /// Wakes the in-flight poller after an attach or detach.
    pub in_flight: Arc<Notify>,
    /// Notified (all waiters) whenever the poller or resync changed the inventory, so a
    /// chain waiting for an attach to complete continues at once.
    pub inventory_changed: Arc<Notify>,
}

impl<E: Ec2> std::fmt::Debug for Context<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A Node selected by a NodeENI, with its instance.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    node: String,
    instance_id: String,
}

/// Instance ID from a providerID like `aws:///us-east-1a/i-0abc`.
pub fn instance_id(provider_id: &str) -> Option<String> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    (id.starts_with("i-") && id.len() > 2).then(|| id.to_string())
}

/// Idempotency token for creating a slot's ENI. Derived from stable identifiers, so a
/// retried or repeated create after a crash returns the same ENI; `generation` counts
/// replacements (an ENI deleted behind the controller's back needs a new token).
pub fn client_token(cluster: &str, nodeeni_uid: &str, slot: &Slot, generation: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        cluster,
        nodeeni_uid,
        &slot.node,
        &slot.instance_id,
        &slot.subnet_id,
        &slot.device_index.to_string(),
        generation,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    // 64 hex characters: the most EC2 accepts.
    hex::encode(h.finalize())
}

fn select_targets(spec: &eni_api::NodeENISpec, nodes: &Store<Node>) -> (Vec<Target>, Vec<String>) {
    let mut targets = Vec::new();
    let mut issues = Vec::new();
    for node in nodes.state() {
        if node.metadata.deletion_timestamp.is_some() || !spec.selects(node.labels()) {
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
            }),
            None => issues.push(format!(
                "node {} has no AWS providerID ({:?})",
                node.name_any(),
                provider
            )),
        }
    }
    targets.sort_by(|a, b| a.node.cmp(&b.node));
    (targets, issues)
}

/// What a reconcile learned, for status and requeue.
#[derive(Debug, Default)]
struct Outcome {
    /// Per-node problems (missing providerID, no subnet in zone, instance not found).
    issues: Vec<String>,
    /// A resolution failure that stopped all mutations.
    resolve_error: Option<ResolveError>,
    /// Slot problems from this pass: (node, message, reason).
    slot_errors: Vec<(String, String, &'static str)>,
    subnets: BTreeMap<String, Subnet>,
    subnet_ids: Vec<String>,
    security_groups: Vec<String>,
}

/// Reconciles one NodeENI.
pub async fn reconcile<E: Ec2>(obj: Arc<NodeENI>, ctx: Arc<Context<E>>) -> Result<Requeue, Error> {
    let name = obj.name_any();
    let span = info_span!("reconcile", nodeeni = %name, generation = obj.metadata.generation);
    let start = std::time::Instant::now();
    let result = reconcile_inner(obj, &ctx).instrument(span).await;
    ctx.metrics.reconcile(result.is_ok(), start.elapsed());
    result
}

async fn reconcile_inner<E: Ec2>(obj: Arc<NodeENI>, ctx: &Context<E>) -> Result<Requeue, Error> {
    let name = obj.name_any();
    let api: Api<NodeENI> = Api::all(ctx.client.clone());
    let deleting = obj.metadata.deletion_timestamp.is_some();
    let has_finalizer = obj.finalizers().iter().any(|f| f == FINALIZER);
    if deleting && !has_finalizer {
        return Ok(Requeue::await_change());
    }
    if !deleting && !has_finalizer {
        add_finalizer(&api, &obj).await?;
    }
    ctx.nodes.wait_until_ready().await.ok();

    let mut outcome = Outcome::default();
    let (targets, issues) = if deleting {
        (Vec::new(), Vec::new())
    } else {
        select_targets(&obj.spec, &ctx.nodes)
    };
    outcome.issues = issues;

    // Observe instances (batched, cached) and resolve names per VPC.
    let instance_ids: Vec<String> = targets.iter().map(|t| t.instance_id.clone()).collect();
    if !instance_ids.is_empty() {
        ctx.instances.ensure(&ctx.ec2, &instance_ids).await?;
    }
    let mut vpcs: BTreeSet<String> = BTreeSet::new();
    let mut live_targets = Vec::new();
    for t in targets {
        match ctx.instances.get(&t.instance_id) {
            Some(i) => {
                vpcs.insert(i.vpc_id.clone());
                live_targets.push((t, i));
            }
            None => outcome.issues.push(format!(
                "node {}: instance {} not found in EC2",
                t.node, t.instance_id
            )),
        }
    }
    let mut subnets_by_vpc: BTreeMap<String, Vec<Subnet>> = BTreeMap::new();
    let mut settings_by_vpc: BTreeMap<String, Settings> = BTreeMap::new();
    for vpc in &vpcs {
        let resolved = async {
            let subnets = ctx
                .resolver
                .subnets(
                    &ctx.ec2,
                    &obj.spec.subnet_ids(),
                    &obj.spec.subnet_names(),
                    vpc,
                )
                .await?;
            let groups = ctx
                .resolver
                .security_groups(
                    &ctx.ec2,
                    &obj.spec.security_group_ids,
                    &obj.spec.security_group_names,
                    vpc,
                )
                .await?;
            Ok::<_, ResolveError>((subnets, groups))
        }
        .await;
        match resolved {
            Ok((subnets, groups)) => {
                for s in &subnets {
                    outcome.subnets.insert(s.id.clone(), s.clone());
                    if !outcome.subnet_ids.contains(&s.id) {
                        outcome.subnet_ids.push(s.id.clone());
                    }
                }
                for g in &groups {
                    if !outcome.security_groups.contains(g) {
                        outcome.security_groups.push(g.clone());
                    }
                }
                subnets_by_vpc.insert(vpc.clone(), subnets);
                settings_by_vpc.insert(
                    vpc.clone(),
                    Settings {
                        security_groups: groups,
                        description: description(&obj),
                        delete_on_termination: obj.spec.delete_on_termination,
                    },
                );
            }
            Err(ResolveError::Ec2(e)) if e.is_retryable() => return Err(e.into()),
            Err(e) => {
                outcome.resolve_error = Some(e);
                break;
            }
        }
    }

    if let Some(err) = &outcome.resolve_error {
        // Never act on a half-resolved spec: no creates, and no deletes either.
        warn!(error = %err, "cannot resolve subnets or security groups");
        publish(
            ctx,
            &obj,
            EventType::Warning,
            err.reason(),
            "Resolve",
            err.to_string(),
        )
        .await;
        write_status(ctx, &api, &obj, None, &outcome).await?;
        return Ok(Requeue::requeue(Duration::from_secs(60)));
    }

    // Desired slots: per node, the subnets in its VPC and zone, at base + position.
    let mut slots: Vec<(Slot, Settings)> = Vec::new();
    for (t, inst) in &live_targets {
        let here: Vec<&Subnet> = subnets_by_vpc
            .get(&inst.vpc_id)
            .map(|v| {
                v.iter()
                    .filter(|s| s.availability_zone == inst.availability_zone)
                    .collect()
            })
            .unwrap_or_default();
        if here.is_empty() {
            outcome.issues.push(format!(
                "node {}: none of the subnets is in its zone {}",
                t.node, inst.availability_zone
            ));
            continue;
        }
        let Some(settings) = settings_by_vpc.get(&inst.vpc_id) else {
            continue;
        };
        for (k, s) in here.iter().enumerate() {
            slots.push((
                Slot {
                    node: t.node.clone(),
                    instance_id: t.instance_id.clone(),
                    subnet_id: s.id.clone(),
                    device_index: obj.spec.device_index + k as i32,
                    network_card_index: 0,
                },
                settings.clone(),
            ));
        }
    }

    let interim = Outcome {
        issues: outcome.issues.clone(),
        subnets: outcome.subnets.clone(),
        subnet_ids: outcome.subnet_ids.clone(),
        security_groups: outcome.security_groups.clone(),
        ..Outcome::default()
    };
    let plan = {
        let pass = execute_pass(ctx, &obj, &slots, &mut outcome);
        tokio::pin!(pass);
        let mut tick = tokio::time::interval(ctx.config.status_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                plan = &mut pass => break plan,
                _ = tick.tick() => {
                    // Bulk provisioning takes minutes at EC2's rate: report progress.
                    let progress = current_plan(ctx, &name, &slots);
                    if let Err(e) = write_status(ctx, &api, &obj, Some(&progress), &interim).await {
                        debug!(error = %e, "interim status");
                    }
                }
            }
        }
    };

    write_status(ctx, &api, &obj, Some(&plan), &outcome).await?;
    update_gauges(ctx);

    let remaining = lock(&ctx.inventory).owned_by(&name).len();
    if deleting && remaining == 0 {
        remove_finalizer(&api, &obj).await?;
        info!("all ENIs removed; finalizer released");
        return Ok(Requeue::await_change());
    }
    Ok(next_requeue(ctx, &plan, &outcome))
}

fn description(obj: &NodeENI) -> String {
    obj.spec
        .description
        .clone()
        .unwrap_or_else(|| format!("aws-multi-eni: NodeENI {}", obj.name_any()))
}

fn next_requeue<E: Ec2>(ctx: &Context<E>, plan: &Plan, outcome: &Outcome) -> Requeue {
    let blocked = plan
        .slots
        .iter()
        .any(|(_, p)| matches!(p.step, Step::Blocked(_)));
    if !outcome.slot_errors.is_empty() || blocked {
        // Someone else must change something (free an index, a bigger instance, IAM):
        // look again now and then, without a retry storm.
        Requeue::requeue(Duration::from_secs(30))
    } else if !plan.converged() {
        // In-flight attaches and detaches wake us through the poller; this is a backstop.
        Requeue::requeue(Duration::from_secs(5))
    } else {
        Requeue::requeue(ctx.config.resync_period)
    }
}

/// Plans against the inventory and runs the actions, one chain per slot or removal.
/// Returns the plan of the state after the pass.
async fn execute_pass<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    slots: &[(Slot, Settings)],
    outcome: &mut Outcome,
) -> Plan {
    let name = obj.name_any();
    let first = current_plan(ctx, &name, slots);

    // Slot chains.
    let slot_jobs: Vec<(Slot, Settings)> = first
        .slots
        .iter()
        .zip(slots)
        .filter(|((_, p), _)| matches!(p.step, Step::Act(_)))
        .map(|(_, (s, st))| (s.clone(), st.clone()))
        .collect();
    let results: Vec<Option<(String, String, &'static str)>> =
        futures::stream::iter(slot_jobs.into_iter().map(|(slot, settings)| async move {
            run_slot_chain(ctx, obj, &slot, &settings).await.err()
        }))
        .buffer_unordered(ctx.config.parallel_operations.max(1))
        .collect()
        .await;
    outcome.slot_errors.extend(results.into_iter().flatten());

    // Removal chains (including duplicates found while planning slots).
    let removals: Vec<(String, Action)> = current_plan(ctx, &name, slots)
        .removals
        .into_iter()
        .filter_map(|(id, step)| match step {
            Step::Act(a) => Some((id, a)),
            _ => None,
        })
        .collect();
    let results: Vec<Option<(String, String, &'static str)>> = futures::stream::iter(
        removals
            .into_iter()
            .map(|(id, action)| async move { run_removal(ctx, obj, &id, action).await.err() }),
    )
    .buffer_unordered(ctx.config.parallel_cleanups.max(1))
    .collect()
    .await;
    outcome.slot_errors.extend(results.into_iter().flatten());

    current_plan(ctx, &name, slots)
}

/// Plans the NodeENI against the current inventory (pure apart from reading caches).
fn current_plan<E: Ec2>(ctx: &Context<E>, nodeeni: &str, slots: &[(Slot, Settings)]) -> Plan {
    let inventory = lock(&ctx.inventory);
    let enis = inventory.owned_by(nodeeni);
    let stuck = inventory.stuck_detaching(ctx.config.detach_timeout);
    let mut views = BTreeMap::new();
    for (slot, _) in slots {
        if views.contains_key(&slot.instance_id) {
            continue;
        }
        if let Some(inst) = ctx.instances.get(&slot.instance_id) {
            views.insert(
                slot.instance_id.clone(),
                InstanceView {
                    instance_type: inst.instance_type.clone(),
                    attached: merged_attachments(&inst, &inventory),
                    max_enis: ctx
                        .instances
                        .max_enis(&inst.instance_type, slot.network_card_index),
                },
            );
        }
    }
    // Slots of one NodeENI share settings within a VPC; plan each with its own.
    let mut merged = Plan::default();
    let only_slots: Vec<Slot> = slots.iter().map(|(s, _)| s.clone()).collect();
    let fallback = slots.first().map(|(_, st)| st.clone()).unwrap_or(Settings {
        security_groups: Vec::new(),
        description: String::new(),
        delete_on_termination: true,
    });
    let whole = plan::plan(&only_slots, &enis, &fallback, &views, &stuck);
    merged.removals = whole.removals;
    for ((slot, settings), (_, sp)) in slots.iter().zip(whole.slots) {
        let sp = if settings == &fallback {
            sp
        } else {
            let candidates: Vec<&crate::ec2::Eni> =
                enis.iter().filter(|e| plan::claims(e, slot)).collect();
            plan::plan_slot(slot, &candidates, settings, views.get(&slot.instance_id))
        };
        merged.slots.push((slot.clone(), sp));
    }
    merged
}

/// Plans one slot against the current inventory (clones only the slot's own ENIs).
fn slot_plan<E: Ec2>(
    ctx: &Context<E>,
    nodeeni: &str,
    slot: &Slot,
    settings: &Settings,
) -> SlotPlan {
    let inventory = lock(&ctx.inventory);
    let candidates: Vec<crate::ec2::Eni> = inventory
        .all()
        .filter(|e| e.tags.get(tags::NODE_ENI).map(String::as_str) == Some(nodeeni))
        .filter(|e| plan::claims(e, slot))
        .cloned()
        .collect();
    let candidates: Vec<&crate::ec2::Eni> = candidates.iter().collect();
    let view = ctx
        .instances
        .get(&slot.instance_id)
        .map(|inst| InstanceView {
            instance_type: inst.instance_type.clone(),
            attached: merged_attachments(&inst, &inventory),
            max_enis: ctx
                .instances
                .max_enis(&inst.instance_type, slot.network_card_index),
        });
    plan::plan_slot(slot, &candidates, settings, view.as_ref())
}

/// Runs a slot's actions until it is done or blocked: create -> attach -> (wait for
/// the poller to see the attachment) -> set DeleteOnTermination, or a drift fix. One chain
/// per ENI keeps every EC2 bucket busy at once instead of one action kind per pass.
async fn run_slot_chain<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    slot: &Slot,
    settings: &Settings,
) -> Result<(), (String, String, &'static str)> {
    let name = obj.name_any();
    // Bounded: a slot needs at most create, attach, and three modifications.
    for _ in 0..8 {
        // Register interest before looking, so a change in between is not missed.
        let changed = ctx.inventory_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let sp = slot_plan(ctx, &name, slot, settings);
        match sp.step {
            Step::Act(action) => execute_slot_action(ctx, obj, slot, settings, action)
                .await
                .map_err(|(msg, reason)| (slot.node.clone(), msg, reason))?,
            Step::Wait if sp.status == AttachmentStatus::Attaching => {
                if tokio::time::timeout(ATTACH_WAIT, changed).await.is_err() {
                    return Ok(());
                }
            }
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// How long a chain waits for EC2 to finish an attach before leaving it to a later pass.
const ATTACH_WAIT: Duration = Duration::from_secs(30);

async fn execute_slot_action<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    slot: &Slot,
    settings: &Settings,
    action: Action,
) -> Result<(), (String, &'static str)> {
    let name = obj.name_any();
    let op = action.operation();
    let result: Result<(), Ec2Error> = match &action {
        Action::Create => {
            let generation = previous_eni(obj, slot).unwrap_or_default();
            let token = client_token(
                &ctx.config.cluster_name,
                obj.uid().as_deref().unwrap_or(&name),
                slot,
                &generation,
            );
            let new = NewEni {
                subnet_id: slot.subnet_id.clone(),
                security_groups: settings.security_groups.clone(),
                description: settings.description.clone(),
                tags: BTreeMap::from([
                    (tags::CLUSTER.to_string(), ctx.config.cluster_name.clone()),
                    (tags::NODE_ENI.to_string(), name.clone()),
                    (tags::NODE.to_string(), slot.node.clone()),
                    (tags::INSTANCE.to_string(), slot.instance_id.clone()),
                    (
                        tags::DEVICE_INDEX.to_string(),
                        slot.device_index.to_string(),
                    ),
                    (
                        tags::NAME.to_string(),
                        format!("{name}-{}-{}", slot.node, slot.device_index),
                    ),
                ]),
                client_token: token,
            };
            match ctx.ec2.create_eni(new).await {
                Ok(eni) => {
                    let id = eni.id.clone();
                    lock(&ctx.inventory).upsert(eni);
                    publish(
                        ctx,
                        obj,
                        EventType::Normal,
                        "Created",
                        "CreateNetworkInterface",
                        format!(
                            "created {id} in {} for node {} (device index {})",
                            slot.subnet_id, slot.node, slot.device_index
                        ),
                    )
                    .await;
                    Ok(())
                }
                Err(e) => {
                    if e.kind == ErrorKind::NotFound {
                        ctx.resolver.invalidate();
                    }
                    Err(e)
                }
            }
        }
        Action::Attach { eni_id } => {
            match ctx
                .ec2
                .attach_eni(
                    eni_id.clone(),
                    slot.instance_id.clone(),
                    slot.device_index,
                    slot.network_card_index,
                )
                .await
            {
                Ok(attachment_id) => {
                    lock(&ctx.inventory).update(eni_id, |e| {
                        e.status = "in-use".into();
                        e.attachment = Some(Attachment {
                            id: attachment_id.clone(),
                            instance_id: slot.instance_id.clone(),
                            device_index: slot.device_index,
                            network_card_index: slot.network_card_index,
                            state: AttachmentState::Attaching,
                            // AttachNetworkInterface leaves it false.
                            delete_on_termination: false,
                        });
                    });
                    ctx.in_flight.notify_one();
                    publish(
                        ctx,
                        obj,
                        EventType::Normal,
                        "Attached",
                        "AttachNetworkInterface",
                        format!(
                            "attached {eni_id} to {} ({}) at device index {}",
                            slot.node, slot.instance_id, slot.device_index
                        ),
                    )
                    .await;
                    Ok(())
                }
                Err(e) => {
                    match e.kind {
                        ErrorKind::NotFound => {
                            lock(&ctx.inventory).remove(eni_id);
                        }
                        ErrorKind::DeviceIndexInUse | ErrorKind::AttachmentLimit => {
                            // The cache missed someone else's ENI: describe again next time.
                            ctx.instances.invalidate(&slot.instance_id);
                        }
                        _ => {}
                    }
                    Err(e)
                }
            }
        }
        Action::SetDeleteOnTermination {
            eni_id,
            attachment_id,
            delete,
        } => ctx
            .ec2
            .set_delete_on_termination(eni_id.clone(), attachment_id.clone(), *delete)
            .await
            .map(|()| {
                lock(&ctx.inventory).update(eni_id, |e| {
                    if let Some(a) = e.attachment.as_mut() {
                        a.delete_on_termination = *delete;
                    }
                });
            }),
        Action::SetSecurityGroups { eni_id, groups } => ctx
            .ec2
            .set_security_groups(eni_id.clone(), groups.clone())
            .await
            .map(|()| {
                lock(&ctx.inventory).update(eni_id, |e| e.security_groups = groups.clone());
            }),
        Action::SetDescription {
            eni_id,
            description,
        } => ctx
            .ec2
            .set_description(eni_id.clone(), description.clone())
            .await
            .map(|()| {
                lock(&ctx.inventory).update(eni_id, |e| e.description = description.clone());
            }),
        Action::Detach { .. } | Action::Delete { .. } => {
            let eni_id = match &action {
                Action::Detach { eni_id, .. } | Action::Delete { eni_id } => eni_id.clone(),
                _ => String::new(),
            };
            return run_removal(ctx, obj, &eni_id, action)
                .await
                .map_err(|(_, msg, reason)| (msg, reason));
        }
    };
    if matches!(
        action,
        Action::SetDeleteOnTermination { .. }
            | Action::SetSecurityGroups { .. }
            | Action::SetDescription { .. }
    ) && result.is_ok()
    {
        debug!(?action, "modified ENI");
        let what = match &action {
            Action::SetDeleteOnTermination { eni_id, delete, .. } => {
                format!("set DeleteOnTermination={delete} on {eni_id}")
            }
            Action::SetSecurityGroups { eni_id, groups } => {
                format!("set security groups of {eni_id} to {}", groups.join(","))
            }
            Action::SetDescription { eni_id, .. } => format!("updated description of {eni_id}"),
            _ => String::new(),
        };
        publish(ctx, obj, EventType::Normal, "Modified", op, what).await;
    }
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            let reason = match e.kind {
                ErrorKind::DeviceIndexInUse => condition::DEVICE_INDEX_IN_USE,
                ErrorKind::AttachmentLimit => condition::INSTANCE_ENI_LIMIT,
                _ => condition::EC2_ERROR,
            };
            let msg = format!("node {}: {e}", slot.node);
            warn!(operation = op, error = %msg, "EC2 action failed");
            publish(
                ctx,
                obj,
                EventType::Warning,
                &format!("{}Failed", verb(&action)),
                op,
                msg.clone(),
            )
            .await;
            Err((msg, reason))
        }
    }
}

/// Short verb for event reasons (`CreateFailed`, `AttachFailed`, ...).
fn verb(action: &Action) -> &'static str {
    match action {
        Action::Create => "Create",
        Action::Attach { .. } => "Attach",
        Action::SetDeleteOnTermination { .. }
        | Action::SetSecurityGroups { .. }
        | Action::SetDescription { .. } => "Modify",
        Action::Detach { .. } => "Detach",
        Action::Delete { .. } => "Delete",
    }
}

/// The ENI a slot had before (from status), so a replacement gets a new client token.
fn previous_eni(obj: &NodeENI, slot: &Slot) -> Option<String> {
    obj.status.as_ref().and_then(|s| {
        s.attachments
            .iter()
            .find(|a| {
                a.node_id == slot.node
                    && a.subnet_id == slot.subnet_id
                    && a.device_index == slot.device_index
                    && !a.eni_id.is_empty()
            })
            .map(|a| a.eni_id.clone())
    })
}

/// Runs one removal step: detach (then wait for the poller) or delete.
async fn run_removal<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    eni_id: &str,
    action: Action,
) -> Result<(), (String, String, &'static str)> {
    let node = lock(&ctx.inventory)
        .get(eni_id)
        .and_then(|e| e.tags.get(tags::NODE).cloned())
        .unwrap_or_default();
    let result = match &action {
        Action::Detach {
            attachment_id,
            force,
            ..
        } => match ctx.ec2.detach_eni(attachment_id.clone(), *force).await {
            Ok(()) => {
                lock(&ctx.inventory).update(eni_id, |e| {
                    if let Some(a) = e.attachment.as_mut() {
                        a.state = AttachmentState::Detaching;
                    }
                });
                ctx.in_flight.notify_one();
                let how = if *force { "force-detached" } else { "detached" };
                publish(
                    ctx,
                    obj,
                    EventType::Normal,
                    "Detached",
                    "DetachNetworkInterface",
                    format!("{how} {eni_id} from node {node}"),
                )
                .await;
                Ok(())
            }
            Err(e) if e.kind == ErrorKind::NotFound => {
                // Already detached: learn its real state.
                refresh_eni(ctx, eni_id).await;
                Ok(())
            }
            Err(e) => Err(e),
        },
        Action::Delete { .. } => match ctx.ec2.delete_eni(eni_id.to_string()).await {
            Ok(()) => {
                lock(&ctx.inventory).remove(eni_id);
                publish(
                    ctx,
                    obj,
                    EventType::Normal,
                    "Deleted",
                    "DeleteNetworkInterface",
                    format!("deleted {eni_id} (node {node})"),
                )
                .await;
                Ok(())
            }
            Err(e) if e.kind == ErrorKind::NotFound => {
                lock(&ctx.inventory).remove(eni_id);
                Ok(())
            }
            Err(e) if e.kind == ErrorKind::InUse => {
                // Attached after all (e.g. by someone else): learn how, detach next pass.
                refresh_eni(ctx, eni_id).await;
                Ok(())
            }
            Err(e) => Err(e),
        },
        _ => Ok(()),
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            let msg = format!("removing {eni_id} (node {node}): {e}");
            warn!(error = %msg, "EC2 action failed");
            publish(
                ctx,
                obj,
                EventType::Warning,
                "RemoveFailed",
                action.operation(),
                msg.clone(),
            )
            .await;
            Err((node, msg, condition::EC2_ERROR))
        }
    }
}

/// Describes one ENI again and records the answer.
async fn refresh_eni<E: Ec2>(ctx: &Context<E>, eni_id: &str) {
    let ids = vec![eni_id.to_string()];
    let asked = tokio::time::Instant::now();
    if let Ok(found) = ctx
        .ec2
        .describe_enis(crate::ec2::EniQuery::Ids(ids.clone()))
        .await
    {
        lock(&ctx.inventory).refresh(&ids, found, asked);
    }
}

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

async fn add_finalizer(api: &Api<NodeENI>, obj: &NodeENI) -> Result<(), kube::Error> {
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

async fn remove_finalizer(api: &Api<NodeENI>, obj: &NodeENI) -> Result<(), kube::Error> {
    let finalizers: Vec<&String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch = serde_json::json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": obj.resource_version(),
        }
    });
    ignore_gone(
        api.patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await,
    )
}

/// A write to a NodeENI deleted meanwhile has nothing left to do.
fn ignore_gone<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Builds and writes the status when it changed.
async fn write_status<E: Ec2>(
    ctx: &Context<E>,
    api: &Api<NodeENI>,
    obj: &NodeENI,
    plan: Option<&Plan>,
    outcome: &Outcome,
) -> Result<(), kube::Error> {
    let old = obj.status.clone().unwrap_or_default();
    let status = build_status(ctx, obj, plan, outcome, &old);
    if status == old {
        return Ok(());
    }
    let patch = serde_json::json!({ "status": {
        "observedGeneration": status.observed_generation,
        "conditions": status.conditions,
        "desiredAttachments": status.desired_attachments,
        "readyAttachments": status.ready_attachments,
        "subnetIDs": status.subnet_ids,
        "securityGroupIDs": status.security_group_ids,
        "attachments": status.attachments,
    }});
    ignore_gone(
        api.patch_status(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await,
    )
}

fn build_status<E: Ec2>(
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
                    Blocked::DeviceIndexInUse { eni_id } => (
                        format!(
                            "node {}: device index {} is in use by {eni_id}",
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
            attachments.push(entry(
                &slot.node,
                &slot.instance_id,
                &slot.subnet_id,
                slot.device_index,
                sp.eni_id.as_deref(),
                sp.status,
            ));
        }
        for (id, _) in &plan.removals {
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
                    plan::removal_status(e),
                ));
            }
        }
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

    let (status, reason, message) = if obj.metadata.deletion_timestamp.is_some() {
        (
            "False",
            condition::DELETING,
            format!("removing {} ENI(s)", attachments.len()),
        )
    } else if let Some(err) = &outcome.resolve_error {
        ("False", err.reason(), err.to_string())
    } else {
        let mut problems: Vec<(String, &'static str)> = outcome
            .slot_errors
            .iter()
            .map(|(_, m, r)| (m.clone(), *r))
            .collect();
        problems.extend(blocked);
        problems.extend(
            outcome
                .issues
                .iter()
                .map(|i| (i.clone(), condition::INVALID_PROVIDER_ID)),
        );
        let converged = plan.is_some_and(Plan::converged);
        if !problems.is_empty() {
            let shown: Vec<&str> = problems.iter().take(5).map(|(m, _)| m.as_str()).collect();
            let more = problems.len().saturating_sub(5);
            let mut message = format!("{ready} of {desired} ENIs attached; {}", shown.join("; "));
            if more > 0 {
                message.push_str(&format!("; and {more} more"));
            }
            let reason = problems[0].1;
            let status = if converged
                && problems
                    .iter()
                    .all(|(_, r)| *r == condition::INVALID_PROVIDER_ID)
            {
                // Nodes without an instance cannot get ENIs; the others are fine.
                "True"
            } else {
                "False"
            };
            (status, reason, message)
        } else if desired == 0 && converged {
            (
                "True",
                condition::NO_MATCHING_NODES,
                "no Node matches the nodeSelector".to_string(),
            )
        } else if converged {
            (
                "True",
                condition::ALL_ATTACHED,
                format!("{ready} of {desired} ENIs attached"),
            )
        } else {
            (
                "False",
                condition::PROGRESSING,
                format!("{ready} of {desired} ENIs attached"),
            )
        }
    };
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
    NodeENIStatus {
        observed_generation: generation,
        conditions: vec![ready_condition],
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

fn update_gauges<E: Ec2>(ctx: &Context<E>) {
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

/// Requeue policy for failed reconciles: exponential-ish by error kind.
pub fn error_policy<E: Ec2>(obj: Arc<NodeENI>, err: &Error, _ctx: Arc<Context<E>>) -> Requeue {
    warn!(nodeeni = %obj.name_any(), error = %err, "reconcile failed");
    Requeue::requeue(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_id_from_provider_id() {
        assert_eq!(
            instance_id("aws:///us-east-1a/i-0abc123").as_deref(),
            Some("i-0abc123")
        );
        assert_eq!(instance_id("aws:///i-0abc").as_deref(), Some("i-0abc"));
        assert_eq!(instance_id("gce://p/z/n"), None);
        assert_eq!(instance_id(""), None);
        assert_eq!(instance_id("aws:///us-east-1a/"), None);
    }

    #[test]
    fn client_tokens_are_stable_and_distinct() {
        let slot = Slot {
            node: "n".into(),
            instance_id: "i-1".into(),
            subnet_id: "subnet-1".into(),
            device_index: 1,
            network_card_index: 0,
        };
        let a = client_token("c", "uid", &slot, "");
        assert_eq!(a, client_token("c", "uid", &slot, ""));
        assert_eq!(a.len(), 64);
        assert_ne!(a, client_token("c", "uid", &slot, "eni-old"));
        assert_ne!(a, client_token("c2", "uid", &slot, ""));
    }
}
