//! The controller as a well-behaved EC2 client: crash safety, throttling, instance
//! limits, drift and orphans. EC2 is moto behind the fault layer (hack/testkit faults),
//! which adds what moto lacks: throttling, limits, in-use errors, client tokens and a
//! DeleteOnTermination that sticks.
//!
//! Integration tier: `make test-integration`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{CLUSTER, World, condition, ready};
use eni_api::tags;
use eni_testkit::eventually;
use eni_testkit::faults::{FaultConfig, LatencyConfig};
use kube::api::{Patch, PatchParams};
use rand::Rng;

fn plain_nodeeni(name: &str, subnet: &str, sg: &str) -> String {
    format!(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {{name: {name}}}
spec:
  nodeSelector: {{ng: multi-eni}}
  subnetID: {subnet}
  securityGroupIDs: [{sg}]
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn killed_controller_leaves_no_duplicates_or_orphans() {
    let mut w = World::new().await;
    let mut config = FaultConfig {
        latency: LatencyConfig {
            min_ms: 20,
            max_ms: 120,
        },
        ..FaultConfig::default()
    };
    config.throttle.scale = 0.5;
    w.start_faults(config).await;
    let mut instances = BTreeMap::new();
    for i in 0..50 {
        let node = format!("node-{i:02}");
        let instance = w.node(&node, &[("ng", "multi-eni")]).await;
        instances.insert(node, instance);
    }
    let (subnet, sg) = (w.subnets["net-a"].clone(), w.groups["multus-a"].clone());
    w.apply_nodeeni(&plain_nodeeni("crash", &subnet, &sg)).await;

    // Kill -9 at random moments while the 50 ENIs converge.
    let mut rng = rand::rng();
    for n in 0..10 {
        let mut c = w.spawn_controller(n, &[]);
        let pause = Duration::from_millis(rng.random_range(300..2500));
        tokio::time::sleep(pause).await;
        c.kill();
    }
    let _final = w.spawn_controller(10, &[]);
    let obj = w
        .wait_for_long("crash", "50 attached", Duration::from_secs(240), |o| {
            ready(o) && o.status.as_ref().is_some_and(|s| s.ready_attachments == 50)
        })
        .await;
    let status = obj.status.expect("status");

    // Exactly one ENI per node, every one in status, no duplicate device index.
    let enis = w.managed_enis(None).await;
    let in_status: BTreeSet<&str> = status
        .attachments
        .iter()
        .map(|a| a.eni_id.as_str())
        .collect();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for e in &enis {
        let id = e.network_interface_id().unwrap_or_default();
        assert!(
            in_status.contains(id),
            "{id} is owned by the cluster but not in status"
        );
        let node = e
            .tag_set()
            .iter()
            .find(|t| t.key() == Some(tags::NODE))
            .and_then(|t| t.value())
            .unwrap_or_default()
            .to_string();
        *per_node.entry(node).or_default() += 1;
    }
    assert_eq!(enis.len(), 50, "ENIs owned by the cluster");
    assert!(per_node.values().all(|n| *n == 1), "{per_node:?}");
    let reservations = w.ec2.describe_instances().send().await.expect("instances");
    for inst in reservations
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
    {
        let mut seen = BTreeSet::new();
        for ni in inst.network_interfaces() {
            let idx = ni.attachment().and_then(|a| a.device_index());
            assert!(
                seen.insert(idx),
                "duplicate device index {idx:?} on {:?}",
                inst.instance_id()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn tiny_ec2_buckets_slow_convergence_but_fail_nothing() {
    let mut w = World::new().await;
    let mut config = FaultConfig::default();
    config.throttle.scale = 0.1; // mutating: 5 burst, 0.5/s; describe: 10 burst, 2/s
    w.start_faults(config).await;
    for i in 0..10 {
        w.node(&format!("node-{i}"), &[("ng", "multi-eni")]).await;
    }
    // The controller keeps EC2's default buckets: it does not know the account is busier.
    w.start_controller(&[]);
    let (subnet, sg) = (w.subnets["net-a"].clone(), w.groups["multus-a"].clone());
    w.apply_nodeeni(&plain_nodeeni("throttled", &subnet, &sg))
        .await;
    w.wait_for_long("throttled", "10 attached", Duration::from_secs(180), |o| {
        ready(o) && o.status.as_ref().is_some_and(|s| s.ready_attachments == 10)
    })
    .await;
    let stats = w.faults.as_ref().expect("faults").stats();
    let metrics = w.metrics.encode();
    println!(
        "throttled requests: {}; reconcile metrics:\n{}",
        stats.total.throttled,
        metrics
            .lines()
            .filter(|l| l.starts_with("eni_controller_reconciles_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        stats.total.throttled > 0,
        "the test did not throttle anything"
    );
    assert!(
        !metrics.contains(r#"eni_controller_reconciles_total{result="error"}"#),
        "a reconcile failed:\n{metrics}"
    );
    assert_eq!(w.managed_enis(None).await.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn instance_type_limit_is_a_condition_not_a_retry_storm() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    w.node("node-1", &[("ng", "multi-eni")]).await; // m5.large: 3 interfaces
    w.start_controller(&[]);
    // Indexes 2 and 3: the primary plus two would make 3, the third does not fit.
    w.apply_nodeeni(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {name: too-many}
spec:
  nodeSelector: {ng: multi-eni}
  subnetNames: [net-a, net-b]
  securityGroupNames: [multus-a]
  deviceIndex: 1
",
    )
    .await;
    let first = w
        .wait_for("too-many", "2 attached", |o| {
            o.status.as_ref().is_some_and(|s| s.ready_attachments == 2)
        })
        .await;
    assert!(ready(&first));

    // A second NodeENI on the same node cannot fit at all.
    w.apply_nodeeni(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {name: no-room}
spec:
  nodeSelector: {ng: multi-eni}
  subnetNames: [net-b]
  securityGroupNames: [multus-a]
  deviceIndex: 3
",
    )
    .await;
    let obj = w
        .wait_for("no-room", "InstanceENILimit", |o| {
            condition(o, "Ready").is_some_and(|c| c.reason == "InstanceENILimit")
        })
        .await;
    let c = condition(&obj, "Ready").expect("condition");
    assert_eq!(c.status, "False");
    assert!(
        c.message.contains("m5.large") && c.message.contains('3'),
        "{}",
        c.message
    );
    assert!(
        w.managed_enis(None).await.len() == 2,
        "an ENI was created for a slot that cannot be attached"
    );
    // Bounded: no EC2 mutation is attempted for the blocked slot while it stays blocked.
    let before = w
        .faults
        .as_ref()
        .expect("faults")
        .stats()
        .mutating_requests();
    let later = eventually(Duration::from_secs(5), || async { None::<()> }).await;
    assert!(later.is_none());
    let after = w
        .faults
        .as_ref()
        .expect("faults")
        .stats()
        .mutating_requests();
    assert_eq!(before, after, "mutating EC2 calls while blocked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn security_group_and_delete_on_termination_drift_is_corrected_in_place() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    w.node("node-1", &[("ng", "multi-eni")]).await;
    w.start_controller(&[]);
    let subnet = w.subnets["net-a"].clone();
    let (sg_a, sg_b) = (w.groups["multus-a"].clone(), w.groups["multus-b"].clone());
    w.apply_nodeeni(&plain_nodeeni("drift", &subnet, &sg_a))
        .await;
    let obj = w.wait_for("drift", "Ready", ready).await;
    let eni_id = obj.status.expect("status").attachments[0].eni_id.clone();
    let faults = w.faults.as_ref().expect("faults").endpoint.clone();
    let via_faults = common::ec2_client(&faults);
    let describe = || async {
        via_faults
            .describe_network_interfaces()
            .network_interface_ids(&eni_id)
            .send()
            .await
            .expect("describe")
            .network_interfaces()[0]
            .clone()
    };
    assert_eq!(
        describe()
            .await
            .attachment()
            .and_then(|a| a.delete_on_termination()),
        Some(true)
    );

    // Change groups and DeleteOnTermination in the spec: same ENI, modified in place.
    w.nodeenis()
        .patch(
            "drift",
            &PatchParams::apply("it").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "networking.k8s.aws/v1alpha1",
                "kind": "NodeENI",
                "metadata": {"name": "drift"},
                "spec": {
                    "nodeSelector": {"ng": "multi-eni"},
                    "subnetID": subnet,
                    "securityGroupIDs": [sg_b],
                    "deleteOnTermination": false,
                }
            })),
        )
        .await
        .expect("update spec");
    let settled = eventually(Duration::from_secs(60), || async {
        let e = describe().await;
        let groups: Vec<&str> = e.groups().iter().filter_map(|g| g.group_id()).collect();
        let dot = e.attachment().and_then(|a| a.delete_on_termination());
        (groups == vec![sg_b.as_str()] && dot == Some(false)).then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "drift not corrected: {:?}",
        describe().await
    );
    let obj = w.wait_for("drift", "Ready at new generation", ready).await;
    assert_eq!(obj.status.expect("status").attachments[0].eni_id, eni_id);
    assert_eq!(w.managed_enis(None).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn orphaned_enis_are_swept_after_the_grace_period() {
    let mut w = World::new().await;
    // An ENI this cluster created for a NodeENI that no longer exists.
    let orphan = w
        .ec2
        .create_network_interface()
        .subnet_id(&w.subnets["net-a"])
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::NetworkInterface)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(tags::CLUSTER)
                        .value(CLUSTER)
                        .build(),
                )
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(tags::CLUSTER_ID)
                        .value("it-cluster-id")
                        .build(),
                )
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(tags::NODE_ENI)
                        .value("long-gone")
                        .build(),
                )
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(tags::NODE)
                        .value("node-x")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect("create orphan")
        .network_interface()
        .and_then(|n| n.network_interface_id())
        .expect("id")
        .to_string();
    // Another cluster's ENI must never be touched.
    w.ec2
        .create_network_interface()
        .subnet_id(&w.subnets["net-a"])
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::NetworkInterface)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key(tags::CLUSTER)
                        .value("someone-else")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect("create foreign ENI");
    w.start_controller(&["--orphan-grace-period=2s", "--cluster-id=it-cluster-id"]);
    let swept = eventually(Duration::from_secs(60), || async {
        w.managed_enis(None).await.is_empty().then_some(())
    })
    .await;
    assert!(swept.is_some(), "orphan {orphan} was not deleted");
    assert!(
        w.metrics
            .encode()
            .contains("eni_controller_orphan_enis_deleted_total 1")
    );
    let all = w
        .ec2
        .describe_network_interfaces()
        .send()
        .await
        .expect("describe");
    assert_eq!(
        all.network_interfaces().len(),
        1,
        "the foreign ENI must stay"
    );
}
