//! `soak-ipam`: the randomized, seeded soak of pod address pools under kill -9 (issue 17).
//! See `eni_soak::ipam` and `--help`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use eni_soak::ipam::{self, RunConfig};

/// Randomized, seeded soak of pod address pools: eni-controller (against kube-apiserver and
/// moto behind the EC2 fault layer), the eni-manager node daemon and cni-helper as IPAM,
/// with pods started, killed mid-ADD, deleted and vanishing, pool changes, and kill -9 of
/// the node daemon mid-refill and of the controller; pool accounting is checked against
/// EC2 in quiet periods. On failure it prints the seed and the shortest failing prefix it
/// finds. The same seed gives the same operations.
#[derive(Debug, Parser)]
#[command(name = "soak-ipam", version, long_about)]
struct Args {
    /// Seed of the operation list (random if not given; printed either way).
    #[arg(long, env = "SOAK_SEED")]
    seed: Option<u64>,
    /// Operations to generate (quiet periods included).
    #[arg(long = "ops", env = "SOAK_OPS", default_value_t = 200)]
    ops: usize,
    /// Stop applying operations after this long, then run one last quiet period.
    #[arg(long, env = "SOAK_DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Fresh-world runs the shrinker may make (0: no shrinking).
    #[arg(long, env = "SOAK_SHRINK_RUNS", default_value_t = 8)]
    shrink_runs: usize,
    /// How long a quiet period may take to converge before it fails.
    #[arg(long, env = "SOAK_CONVERGE_DEADLINE", default_value = "60s", value_parser = humantime::parse_duration)]
    converge_deadline: Duration,
    /// Directory with eni-controller, eni-manager and cni-helper (default: next to this
    /// binary).
    #[arg(long, env = "SOAK_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Directory for logs (a sub-directory per run).
    #[arg(long, env = "SOAK_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// Print the operation list and exit.
    #[arg(long)]
    print_ops: bool,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "SOAK_LOG", default_value = "info,eni_testkit=warn")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    eni_testkit::install_crypto_provider();
    let seed = args.seed.unwrap_or_else(rand::random);
    let list = ipam::generate(seed, args.ops);
    if args.print_ops {
        for (i, op) in list.iter().enumerate() {
            println!("{i:>5} {op:?}");
        }
        return Ok(());
    }
    let dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_path_buf(),
    };
    let bin = |name: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        if !p.is_file() {
            bail!(
                "{} not found: cargo build --workspace --bins, or pass --bin-dir",
                p.display()
            );
        }
        Ok(p)
    };
    let cfg = RunConfig {
        seed,
        controller: bin("eni-controller")?,
        manager: bin("eni-manager")?,
        cni_helper: bin("cni-helper")?,
        converge_deadline: args.converge_deadline,
        log_dir: args
            .log_dir
            .unwrap_or_else(|| std::env::temp_dir().join(format!("eni-soak-ipam-{seed}"))),
        duration: args.duration,
    };
    println!("soak-ipam: seed {seed}, {} ops", list.len());
    let out = ipam::soak(&cfg, &list, args.shrink_runs).await?;
    println!("{}", ipam::figures(&out.report, seed));
    let Some(failure) = &out.report.failure else {
        println!("soak-ipam PASSED (seed {seed})");
        return Ok(());
    };
    println!(
        "soak-ipam FAILED (seed {seed}) at op {} ({:?}): {}",
        failure.at, list[failure.at], failure.what
    );
    if let Some((list, f)) = &out.shrunk {
        println!(
            "shortest failing prefix found ({} ops, {} shrink runs; replay: --seed {seed} --ops {}):",
            list.len(),
            out.shrink_runs,
            list.len()
        );
        for op in list {
            println!("  {op:?}");
        }
        println!("  -> {}", f.what);
    }
    bail!("soak-ipam failed (seed {seed})")
}
