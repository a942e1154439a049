//! `ec2-faults`: the EC2 fault layer as a process, in front of moto on loopback.
//!
//! Prints `listening on http://ADDR` on stdout when ready. Settings can be changed at run
//! time with `POST /_faults/config` (JSON merge patch); counters at `GET /_faults/stats`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use eni_testkit::faults::{FaultConfig, FaultProxy};

/// EC2 fault layer: throttling, latency and real-EC2 validation in front of moto.
#[derive(Debug, Parser)]
#[command(name = "ec2-faults", version)]
struct Args {
    /// Address to listen on (loopback only; port 0 picks a free port).
    #[arg(long, env = "EC2_FAULTS_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// moto's endpoint, e.g. http://127.0.0.1:5000 (loopback only).
    #[arg(long, env = "EC2_FAULTS_UPSTREAM")]
    upstream: String,
    /// A JSON file with a full or partial FaultConfig; flags override it.
    #[arg(long, env = "EC2_FAULTS_CONFIG")]
    config: Option<PathBuf>,
    /// Turn throttling off.
    #[arg(long, env = "EC2_FAULTS_NO_THROTTLE")]
    no_throttle: bool,
    /// Multiply every bucket's burst and refill (0.1: 10x smaller buckets).
    #[arg(long, env = "EC2_FAULTS_BUCKET_SCALE")]
    bucket_scale: Option<f64>,
    /// Burst of mutating actions (default 50).
    #[arg(long, env = "EC2_FAULTS_MUTATING_BURST")]
    mutating_burst: Option<f64>,
    /// Refill per second of mutating actions (default 5).
    #[arg(long, env = "EC2_FAULTS_MUTATING_RATE")]
    mutating_rate: Option<f64>,
    /// Burst of Describe* actions (default 100).
    #[arg(long, env = "EC2_FAULTS_DESCRIBE_BURST")]
    describe_burst: Option<f64>,
    /// Refill per second of Describe* actions (default 20).
    #[arg(long, env = "EC2_FAULTS_DESCRIBE_RATE")]
    describe_rate: Option<f64>,
    /// Minimum added latency per request in ms (default 0).
    #[arg(long, env = "EC2_FAULTS_LATENCY_MIN_MS")]
    latency_min_ms: Option<u64>,
    /// Maximum added latency per request in ms (default 0: none).
    #[arg(long, env = "EC2_FAULTS_LATENCY_MAX_MS")]
    latency_max_ms: Option<u64>,
    /// Probability in [0, 1] of an injected HTTP 500 InternalError (default 0).
    #[arg(long, env = "EC2_FAULTS_ERROR_RATE")]
    error_rate: Option<f64>,
    /// Report `attaching` for this many ms after an attach (default 0: off).
    #[arg(long, env = "EC2_FAULTS_ATTACH_DELAY_MS")]
    attach_delay_ms: Option<u64>,
    /// Report `detaching` for this many ms after a detach (default 0: off).
    #[arg(long, env = "EC2_FAULTS_DETACH_DELAY_MS")]
    detach_delay_ms: Option<u64>,
    /// Allow attaching at an occupied device index (like moto).
    #[arg(long, env = "EC2_FAULTS_ALLOW_DUPLICATE_DEVICE_INDEX")]
    allow_duplicate_device_index: bool,
    /// Do not enforce the instance type's ENI limits.
    #[arg(long, env = "EC2_FAULTS_NO_ATTACHMENT_LIMITS")]
    no_attachment_limits: bool,
    /// Allow deleting attached ENIs (like moto).
    #[arg(long, env = "EC2_FAULTS_ALLOW_IN_USE_DELETE")]
    allow_in_use_delete: bool,
    /// Ignore ClientToken (like moto).
    #[arg(long, env = "EC2_FAULTS_NO_CLIENT_TOKEN")]
    no_client_token: bool,
    /// Do not remember Attachment.DeleteOnTermination (like moto).
    #[arg(long, env = "EC2_FAULTS_NO_STICKY_DELETE_ON_TERMINATION")]
    no_sticky_delete_on_termination: bool,
    /// Log filter (tracing EnvFilter syntax); logs go to stderr.
    #[arg(long, env = "EC2_FAULTS_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("read {0}: {1}")]
    ReadConfig(PathBuf, std::io::Error),
    #[error("parse {0}: {1}")]
    ParseConfig(PathBuf, serde_json::Error),
    #[error(transparent)]
    Proxy(#[from] eni_testkit::faults::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Args {
    fn fault_config(&self) -> Result<FaultConfig, Error> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::ReadConfig(path.clone(), e))?;
                serde_json::from_str(&text).map_err(|e| Error::ParseConfig(path.clone(), e))?
            }
            None => FaultConfig::default(),
        };
        if self.no_throttle {
            c.throttle.enabled = false;
        }
        if let Some(v) = self.bucket_scale {
            c.throttle.scale = v;
        }
        if let Some(v) = self.mutating_burst {
            c.throttle.mutating.burst = v;
        }
        if let Some(v) = self.mutating_rate {
            c.throttle.mutating.refill_per_sec = v;
        }
        if let Some(v) = self.describe_burst {
            c.throttle.describe.burst = v;
        }
        if let Some(v) = self.describe_rate {
            c.throttle.describe.refill_per_sec = v;
        }
        if let Some(v) = self.latency_min_ms {
            c.latency.min_ms = v;
        }
        if let Some(v) = self.latency_max_ms {
            c.latency.max_ms = v;
        }
        if let Some(v) = self.error_rate {
            c.error_rate = v;
        }
        if let Some(v) = self.attach_delay_ms {
            c.attach_delay_ms = v;
        }
        if let Some(v) = self.detach_delay_ms {
            c.detach_delay_ms = v;
        }
        c.reject_duplicate_device_index &= !self.allow_duplicate_device_index;
        c.enforce_attachment_limits &= !self.no_attachment_limits;
        c.reject_in_use_delete &= !self.allow_in_use_delete;
        c.client_token_idempotency &= !self.no_client_token;
        c.sticky_delete_on_termination &= !self.no_sticky_delete_on_termination;
        Ok(c)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Error> {
    use std::io::Write;
    let config = args.fault_config()?;
    let proxy = FaultProxy::start_on(args.listen, &args.upstream, config).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", proxy.endpoint)?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!(stats = %serde_json::to_string(&proxy.stats()).unwrap_or_default(), "exiting");
    Ok(())
}
