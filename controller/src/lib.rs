//! eni-controller: turns NodeENI resources into attached AWS ENIs and back.
//!
//! Layout:
//! * [`config`]: flags and environment.
//! * [`ec2`]: the narrow EC2 trait and its AWS SDK adapter.
//! * [`plan`]: the pure planning step, unit tested.
//! * [`ipam`]: the pure pod address pool planner (spec.ipam), unit tested.
//! * [`reconciler`]: observe -> plan -> execute -> status, per NodeENI.
//! * [`inventory`], [`resolve`]: in-memory EC2 state and name caches.
//! * [`ratelimit`]: client-side EC2 token buckets.
//! * [`debounce`]: bounded coalescing of reconcile triggers.
//! * [`server`]: `/healthz`, `/readyz`, `/metrics`.

pub mod config;
pub mod debounce;
pub mod ec2;
pub mod inventory;
pub mod ipam;
pub mod lease;
pub mod metrics;
pub mod plan;
pub mod ratelimit;
pub mod reconciler;
pub mod resolve;
pub mod server;
mod tasks;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use eni_api::NodeENI;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::controller::applier;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{Notify, mpsc};
use tracing::{error, info, warn};

use crate::config::ControllerArgs;
use crate::ec2::Ec2;
use crate::ec2::aws::AwsEc2;
use crate::inventory::{Instances, Inventory};
use crate::lease::{Elector, Fence, LeaseTimings};
use crate::metrics::Metrics;
use crate::ratelimit::{Bucket, Limits, RateLimiter};
use crate::reconciler::{Context, ReconcilerConfig};
use crate::resolve::Resolver;

/// Errors that stop the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad flags.
    #[error("configuration: {0}")]
    Config(String),
    /// Kubernetes client setup or API failure.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// EC2 failure at start-up.
    #[error("EC2: {0}")]
    Ec2(#[from] ec2::Ec2Error),
    /// The metrics server could not start.
    #[error("metrics server on {addr}: {source}")]
    Server {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Leader election failed, or this replica lost the Lease (it exits so a fresh
    /// replica can stand by).
    #[error("leader election: {0}")]
    Lease(#[from] lease::LeaseError),
}

/// Runs the controller until the process is told to stop.
pub async fn run(args: ControllerArgs) -> Result<(), Error> {
    args.validate().map_err(Error::Config)?;
    let client = Client::try_default().await?;
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let server = server::serve(args.metrics_addr, metrics.clone(), ready.clone())
        .await
        .map_err(|source| Error::Server {
            addr: args.metrics_addr,
            source,
        })?;
    tokio::spawn(server);

    let identity = args
        .pod_name
        .clone()
        // PIDs repeat across containers (PID 1): add the host name and a random part.
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
            format!(
                "eni-controller-{host}-{}",
                crate::reconciler::new_token().get(..8).unwrap_or("0")
            )
        });
    let fence = if args.leader_elect {
        Fence::closed()
    } else {
        Fence::open()
    };
    let elector = if args.leader_elect {
        let elector = Elector::new(
            client.clone(),
            &args.leader_election_namespace,
            &args.leader_election_id,
            &identity,
            LeaseTimings {
                lease_duration: args.leader_election_lease_duration,
                renew_deadline: args.leader_election_renew_deadline,
                retry_period: args.leader_election_retry_period,
            },
            fence.clone(),
        );
        // A standby replica is healthy and ready: it serves probes and metrics while
        // waiting.
        ready.store(true, Ordering::SeqCst);
        info!(lease = %args.leader_election_id, %identity, "waiting for leadership");
        elector.acquire().await?;
        info!(%identity, "became leader");
        metrics.leader.set(1);
        Some(elector)
    } else {
        None
    };

    let ec2 = aws_ec2(&args, metrics.clone()).await.with_fence(fence);
    let held = async {
        match &elector {
            Some(e) => e.hold().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = run_with(client, ec2, args, metrics.clone(), ready, identity) => result,
        lost = held => {
            metrics.leader.set(0);
            error!(error = %lost, "stopping: leadership lost");
            Err(lost.into())
        }
    }
}

/// Builds the AWS SDK EC2 adapter from the flags.
pub async fn aws_ec2(args: &ControllerArgs, metrics: Metrics) -> AwsEc2 {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        // The adapter retries itself, with the shared rate limiter in the loop.
        .retry_config(RetryConfig::disabled());
    if let Some(region) = &args.aws_region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let shared = loader.load().await;
    let mut builder = aws_sdk_ec2::config::Builder::from(&shared);
    if let Some(endpoint) = &args.ec2_endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    AwsEc2::new(
        aws_sdk_ec2::Client::from_conf(builder.build()),
        metrics,
        rate_limiter(args),
    )
}

/// The client-side EC2 rate limiter the flags ask for.
pub fn rate_limiter(args: &ControllerArgs) -> RateLimiter {
    RateLimiter::new(Limits {
        mutating: Bucket {
            burst: args.ec2_mutating_burst,
            per_second: args.ec2_mutating_rate,
        },
        describe: Bucket {
            burst: args.ec2_describe_burst,
            per_second: args.ec2_describe_rate,
        },
    })
}

/// Runs the controller with a given EC2 implementation (tests pass a mock or moto).
pub async fn run_with<E: Ec2>(
    client: Client,
    ec2: E,
    args: ControllerArgs,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    identity: String,
) -> Result<(), Error> {
    let cluster_id = match &args.cluster_id {
        Some(id) => id.clone(),
        None => cluster_identity(&client).await?,
    };
    info!(cluster = %args.cluster_name, %cluster_id, "cluster identity");
    // Adopt what exists before acting: everything tagged with this cluster.
    let inventory = Arc::new(Mutex::new(Inventory::default()));
    let started = tokio::time::Instant::now();
    // The Nodes' instances, for telling this cluster's pre-identity ENIs from those of
    // another cluster with the same name.
    let node_list = Api::<Node>::all(client.clone())
        .list(&kube::api::ListParams::default())
        .await?;
    let instances = tasks::node_instances(&node_list.items);
    let existing = tasks::load_owned(&ec2, &args.cluster_name, &cluster_id, &instances).await?;
    info!(enis = existing.len(), "loaded managed ENIs");
    inventory::lock(&inventory).replace_all(existing, started);

    let nodeenis: Api<NodeENI> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let (node_store, node_writer) = reflector::store::<Node>();
    let node_events = watcher(nodes, watcher::Config::default().any_semantic())
        .default_backoff()
        // Keep only what the controller reads: labels, providerID, deletion.
        .modify(tasks::strip_node)
        .reflect(node_writer);

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "eni-controller".into(),
            instance: Some(identity),
        },
    );
    let in_flight = Arc::new(Notify::new());
    let ctx = Arc::new(Context {
        client: client.clone(),
        ec2,
        config: ReconcilerConfig {
            cluster_name: args.cluster_name.clone(),
            cluster_id,
            resync_period: args.resync_period,
            detach_timeout: args.detachment_timeout,
            parallel_operations: args.max_concurrent_eni_operations,
            parallel_cleanups: args.max_concurrent_eni_cleanup,
            status_interval: std::time::Duration::from_secs(10),
        },
        inventory,
        instances: Instances::default(),
        resolver: Resolver::new(args.name_cache_ttl),
        nodes: node_store,
        recorder,
        metrics,
        in_flight: in_flight.clone(),
        inventory_changed: Arc::new(Notify::new()),
        failures: Default::default(),
    });

    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel::<ObjectRef<NodeENI>>();
    tokio::spawn(tasks::poll_in_flight(
        ctx.clone(),
        args.in_flight_poll_interval,
        trigger_tx.clone(),
    ));
    tokio::spawn(tasks::resync(
        ctx.clone(),
        args.resync_period,
        trigger_tx.clone(),
    ));
    if !args.orphan_grace_period.is_zero() {
        tokio::spawn(tasks::sweep_orphans(
            ctx.clone(),
            nodeenis.clone(),
            args.orphan_grace_period,
            args.orphan_dry_run,
        ));
    }

    // NodeENI watch -> store, and the triggers of every source, coalesced per NodeENI
    // (see `debounce`) before kube's applier runs them: it holds its runner until the
    // store is synced and never runs one NodeENI twice at once.
    let (nodeeni_store, nodeeni_writer) = reflector::store::<NodeENI>();
    let nodeeni_triggers = watcher(nodeenis, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(nodeeni_writer)
        .applied_objects()
        .filter_map(|res| logged_watch_error(res, "watching NodeENIs"))
        .map(|n| ObjectRef::from_obj(&n));
    let mapper_store = nodeeni_store.clone();
    let node_triggers = tasks::node_changes(node_events)
        .filter_map(|res| logged_watch_error(res, "watching Nodes"))
        .flat_map(move |node| {
            // A Node change concerns the NodeENIs that select it now or have ENIs on it.
            let name = node.name_any();
            let refs: Vec<ObjectRef<NodeENI>> = mapper_store
                .state()
                .iter()
                .filter(|n| {
                    n.spec.selects(node.labels())
                        || n.status
                            .as_ref()
                            .is_some_and(|s| s.attachments.iter().any(|a| a.node_id == name))
                })
                .map(|n| ObjectRef::from_obj(n.as_ref()))
                .collect();
            futures::stream::iter(refs)
        });
    let triggers = futures::stream::select_all([
        nodeeni_triggers.boxed(),
        node_triggers.boxed(),
        tokio_stream_from(trigger_rx).boxed(),
    ]);
    let queue = debounce::coalesced(triggers, args.coalesce_quiet, args.coalesce_max_delay)
        .map(Ok::<_, std::convert::Infallible>)
        .take_until(tasks::shutdown_signal());
    ready.store(true, Ordering::SeqCst);
    info!("controller running");
    applier(
        |obj, ctx| Box::pin(reconciler::reconcile(obj, ctx)),
        reconciler::error_policy,
        ctx,
        nodeeni_store,
        queue,
        kube::runtime::controller::Config::default().concurrency(args.max_concurrent_reconciles),
    )
    .for_each(|res| async move {
        if let Err(e) = res {
            match e {
                // Deleted before its turn came.
                kube::runtime::controller::Error::ObjectNotFound(r) => {
                    tracing::debug!(object = %r, "gone before its reconcile");
                }
                other => warn!(error = %other, "controller"),
            }
        }
    })
    .await;
    info!("controller stopped");
    Ok(())
}

/// The UID of the `kube-system` namespace: created with the cluster, never reused.
pub async fn cluster_identity(client: &Client) -> Result<String, Error> {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = namespaces.get("kube-system").await.map_err(|e| {
        Error::Config(format!(
            "cannot read the kube-system namespace for the cluster identity ({e}): grant `get` on it or set --cluster-id"
        ))
    })?;
    ns.metadata
        .uid
        .ok_or_else(|| Error::Config("the kube-system namespace has no UID".into()))
}

/// The object of a watch event; a watch error is logged (the watcher backs off and
/// retries on its own) and dropped.
fn logged_watch_error<K>(
    res: Result<K, watcher::Error>,
    what: &'static str,
) -> std::future::Ready<Option<K>> {
    std::future::ready(match res {
        Ok(k) => Some(k),
        Err(e) => {
            warn!(error = %e, "{what}");
            None
        }
    })
}

pub(crate) fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Labels of a NodeENI's managed ENIs, for tests and tools.
pub fn ownership_tags(cluster: &str, nodeeni: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (eni_api::tags::CLUSTER.to_string(), cluster.to_string()),
        (eni_api::tags::NODE_ENI.to_string(), nodeeni.to_string()),
    ])
}
