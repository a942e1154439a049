//! NodeENI lifecycle end to end: the controller against a real kube-apiserver and moto.
//!
//! Integration tier: `make test-integration`.

mod common;

use std::time::Duration;

use common::{CLUSTER, World, condition, ready};
use eni_api::tags;
use eni_testkit::eventually;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

const TIMEOUT: Duration = Duration::from_secs(60);

fn tag<'a>(eni: &'a aws_sdk_ec2::types::NetworkInterface, key: &str) -> Option<&'a str> {
    eni.tag_set()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn nodeeni_attaches_one_eni_per_node_and_cleans_up() {
    let mut w = World::new().await;
    let mut instances = Vec::new();
    for n in ["node-1", "node-2", "node-3"] {
        instances.push(w.node(n, &[("ng", "multi-eni")]).await);
    }
    // A node that is not selected.
    w.node("node-other", &[("ng", "other")]).await;
    w.start_controller(&[]);
    let subnet = w.subnets["net-a"].clone();
    let sg = w.groups["multus-a"].clone();
    w.apply_nodeeni(&format!(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {{name: multus}}
spec:
  nodeSelector: {{ng: multi-eni}}
  subnetID: {subnet}
  securityGroupIDs: [{sg}]
  deviceIndex: 2
  mtu: 9001
  description: multus data plane
"
    ))
    .await;

    let obj = w
        .wait_for("multus", "Ready with 3 attachments", |o| {
            ready(o) && o.status.as_ref().is_some_and(|s| s.attachments.len() == 3)
        })
        .await;
    let status = obj.status.expect("status");
    assert_eq!(status.desired_attachments, 3);
    assert_eq!(status.ready_attachments, 3);
    assert_eq!(status.subnet_ids, vec![subnet.clone()]);
    for a in &status.attachments {
        assert_eq!(a.status, "Attached", "{a:?}");
        assert_eq!(a.device_index, 2);
        assert_eq!(a.subnet_id, subnet);
        assert_eq!(a.subnet_cidr.as_deref(), Some("10.0.1.0/24"));
        assert_eq!(a.vpc_id.as_deref(), Some(w.vpc.as_str()));
        assert_eq!(a.mtu, Some(9001));
        assert!(
            a.mac_address.as_deref().is_some_and(|m| m.len() == 17),
            "{a:?}"
        );
        assert!(a.eni_id.starts_with("eni-") && !a.attachment_id.is_empty());
    }

    // EC2: exactly one ENI per selected instance, as asked.
    let enis = w.managed_enis(None).await;
    assert_eq!(enis.len(), 3, "{enis:?}");
    for (node, instance) in ["node-1", "node-2", "node-3"].iter().zip(&instances) {
        let mine: Vec<_> = enis
            .iter()
            .filter(|e| e.attachment().and_then(|a| a.instance_id()) == Some(instance.as_str()))
            .collect();
        assert_eq!(mine.len(), 1, "{node}: {mine:?}");
        let e = mine[0];
        assert_eq!(e.attachment().and_then(|a| a.device_index()), Some(2));
        assert_eq!(e.subnet_id(), Some(subnet.as_str()));
        assert_eq!(e.description(), Some("multus data plane"));
        let groups: Vec<&str> = e.groups().iter().filter_map(|g| g.group_id()).collect();
        assert_eq!(groups, vec![sg.as_str()]);
        assert_eq!(tag(e, tags::CLUSTER), Some(CLUSTER));
        assert_eq!(tag(e, tags::NODE_ENI), Some("multus"));
        assert_eq!(tag(e, tags::NODE), Some(*node));
        assert_eq!(tag(e, tags::DEVICE_INDEX), Some("2"));
    }
    // DeleteOnTermination (default true) was set on each attachment: moto does not keep
    // it, so count the calls (create, attach, modify = 3 mutating calls per ENI).
    assert_eq!(w.metrics.ec2_call_count("CreateNetworkInterface"), 3);
    assert_eq!(w.metrics.ec2_call_count("AttachNetworkInterface"), 3);
    assert_eq!(
        w.metrics.ec2_call_count("ModifyNetworkInterfaceAttribute"),
        3
    );

    // Events were recorded against the NodeENI.
    let events: Api<Event> = Api::namespaced(w.kube.clone(), "default");
    let found = eventually(TIMEOUT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            let reasons: Vec<String> = list
                .items
                .iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("multus"))
                .filter_map(|e| e.reason.clone())
                .collect();
            (reasons.iter().any(|r| r == "Created") && reasons.iter().any(|r| r == "Attached"))
                .then_some(reasons)
        }
    })
    .await;
    assert!(found.is_some(), "no Created/Attached events");

    // Unlabel node-1: its ENI is detached and deleted, status drops it.
    let nodes: Api<Node> = Api::all(w.kube.clone());
    nodes
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"ng": null}}})),
        )
        .await
        .expect("unlabel");
    w.wait_for("multus", "node-1 dropped", |o| {
        ready(o)
            && o.status.as_ref().is_some_and(|s| {
                s.attachments.len() == 2 && s.attachments.iter().all(|a| a.node_id != "node-1")
            })
    })
    .await;
    assert!(w.managed_enis(Some("node-1")).await.is_empty());

    // Delete node-2: same.
    nodes
        .delete("node-2", &DeleteParams::default())
        .await
        .expect("delete node");
    w.wait_for("multus", "node-2 dropped", |o| {
        ready(o) && o.status.as_ref().is_some_and(|s| s.attachments.len() == 1)
    })
    .await;
    assert!(w.managed_enis(Some("node-2")).await.is_empty());

    // Delete the NodeENI: every ENI goes, then the finalizer, then the object.
    w.nodeenis()
        .delete("multus", &DeleteParams::default())
        .await
        .expect("delete NodeENI");
    let gone = eventually(TIMEOUT, || async {
        w.nodeenis()
            .get_opt("multus")
            .await
            .ok()
            .and_then(|o| o.is_none().then_some(()))
    })
    .await;
    assert!(gone.is_some(), "NodeENI was never finalized");
    assert!(w.managed_enis(None).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn names_resolve_and_multi_subnet_uses_consecutive_indexes() {
    let mut w = World::new().await;
    for n in ["node-1", "node-2"] {
        w.node(n, &[("ng", "multi-eni")]).await;
    }
    w.start_controller(&[]);
    w.apply_nodeeni(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {name: by-name}
spec:
  nodeSelector: {ng: multi-eni}
  subnetNames: [net-a, net-b]
  securityGroupNames: [multus-a, multus-b]
  deviceIndex: 1
",
    )
    .await;
    let obj = w
        .wait_for("by-name", "Ready with 4 attachments", |o| {
            ready(o) && o.status.as_ref().is_some_and(|s| s.attachments.len() == 4)
        })
        .await;
    let status = obj.status.expect("status");
    assert_eq!(
        status.subnet_ids,
        vec![w.subnets["net-a"].clone(), w.subnets["net-b"].clone()]
    );
    let mut want_groups = vec![w.groups["multus-a"].clone(), w.groups["multus-b"].clone()];
    want_groups.sort();
    assert_eq!(status.security_group_ids, want_groups);
    for node in ["node-1", "node-2"] {
        let mut mine: Vec<(i32, String)> = status
            .attachments
            .iter()
            .filter(|a| a.node_id == node)
            .map(|a| (a.device_index, a.subnet_id.clone()))
            .collect();
        mine.sort();
        assert_eq!(
            mine,
            vec![
                (1, w.subnets["net-a"].clone()),
                (2, w.subnets["net-b"].clone())
            ],
            "{node}"
        );
    }
    for e in w.managed_enis(None).await {
        let mut groups: Vec<String> = e
            .groups()
            .iter()
            .filter_map(|g| g.group_id().map(String::from))
            .collect();
        groups.sort();
        assert_eq!(groups, want_groups);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn unknown_subnet_name_is_a_condition_and_creates_nothing() {
    let mut w = World::new().await;
    w.node("node-1", &[("ng", "multi-eni")]).await;
    w.start_controller(&[]);
    w.apply_nodeeni(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {name: typo}
spec:
  nodeSelector: {ng: multi-eni}
  subnetName: no-such-subnet
  securityGroupNames: [multus-a]
",
    )
    .await;
    let obj = w
        .wait_for("typo", "SubnetNotFound", |o| {
            condition(o, "Ready")
                .is_some_and(|c| c.status == "False" && c.reason == "SubnetNotFound")
        })
        .await;
    let c = condition(&obj, "Ready").expect("condition");
    assert!(c.message.contains("no-such-subnet"), "{}", c.message);
    assert!(w.managed_enis(None).await.is_empty());
    assert_eq!(w.metrics.ec2_call_count("CreateNetworkInterface"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn eni_deleted_out_of_band_is_recreated() {
    let mut w = World::new().await;
    let instance = w.node("node-1", &[("ng", "multi-eni")]).await;
    w.start_controller(&["--resync-period=2s"]);
    let subnet = w.subnets["net-a"].clone();
    w.apply_nodeeni(&format!(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {{name: repair}}
spec:
  nodeSelector: {{ng: multi-eni}}
  subnetID: {subnet}
  securityGroupNames: [multus-a]
"
    ))
    .await;
    let obj = w.wait_for("repair", "Ready", ready).await;
    let first = obj.status.expect("status").attachments[0].clone();

    // Someone detaches and deletes the ENI behind the controller's back.
    w.ec2
        .detach_network_interface()
        .attachment_id(&first.attachment_id)
        .send()
        .await
        .expect("detach");
    w.ec2
        .delete_network_interface()
        .network_interface_id(&first.eni_id)
        .send()
        .await
        .expect("delete");

    let obj = w
        .wait_for("repair", "a new ENI attached", |o| {
            ready(o)
                && o.status.as_ref().is_some_and(|s| {
                    s.attachments.len() == 1 && s.attachments[0].eni_id != first.eni_id
                })
        })
        .await;
    let again = &obj.status.expect("status").attachments[0];
    let enis = w.managed_enis(None).await;
    assert_eq!(enis.len(), 1);
    assert_eq!(enis[0].network_interface_id(), Some(again.eni_id.as_str()));
    assert_eq!(
        enis[0].attachment().and_then(|a| a.instance_id()),
        Some(instance.as_str())
    );
}
