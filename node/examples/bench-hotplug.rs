//! Hot-plug benchmark for `eni-manager` (run by `hack/bench-node.sh`, as root).
//!
//! Starts the real kube-apiserver (testkit), a NodeENI whose status lists `PLUGS` ENIs
//! for a test node, a network namespace, and the `eni-manager` binary in
//! `$ENI_MANAGER_BIN` operating in that namespace. Then, one at a time, it "hot-plugs"
//! each ENI (a dummy interface with its MAC, or a veth end where the kernel has no dummy
//! driver) and measures the time from just before `ip link add` until this benchmark's
//! own netlink socket in the namespace sees the link up with MTU 9001 (event-driven, no
//! polling). Prints median / p99 / max, and the daemon's RSS when idle.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Manager, Netns};
use eni_api::{NodeENI, crd};
use eni_testkit::{ApiServer, eventually};
use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

const PLUGS: usize = 50;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = ApiServer::shared().await?;
    let client = server.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "nodeenis.networking.k8s.aws",
        &PatchParams::apply("bench").force(),
        &Patch::Apply(crd()),
    )
    .await?;
    eventually(Duration::from_secs(30), || {
        let crds = crds.clone();
        async move {
            let c = crds.get("nodeenis.networking.k8s.aws").await.ok()?;
            c.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        }
    })
    .await
    .ok_or_else(|| anyhow::anyhow!("CRD not established"))?;

    let ns = Netns::new("bench");
    let node = format!("bench-node-{}", ns.name);
    let macs: Vec<String> = (0..PLUGS)
        .map(|i| format!("02:be:00:00:00:{:02x}", i + 1))
        .collect();
    let attachments: Vec<serde_json::Value> = macs
        .iter()
        .enumerate()
        .map(|(i, mac)| {
            serde_json::json!({"nodeID": node, "instanceID": "i-0123456789abcdef0",
                "eniID": format!("eni-bench{i:012}"), "deviceIndex": i + 1,
                "macAddress": mac, "status": "Attached"})
        })
        .collect();
    let api: Api<NodeENI> = Api::all(client.clone());
    let name = format!("bench-{}", ns.name);
    let obj: NodeENI = serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
        "metadata": {"name": name},
        "spec": {"nodeSelector": {}, "subnetID": "subnet-0f59b4f14737be9ad",
                 "securityGroupIDs": ["sg-05da196f3314d4af8"]}
    }))?;
    api.create(&PostParams::default(), &obj).await?;
    api.patch_status(
        &name,
        &PatchParams::apply("bench-controller").force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
            "metadata": {"name": name}, "status": {"attachments": attachments}})),
    )
    .await?;

    let dir = tempfile::tempdir()?;
    let mut mgr = Manager::start(&server.kubeconfig, &node, &ns.path(), dir.path(), &[]);
    mgr.wait_ready(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_start = mgr.rss_kib();

    let (netlink, events) = eni_node::netlink::connect(Some(&ns.path()))?;
    let mut events = std::pin::pin!(events);
    let mut took = Vec::with_capacity(PLUGS);
    let mut took_seen = Vec::with_capacity(PLUGS);
    for (i, mac) in macs.iter().enumerate() {
        let ifname = format!("ens{}", i + 5);
        let t0 = Instant::now();
        ns.add_dummy(&ifname, mac);
        let deadline = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(deadline);
        let mut seen = None;
        loop {
            let links = netlink.links().await?;
            let now = Instant::now();
            if let Some(l) = links.iter().find(|l| &l.mac == mac) {
                let seen = *seen.get_or_insert(now);
                if l.up && l.mtu == 9001 {
                    took.push(now - t0);
                    took_seen.push(now - seen);
                    break;
                }
            }
            tokio::select! {
                _ = &mut deadline => anyhow::bail!("{ifname} not configured within 5 s; log: {}", mgr.log.display()),
                _ = events.next() => {}
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_idle = mgr.rss_kib();

    took.sort();
    took_seen.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "eni-manager hot-plug benchmark ({PLUGS} plugs, one at a time, {} links in the namespace at the end)",
        netlink.links().await?.len()
    );
    println!("  hot-plug -> configured (up + MTU 9001), from before `ip link add`:");
    println!("    min    {:8.2} ms", ms(took[0]));
    println!("    median {:8.2} ms", ms(percentile(&took, 50.0)));
    println!("    p99    {:8.2} ms", ms(percentile(&took, 99.0)));
    println!("    max    {:8.2} ms", ms(took[took.len() - 1]));
    println!(
        "  link first seen by netlink -> configured (daemon only, 0 when already configured at first sight):"
    );
    println!("    median {:8.2} ms", ms(percentile(&took_seen, 50.0)));
    println!("    p99    {:8.2} ms", ms(percentile(&took_seen, 99.0)));
    let mib = |k: Option<u64>| {
        k.map_or("n/a".to_string(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        })
    };
    println!(
        "  daemon RSS: idle after start {}, idle after {PLUGS} plugs {} (target <= 20 MiB)",
        mib(rss_start),
        mib(rss_idle)
    );
    api.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}
