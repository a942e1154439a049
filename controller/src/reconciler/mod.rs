//! NodeENI reconcile: observe -> [`plan`] -> execute -> report.
//!
//! One reconcile handles one NodeENI. It reads the selected Nodes from the reflector
//! store and the ENIs from the in-memory [`Inventory`], so a pass with nothing to do
//! makes no EC2 call. Actions run as per-ENI chains (create -> attach -> modify) with
//! bounded parallelism; a pass stops starting new chains after a time budget so status
//! is written regularly while a large NodeENI converges.

mod act;
pub mod adopt;
mod observe;
mod pool;
mod report;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eni_api::{ENIAttachment, FINALIZER, NodeENI};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::Store;
use tokio::sync::Notify;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::ec2::{Ec2, Ec2Error, Subnet};
use crate::inventory::{Instances, SharedInventory, lock};
use crate::metrics::Metrics;
use crate::plan::{Plan, Slot, Step};
use crate::resolve::{ResolveError, Resolver};

pub use act::new_token;
use act::{assign_tokens, current_plan, execute_pass};
use observe::observe;
use report::{
    add_finalizer, publish, remove_finalizer, report_failure, update_gauges, write_status,
};

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
    /// Value of the cluster identity tag (the `kube-system` namespace's UID).
    pub cluster_id: String,
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
    /// Consecutive failed reconciles per NodeENI, for the error policy's backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl<E: Ec2> std::fmt::Debug for Context<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a reconcile learned, for status and requeue.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// Problems resolving names and IDs, one per distinct message: (message, reason).
    /// They come first in the Ready condition.
    resolve_errors: Vec<(String, &'static str)>,
    /// Per-node problems (missing providerID, no subnet in zone, instance not found):
    /// (message, reason).
    issues: Vec<(String, &'static str)>,
    /// Slot problems from this pass: (node, message, reason).
    slot_errors: Vec<(String, String, &'static str)>,
    subnets: BTreeMap<String, Subnet>,
    subnet_ids: Vec<String>,
    security_groups: Vec<String>,
    /// The `ClientToken` of each slot's next create, to record in status.
    tokens: BTreeMap<SlotKey, String>,
    /// Status entries of ENIs this controller does not own and could not adopt (see
    /// [`adopt`]): kept listed, and the finalizer kept, until they are gone.
    unadopted: Vec<ENIAttachment>,
    /// Pod address pools to publish, by ENI (`spec.ipam`; see [`pool`]). Starts as the
    /// pools status lists, so interim writes keep them.
    pools: BTreeMap<String, eni_api::EniPool>,
    /// The IPAM condition, when the NodeENI has `spec.ipam`.
    ipam: Option<pool::IpamVerdict>,
    /// A pool is being filled or shrunk, or a call failed: look again soon.
    pools_pending: bool,
}

impl Outcome {
    fn resolve_error(&mut self, e: &ResolveError) {
        let message = e.to_string();
        if !self.resolve_errors.iter().any(|(m, _)| *m == message) {
            self.resolve_errors.push((message, e.reason()));
        }
    }

    /// The same outcome without this pass's slot errors, for interim status.
    fn interim(&self) -> Outcome {
        Outcome {
            resolve_errors: self.resolve_errors.clone(),
            issues: self.issues.clone(),
            slot_errors: Vec::new(),
            subnets: self.subnets.clone(),
            subnet_ids: self.subnet_ids.clone(),
            security_groups: self.security_groups.clone(),
            tokens: self.tokens.clone(),
            unadopted: self.unadopted.clone(),
            pools: self.pools.clone(),
            ipam: self.ipam.clone(),
            pools_pending: self.pools_pending,
        }
    }
}

/// A slot as status records it: (node, subnet, device index).
pub(super) type SlotKey = (String, String, i32);

pub(super) fn slot_key(slot: &Slot) -> SlotKey {
    (slot.node.clone(), slot.subnet_id.clone(), slot.device_index)
}

/// Instance ID from a providerID like `aws:///us-east-1a/i-0abc`.
pub fn instance_id(provider_id: &str) -> Option<String> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    (id.starts_with("i-") && id.len() > 2).then(|| id.to_string())
}

/// Reconciles one NodeENI.
pub async fn reconcile<E: Ec2>(obj: Arc<NodeENI>, ctx: Arc<Context<E>>) -> Result<Requeue, Error> {
    let name = obj.name_any();
    let span = info_span!("reconcile", nodeeni = %name, generation = obj.metadata.generation);
    let start = std::time::Instant::now();
    let result = reconcile_inner(obj.clone(), &ctx)
        .instrument(span.clone())
        .await;
    ctx.metrics.reconcile(result.is_ok(), start.elapsed());
    match &result {
        Ok(_) => {
            lock(&ctx.failures).remove(&name);
        }
        // Whatever failed before the status write still reaches the user.
        Err(e) => report_failure(&ctx, &obj, e).instrument(span).await,
    }
    result
}

async fn reconcile_inner<E: Ec2>(obj: Arc<NodeENI>, ctx: &Context<E>) -> Result<Requeue, Error> {
    let name = obj.name_any();
    let api: Api<NodeENI> = Api::all(ctx.client.clone());
    let deleting = obj.metadata.deletion_timestamp.is_some();
    let has_finalizer = obj.finalizers().iter().any(|f| f == FINALIZER);
    debug!(deleting, has_finalizer, "reconcile");
    if deleting && !has_finalizer {
        return Ok(Requeue::await_change());
    }
    if !deleting && !has_finalizer {
        add_finalizer(&api, &obj).await?;
    }
    ctx.nodes.wait_until_ready().await.ok();

    // Observe.
    let mut outcome = Outcome {
        pools: pool::published(&obj),
        ..Outcome::default()
    };
    adopt::adopt(ctx, &obj, &mut outcome).await?;
    let observed = observe(ctx, &obj, &mut outcome).await?;
    debug!(slots = observed.slots.len(), "observed");
    for (message, _) in &outcome.resolve_errors {
        warn!(error = %message, "cannot resolve a subnet or security group");
    }
    if let Some((message, reason)) = outcome.resolve_errors.first() {
        publish(
            ctx,
            &obj,
            EventType::Warning,
            reason,
            "Resolve",
            message.clone(),
        )
        .await;
    }

    // Plan, and record the client token of every create before sending it.
    let slots = &observed.slots;
    let first = current_plan(ctx, &name, slots, &observed.held);
    // The object as last written in this pass: later writes compare with it.
    let mut last: Option<NodeENI> = None;
    if assign_tokens(&obj, &first, &mut outcome) {
        last = write_status(ctx, &api, &obj, None, Some(&first), &outcome.interim()).await?;
    }

    // Act, reporting progress while a long pass runs.
    // The chains replace a token EC2 refuses; progress reports show the current ones.
    let tokens = Mutex::new(std::mem::take(&mut outcome.tokens));
    let plan = {
        let interim = outcome.interim();
        let pass = execute_pass(ctx, &obj, slots, &observed.held, &mut outcome, &tokens);
        tokio::pin!(pass);
        let mut tick = tokio::time::interval(ctx.config.status_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                plan = &mut pass => break plan,
                _ = tick.tick() => {
                    // Bulk provisioning takes minutes at EC2's rate: report progress.
                    let progress = current_plan(ctx, &name, slots, &observed.held);
                    let mut now = interim.interim();
                    now.tokens = lock(&tokens).clone();
                    match write_status(ctx, &api, &obj, last.as_ref(), Some(&progress), &now).await {
                        Ok(Some(o)) => last = Some(o),
                        Ok(None) => {}
                        Err(e) => debug!(error = %e, "interim status"),
                    }
                }
            }
        }
    };
    outcome.tokens = tokens.into_inner().unwrap_or_else(|e| e.into_inner());

    debug!("pass done");
    // Blocked slots wait for someone else's ENI to go: look at their instances afresh
    // on the next pass.
    for (slot, sp) in &plan.slots {
        if matches!(sp.step, Step::Blocked(_)) {
            ctx.instances.invalidate(&slot.instance_id);
        }
    }

    // Pod address pools of the attached ENIs.
    pool::pools(ctx, &obj, &mut outcome).await;

    // Report.
    let latest = write_status(ctx, &api, &obj, last.as_ref(), Some(&plan), &outcome)
        .await?
        .or(last);
    update_gauges(ctx);
    let labels = crate::metrics::NodeEniLabels {
        nodeeni: name.clone(),
    };
    ctx.metrics
        .desired_enis
        .get_or_create(&labels)
        .set(plan.slots.len() as i64);
    ctx.metrics.ready_enis.get_or_create(&labels).set(
        plan.slots
            .iter()
            .filter(|(_, p)| p.status == eni_api::AttachmentStatus::Attached)
            .count() as i64,
    );

    let remaining = lock(&ctx.inventory).owned_by(&name).len();
    if deleting && remaining == 0 && outcome.unadopted.is_empty() && !leftovers(ctx, &name).await? {
        remove_finalizer(&api, latest.as_ref().unwrap_or(&obj)).await?;
        ctx.metrics.desired_enis.remove(&labels);
        ctx.metrics.ready_enis.remove(&labels);
        info!("all ENIs removed; finalizer released");
        return Ok(Requeue::await_change());
    }
    let requeue = next_requeue(ctx, &plan, &outcome);
    debug!(
        nodes = ctx.nodes.state().len(),
        slots = plan.slots.len(),
        issues = outcome.issues.len(),
        ?requeue,
        "reconciled"
    );
    Ok(requeue)
}

/// Before the finalizer goes: whether EC2 still has an ENI of this NodeENI that the
/// inventory does not know (a create that timed out but succeeded, a listing that
/// lagged). One describe per deletion; what it finds is taken into the inventory.
async fn leftovers<E: Ec2>(ctx: &Context<E>, name: &str) -> Result<bool, Error> {
    let found = ctx
        .ec2
        .describe_enis(crate::ec2::EniQuery::Tag(
            eni_api::tags::NODE_ENI.to_string(),
            name.to_string(),
        ))
        .await?;
    let mine: Vec<crate::ec2::Eni> = found
        .into_iter()
        .filter(|e| {
            adopt::ownership(e, &ctx.config.cluster_name, &ctx.config.cluster_id)
                == adopt::Ownership::Ours
        })
        .collect();
    if mine.is_empty() {
        return Ok(false);
    }
    let mut inventory = lock(&ctx.inventory);
    for e in mine {
        info!(eni = %e.id, "found an ENI of this NodeENI the inventory missed; removing it before the finalizer goes");
        inventory.upsert(e);
    }
    Ok(true)
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
    } else if !plan.converged() || outcome.pools_pending {
        // In-flight attaches and detaches wake us through the poller; this is a backstop.
        Requeue::requeue(Duration::from_secs(5))
    } else {
        Requeue::requeue(ctx.config.resync_period)
    }
}

/// Requeue policy for failed reconciles: exponential-ish by error kind.
pub fn error_policy<E: Ec2>(obj: Arc<NodeENI>, err: &Error, ctx: Arc<Context<E>>) -> Requeue {
    let failures = {
        let mut all = lock(&ctx.failures);
        let n = all.entry(obj.name_any()).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let delay = failure_backoff(failures);
    warn!(nodeeni = %obj.name_any(), error = %err, failures, retry_in = ?delay, "reconcile failed");
    Requeue::requeue(delay)
}

/// Backoff after `failures` consecutive failed reconciles of one NodeENI: 5 s, doubling,
/// at most 5 minutes, with up to 10% jitter so NodeENIs failing together spread out.
pub fn failure_backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(5).saturating_mul(1 << failures.saturating_sub(1).min(6));
    let base = base.min(Duration::from_secs(300));
    base + base.mul_f64(rand::random::<f64>() * 0.1)
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
    fn failures_back_off_exponentially_up_to_five_minutes() {
        let within = |d: Duration, lo: u64| {
            d >= Duration::from_secs(lo) && d <= Duration::from_secs(lo).mul_f64(1.1)
        };
        assert!(within(failure_backoff(1), 5));
        assert!(within(failure_backoff(2), 10));
        assert!(within(failure_backoff(4), 40));
        assert!(within(failure_backoff(7), 300));
        assert!(within(failure_backoff(100), 300));
    }

    #[test]
    fn client_tokens_are_fresh() {
        let a = new_token();
        assert_eq!(a.len(), 32);
        assert!(a.len() <= 64, "EC2 takes at most 64 characters");
        assert_ne!(a, new_token());
    }
}
