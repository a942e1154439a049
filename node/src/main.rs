//! `eni-manager`: see `eni-manager --help` and the crate docs.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use eni_deviceplugin::BoundDevice;
use eni_node::config::{Config, LogFormat};
use eni_node::daemon::{self, Daemon, Settings};
use eni_node::metrics::Metrics;
use eni_node::sysfs::{Binder, RealSysfs, SimKernel, Sysfs};
use tokio::sync::watch;
use tracing::info;
use tracing_subscriber::EnvFilter;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    info!("signal received");
}

// Two workers whatever the node size: the daemon is mostly idle, and every extra worker
// thread costs memory (its own stack and malloc arena).
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    init_tracing(cfg.log_format);
    info!(
        node = cfg.node_name,
        version = env!("CARGO_PKG_VERSION"),
        "eni-manager starting"
    );

    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;

    // The current set of DPDK-bound devices, for the kubelet device plugin.
    let (bound_tx, bound_rx) = watch::channel::<Vec<BoundDevice>>(Vec::new());

    // ---- DEVICE PLUGIN: start it here. ----------------------------------------------
    // The lead wires `eni_deviceplugin`'s async entry point in at this spot, handing it
    // `bound_rx` (a `watch::Receiver<Vec<BoundDevice>>`); until then the receiver is
    // just kept alive so the daemon's sends succeed.
    let _device_plugin_rx = bound_rx;
    // ------------------------------------------------------------------------------------

    let metrics = Metrics::new();
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {}", cfg.metrics_addr))?;
    info!(addr = %listener.local_addr()?, "serving /healthz /readyz /metrics");
    let router = metrics.router();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });

    let (netlink, link_events) = eni_node::netlink::connect(cfg.netns.as_deref())
        .context("cannot open the netlink socket")?;
    let sys: Arc<dyn Sysfs> = if cfg.simulate_pci_kernel {
        tracing::warn!(root = %cfg.sysfs_root.display(), "simulating the PCI kernel side on a fake sysfs tree");
        Arc::new(SimKernel::new(&cfg.sysfs_root))
    } else {
        Arc::new(RealSysfs::new(&cfg.sysfs_root))
    };
    let daemon = Daemon::new(
        Settings {
            node: cfg.node_name.clone(),
            state_dir: cfg.state_dir.clone(),
            default_mtu: cfg.default_mtu,
            stable_names: cfg.stable_names,
        },
        netlink,
        Binder::new(sys, cfg.force_non_ena),
        bound_tx,
        metrics,
    );
    daemon::run(
        daemon,
        client,
        link_events,
        cfg.resync_period,
        shutdown_signal(),
    )
    .await
    .context("node daemon failed")?;
    Ok(())
}
