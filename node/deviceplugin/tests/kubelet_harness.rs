//! Against the real kubelet device-manager code (Go harness `kubelet-dp`, built by
//! `hack/peers.sh`). Run with `make test-integration` or
//! `cargo test -p eni-deviceplugin --test kubelet_harness -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::kubelet_dp::{KubeletDp, is};
use common::*;
use eni_deviceplugin::{BoundDevice, CancellationToken, RegistrationMode};
use serde_json::Value;
use tokio::sync::watch;

const A: &str = "0000:00:07.0";
const B: &str = "0000:00:08.0";
const S: Duration = Duration::from_secs(1);

fn devices_event(v: &Value, total: u64, healthy: u64) -> bool {
    is(v, "devices") && v["resource"] == RES && v["total"] == total && v["healthy"] == healthy
}

fn health(v: &Value, id: &str) -> Option<String> {
    v["devices"]
        .as_array()?
        .iter()
        .find(|d| d["id"] == id)
        .map(|d| d["health"].as_str().unwrap_or("").to_owned())
}

#[tokio::test]
#[ignore = "integration: needs kubelet-dp from hack/peers.sh"]
async fn real_kubelet_register_list_allocate_health_restart() {
    init_tracing();
    let host = Host::new();
    host.add_device(A, "vfio-pci", 0, true, 0);
    host.add_device(B, "vfio-pci", 1, true, 1);
    let dir = host.path("device-plugins");
    let mut k = KubeletDp::start(&dir, &[]);
    k.expect(10 * S, "harness ready", |v| is(v, "ready")).await;

    let (tx, rx) = watch::channel(vec![bound(A, RES, "vfio-pci")]);
    let shutdown = CancellationToken::new();
    let plugin = tokio::spawn(eni_deviceplugin::run(host.config(), rx, shutdown.clone()));

    // Registered through the kubelet's own Register handler, which dials us back.
    let (reg, _) = k
        .expect(10 * S, "registered", |v| {
            is(v, "registered") && v["resource"] == RES
        })
        .await;
    assert_eq!(reg["options"]["get_preferred_allocation_available"], true);
    let (list, _) = k
        .expect(5 * S, "1 healthy device", |v| devices_event(v, 1, 1))
        .await;
    assert_eq!(list["devices"][0]["id"], A);
    assert_eq!(list["devices"][0]["numa"], serde_json::json!([0]));

    // Allocate through the kubelet's client.
    let r = k.command(&format!("allocate {RES} {A}")).await;
    assert_eq!(r["ok"], true, "{r}");
    let c = &r["response"]["container_responses"][0];
    assert_eq!(c["envs"]["PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE"], A);
    let info: Value = serde_json::from_str(
        c["envs"]["PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE_INFO"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(info[A]["vfio"]["mount"], "/dev/vfio/vfio");
    assert_eq!(info[A]["vfio"]["dev-mount"], "/dev/vfio/0");
    let devs: Vec<(String, String)> = c["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["host_path"].as_str().unwrap().into(),
                d["container_path"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        devs,
        vec![
            ("/dev/vfio/vfio".into(), "/dev/vfio/vfio".into()),
            ("/dev/vfio/noiommu-0".into(), "/dev/vfio/0".into())
        ]
    );
    assert!(
        host.path("devinfo")
            .join(format!("intel.com-intel_sriov_netdevice-{A}-device.json"))
            .is_file()
    );
    let r = k.command(&format!("allocate {RES} 0000:00:99.0")).await;
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("unknown device ID"),
        "{r}"
    );

    // Bind a second device -> 2 devices.
    tx.send_replace(vec![bound(A, RES, "vfio-pci"), bound(B, RES, "vfio-pci")]);
    let (list, _) = k
        .expect(5 * S, "2 healthy devices", |v| devices_event(v, 2, 2))
        .await;
    assert_eq!(health(&list, B).as_deref(), Some("Healthy"));
    let r = k.command(&format!("preferred {RES} 1 {A},{B} {B}")).await;
    assert_eq!(
        r["response"]["container_responses"][0]["deviceIDs"],
        serde_json::json!([B]),
        "{r}"
    );

    // Make one unhealthy (rebound to its kernel driver) -> Unhealthy.
    let t = std::time::Instant::now();
    host.set_driver(B, "ena");
    let (list, _) = k
        .expect(5 * S, "B unhealthy", |v| devices_event(v, 2, 1))
        .await;
    println!("unhealthy seen by the kubelet after {:?}", t.elapsed());
    assert!(t.elapsed() < 2 * S);
    assert_eq!(health(&list, B).as_deref(), Some("Unhealthy"));
    let r = k.command(&format!("allocate {RES} {B}")).await;
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("Unhealthy"), "{r}");

    // Kubelet restart: sockets wiped, new kubelet.sock -> registered again.
    for round in 0..3 {
        k.clear_pending();
        let r = k.command("restart").await;
        assert_eq!(r["ok"], true, "{r}");
        let (ready, _) = k
            .expect(5 * S, "ready after restart", |v| is(v, "ready"))
            .await;
        let (reg, _) = k
            .expect(10 * S, "re-registered", |v| {
                is(v, "registered") && v["resource"] == RES
            })
            .await;
        let ms = (reg["ts"].as_i64().unwrap() - ready["ts"].as_i64().unwrap()) as f64 / 1e6;
        println!("kubelet restart #{round}: re-registered {ms:.1} ms after the new kubelet.sock");
        assert!(ms < 2000.0, "re-registration took {ms} ms");
        k.expect(5 * S, "list after restart", |v| devices_event(v, 2, 1))
            .await;
    }
    let r = k.command(&format!("allocate {RES} {A}")).await;
    assert_eq!(r["ok"], true, "{r}");

    shutdown.cancel();
    plugin.await.unwrap().unwrap();
    k.quit().await;
}

#[tokio::test]
#[ignore = "integration: needs kubelet-dp from hack/peers.sh"]
async fn real_kubelet_plugin_watcher_registers_plugins_registry_socket() {
    init_tracing();
    let host = Host::new();
    host.add_device(A, "vfio-pci", 0, true, 0);
    let dir = host.path("device-plugins");
    let registry = host.path("plugins_registry");
    let mut k = KubeletDp::start(&dir, &["--plugins-registry", registry.to_str().unwrap()]);
    k.expect(10 * S, "harness ready", |v| is(v, "ready")).await;

    let mut config = host.config();
    config.registration = RegistrationMode::PluginsRegistry;
    let (_tx, rx) = watch::channel::<Vec<BoundDevice>>(vec![bound(A, RES, "vfio-pci")]);
    let shutdown = CancellationToken::new();
    let plugin = tokio::spawn(eni_deviceplugin::run(config, rx, shutdown.clone()));
    let (reg, _) = k
        .expect(15 * S, "registered via plugin watcher", |v| {
            is(v, "registered") && v["resource"] == RES
        })
        .await;
    assert!(
        reg["endpoint"]
            .as_str()
            .unwrap()
            .starts_with(registry.to_str().unwrap()),
        "{reg}"
    );
    k.expect(5 * S, "1 healthy device", |v| devices_event(v, 1, 1))
        .await;
    let r = k.command(&format!("allocate {RES} {A}")).await;
    assert_eq!(r["ok"], true, "{r}");
    shutdown.cancel();
    plugin.await.unwrap().unwrap();
    k.quit().await;
}
