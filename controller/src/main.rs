//! eni-controller binary.

use anyhow::Context as _;
use eni_controller::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_with_env(std::env::args_os(), |name| std::env::var_os(name))
        .unwrap_or_else(|e| e.exit());
    if let Some(Command::Crd) = cli.command {
        print!("{}", eni_api::crd_yaml()?);
        return Ok(());
    }
    let args = cli.controller;
    let filter = EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("invalid --log-level {:?}", args.log_level))?;
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => subscriber.json().flatten_event(true).init(),
        LogFormat::Text => subscriber.init(),
    }
    // kube and the AWS SDK each bring a rustls crypto backend; pick one process-wide.
    let _ = rustls::crypto::ring::default_provider().install_default();
    eni_controller::run(args).await.context("eni-controller")
}
