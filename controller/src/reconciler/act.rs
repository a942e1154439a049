//! Act: run the planned EC2 actions, one chain per ENI (create -> attach -> modify) or
//! removal (detach -> delete), keeping the inventory current from the answers.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use eni_api::{AttachmentStatus, NodeENI, tags};
use futures::{FutureExt, StreamExt};
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::{debug, info, warn};

use super::report::publish;
use super::{Context, Outcome, SlotKey, slot_key};
use crate::ec2::{Attachment, AttachmentState, Ec2, Ec2Error, ErrorKind, NewEni};
use crate::inventory::{lock, merged_attachments};
use crate::plan::{self, Action, Held, InstanceView, Plan, Settings, Slot, SlotPlan, Step};
use eni_api::condition;

/// A fresh `ClientToken` for a create: 32 random hex characters. A token is minted
/// whenever a new ENI is really wanted and recorded in status before it is sent, so a
/// create retried after a timeout or a crash returns the same ENI, and a slot that
/// wants an ENI again (its ENI was deleted, or the slot left and came back) never
/// replays an answer for an ENI that is gone.
pub fn new_token() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Picks the client token of every slot the plan creates: the one recorded in status
/// while no ENI is known to have come of it, a new one otherwise. Returns whether a new
/// token was minted (status must record it before the create is sent).
pub(super) fn assign_tokens(obj: &NodeENI, plan: &Plan, outcome: &mut Outcome) -> bool {
    let recorded = obj
        .status
        .as_ref()
        .map(|s| s.attachments.as_slice())
        .unwrap_or_default();
    let mut minted = false;
    for (slot, sp) in &plan.slots {
        if sp.step != Step::Act(Action::Create) {
            continue;
        }
        let key = slot_key(slot);
        let entry = recorded.iter().find(|a| {
            (a.node_id.as_str(), a.subnet_id.as_str(), a.device_index)
                == (key.0.as_str(), key.1.as_str(), key.2)
        });
        // Spent: an ENI came of the token, and a create is planned, so that ENI is gone
        // or no longer serves the slot (e.g. the Node was replaced under its name).
        let reusable = entry.and_then(|a| {
            let token = a.client_token.as_ref()?;
            a.eni_id.is_empty().then(|| token.clone())
        });
        let token = match reusable {
            Some(t) => t,
            None => {
                minted = true;
                new_token()
            }
        };
        outcome.tokens.insert(key, token);
    }
    minted
}

/// Plans against the inventory and runs the actions, one chain per slot or removal.
/// Returns the plan of the state after the pass.
pub(super) async fn execute_pass<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    slots: &[(Slot, Settings)],
    held: &Held,
    outcome: &mut Outcome,
    tokens: &Mutex<BTreeMap<SlotKey, String>>,
) -> Plan {
    let name = obj.name_any();
    let first = current_plan(ctx, &name, slots, held);

    // Slot chains.
    let slot_jobs: Vec<(Slot, Settings)> = first
        .slots
        .iter()
        .zip(slots)
        .filter(|((_, p), _)| matches!(p.step, Step::Act(_)))
        .map(|(_, (s, st))| (s.clone(), st.clone()))
        .collect();
    // Slot chains and removal chains (including duplicates found while planning slots)
    // run side by side, every chain started at once behind the rate limiter, so the
    // create/attach and detach/delete buckets are all busy together.
    let removal_ids: Vec<String> = first.removals.iter().map(|(id, _)| id.clone()).collect();
    let slot_chains = futures::stream::iter(slot_jobs.into_iter().map(|(slot, settings)| {
        async move {
            run_slot_chain(ctx, obj, &slot, &settings, tokens)
                .await
                .err()
                .map(ChainError::from)
        }
        .boxed()
    }))
    .buffer_unordered(ctx.config.parallel_operations.max(1))
    .collect::<Vec<Option<ChainError>>>();
    let removal_chains = futures::stream::iter(removal_ids.into_iter().map(|id| {
        async move {
            run_removal_chain(ctx, obj, &id)
                .await
                .err()
                .map(ChainError::from)
        }
        .boxed()
    }))
    .buffer_unordered(ctx.config.parallel_cleanups.max(1))
    .collect::<Vec<Option<ChainError>>>();
    let (slot_results, removal_results) = futures::join!(slot_chains, removal_chains);
    outcome.slot_errors.extend(
        slot_results
            .into_iter()
            .chain(removal_results)
            .flatten()
            .map(|e| (e.node, e.message, e.reason)),
    );
    current_plan(ctx, &name, slots, held)
}

/// Plans the NodeENI against the current inventory (pure apart from reading caches).
pub(super) fn current_plan<E: Ec2>(
    ctx: &Context<E>,
    nodeeni: &str,
    slots: &[(Slot, Settings)],
    held: &Held,
) -> Plan {
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
    let whole = plan::plan(&only_slots, &enis, &fallback, &views, &stuck, held);
    merged.removals = whole.removals;
    merged.held = whole.held;
    for ((slot, settings), (_, sp)) in slots.iter().zip(whole.slots) {
        let sp = if settings == &fallback {
            sp
        } else {
            let candidates: Vec<&crate::ec2::Eni> =
                enis.iter().filter(|e| plan::claims(e, slot)).collect();
            plan::plan_slot(
                slot,
                &candidates,
                settings,
                views.get(&slot.instance_id),
                &stuck,
            )
        };
        merged.slots.push((slot.clone(), sp));
    }
    merged
}

/// Plans one slot against the current inventory (clones only the slot's own ENIs).
pub(super) fn slot_plan<E: Ec2>(
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
    let stuck = inventory.stuck_detaching(ctx.config.detach_timeout);
    plan::plan_slot(slot, &candidates, settings, view.as_ref(), &stuck)
}

/// Runs a slot's actions until it is done or blocked: create -> attach -> (wait for
/// the poller to see the attachment) -> set DeleteOnTermination, or a drift fix. One chain
/// per ENI keeps every EC2 bucket busy at once instead of one action kind per pass.
pub(super) async fn run_slot_chain<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    slot: &Slot,
    settings: &Settings,
    tokens: &Mutex<BTreeMap<SlotKey, String>>,
) -> Result<(), (String, String, &'static str)> {
    let name = obj.name_any();
    // Bounded by actions (a slot needs at most create, attach and three modifications,
    // plus a retry with a new token) and by how long it waits for EC2, not by wake-ups:
    // the poller wakes every waiting chain after each poll.
    // The wait for EC2 is timed from the action it waits on: a chain may queue for its
    // first token for minutes in bulk provisioning, which is not EC2 being slow.
    let mut actions = 0;
    let mut deadline = None;
    loop {
        // Register interest before looking, so a change in between is not missed.
        let changed = ctx.inventory_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let sp = slot_plan(ctx, &name, slot, settings);
        match sp.step {
            Step::Act(_) if actions >= MAX_CHAIN_ACTIONS => return Ok(()),
            Step::Act(action) => {
                actions += 1;
                execute_slot_action(ctx, obj, slot, settings, action, tokens)
                    .await
                    .map_err(|(msg, reason)| (slot.node.clone(), msg, reason))?;
                deadline = Some(tokio::time::Instant::now() + ATTACH_WAIT);
            }
            Step::Wait if sp.status == AttachmentStatus::Attaching => {
                let until =
                    *deadline.get_or_insert_with(|| tokio::time::Instant::now() + ATTACH_WAIT);
                if tokio::time::timeout_at(until, changed).await.is_err() {
                    return Ok(());
                }
            }
            _ => return Ok(()),
        }
    }
}

/// Runs an ENI's removal until it is gone or waits on someone else: detach -> (wait for
/// the poller to see it detached; forced once the detachment timeout passed) -> delete.
pub(super) async fn run_removal_chain<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    eni_id: &str,
) -> Result<(), (String, String, &'static str)> {
    // Bounded by actions (detach, forced detach, delete) and by a deadline past the
    // detachment timeout, not by wake-ups.
    // Like the slot chain's, the wait is timed from the last action, not from the chain's
    // start (which may be long before its first token).
    let wait = ATTACH_WAIT.max(ctx.config.detach_timeout + Duration::from_secs(1));
    let mut actions = 0;
    let mut deadline = tokio::time::Instant::now() + wait;
    loop {
        let changed = ctx.inventory_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let step = {
            let inventory = lock(&ctx.inventory);
            let Some(eni) = inventory.get(eni_id) else {
                return Ok(());
            };
            let stuck = inventory
                .stuck_detaching(ctx.config.detach_timeout)
                .contains(eni_id);
            plan::plan_removal(eni, stuck)
        };
        match step {
            Step::Act(_) if actions >= MAX_CHAIN_ACTIONS => return Ok(()),
            Step::Act(action) => {
                actions += 1;
                run_removal(ctx, obj, eni_id, action).await?;
                deadline = tokio::time::Instant::now() + wait;
            }
            Step::Wait => {
                // Wake when the poller sees the detach finish, or when the detachment
                // timeout makes a forced detach due.
                let due = lock(&ctx.inventory)
                    .detach_due(eni_id, ctx.config.detach_timeout)
                    .unwrap_or(deadline)
                    .min(deadline);
                if tokio::time::timeout_at(due, changed).await.is_err()
                    && tokio::time::Instant::now() >= deadline
                {
                    return Ok(());
                }
            }
            _ => return Ok(()),
        }
    }
}

/// Most EC2 actions one chain takes in a pass.
const MAX_CHAIN_ACTIONS: usize = 6;

/// A chain's failure. A named type (not a tuple with a `&'static str`) so the futures
/// that carry it stay `Send` for every lifetime the compiler picks.
#[derive(Debug)]
pub(super) struct ChainError {
    node: String,
    message: String,
    reason: &'static str,
}

impl From<(String, String, &'static str)> for ChainError {
    fn from((node, message, reason): (String, String, &'static str)) -> Self {
        Self {
            node,
            message,
            reason,
        }
    }
}

/// How long a chain waits for EC2 to finish an attach before leaving it to a later pass.
pub(super) const ATTACH_WAIT: Duration = Duration::from_secs(30);

pub(super) async fn execute_slot_action<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    slot: &Slot,
    settings: &Settings,
    action: Action,
    tokens: &Mutex<BTreeMap<SlotKey, String>>,
) -> Result<(), (String, &'static str)> {
    let op = action.operation();
    let result: Result<(), Ec2Error> = match &action {
        Action::Create => create(ctx, obj, slot, settings, tokens).await,
        Action::Attach { eni_id } => attach(ctx, obj, slot, eni_id, tokens).await,
        Action::SetDeleteOnTermination { .. }
        | Action::SetSecurityGroups { .. }
        | Action::SetDescription { .. } => modify(ctx, &action).await,
        Action::Detach { eni_id, .. } | Action::Delete { eni_id } => {
            return run_removal(ctx, obj, eni_id, action.clone())
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
        // A replica whose Lease term ran out stops quietly; the new leader carries on.
        Err(e) if e.kind == ErrorKind::NotLeader => Err((e.to_string(), condition::EC2_ERROR)),
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

/// Creates the slot's ENI with its client token and ownership tags.
async fn create<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    slot: &Slot,
    settings: &Settings,
    tokens: &Mutex<BTreeMap<SlotKey, String>>,
) -> Result<(), Ec2Error> {
    let name = obj.name_any();
    let key = slot_key(slot);
    let token = lock(tokens)
        .entry(key.clone())
        .or_insert_with(new_token)
        .clone();
    let new = NewEni {
        subnet_id: slot.subnet_id.clone(),
        security_groups: settings.security_groups.clone(),
        description: settings.description.clone(),
        tags: {
            let mut t = super::adopt::ownership_tags(
                &ctx.config.cluster_name,
                &ctx.config.cluster_id,
                &name,
                &slot.node,
                &slot.instance_id,
                slot.device_index,
            );
            t.insert(
                tags::NAME.to_string(),
                format!("{name}-{}-{}", slot.node, slot.device_index),
            );
            t
        },
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
        // The token was first sent with other settings (the spec changed in
        // between): the create that is wanted now needs a new one.
        Err(e) if e.kind == ErrorKind::TokenMismatch => {
            info!(slot = ?key, "client token sent before with other settings: using a new one");
            lock(tokens).insert(key.clone(), new_token());
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

/// Attaches the slot's ENI at its device index.
async fn attach<E: Ec2>(
    ctx: &Context<E>,
    obj: &NodeENI,
    slot: &Slot,
    eni_id: &String,
    tokens: &Mutex<BTreeMap<SlotKey, String>>,
) -> Result<(), Ec2Error> {
    let key = slot_key(slot);
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
        Err(e) if e.kind == ErrorKind::NotFound => {
            // Gone, or EC2 replayed the answer of a create whose ENI was deleted
            // since: make sure, then the slot needs a new token.
            refresh_eni(ctx, eni_id).await;
            if lock(&ctx.inventory).get(eni_id).is_none() {
                info!(eni = %eni_id, slot = ?key, "ENI to attach is gone: creating anew with a new client token");
                lock(tokens).insert(key.clone(), new_token());
                Ok(())
            } else {
                Err(e)
            }
        }
        Err(e) => {
            match e.kind {
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

/// Corrects one setting of an attached ENI in place.
async fn modify<E: Ec2>(ctx: &Context<E>, action: &Action) -> Result<(), Ec2Error> {
    match action {
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
        _ => Ok(()),
    }
}

/// Short verb for event reasons (`CreateFailed`, `AttachFailed`, ...).
pub(super) fn verb(action: &Action) -> &'static str {
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

/// Runs one removal step: detach (then wait for the poller) or delete.
pub(super) async fn run_removal<E: Ec2>(
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
                {
                    let mut inventory = lock(&ctx.inventory);
                    inventory.update(eni_id, |e| {
                        if let Some(a) = e.attachment.as_mut() {
                            a.state = AttachmentState::Detaching;
                        }
                    });
                    if *force {
                        // Force again only if this one also outlasts the timeout.
                        inventory.restart_detach_timer(eni_id);
                    }
                }
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
                ctx.instances.forget_eni(eni_id);
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
                ctx.instances.forget_eni(eni_id);
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
pub(super) async fn refresh_eni<E: Ec2>(ctx: &Context<E>, eni_id: &str) {
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
