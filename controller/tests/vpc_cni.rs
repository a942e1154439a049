//! Living beside the Amazon VPC CNI: an ipamd stand-in (hack/testkit `ipamd`) attaches its
//! own ENIs at the next free device index on some instances while the controller works.
//! Neither side may lose an ENI, and every collision is reported in the NodeENI's Ready
//! condition, not retried in a loop.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{CLUSTER, World, condition};
use eni_testkit::faults::FaultConfig;
use eni_testkit::ipamd::Ipamd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn controller_and_vpc_cni_share_instances_without_losing_enis() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    let mut instances = Vec::new();
    for n in 1..=3 {
        instances.push(w.node(&format!("node-{n}"), &[("ng", "multi-eni")]).await);
    }
    // ipamd wants 2 ENIs on node-1 (indexes 1 and 2: it races us for 2), 1 on node-2
    // (index 1, our recommended layout), none on node-3.
    let want = BTreeMap::from([(instances[0].clone(), 2), (instances[1].clone(), 1)]);
    let ipamd = Ipamd::start(
        common::ec2_client(&w.controller_endpoint()),
        CLUSTER,
        &w.subnets["net-b"],
        want,
        Duration::from_millis(100),
    );
    w.start_controller(&[]);
    let subnet = w.subnets["net-a"].clone();
    w.apply_nodeeni(&format!(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {{name: beside-cni}}
spec:
  nodeSelector: {{ng: multi-eni}}
  subnetID: {subnet}
  securityGroupNames: [multus-a]
  deviceIndex: 2
"
    ))
    .await;

    // Settled: ipamd has what it wants (or EC2 refused it the rest), and every node has
    // our ENI at index 2 or is reported as blocked by the VPC CNI.
    let settled = w
        .wait_for_long(
            "beside-cni",
            "every slot attached or reported",
            Duration::from_secs(120),
            |o| {
                let Some(s) = o.status.as_ref() else {
                    return false;
                };
                let message = condition(o, "Ready")
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                (1..=3).all(|n| {
                    let node = format!("node-{n}");
                    s.attachments
                        .iter()
                        .any(|a| a.node_id == node && a.status == "Attached")
                        || (message.contains(&format!("node {node}: device index 2 is in use by"))
                            && message.contains("Amazon VPC CNI"))
                })
            },
        )
        .await;
    let record = ipamd.record();
    drop(ipamd);

    // No ENI lost: each ipamd ENI is still attached where ipamd put it.
    for a in &record.attached {
        let eni = w
            .ec2
            .describe_network_interfaces()
            .network_interface_ids(&a.eni_id)
            .send()
            .await
            .expect("describe")
            .network_interfaces()
            .first()
            .cloned()
            .unwrap_or_else(|| panic!("ipamd's ENI {} was deleted", a.eni_id));
        let at = eni.attachment().expect("still attached");
        assert_eq!(at.instance_id(), Some(a.instance_id.as_str()));
        assert_eq!(at.device_index(), Some(a.device_index));
    }
    // Ours: one per node at most, each attached at index 2 or waiting, none lost.
    let ours = w.managed_enis(None).await;
    assert!(ours.len() <= 3, "{} managed ENIs for 3 nodes", ours.len());
    for e in &ours {
        if let Some(at) = e.attachment() {
            assert_eq!(at.device_index(), Some(2));
        }
    }
    let status = settled.status.expect("status");
    assert_eq!(status.desired_attachments, 3);
    // Collisions are reported, not retried in a loop: a bounded number of calls.
    let creates = w.metrics.ec2_call_count("CreateNetworkInterface");
    let attaches = w.metrics.ec2_call_count("AttachNetworkInterface");
    assert!(creates <= 3, "{creates} creates for 3 slots");
    assert!(attaches <= 6, "{attaches} attaches for 3 slots");
    // And no further attempts while the collision lasts.
    let before = w.metrics.ec2_call_count("AttachNetworkInterface");
    w.apply_nodeeni(&format!(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {{name: beside-cni}}
spec:
  nodeSelector: {{ng: multi-eni}}
  subnetID: {subnet}
  securityGroupNames: [multus-a]
  deviceIndex: 2
  description: look again
"
    ))
    .await;
    w.wait_for("beside-cni", "the pass after the edit", |o| {
        o.status.as_ref().and_then(|s| s.observed_generation) == o.metadata.generation
    })
    .await;
    assert_eq!(w.metrics.ec2_call_count("AttachNetworkInterface"), before);
}
