//! Pod address pools (`spec.ipam`) end to end: the controller against a real
//! kube-apiserver and moto behind the EC2 fault layer (which models prefixes, the
//! per-interface limit, reserved addresses and EC2's answer shape). The node daemon's
//! report is written here by hand, as the daemon would (server-side apply under its field
//! manager), so every step of the refill / shrink handshake is observable.
//!
//! Integration tier: `make test-integration`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{World, condition};
use eni_api::{EniPool, NodeENI};
use eni_testkit::faults::FaultConfig;
use kube::api::{Patch, PatchParams};

fn pool(o: &NodeENI) -> Option<EniPool> {
    o.status.as_ref()?.attachments.first()?.ipam.clone()
}

fn eni_id(o: &NodeENI) -> String {
    o.status
        .as_ref()
        .and_then(|s| s.attachments.first())
        .map(|a| a.eni_id.clone())
        .unwrap_or_default()
}

/// (secondary addresses, prefixes) EC2 lists on the ENI.
async fn in_ec2(w: &World, eni: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = w
        .ec2
        .describe_network_interfaces()
        .network_interface_ids(eni)
        .send()
        .await
        .expect("describe");
    let Some(n) = out.network_interfaces().first() else {
        return Default::default();
    };
    let addresses = n
        .private_ip_addresses()
        .iter()
        .filter(|a| a.primary() != Some(true))
        .filter_map(|a| a.private_ip_address().map(str::to_string))
        .collect();
    // Prefixes come from the fault layer's view (moto has none).
    let f = w.faults.as_ref().expect("faults");
    let through = common::ec2_client(&f.endpoint)
        .describe_network_interfaces()
        .network_interface_ids(eni)
        .send()
        .await
        .expect("describe through the fault layer");
    let prefixes = through
        .network_interfaces()
        .first()
        .map(|n| {
            n.ipv4_prefixes()
                .iter()
                .filter_map(|p| p.ipv4_prefix().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    (addresses, prefixes)
}

/// Writes node-1's report for the ENI, as its node daemon would.
async fn report(w: &World, eni: &str, pool: &[String], in_use: &[String], released: &[String]) {
    let body = serde_json::json!({
        "apiVersion": "networking.k8s.aws/v1alpha1",
        "kind": "NodeENI",
        "metadata": {"name": "vpc"},
        "status": {"nodeReports": [{
            "nodeName": "node-1",
            "interfaces": [{"eniID": eni, "ipam": {"pool": pool, "inUse": in_use, "released": released}}],
        }]},
    });
    w.nodeenis()
        .patch_status(
            "vpc",
            &PatchParams::apply("eni-manager-node-1").force(),
            &Patch::Apply(&body),
        )
        .await
        .expect("node report");
}

fn spec(w: &World, ipam: &str) -> String {
    format!(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {{name: vpc}}
spec:
  nodeSelector: {{ng: vpc}}
  subnetID: {}
  securityGroupIDs: [{}]
  deviceIndex: 2
  ipam: {ipam}
",
        w.subnets["net-a"], w.groups["multus-a"]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn warm_pool_follows_node_usage_and_never_unassigns_an_address_in_use() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    w.node("node-1", &[("ng", "vpc")]).await;
    w.start_controller(&[]);
    w.apply_nodeeni(&spec(&w, "{warmTarget: 4, minimum: 2}"))
        .await;

    // Filled to the warm target in one call, published, and in EC2.
    let obj = w
        .wait_for("vpc", "a pool of 4", |o| {
            pool(o).is_some_and(|p| p.addresses.len() == 4)
                && condition(o, "IPAM").is_some_and(|c| c.status == "True")
        })
        .await;
    let eni = eni_id(&obj);
    let p = pool(&obj).expect("pool");
    assert_eq!(p.mode, "secondaryIPs");
    assert_eq!((p.pool_size, p.in_use, p.free), (4, 0, 4));
    let (ec2, _) = in_ec2(&w, &eni).await;
    assert_eq!(ec2, p.addresses.iter().cloned().collect::<BTreeSet<_>>());
    for a in &p.addresses {
        let last: u32 = a
            .rsplit('.')
            .next()
            .and_then(|o| o.parse().ok())
            .unwrap_or(0);
        assert!((4..255).contains(&last), "reserved address {a} handed out");
    }
    assert_eq!(w.metrics.ec2_call_count("AssignPrivateIpAddresses"), 1);

    // Three in use: 1 free < 2, so 3 more for 4 free.
    let in_use: Vec<String> = p.addresses[..3].to_vec();
    report(&w, &eni, &p.addresses, &in_use, &[]).await;
    let obj = w
        .wait_for("vpc", "a pool of 7", |o| {
            pool(o).is_some_and(|p| p.addresses.len() == 7 && p.in_use == 3)
        })
        .await;
    let p = pool(&obj).expect("pool");
    assert_eq!(p.free, 4);
    assert_eq!(w.metrics.ec2_call_count("AssignPrivateIpAddresses"), 2);

    // The pods go: 7 free > 4, so 3 free addresses leave the pool first ...
    report(&w, &eni, &p.addresses, &[], &[]).await;
    let obj = w
        .wait_for("vpc", "3 releasing", |o| {
            pool(o).is_some_and(|p| p.releasing.len() == 3 && p.addresses.len() == 4)
        })
        .await;
    let p = pool(&obj).expect("pool");
    // ... and stay assigned until the node lets go of them: two more passes end (the
    // second starts after the one that published them has ended) and unassign nothing.
    let seen = w.reconciles_ok();
    w.wait_for_reconciles(seen, 2).await;
    assert_eq!(in_ec2(&w, &eni).await.0.len(), 7);
    assert_eq!(w.metrics.ec2_call_count("UnassignPrivateIpAddresses"), 0);

    // The node released two of them but a pod took the third meanwhile (the node would
    // not release it; a stale or wrong report must not make it go either).
    let taken = p.releasing[2].clone();
    let released = p.releasing.clone();
    report(
        &w,
        &eni,
        &p.addresses,
        std::slice::from_ref(&taken),
        &released,
    )
    .await;
    let obj = w
        .wait_for("vpc", "two unassigned", |o| {
            pool(o).is_some_and(|p| p.releasing == [taken.clone()])
        })
        .await;
    let (ec2, _) = in_ec2(&w, &eni).await;
    assert_eq!(ec2.len(), 5);
    assert!(ec2.contains(&taken), "an address in use was unassigned");
    assert_eq!(w.metrics.ec2_call_count("UnassignPrivateIpAddresses"), 1);

    // Level-triggered: a restarted controller reaches the same pool from EC2 and status.
    let before = pool(&obj).expect("pool");
    w.stop_controller().await;
    let seen = w.reconciles_ok();
    w.start_controller(&[]);
    // Its first pass (from the initial list) has ended, status written.
    w.wait_for_reconciles(seen, 1).await;
    let after = pool(&w.nodeenis().get("vpc").await.expect("get")).expect("pool");
    assert_eq!(before.addresses, after.addresses);
    assert_eq!(before.releasing, after.releasing);
    assert_eq!(w.metrics.ec2_call_count("AssignPrivateIpAddresses"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn prefixes_on_nitro_and_the_instance_limit() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    // m5.large: Nitro, 10 addresses per interface.
    w.node("node-1", &[("ng", "vpc")]).await;
    w.start_controller(&[]);
    w.apply_nodeeni(&spec(&w, "{mode: prefixes, warmTarget: 20, minimum: 20}"))
        .await;
    let obj = w
        .wait_for("vpc", "two prefixes", |o| {
            pool(o).is_some_and(|p| p.prefixes.len() == 2)
        })
        .await;
    let eni = eni_id(&obj);
    let p = pool(&obj).expect("pool");
    assert_eq!(p.mode, "prefixes");
    assert_eq!(p.pool_size, 32);
    assert!(p.addresses.is_empty());
    let (_, prefixes) = in_ec2(&w, &eni).await;
    assert_eq!(
        prefixes,
        p.prefixes.iter().cloned().collect::<BTreeSet<_>>()
    );

    // Secondary addresses instead: the warm target asks for more than the instance takes
    // (primary + 9): the pool stops at 9 and says so.
    w.apply_nodeeni(&spec(&w, "{warmTarget: 30, minimum: 30}"))
        .await;
    let obj = w
        .wait_for("vpc", "at the limit", |o| {
            condition(o, "IPAM").is_some_and(|c| c.reason == "PoolAtLimit")
        })
        .await;
    let (addresses, prefixes) = in_ec2(&w, &eni).await;
    // The prefixes drain (no node report yet says they are free, so they stay
    // releasing and keep their slots): 1 + 2 prefixes + 7 addresses = 10.
    assert_eq!(prefixes.len(), 2, "{prefixes:?}");
    assert_eq!(addresses.len(), 7, "{addresses:?}");
    let p = pool(&obj).expect("pool");
    assert_eq!(p.releasing.len(), 2);
    let errors = w
        .faults
        .as_ref()
        .expect("faults")
        .stats()
        .action("AssignPrivateIpAddresses")
        .rejected;
    assert_eq!(errors, 0, "the controller never asks beyond the limit");
}

/// Churn benchmark: 200 pods come and go (at most `max_alive` at once) on one node's
/// warm pool; the node's usage reports drive the controller. Prints EC2 calls per 100 pods
/// and how often a pod found the pool empty (CNI error 11, retried); asserts only
/// correctness: no address in use is ever unassigned.
async fn churn(ipam: &str, max_alive: usize) {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    w.node("node-1", &[("ng", "vpc")]).await;
    w.start_controller(&[]);
    w.apply_nodeeni(&spec(&w, ipam)).await;
    let obj = w
        .wait_for("vpc", "a warm pool", |o| {
            condition(o, "IPAM").is_some_and(|c| c.status == "True")
        })
        .await;
    let eni = eni_id(&obj);
    let calls = |w: &World| {
        w.metrics.ec2_call_count("AssignPrivateIpAddresses")
            + w.metrics.ec2_call_count("UnassignPrivateIpAddresses")
    };
    let start_calls = calls(&w);
    let expand = |p: &EniPool| -> Vec<String> {
        let mut all = p.addresses.clone();
        for prefix in &p.prefixes {
            let base = prefix.split('/').next().unwrap_or_default();
            let octets: Vec<u32> = base.split('.').filter_map(|o| o.parse().ok()).collect();
            if let [a, b, c, d] = octets[..] {
                for i in 0..16 {
                    all.push(format!("{a}.{b}.{c}.{}", d + i));
                }
            }
        }
        all
    };
    let mut alive: Vec<String> = Vec::new();
    let mut started = 0;
    let mut empty = 0;
    let mut step = 0u64;
    // Pace like a node daemon, which reports usage at most once a second (it checks the
    // allocation file that often). This paces the load; it waits for nothing: whatever
    // the controller has not refilled by the next step counts as an empty pool.
    let mut pace = tokio::time::interval(Duration::from_secs(1));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while started < 200 || !alive.is_empty() {
        pace.tick().await;
        step += 1;
        let p = pool(&w.nodeenis().get("vpc").await.expect("get")).expect("pool");
        let free: Vec<String> = expand(&p)
            .into_iter()
            .filter(|a| !alive.contains(a))
            .collect();
        // Pods arrive in bursts of up to 3 while fewer than `max_alive` run; every fourth
        // step, and once all have started, up to 3 leave.
        let arriving = started < 200 && alive.len() < max_alive && !step.is_multiple_of(4);
        if arriving {
            let want = 3.min(200 - started).min(max_alive - alive.len());
            for i in 0..want {
                match free.get(i) {
                    Some(a) => {
                        alive.push(a.clone());
                        started += 1;
                    }
                    None => empty += 1,
                }
            }
        } else {
            for _ in 0..3.min(alive.len()) {
                alive.remove(0);
            }
        }
        let released: Vec<String> = p
            .releasing
            .iter()
            .filter(|r| {
                !alive.iter().any(|a| {
                    r.contains('/')
                        && expand(&EniPool {
                            prefixes: vec![(*r).clone()],
                            ..EniPool::default()
                        })
                        .contains(a)
                        || *r == a
                })
            })
            .cloned()
            .collect();
        let mut pool_units = p.addresses.clone();
        pool_units.extend(p.prefixes.iter().cloned());
        report(&w, &eni, &pool_units, &alive, &released).await;
        // Every address in use is still assigned in EC2.
        let (addresses, prefixes) = in_ec2(&w, &eni).await;
        let assigned = expand(&EniPool {
            addresses: addresses.into_iter().collect(),
            prefixes: prefixes.into_iter().collect(),
            ..EniPool::default()
        });
        for a in &alive {
            assert!(assigned.contains(a), "{a} in use but unassigned");
        }
    }
    let used = calls(&w) - start_calls;
    println!(
        "churn ({ipam}, at most {max_alive} pods at once): 200 pods in {step} steps: {used} EC2 Assign/Unassign calls ({:.1} per 100 pods), {empty} ADDs found the pool empty (error 11, retried)",
        used as f64 / 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (benchmark)"]
async fn churn_of_200_pods_on_secondary_addresses() {
    // m5.large: 9 secondary addresses per ENI; 6 pods + the warm target fit.
    churn("{warmTarget: 3, minimum: 2}", 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (benchmark)"]
async fn churn_of_200_pods_on_prefixes() {
    churn("{mode: prefixes, warmTarget: 8, minimum: 4}", 10).await;
}
