//! `eni-manager`: see `eni-manager --help` and the crate docs.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use eni_deviceplugin::{BoundDevice, CancellationToken};
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
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
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
    // Built in one workspace with the controller, rustls may carry two crypto backends
    // (ring, and aws-lc-rs from the AWS SDK); choose one process-wide, as the controller does.
    let _ = rustls::crypto::ring::default_provider().install_default();
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

    // The kubelet device plugin: advertises the DPDK-bound devices the daemon publishes
    // on `bound_tx`, and stops with the daemon. Its only errors are setup errors
    // (directories, inotify), which end the process like the daemon's own.
    let plugin_shutdown = CancellationToken::new();
    let mut device_plugin = match cfg.device_plugin_config() {
        Some(dp) => {
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
    let daemon_run = daemon::run(
        daemon,
        client,
        link_events,
        cfg.resync_period,
        shutdown_signal(),
    );
    let mut plugin_done = false;
    let result = match device_plugin.as_mut() {
        Some(plugin) => tokio::select! {
            r = daemon_run => r.context("node daemon failed"),
            r = plugin => {
                // The plugin only returns early on a setup error (or a panic).
                plugin_done = true;
                match r {
                    Ok(Ok(())) => Err(anyhow::anyhow!("the device plugin stopped unexpectedly")),
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context(
                        "device plugin failed (--device-plugin=false turns it off)",
                    )),
                    Err(e) => Err(anyhow::Error::new(e).context("device plugin task failed")),
                }
            }
        },
        None => daemon_run.await.context("node daemon failed"),
    };
    plugin_shutdown.cancel();
    if let Some(plugin) = device_plugin.filter(|_| !plugin_done) {
        match tokio::time::timeout(std::time::Duration::from_secs(10), plugin).await {
            Ok(Ok(Ok(()))) => info!("device plugin stopped"),
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "device plugin failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "device plugin task failed"),
            Err(_) => tracing::warn!("device plugin did not stop within 10s"),
        }
    }
    result
}
