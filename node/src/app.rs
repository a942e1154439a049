//! Process wiring of `eni-manager`: the Kubernetes client, the metrics server, netlink,
//! sysfs, the daemon and the kubelet device plugin, run until `shutdown`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use eni_deviceplugin::{BoundDevice, CancellationToken};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::daemon::{self, Daemon, Settings};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::podresources::PodResources;
use crate::sysfs::{Binder, Policy, RealSysfs, Sysfs};

/// Longest wait for the kubelet's PodResources `List`.
const POD_RESOURCES_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the device plugin may take to stop after the daemon did.
const PLUGIN_STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn setup(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Setup {
        what,
        source: Box::new(source),
    }
}

/// The sysfs adapter `cfg` asks for.
fn sysfs(cfg: &Config) -> Arc<dyn Sysfs> {
    #[cfg(feature = "test-util")]
    if cfg.simulate_pci_kernel {
        warn!(root = %cfg.sysfs_root.display(), "simulating the PCI kernel side on a fake sysfs tree");
        return Arc::new(crate::sysfs::SimKernel::new(&cfg.sysfs_root));
    }
    Arc::new(RealSysfs::new(&cfg.sysfs_root))
}

/// Runs the node daemon and (unless disabled) the device plugin until `shutdown`
/// completes or one of them fails.
///
/// # Errors
/// Setup errors (Kubernetes client, listeners, netlink, device plugin directories) and
/// a lost netlink connection.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    info!(
        node = cfg.node_name,
        version = env!("CARGO_PKG_VERSION"),
        "eni-manager starting"
    );
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Error::Setup {
            what: "build a Kubernetes client (in-cluster config or KUBECONFIG)",
            source: Box::new(e),
        })?;

    // The current set of DPDK-bound devices: one inventory, split by resource between
    // the kubelet device plugin and the DRA driver (a resource is served one way).
    let (bound_tx, all_rx) = watch::channel::<Vec<BoundDevice>>(Vec::new());
    let (bound_rx, dra_rx) = split_inventory(all_rx, cfg.dra_served());
    let plugin_shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let dra = match cfg.dra_config() {
        Some((publisher, plugin)) => {
            info!(driver = cfg.dra_driver_name, resources = ?cfg.dra_served(), netdev = ?cfg.netdev_resource(), "starting the DRA driver");
            let probe: Arc<dyn eni_deviceplugin::DeviceProbe> = Arc::new(
                eni_deviceplugin::SysfsProbe::new(&cfg.sysfs_root, &cfg.dev_root),
            );
            let claims = Arc::new(eni_dra::KubeClaims::new(
                client.clone(),
                &cfg.dra_driver_name,
            ));
            let dra_setup = |e: eni_dra::Error| Error::Setup {
                what: "start the DRA driver",
                source: Box::new(e),
            };
            let driver = eni_dra::Driver::new(plugin, claims, probe.clone(), dra_rx.clone())
                .map_err(dra_setup)?;
            let kubelet_plugin = eni_dra::plugin::start(Arc::new(driver), plugin_shutdown.clone())
                .map_err(dra_setup)?;
            let slices = tokio::spawn(eni_dra::publish::run(
                publisher,
                client.clone(),
                probe,
                dra_rx,
                plugin_shutdown.clone(),
            ));
            Some((slices, kubelet_plugin))
        }
        None => None,
    };
    let mut device_plugin = match cfg.device_plugin_config() {
        Some(mut dp) => {
            dp.allocations = metrics.allocations.clone();
            info!(
                dir = %dp.device_plugin_dir.display(),
                registration = %dp.registration,
                "starting the kubelet device plugin"
            );
            Some(tokio::spawn(eni_deviceplugin::run(
                dp,
                bound_rx,
                plugin_shutdown.clone(),
            )))
        }
        None => {
            info!("kubelet device plugin disabled (--device-plugin=false)");
            drop(bound_rx);
            None
        }
    };

    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(setup("listen on --metrics-addr"))?;
    info!(addr = %listener.local_addr().map_err(setup("listen on --metrics-addr"))?, "serving /healthz /readyz /metrics");
    let router = metrics.router();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            error!(error = %e, "metrics server stopped");
        }
    });

    let (netlink, link_events) = crate::netlink::connect(cfg.netns.as_deref())?;
    let binder = Binder::new(
        sysfs(&cfg),
        Policy {
            force_non_ena: cfg.force_non_ena,
            allow_noiommu: cfg.enable_unsafe_noiommu_mode,
        },
    );
    let mut daemon = Daemon::new(
        Settings {
            node: cfg.node_name.clone(),
            state_dir: cfg.state_dir.clone(),
            default_mtu: cfg.default_mtu,
            stable_names: cfg.stable_names,
            sysfs_timeout: cfg.sysfs_timeout,
            pod_resources: (!cfg.pod_resources_socket.as_os_str().is_empty())
                .then(|| PodResources::new(&cfg.pod_resources_socket, POD_RESOURCES_TIMEOUT)),
        },
        netlink,
        binder,
        bound_tx,
        metrics,
    );
    daemon.set_netdev_resource(cfg.netdev_resource().map(str::to_owned));
    let reconcile_allocations = (!cfg.ipam_reconcile_period.is_zero()).then(|| {
        tokio::spawn(daemon::reconcile_allocations(
            client.clone(),
            cfg.node_name.clone(),
            cfg.state_dir.clone(),
            cfg.ipam_reconcile_period,
        ))
    });
    let daemon_run = daemon::run(daemon, client, link_events, cfg.resync_period, shutdown);
    let mut plugin_done = false;
    let result = match device_plugin.as_mut() {
        Some(plugin) => tokio::select! {
            r = daemon_run => r,
            r = plugin => {
                // The plugin only returns early on a setup error (or a panic).
                plugin_done = true;
                Err(match r {
                    Ok(Ok(())) => Error::DevicePlugin("stopped unexpectedly".into()),
                    Ok(Err(e)) => Error::DevicePlugin(format!("{e} (--device-plugin=false turns it off)")),
                    Err(e) => Error::DevicePlugin(format!("task failed: {e}")),
                })
            }
        },
        None => daemon_run.await,
    };
    plugin_shutdown.cancel();
    if let Some(t) = reconcile_allocations {
        t.abort();
    }
    if let Some(plugin) = device_plugin.filter(|_| !plugin_done) {
        match tokio::time::timeout(PLUGIN_STOP_TIMEOUT, plugin).await {
            Ok(Ok(Ok(()))) => info!("device plugin stopped"),
            Ok(Ok(Err(e))) => error!(error = %e, "device plugin failed"),
            Ok(Err(e)) => error!(error = %e, "device plugin task failed"),
            Err(_) => warn!("device plugin did not stop within {PLUGIN_STOP_TIMEOUT:?}"),
        }
    }
    if let Some((slices, kubelet_plugin)) = dra {
        for (what, task) in [
            ("slice publisher", slices),
            ("kubelet plugin", kubelet_plugin),
        ] {
            match tokio::time::timeout(PLUGIN_STOP_TIMEOUT, task).await {
                Ok(Ok(Ok(()))) => info!("DRA {what} stopped"),
                Ok(Ok(Err(e))) => error!(error = %e, "DRA {what} failed"),
                Ok(Err(e)) => error!(error = %e, "DRA {what} task failed"),
                Err(_) => warn!("DRA {what} did not stop within {PLUGIN_STOP_TIMEOUT:?}"),
            }
        }
    }
    result
}

/// Splits the inventory: devices of `dra_resources` go to the DRA driver (second
/// receiver), all others to the device plugin (first). With no DRA resources the device
/// plugin reads the inventory itself.
fn split_inventory(
    all: watch::Receiver<Vec<BoundDevice>>,
    dra_resources: Vec<String>,
) -> (
    watch::Receiver<Vec<BoundDevice>>,
    watch::Receiver<Vec<BoundDevice>>,
) {
    if dra_resources.is_empty() {
        let (_, empty) = watch::channel(Vec::new());
        return (all, empty);
    }
    let split = move |devs: &[BoundDevice]| -> (Vec<BoundDevice>, Vec<BoundDevice>) {
        devs.iter()
            .cloned()
            .partition(|d| !dra_resources.contains(&d.resource_name))
    };
    let (dp, dra) = split(&all.borrow());
    let (dp_tx, dp_rx) = watch::channel(dp);
    let (dra_tx, dra_rx) = watch::channel(dra);
    let mut all = all;
    tokio::spawn(async move {
        while all.changed().await.is_ok() {
            let (dp, dra) = split(&all.borrow_and_update());
            dp_tx.send_if_modified(|c| std::mem::replace(c, dp.clone()) != dp);
            dra_tx.send_if_modified(|c| std::mem::replace(c, dra.clone()) != dra);
        }
    });
    (dp_rx, dra_rx)
}
