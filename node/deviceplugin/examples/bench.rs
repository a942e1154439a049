//! Benchmark of the device plugin: Allocate latency (p50 / p99 over N calls) and the
//! re-registration time after a kubelet restart.
//!
//! `cargo run --release -p eni-deviceplugin --example bench-deviceplugin -- [--calls N] [--restarts N]
//! [--harness-args "--kubeconfig K --node-name N"]`
//! (or `hack/bench-deviceplugin.sh`). Uses the real kubelet device-manager harness
//! (`$ENI_BIN_DIR/kubelet-dp`, built by `hack/peers.sh`) when present, and always the
//! in-process Rust client / fake kubelet. Temp dirs and Unix sockets only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::kubelet_dp::{KubeletDp, is};
use common::*;
use eni_deviceplugin::config::socket_name;
use eni_deviceplugin::{CancellationToken, Config};
use eni_proto::deviceplugin::v1beta1 as api;
use tokio::sync::watch;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let total: Duration = v.iter().sum();
    println!(
        "{name}: n={} p50={:.1}us p99={:.1}us max={:.1}us mean={:.1}us",
        v.len(),
        pct(&v, 0.50).as_secs_f64() * 1e6,
        pct(&v, 0.99).as_secs_f64() * 1e6,
        v.last().unwrap().as_secs_f64() * 1e6,
        total.as_secs_f64() * 1e6 / v.len() as f64
    );
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    init_tracing_with("eni_deviceplugin=warn");
    let calls = arg("--calls", 10_000);
    let restarts = arg("--restarts", 20);
    let host = Host::new();
    let ids: Vec<String> = (1..=4).map(|i| format!("0000:00:0{i}.0")).collect();
    for (i, id) in ids.iter().enumerate() {
        host.add_device(id, "vfio-pci", i as u32, true, (i % 2) as i64);
    }
    let devices = ids.iter().map(|id| bound(id, RES, "vfio-pci")).collect();
    let config = Config {
        // Production periods, not the test ones.
        health_interval: Duration::from_millis(500),
        socket_check_interval: Duration::from_secs(1),
        ..host.config()
    };
    let dir = host.path("device-plugins");

    let have_go = common::kubelet_dp::binary_if_present().is_some();
    let mut harness = None;
    let mut fake = None;
    if have_go {
        let args: Vec<String> = std::env::args().collect();
        let extra: Vec<&str> = args
            .iter()
            .position(|a| a == "--harness-args")
            .and_then(|i| args.get(i + 1))
            .map(|s| s.split_whitespace().collect())
            .unwrap_or_default();
        let mut k = KubeletDp::start_quiet(&dir, &extra);
        k.expect(Duration::from_secs(10), "ready", |v| is(v, "ready"))
            .await;
        harness = Some(k);
    } else {
        println!("kubelet-dp not built (hack/peers.sh): using the Rust fake kubelet only");
        fake = Some(FakeKubelet::start(&dir));
    }
    let (_tx, rx) = watch::channel(devices);
    let shutdown = CancellationToken::new();
    let plugin = tokio::spawn(eni_deviceplugin::run(config, rx, shutdown.clone()));
    if let Some(k) = harness.as_mut() {
        k.expect(Duration::from_secs(10), "registered", |v| {
            is(v, "registered")
        })
        .await;
        k.expect(Duration::from_secs(10), "devices", |v| {
            is(v, "devices") && v["total"] == 4
        })
        .await;
    }
    if let Some(k) = fake.as_mut() {
        k.next_registration(10).await;
    }

    // 1. Allocate latency from a Rust (tonic) client, one device per call.
    let mut client = plugin_client(&dir.join(socket_name(RES))).await;
    let mut lat = Vec::with_capacity(calls);
    let started = Instant::now();
    for i in 0..calls {
        let req = api::AllocateRequest {
            container_requests: vec![api::ContainerAllocateRequest {
                devices_ids: vec![ids[i % ids.len()].clone()],
            }],
        };
        let t = Instant::now();
        client.allocate(req).await.unwrap();
        lat.push(t.elapsed());
    }
    println!(
        "Allocate via tonic client: {calls} calls in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    summary("Allocate latency (Rust client, 1 device)", lat);

    // 2. The same through the kubelet's own plugin client (Go), two devices per call.
    if let Some(k) = harness.as_mut() {
        let r = k
            .command(&format!("bench {RES} {calls} {} {}", ids[0], ids[1]))
            .await;
        assert_eq!(r["ok"], true, "{r}");
        let x = &r["response"];
        println!(
            "Allocate latency (kubelet Go client, 2 devices): n={} p50={}us p99={}us max={}us total={}ms",
            x["calls"], x["p50_us"], x["p99_us"], x["max_us"], x["total_ms"]
        );
    }

    // 3. Re-registration after a kubelet restart (sockets wiped, new kubelet.sock).
    let mut rereg = Vec::new();
    for _ in 0..restarts {
        if let Some(k) = harness.as_mut() {
            k.clear_pending();
            let r = k.command("restart").await;
            assert_eq!(r["ok"], true, "{r}");
            let (ready, _) = k
                .expect(Duration::from_secs(5), "ready", |v| is(v, "ready"))
                .await;
            let (reg, _) = k
                .expect(Duration::from_secs(10), "registered", |v| {
                    is(v, "registered")
                })
                .await;
            let ns = reg["ts"].as_i64().unwrap() - ready["ts"].as_i64().unwrap();
            rereg.push(Duration::from_nanos(ns.max(0) as u64));
        } else if let Some(k) = fake.as_mut() {
            let t = Instant::now();
            k.restart();
            k.next_registration(10).await;
            rereg.push(t.elapsed());
        }
    }
    let who = if have_go {
        "real kubelet device manager"
    } else {
        "Rust fake kubelet"
    };
    let mut sorted = rereg.clone();
    sorted.sort();
    println!(
        "Re-registration after kubelet restart ({who}): n={} p50={:.1}ms max={:.1}ms",
        sorted.len(),
        pct(&sorted, 0.5).as_secs_f64() * 1e3,
        sorted.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0)
    );

    shutdown.cancel();
    plugin.await.unwrap().unwrap();
    if let Some(k) = harness {
        k.quit().await;
    }
}
