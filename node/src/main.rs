//! `eni-manager`: see `eni-manager --help` and the crate docs.

use anyhow::Context as _;
use eni_node::config::{Config, LogFormat};
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
            Ok(mut s) => drop(s.recv().await),
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("signal received");
}

fn main() -> anyhow::Result<()> {
    let cfg = Config::parse_with_env(std::env::args_os(), |name| std::env::var_os(name))
        .unwrap_or_else(|e| e.exit());
    init_tracing(cfg.log_format);
    // Built in one workspace with the controller, rustls may carry two crypto backends
    // (ring, and aws-lc-rs from the AWS SDK); choose one process-wide, as the controller does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Two workers whatever the node size: the daemon is mostly idle, and every extra
    // worker thread costs memory (its own stack and malloc arena).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(eni_node::app::run(cfg, shutdown_signal()));
    // A sysfs write the kernel blocks (unbinding a device a process holds) must not keep
    // the process from exiting: do not wait for blocking threads at shutdown.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    result.context("eni-manager")
}
