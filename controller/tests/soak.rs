//! The short run of the randomized soak (hack/soak-controller): a fixed seed, about two
//! minutes, against the eni-controller binary this package builds. The long runs and
//! the shrinker are in the `soak-controller` binary (`--help`).
//!
//! `SOAK_ALL_KINDS=1` enables the operation kinds left out below (they find controller
//! defects still open in issue 12); `SOAK_SEED` / `SOAK_OPS` override the seed and length.
//! Before defect 1 was fixed this seed failed (a label removed and re-added: the slot's
//! old client token replayed a deleted ENI).
//!
//! Integration tier: `make test-integration`.

use std::collections::BTreeSet;
use std::time::Duration;

use eni_soak::check::CheckConfig;
use eni_soak::ops::{self, Kind};
use eni_soak::run::{self, RunConfig};
use eni_soak::world::ControllerTiming;

/// Kinds that still find open controller defects (issue 12), with the defect. Empty since
/// the fixes of issue 12 landed; before them `node-drain` (defect 14) and `oob-delete`
/// (defect 1) failed here, and `leader-cut` (defect 5) was left out untried.
const EXCLUDED: &[(Kind, &str)] = &[];

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn soak_short_run() {
    eni_testkit::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "eni_soak=info".into()),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "eni_soak=info".into()),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    let seed: u64 = env("SOAK_SEED", 20261130);
    let count: usize = env("SOAK_OPS", 60);
    let all = std::env::var_os("SOAK_ALL_KINDS").is_some();
    let mut kinds: BTreeSet<Kind> = Kind::all().into_iter().collect();
    if !all {
        for (k, why) in EXCLUDED {
            eprintln!("soak: leaving out {k:?} ({why}); SOAK_ALL_KINDS=1 enables it");
            kinds.remove(k);
        }
    }
    let list = ops::generate(seed, count, &kinds);
    let log_root = tempfile::Builder::new()
        .prefix("eni-soak-test-")
        .tempdir()
        .expect("temp dir");
    let cfg = RunConfig {
        controller: env!("CARGO_BIN_EXE_eni-controller").into(),
        seed,
        timing: ControllerTiming {
            resync: Duration::from_secs(10),
            detach_timeout: Duration::from_secs(3),
            orphan_grace: Duration::from_secs(5),
        },
        check: CheckConfig {
            draining_keeps_enis: true,
            eni_call_budget: 8,
            lease_loss_grace: Duration::from_secs(18),
        },
        idle_window: Duration::from_secs(15),
        converge_deadline: Duration::from_secs(90),
        duration: Some(Duration::from_secs(110)),
        log_root: log_root.path().to_path_buf(),
    };
    let out = run::soak(&cfg, &list, false, 0)
        .await
        .expect("soak harness");
    print!("{}", run::figures(&out.report, seed));
    if let Some(f) = &out.report.failure {
        let logs = log_root.keep();
        panic!(
            "soak failed (seed {seed}) at op {}:\n  {}\nops:\n  {}\nlogs kept in {}; shrink with: soak-controller --seed {seed} --ops {count}",
            f.at,
            f.violations.join("\n  "),
            list[..=f.at]
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n  "),
            logs.display()
        );
    }
    assert!(out.report.quiet_passed >= 2, "too few quiet periods ran");
}
