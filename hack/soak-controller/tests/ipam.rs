//! The short run of the pod address pool soak (`eni_soak::ipam`, issue 17): a fixed seed,
//! about two minutes, with the eni-controller, eni-manager and cni-helper binaries built
//! next to this test (`cargo test --workspace` builds them). The long runs and the
//! shrinker: the `soak-ipam` binary (`--help`). `SOAK_SEED` / `SOAK_OPS` override the
//! seed and the length.
//!
//! Integration tier (root: the node daemon's network namespace): `make test-integration`.

use std::time::Duration;

use eni_soak::ipam::{self, RunConfig};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: root, kube-apiserver and moto (make test-integration)"]
async fn ipam_soak_short_run() {
    eni_testkit::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "eni_soak=info".into()),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    let seed: u64 = env("SOAK_SEED", 20261130);
    let count: usize = env("SOAK_OPS", 100);
    let bin = |name: &str| {
        ipam::sibling_binary(name).unwrap_or_else(|| {
            panic!("{name} not built next to this test: cargo build --workspace --bins")
        })
    };
    // Kept when the run fails, removed when it passes.
    let log_dir = std::env::temp_dir().join(format!("eni-soak-ipam-{seed}-{}", std::process::id()));
    let cfg = RunConfig {
        seed,
        controller: bin("eni-controller"),
        manager: bin("eni-manager"),
        cni_helper: bin("cni-helper"),
        converge_deadline: Duration::from_secs(60),
        log_dir: log_dir.clone(),
        duration: Some(Duration::from_secs(150)),
    };
    let list = ipam::generate(seed, count);
    let out = ipam::soak(&cfg, &list, 4).await.expect("soak harness");
    eprintln!("{}", ipam::figures(&out.report, seed));
    if let Some(f) = &out.report.failure {
        let shrunk = out
            .shrunk
            .as_ref()
            .map(|(l, f)| {
                format!(
                    "\nshortest failing prefix ({} ops): {l:?}\n -> {}",
                    l.len(),
                    f.what
                )
            })
            .unwrap_or_default();
        panic!(
            "soak-ipam failed (seed {seed}) at op {} ({:?}): {}{shrunk}\nlogs: {}",
            f.at,
            list[f.at],
            f.what,
            log_dir.display()
        );
    }
    assert!(out.report.quiet_passed > 0, "no quiet period ran");
    let _ = std::fs::remove_dir_all(&log_dir);
}
