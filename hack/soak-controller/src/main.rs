//! `soak-controller`: the randomized, seeded soak of the real eni-controller binary.
//! See the crate docs and `--help`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use eni_soak::check::CheckConfig;
use eni_soak::ops::{self, Kind};
use eni_soak::run::{self, RunConfig};
use eni_soak::world::ControllerTiming;

/// Randomized, seeded, model-based soak of eni-controller.
///
/// Starts etcd + kube-apiserver and moto behind the EC2 fault layer (peers from
/// `make peers`), runs the real eni-controller binary as two replicas with leader
/// election, applies a seeded random list of operations and, in quiet periods, checks
/// invariants against EC2 and the API server. On failure it prints the seed and the
/// shortest failing prefix it finds. The same seed gives the same operations.
#[derive(Debug, Parser)]
#[command(name = "soak-controller", version, long_about)]
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
    /// Search for the shortest failing prefix after a failure.
    #[arg(long, env = "SOAK_SHRINK", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    shrink: bool,
    /// Fresh-world runs the shrinker may make.
    #[arg(long, env = "SOAK_SHRINK_RUNS", default_value_t = 12)]
    shrink_runs: usize,
    /// Operation kinds to use (comma-separated; default: all).
    #[arg(long, env = "SOAK_KINDS", value_delimiter = ',', value_enum)]
    kinds: Vec<Kind>,
    /// Operation kinds to leave out (comma-separated).
    #[arg(long, env = "SOAK_EXCLUDE", value_delimiter = ',', value_enum)]
    exclude: Vec<Kind>,
    /// The eni-controller binary (default: next to this binary).
    #[arg(long, env = "SOAK_CONTROLLER")]
    controller: Option<PathBuf>,
    /// How long a quiet period may take to converge before it fails.
    #[arg(long, env = "SOAK_CONVERGE_DEADLINE", default_value = "120s", value_parser = humantime::parse_duration)]
    converge_deadline: Duration,
    /// The controller's --resync-period.
    #[arg(long, env = "SOAK_RESYNC", default_value = "10s", value_parser = humantime::parse_duration)]
    resync: Duration,
    /// The controller's --detachment-timeout.
    #[arg(long, env = "SOAK_DETACH_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    detach_timeout: Duration,
    /// The controller's --orphan-grace-period.
    #[arg(long, env = "SOAK_ORPHAN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    orphan_grace: Duration,
    /// A draining Node (deletionTimestamp, still there) keeps its ENIs (issue 12, defect
    /// 14); off: it is expected to lose them.
    #[arg(long, env = "SOAK_DRAINING_KEEPS_ENIS", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    draining_keeps_enis: bool,
    /// Mutating EC2 calls reaching EC2 one ENI may cost (plus 2 per edit of its NodeENI
    /// and 2 per out-of-band detach of it).
    #[arg(long, env = "SOAK_ENI_CALL_BUDGET", default_value_t = 8)]
    eni_call_budget: u64,
    /// How long a replica cut off from the API server may keep starting mutating EC2
    /// calls (its Lease lasts 15 s).
    #[arg(long, env = "SOAK_LEASE_LOSS_GRACE", default_value = "18s", value_parser = humantime::parse_duration)]
    lease_loss_grace: Duration,
    /// After the last quiet period, no mutating EC2 call may come for this long (0s: off).
    #[arg(long, env = "SOAK_IDLE_WINDOW", default_value = "15s", value_parser = humantime::parse_duration)]
    idle_window: Duration,
    /// Directory for controller logs (a sub-directory per run).
    #[arg(long, env = "SOAK_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// Print the operation list and exit.
    #[arg(long)]
    print_ops: bool,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "SOAK_LOG", default_value = "info,eni_testkit=warn")]
    log: String,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        other => Err(format!("want on or off, got {other:?}")),
    }
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
    let mut kinds: BTreeSet<Kind> = if args.kinds.is_empty() {
        Kind::all().into_iter().collect()
    } else {
        args.kinds.iter().copied().collect()
    };
    for k in &args.exclude {
        kinds.remove(k);
    }
    let list = ops::generate(seed, args.ops, &kinds);
    if args.print_ops {
        for (i, op) in list.iter().enumerate() {
            println!("{i:>5} {op}");
        }
        return Ok(());
    }
    let controller = match args.controller {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("eni-controller"),
    };
    if !controller.is_file() {
        bail!(
            "{} not found: build it (cargo build -p eni-controller) or pass --controller",
            controller.display()
        );
    }
    let log_root = args
        .log_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("eni-soak-{seed}")));
    let cfg = RunConfig {
        controller,
        seed,
        timing: ControllerTiming {
            resync: args.resync,
            detach_timeout: args.detach_timeout,
            orphan_grace: args.orphan_grace,
        },
        check: CheckConfig {
            draining_keeps_enis: args.draining_keeps_enis,
            eni_call_budget: args.eni_call_budget,
            lease_loss_grace: args.lease_loss_grace,
        },
        idle_window: args.idle_window,
        converge_deadline: args.converge_deadline,
        duration: args.duration,
        log_root,
    };
    println!(
        "soak: seed {seed}, {} ops, kinds {:?}",
        list.len(),
        kinds.iter().collect::<Vec<_>>()
    );
    let out = run::soak(&cfg, &list, args.shrink, args.shrink_runs).await?;
    print!("{}", run::figures(&out.report, seed));
    let Some(failure) = &out.report.failure else {
        println!("soak PASSED (seed {seed})");
        return Ok(());
    };
    println!(
        "soak FAILED (seed {seed}) at op {}: {} broken invariants:",
        failure.at,
        failure.violations.len()
    );
    for v in &failure.violations {
        println!("  - {v}");
    }
    if let Some((list, f)) = &out.shrunk {
        println!(
            "shortest failing sequence found ({} ops, {} shrink runs; replay: --seed {seed} and these ops):",
            list.len(),
            out.shrink_runs
        );
        for op in list {
            println!("  {op}");
        }
        println!("  -> broken:");
        for v in &f.violations {
            println!("     - {v}");
        }
    }
    bail!("soak failed (seed {seed})")
}
