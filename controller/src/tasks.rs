//! Background tasks around the reconciler: Node change filtering, the in-flight poller,
//! the periodic inventory resync and the orphan sweeper.

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use eni_api::NodeENI;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::ec2::{Ec2, EniQuery};
use crate::ec2::{Ec2Error, Eni};
use crate::inventory::{lock, owner};
use crate::reconciler::adopt::{Ownership, ownership};
use crate::reconciler::{Context, instance_id};

/// Every ENI of this cluster: tagged with its name and identity. An ENI tagged with the
/// name alone (made before identities) is taken, and tagged with the identity, only when
/// it provably belongs here: its instance tag or its attachment names an instance of a
/// Node of this cluster (`instances`). Any other name-only ENI may be another cluster's
/// that shares the name: it is left alone (logged and counted once per listing).
pub async fn load_owned<E: Ec2>(
    ec2: &E,
    name: &str,
    id: &str,
    instances: &BTreeSet<String>,
) -> Result<Vec<Eni>, Ec2Error> {
    let all = ec2
        .describe_enis(EniQuery::Tag(
            eni_api::tags::CLUSTER.to_string(),
            name.to_string(),
        ))
        .await?;
    let mut out = Vec::with_capacity(all.len());
    let mut unproven = 0usize;
    for mut eni in all {
        match ownership(&eni, name, id) {
            Ownership::Ours => out.push(eni),
            Ownership::OursUnidentified => {
                let here = eni
                    .tags
                    .get(eni_api::tags::INSTANCE)
                    .is_some_and(|i| instances.contains(i))
                    || eni
                        .attachment
                        .as_ref()
                        .is_some_and(|a| instances.contains(&a.instance_id));
                if !here {
                    unproven += 1;
                    continue;
                }
                let tags = std::collections::BTreeMap::from([
                    (eni_api::tags::CLUSTER_ID.to_string(), id.to_string()),
                    (eni_api::tags::NO_MANAGE.to_string(), "true".to_string()),
                ]);
                match ec2.tag_eni(eni.id.clone(), tags.clone()).await {
                    Ok(()) => {
                        info!(eni = %eni.id, "adopted an ENI tagged before cluster identities");
                        eni.tags.extend(tags);
                        out.push(eni);
                    }
                    Err(e) => {
                        warn!(eni = %eni.id, error = %e, "cannot tag an ENI with the cluster identity; leaving it alone")
                    }
                }
            }
            Ownership::Foreign | Ownership::Untagged => {}
        }
    }
    if unproven > 0 {
        warn!(
            enis = unproven,
            "ENIs tagged with this cluster's name but no identity, on no instance of this cluster: left alone (another cluster with the same name?); tag them with aws-multi-eni.k8s.aws/cluster-id to adopt them"
        );
    }
    Ok(out)
}

/// The EC2 instances of the Nodes in `nodes`.
pub fn node_instances<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeSet<String> {
    nodes
        .into_iter()
        .filter_map(|n| {
            n.spec
                .as_ref()?
                .provider_id
                .as_deref()
                .and_then(instance_id)
        })
        .collect()
}

/// Drops everything of a Node the controller does not read.
pub fn strip_node(node: &mut Node) {
    node.status = None;
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    if let Some(spec) = node.spec.as_mut() {
        spec.taints = None;
        spec.pod_cidrs = None;
        spec.pod_cidr = None;
        spec.config_source = None;
    }
}

fn fingerprint(node: &Node) -> u64 {
    let mut h = DefaultHasher::new();
    node.labels().hash(&mut h);
    node.spec
        .as_ref()
        .and_then(|s| s.provider_id.as_deref())
        .hash(&mut h);
    node.metadata.deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

/// Node watch events reduced to the Nodes whose labels, providerID or deletion changed
/// (heartbeats and status updates are dropped), plus deleted Nodes.
pub fn node_changes<S>(events: S) -> impl Stream<Item = Result<Node, watcher::Error>> + Send
where
    S: Stream<Item = Result<watcher::Event<Node>, watcher::Error>> + Send + 'static,
{
    let mut seen: HashMap<String, u64> = HashMap::new();
    events.filter_map(move |event| {
        let out = match event {
            Ok(watcher::Event::Apply(node)) | Ok(watcher::Event::InitApply(node)) => {
                let fp = fingerprint(&node);
                let changed = seen.insert(node.name_any(), fp) != Some(fp);
                changed.then_some(Ok(node))
            }
            Ok(watcher::Event::Delete(node)) => {
                seen.remove(&node.name_any());
                Some(Ok(node))
            }
            Ok(watcher::Event::Init) | Ok(watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        };
        futures::future::ready(out)
    })
}

fn trigger(tx: &UnboundedSender<ObjectRef<NodeENI>>, names: BTreeSet<String>) {
    for name in names {
        let _ = tx.send(ObjectRef::new(&name));
    }
}

/// Polls ENIs with an attach or detach in flight, in one batched describe per interval,
/// and reconciles their NodeENIs when the state moves. Idle when nothing is in flight.
pub async fn poll_in_flight<E: Ec2>(
    ctx: Arc<Context<E>>,
    interval: Duration,
    tx: UnboundedSender<ObjectRef<NodeENI>>,
) {
    loop {
        if lock(&ctx.inventory).in_flight().is_empty() {
            ctx.in_flight.notified().await;
        }
        tokio::time::sleep(interval).await;
        let ids = lock(&ctx.inventory).in_flight();
        if ids.is_empty() {
            continue;
        }
        let asked = Instant::now();
        match ctx.ec2.describe_enis(EniQuery::Ids(ids.clone())).await {
            Ok(found) => {
                let changed = lock(&ctx.inventory).refresh(&ids, found, asked);
                ctx.inventory_changed.notify_waiters();
                trigger(&tx, changed);
            }
            Err(e) => warn!(error = %e, "polling in-flight ENIs"),
        }
    }
}

/// Re-reads every managed ENI once per period (one paginated describe) so changes made
/// behind the controller's back (deleted or detached ENIs) are noticed and repaired.
pub async fn resync<E: Ec2>(
    ctx: Arc<Context<E>>,
    period: Duration,
    tx: UnboundedSender<ObjectRef<NodeENI>>,
) {
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        // Forget the instances of Nodes that are gone.
        let keep = node_instances(ctx.nodes.state().iter().map(|n| n.as_ref()));
        ctx.instances.retain(&keep);
        match load_owned(
            &ctx.ec2,
            &ctx.config.cluster_name,
            &ctx.config.cluster_id,
            &keep,
        )
        .await
        {
            Ok(all) => {
                let changed = lock(&ctx.inventory).replace_all(all, started);
                ctx.inventory_changed.notify_waiters();
                if !changed.is_empty() {
                    info!(nodeenis = ?changed, "resync found ENIs changed outside the controller");
                }
                trigger(&tx, changed);
            }
            Err(e) => warn!(error = %e, "resync of managed ENIs failed"),
        }
    }
}

/// Deletes `available` ENIs owned by this cluster whose NodeENI no longer exists (or
/// whose Node is gone), once they have been orphaned for `grace`.
pub async fn sweep_orphans<E: Ec2>(
    ctx: Arc<Context<E>>,
    nodeenis: Api<NodeENI>,
    grace: Duration,
    dry_run: bool,
) {
    let period = (grace / 4).clamp(Duration::from_secs(5), Duration::from_secs(300));
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    loop {
        tick.tick().await;
        let existing: BTreeSet<String> = match nodeenis.list_metadata(&ListParams::default()).await
        {
            Ok(list) => list.items.iter().map(|n| n.name_any()).collect(),
            Err(e) => {
                warn!(error = %e, "orphan sweep: cannot list NodeENIs");
                continue;
            }
        };
        let nodes: BTreeSet<String> = ctx.nodes.state().iter().map(|n| n.name_any()).collect();
        let orphans: Vec<String> = lock(&ctx.inventory)
            .all()
            .filter(|e| e.attachment.is_none())
            .filter(|e| {
                let nodeeni_gone = owner(e).is_none_or(|o| !existing.contains(&o));
                let node_gone = e
                    .tags
                    .get(eni_api::tags::NODE)
                    .is_none_or(|n| !nodes.contains(n));
                nodeeni_gone || node_gone
            })
            .map(|e| e.id.clone())
            .collect();
        first_seen.retain(|id, _| orphans.contains(id));
        for id in orphans {
            let since = *first_seen.entry(id.clone()).or_insert_with(Instant::now);
            if since.elapsed() < grace {
                continue;
            }
            ctx.metrics.orphans_found.inc();
            if dry_run {
                info!(eni = %id, "orphaned ENI (dry run: not deleting)");
                continue;
            }
            match ctx.ec2.delete_eni(id.clone()).await {
                Ok(()) => {
                    info!(eni = %id, "deleted orphaned ENI");
                    lock(&ctx.inventory).remove(&id);
                    ctx.instances.forget_eni(&id);
                    ctx.metrics.orphans_deleted.inc();
                    first_seen.remove(&id);
                }
                Err(e) => warn!(eni = %id, error = %e, "could not delete orphaned ENI"),
            }
        }
    }
}

/// Resolves on SIGTERM (the kubelet stopping the Pod) or SIGINT: the reconcile queue
/// closes, running reconciles finish, and the controller returns.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    info!("shutting down: finishing the running reconciles");
}
