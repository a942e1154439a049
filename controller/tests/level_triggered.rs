//! The controller rebuilds every identity and timer from EC2 and the API server: each
//! test plays one path where state kept only in memory, or in a status field that gets
//! cleared, used to make it stall, leak or touch what is not its own. Each runs against a
//! real kube-apiserver and moto behind the EC2 fault layer (real ClientToken replay,
//! device-index checks, hung detaches).

mod common;

use std::time::Duration;

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use common::{CLUSTER, World, condition, ready};
use eni_api::{FINALIZER, NodeENI, tags};
use eni_testkit::eventually;
use eni_testkit::faults::{FailureRule, FaultConfig};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

const IGNORE: &str = "integration: needs kube-apiserver and moto (make test-integration)";

fn nodes(w: &World) -> Api<Node> {
    Api::all(w.kube.clone())
}

async fn label(w: &World, node: &str, value: Option<&str>) {
    nodes(w)
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"ng": value}}})),
        )
        .await
        .expect("label node");
}

fn plain(name: &str, subnet: &str, index: i32) -> String {
    format!(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {{name: {name}}}
spec:
  nodeSelector: {{ng: multi-eni}}
  subnetID: {subnet}
  securityGroupNames: [multus-a]
  deviceIndex: {index}
"
    )
}

fn attachments(o: &NodeENI) -> Vec<eni_api::ENIAttachment> {
    o.status
        .as_ref()
        .map(|s| s.attachments.clone())
        .unwrap_or_default()
}

/// Creates an ENI in `net-a` outside the controller, with `tags` and `description`.
async fn foreign_eni(w: &World, description: &str, tags: &[(&str, &str)]) -> String {
    let mut spec = TagSpecification::builder().resource_type(ResourceType::NetworkInterface);
    for (k, v) in tags {
        spec = spec.tags(Tag::builder().key(*k).value(*v).build());
    }
    w.ec2
        .create_network_interface()
        .subnet_id(&w.subnets["net-a"])
        .description(description)
        .tag_specifications(spec.build())
        .send()
        .await
        .expect("create ENI")
        .network_interface()
        .and_then(|n| n.network_interface_id())
        .expect("ENI id")
        .to_string()
}

/// A NodeENI as the older controller leaves it: its finalizer, and one status
/// attachment in its shape.
async fn left_by_older_controller(w: &World, yaml: &str, attachment: serde_json::Value) {
    let value: serde_json::Value = serde_yaml_ng::from_str(yaml).expect("yaml");
    let mut obj: NodeENI = serde_json::from_value(value).expect("NodeENI");
    obj.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    let name = obj.metadata.name.clone().expect("name");
    w.nodeenis()
        .create(&Default::default(), &obj)
        .await
        .expect("create");
    w.nodeenis()
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"attachments": [attachment]}})),
        )
        .await
        .expect("old status");
}

async fn attach(w: &World, eni: &str, instance: &str, index: i32) -> String {
    w.ec2
        .attach_network_interface()
        .network_interface_id(eni)
        .instance_id(instance)
        .device_index(index)
        .send()
        .await
        .expect("attach")
        .attachment_id()
        .expect("attachment id")
        .to_string()
}

async fn eni_exists(w: &World, eni: &str) -> bool {
    w.ec2
        .describe_network_interfaces()
        .network_interface_ids(eni)
        .send()
        .await
        .map(|r| !r.network_interfaces().is_empty())
        .unwrap_or(false)
}

async fn eni_tags(w: &World, eni: &str) -> std::collections::BTreeMap<String, String> {
    w.ec2
        .describe_network_interfaces()
        .network_interface_ids(eni)
        .send()
        .await
        .expect("describe")
        .network_interfaces()
        .first()
        .map(|n| {
            n.tag_set()
                .iter()
                .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Issue 12 #1: a slot that leaves and comes back (label removed and re-added) gets a
/// new ENI; the client token of the first create, which EC2 would replay with the
/// deleted ENI, is never reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn slot_that_leaves_and_returns_gets_a_new_eni() {
    let _ = IGNORE;
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    w.node("node-1", &[("ng", "multi-eni")]).await;
    w.start_controller(&[]);
    let subnet = w.subnets["net-a"].clone();
    w.apply_nodeeni(&plain("toggle", &subnet, 2)).await;
    let first = w.wait_for("toggle", "Ready", ready).await;
    let first_eni = attachments(&first)[0].eni_id.clone();

    label(&w, "node-1", None).await;
    w.wait_for("toggle", "the ENI removed", |o| attachments(o).is_empty())
        .await;
    assert!(!eni_exists(&w, &first_eni).await);

    label(&w, "node-1", Some("multi-eni")).await;
    let back = w
        .wait_for("toggle", "Ready with a new ENI", |o| {
            ready(o) && attachments(o).len() == 1 && attachments(o)[0].eni_id != first_eni
        })
        .await;
    let eni = &attachments(&back)[0];
    assert!(eni_exists(&w, &eni.eni_id).await);
    assert!(
        eni.client_token.is_some(),
        "the token is recorded in status"
    );
    assert_eq!(w.managed_enis(None).await.len(), 1);
    // Created ENIs carry the VPC CNI's hands-off tag (issue 14).
    let t = eni_tags(&w, &eni.eni_id).await;
    assert_eq!(t.get(tags::NO_MANAGE).map(String::as_str), Some("true"));
    assert!(t.contains_key(tags::CLUSTER_ID));
}

/// Issue 12 #1: after the spec changed between two creates, EC2 answers
/// IdempotentParameterMismatch to the old token; the controller moves to a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn token_sent_with_other_settings_is_replaced() {
    let mut w = World::new().await;
    // Creates fail until the test has used the controller's token itself.
    w.start_faults(FaultConfig {
        rules: vec![FailureRule::internal_error("CreateNetworkInterface")],
        ..FaultConfig::default()
    })
    .await;
    w.node("node-1", &[("ng", "multi-eni")]).await;
    w.start_controller(&[]);
    let subnet = w.subnets["net-a"].clone();
    w.apply_nodeeni(&plain("mismatch", &subnet, 2)).await;
    let pending = w
        .wait_for("mismatch", "a token recorded", |o| {
            attachments(o)
                .first()
                .is_some_and(|a| a.client_token.is_some())
                // The controller has given up for this pass (no retry of its own can
                // race the create below).
                && condition(o, "Ready").is_some_and(|c| c.message.contains("injected by ec2-faults"))
        })
        .await;
    let token = attachments(&pending)[0]
        .client_token
        .clone()
        .expect("token");
    // EC2 records the token with other settings (as when a create took effect, its
    // answer was lost, and the spec changed before the next try). The controller is
    // down meanwhile, so none of its retries can use the token first; the next one
    // finds the token in status.
    w.stop_controller().await;
    let faults = w.faults.as_ref().expect("faults");
    faults.update_config(|c| c.rules.clear());
    common::ec2_client(&w.controller_endpoint())
        .create_network_interface()
        .subnet_id(&subnet)
        .description("other settings")
        .client_token(&token)
        .send()
        .await
        .expect("create with the token");
    w.start_controller(&[]);
    let done = w.wait_for("mismatch", "Ready", ready).await;
    assert_ne!(
        attachments(&done)[0].client_token.as_deref(),
        Some(token.as_str())
    );
}

/// Issue 12 #2: a detach sent before a restart (by this or another replica) that never
/// completes is forced by the next controller after the detachment timeout, and the
/// finalizer is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn hung_detach_sent_before_a_restart_is_forced() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig {
        hang_detaches: true,
        ..FaultConfig::default()
    })
    .await;
    w.node("node-1", &[("ng", "multi-eni")]).await;
    let subnet = w.subnets["net-a"].clone();
    let mut first = w.spawn_controller(1, &["--detachment-timeout=1h"]);
    w.apply_nodeeni(&plain("hung", &subnet, 2)).await;
    w.wait_for("hung", "Ready", ready).await;
    w.nodeenis()
        .delete("hung", &DeleteParams::default())
        .await
        .expect("delete");
    w.wait_for("hung", "detaching", |o| {
        attachments(o).iter().any(|a| a.status == "Detaching")
    })
    .await;
    first.kill();

    let _second = w.spawn_controller(2, &["--detachment-timeout=2s"]);
    let gone = eventually(Duration::from_secs(60), || async {
        w.nodeenis()
            .get_opt("hung")
            .await
            .ok()
            .and_then(|o| o.is_none().then_some(()))
    })
    .await;
    assert!(
        gone.is_some(),
        "the NodeENI is still there: the hung detach was never forced"
    );
    assert!(w.managed_enis(None).await.is_empty());
}

/// Issue 12 #3 and issue 14: a slot blocked by another ENI at its index (here the VPC
/// CNI's, with its real description and tags) says who holds the index, and proceeds
/// once that ENI is gone, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn blocked_slot_proceeds_once_the_blocking_eni_goes() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    let instance = w.node("node-1", &[("ng", "multi-eni")]).await;
    let cni = foreign_eni(
        &w,
        &format!("aws-K8S-{instance}"),
        &[
            ("node.k8s.amazonaws.com/instance_id", instance.as_str()),
            ("cluster.k8s.amazonaws.com/name", CLUSTER),
        ],
    )
    .await;
    let attachment = attach(&w, &cni, &instance, 1).await;
    w.start_controller(&["--resync-period=5s"]);
    let subnet = w.subnets["net-a"].clone();
    w.apply_nodeeni(&plain("blocked", &subnet, 1)).await;
    let obj = w
        .wait_for("blocked", "DeviceIndexInUse", |o| {
            condition(o, "Ready").is_some_and(|c| c.reason == "DeviceIndexInUse")
        })
        .await;
    let message = condition(&obj, "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains(&cni), "{message}");
    assert!(message.contains("Amazon VPC CNI"), "{message}");
    assert_eq!(w.metrics.ec2_call_count("CreateNetworkInterface"), 0);

    // The VPC CNI gives the index up.
    w.ec2
        .detach_network_interface()
        .attachment_id(&attachment)
        .send()
        .await
        .expect("detach");
    w.ec2
        .delete_network_interface()
        .network_interface_id(&cni)
        .send()
        .await
        .expect("delete");
    w.wait_for_long("blocked", "Ready", Duration::from_secs(90), ready)
        .await;
}

/// Issue 12 #4 and issue 14: ENIs listed in a status written by the older Go controller
/// (no ownership tags on the ENI) are adopted and tagged no_manage, and the finalizer is
/// released only once they are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn older_controller_enis_are_adopted_and_cleaned_up() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    let instance = w.node("node-1", &[("ng", "multi-eni")]).await;
    let subnet = w.subnets["net-a"].clone();
    // What the older controller left: an ENI with its tags and description (its
    // createENIInSubnet), attached at index 2.
    let old = foreign_eni(
        &w,
        "ENI created by nodeeni-controller for node node-1",
        &[
            ("Name", "nodeeni-legacy-node-1-00000001"),
            ("NodeENI", "legacy"),
            ("Node", "node-1"),
            ("SubnetID", subnet.as_str()),
            ("kubernetes.io/cluster/managed-by", "nodeeni-controller"),
            ("node.k8s.amazonaws.com/no_manage", "true"),
        ],
    )
    .await;
    let attachment = attach(&w, &old, &instance, 2).await;
    // The status exactly as the older controller writes it (its
    // createAndAttachENIForSubnet: no device index, status "attached").
    left_by_older_controller(
        &w,
        &plain("legacy", &subnet, 2),
        serde_json::json!({
            "nodeID": "node-1",
            "instanceID": instance,
            "eniID": old,
            "attachmentID": attachment,
            "subnetID": subnet,
            "status": "attached",
            "lastUpdated": "2026-01-01T00:00:00Z",
        }),
    )
    .await;

    w.start_controller(&[]);
    let adopted = w.wait_for("legacy", "Ready", ready).await;
    assert_eq!(attachments(&adopted).len(), 1);
    assert_eq!(
        attachments(&adopted)[0].eni_id,
        old,
        "the old ENI serves the slot"
    );
    let t = eni_tags(&w, &old).await;
    assert_eq!(t.get(tags::CLUSTER).map(String::as_str), Some(CLUSTER));
    assert!(t.contains_key(tags::CLUSTER_ID));
    assert_eq!(t.get(tags::NO_MANAGE).map(String::as_str), Some("true"));
    assert_eq!(w.metrics.ec2_call_count("CreateNetworkInterface"), 0);

    w.nodeenis()
        .delete("legacy", &DeleteParams::default())
        .await
        .expect("delete");
    let gone = eventually(Duration::from_secs(60), || async {
        w.nodeenis()
            .get_opt("legacy")
            .await
            .ok()
            .and_then(|o| o.is_none().then_some(()))
    })
    .await;
    assert!(gone.is_some(), "the finalizer was not released");
    assert!(!eni_exists(&w, &old).await, "the old ENI leaked");
}

/// Issue 12 #4: an untagged ENI the old status lists that is NOT where the status says
/// is left alone, stays listed, and keeps the finalizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn misplaced_untagged_eni_is_never_dropped_or_touched() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    let instance = w.node("node-1", &[("ng", "multi-eni")]).await;
    let subnet = w.subnets["net-a"].clone();
    let stray = foreign_eni(&w, "manual", &[]).await;
    attach(&w, &stray, &instance, 3).await;
    left_by_older_controller(
        &w,
        &plain("stray", &subnet, 2),
        serde_json::json!({
            "nodeID": "node-1", "instanceID": instance, "eniID": stray,
            "attachmentID": "eni-attach-0", "subnetID": subnet, "deviceIndex": 2,
            "status": "attached",
        }),
    )
    .await;
    w.start_controller(&[]);
    w.wait_for("stray", "NotAdopted", |o| {
        o.status.as_ref().is_some_and(|s| {
            s.attachments.iter().any(|a| a.eni_id == stray)
                && s.attachments.iter().any(|a| a.status == "Attached")
        }) && condition(o, "Ready").is_some_and(|c| c.message.contains("not adopted"))
    })
    .await;
    w.nodeenis()
        .delete("stray", &DeleteParams::default())
        .await
        .expect("delete");
    // Our own ENI goes; the stray one stays, and so does the NodeENI.
    w.wait_for("stray", "only the stray ENI left", |o| {
        attachments(o).len() == 1 && attachments(o)[0].eni_id == stray
    })
    .await;
    assert!(eni_exists(&w, &stray).await);
    assert!(
        eni_tags(&w, &stray).await.is_empty(),
        "the stray ENI was tagged"
    );
}

/// Issue 12 #6: another cluster with the same --cluster-name in the account: its ENIs
/// (same name tag, another identity) are never detached, deleted or swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn same_named_cluster_enis_are_never_touched() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    let instance = w.node("node-1", &[("ng", "multi-eni")]).await;
    let other = |nodeeni: &'static str, index: &'static str| {
        [
            (tags::CLUSTER, CLUSTER),
            (tags::CLUSTER_ID, "the-other-cluster"),
            (tags::NODE_ENI, nodeeni),
            (tags::NODE, "node-1"),
            (tags::INSTANCE, "i-elsewhere"),
            (tags::DEVICE_INDEX, index),
        ]
    };
    // Available, for a NodeENI that does not exist here: the sweeper's prey before.
    let loose = foreign_eni(&w, "other cluster", &other("theirs", "2")).await;
    // Attached at the index our NodeENI of the same name wants.
    let taken = foreign_eni(&w, "other cluster", &other("same", "3")).await;
    attach(&w, &taken, &instance, 4).await;
    // Ours from before cluster identities existed (for an instance of this cluster):
    // adopted.
    let mine = foreign_eni(
        &w,
        "pre-identity",
        &[
            (tags::CLUSTER, CLUSTER),
            (tags::NODE_ENI, "gone"),
            (tags::NODE, "node-1"),
            (tags::INSTANCE, instance.as_str()),
        ],
    )
    .await;
    // The other cluster's from before identities (an instance that is not ours): it
    // might be either's, so it is left alone.
    let unproven = foreign_eni(
        &w,
        "pre-identity elsewhere",
        &[
            (tags::CLUSTER, CLUSTER),
            (tags::NODE_ENI, "theirs"),
            (tags::NODE, "node-9"),
            (tags::INSTANCE, "i-0aaaaaaaaaaaaaaaa"),
        ],
    )
    .await;
    w.start_controller(&["--orphan-grace-period=1s"]);
    let subnet = w.subnets["net-a"].clone();
    w.apply_nodeeni(&plain("same", &subnet, 2)).await;
    w.wait_for("same", "Ready", ready).await;
    // Our orphan is swept: the sweeper ran over the other cluster's ENIs too.
    let swept = eventually(Duration::from_secs(60), || async {
        (!eni_exists(&w, &mine).await).then_some(())
    })
    .await;
    assert!(swept.is_some(), "our own pre-identity orphan was not swept");
    assert!(
        eni_exists(&w, &loose).await,
        "the other cluster's ENI was swept"
    );
    assert!(
        eni_exists(&w, &unproven).await,
        "a pre-identity ENI of another instance was swept"
    );
    assert!(!eni_tags(&w, &unproven).await.contains_key(tags::CLUSTER_ID));
    assert!(eni_exists(&w, &taken).await);
    assert!(!eni_tags(&w, &taken).await.contains_key(tags::NO_MANAGE));
    assert_eq!(w.metrics.ec2_call_count("DetachNetworkInterface"), 0);
}

/// Issue 12 #8, #9: reports of Nodes that are gone are pruned, and deletion releases the
/// finalizer without a failed reconcile (no 409 on the last pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn stale_node_reports_are_pruned_and_deletion_is_clean() {
    let mut w = World::new().await;
    w.node("node-1", &[("ng", "multi-eni")]).await;
    w.start_controller(&[]);
    let subnet = w.subnets["net-a"].clone();
    w.apply_nodeeni(&plain("prune", &subnet, 2)).await;
    w.wait_for("prune", "Ready", ready).await;
    for node in ["node-1", "long-gone"] {
        w.nodeenis()
            .patch_status(
                "prune",
                &PatchParams::apply(&format!("eni-manager-{node}")).force(),
                &Patch::Apply(serde_json::json!({
                    "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
                    "metadata": {"name": "prune"},
                    "status": {"nodeReports": [{"nodeName": node}]},
                })),
            )
            .await
            .expect("node report");
    }
    // Any change makes the controller look again.
    w.apply_nodeeni(&plain("prune", &subnet, 2).replace(
        "securityGroupNames: [multus-a]",
        "securityGroupNames: [multus-b]",
    ))
    .await;
    w.wait_for("prune", "the report of the missing node pruned", |o| {
        o.status.as_ref().is_some_and(|s| {
            s.node_reports
                .iter()
                .map(|r| r.node_name.as_str())
                .collect::<Vec<_>>()
                == ["node-1"]
        })
    })
    .await;
    let failed_before = failed_reconciles(&w);
    w.nodeenis()
        .delete("prune", &DeleteParams::default())
        .await
        .expect("delete");
    let gone = eventually(Duration::from_secs(60), || async {
        w.nodeenis()
            .get_opt("prune")
            .await
            .ok()
            .and_then(|o| o.is_none().then_some(()))
    })
    .await;
    assert!(gone.is_some());
    assert_eq!(
        failed_reconciles(&w),
        failed_before,
        "a reconcile failed during deletion"
    );
}

/// A NodeENI whose status the node daemons keep writing (every report is a watch event)
/// still gets reconciled: a debounce that restarts on every event would postpone the
/// reconcile for as long as the reports keep coming (kube's trailing-edge debounce does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn nodeeni_under_constant_node_reports_still_converges() {
    let mut w = World::new().await;
    w.node("node-1", &[("ng", "multi-eni")]).await;
    w.start_controller(&[]);
    let subnet = w.subnets["net-a"].clone();
    w.apply_nodeeni(&plain("busy", &subnet, 2)).await;
    w.wait_for("busy", "Ready", ready).await;

    // node-1's daemon reports every 100 ms (a fresh lastUpdated each time).
    let api = w.nodeenis();
    let reporter = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let _ = api
                .patch_status(
                    "busy",
                    &PatchParams::apply("eni-manager-node-1").force(),
                    &Patch::Apply(serde_json::json!({
                        "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
                        "metadata": {"name": "busy"},
                        "status": {"nodeReports": [{"nodeName": "node-1", "lastUpdated": now}]},
                    })),
                )
                .await;
        }
    });
    w.node("node-2", &[("ng", "multi-eni")]).await;
    let converged = w
        .wait_for_long(
            "busy",
            "Ready with node-2's ENI while node-1 keeps reporting",
            Duration::from_secs(60),
            |o| ready(o) && attachments(o).len() == 2,
        )
        .await;
    reporter.abort();
    assert_eq!(converged.status.expect("status").attachments.len(), 2);
}

fn failed_reconciles(w: &World) -> u64 {
    w.metrics
        .reconciles
        .get(&eni_controller::metrics::ResultLabels {
            result: "error".into(),
        })
        .map(|c| c.get())
        .unwrap_or(0)
}

/// Issue 12 #11: an instance that does not exist, and an AccessDenied before the status
/// write, reach the Ready condition with their own reasons; conditions other managers
/// set are kept (server-side apply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn errors_reach_the_condition_and_other_conditions_stay() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    w.node("node-1", &[("ng", "multi-eni")]).await;
    // A Node whose instance does not exist.
    let ghost: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "ghost", "labels": {"ng": "multi-eni"}},
        "spec": {"providerID": "aws:///us-east-1a/i-0123456789abcdef0"},
    }))
    .expect("node");
    nodes(&w)
        .create(&Default::default(), &ghost)
        .await
        .expect("ghost");
    w.start_controller(&[]);
    let subnet = w.subnets["net-a"].clone();
    w.apply_nodeeni(&plain("errors", &subnet, 2)).await;
    w.nodeenis()
        .patch_status(
            "errors",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
                "metadata": {"name": "errors"},
                "status": {"conditions": [{"type": "Audited", "status": "True", "reason": "Checked",
                    "message": "by a test", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
            })),
        )
        .await
        .expect("foreign condition");
    let obj = w
        .wait_for("errors", "InstanceNotFound", |o| {
            condition(o, "Ready")
                .is_some_and(|c| c.reason == "InstanceNotFound" && c.status == "False")
        })
        .await;
    assert!(
        condition(&obj, "Audited").is_some(),
        "another manager's condition was dropped"
    );

    // DescribeInstances denied: the reconcile fails before its status write.
    let faults = w.faults.as_ref().expect("faults");
    faults.update_config(|c| {
        c.rules.push(FailureRule {
            action: "DescribeInstances".into(),
            code: "UnauthorizedOperation".into(),
            message: "You are not authorized to perform this operation.".into(),
            status: 403,
            probability: 1.0,
            ..FailureRule::internal_error("DescribeInstances")
        })
    });
    let late: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "late", "labels": {"ng": "multi-eni"}},
        "spec": {"providerID": "aws:///us-east-1a/i-0fedcba9876543210"},
    }))
    .expect("node");
    nodes(&w)
        .create(&Default::default(), &late)
        .await
        .expect("late");
    let obj = w
        .wait_for("errors", "EC2Error", |o| {
            condition(o, "Ready")
                .is_some_and(|c| c.reason == "EC2Error" && c.message.contains("not authorized"))
        })
        .await;
    assert!(condition(&obj, "Audited").is_some());
}

/// Issue 12 #12, #15: a subnet name that does not resolve holds back only the ENIs at its
/// own index; the index of each subnet is its position in the spec's list on every Node
/// (a subnet outside the Node's zone leaves its index unused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn unknown_name_holds_back_only_its_index_and_indexes_follow_the_spec() {
    let mut w = World::new().await;
    w.start_faults(FaultConfig::default()).await;
    w.node("node-1", &[("ng", "multi-eni")]).await;
    w.start_controller(&[]);
    w.apply_nodeeni(
        "apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {name: multi}
spec:
  nodeSelector: {ng: multi-eni}
  subnetNames: [other-zone, net-a, no-such-subnet, net-b]
  securityGroupNames: [multus-a]
  deviceIndex: 2
",
    )
    .await;
    let obj = w
        .wait_for("multi", "two ENIs and SubnetNotFound", |o| {
            attachments(o)
                .iter()
                .filter(|a| a.status == "Attached")
                .count()
                == 2
                && condition(o, "Ready").is_some_and(|c| c.reason == "SubnetNotFound")
        })
        .await;
    let mut by_index: Vec<(i32, String)> = attachments(&obj)
        .iter()
        .map(|a| (a.device_index, a.subnet_id.clone()))
        .collect();
    by_index.sort();
    // other-zone (index 2) is outside the Node's zone; no-such-subnet (4) is held back.
    assert_eq!(
        by_index,
        vec![
            (3, w.subnets["net-a"].clone()),
            (5, w.subnets["net-b"].clone())
        ]
    );
    // A removal still happens while the name does not resolve.
    label(&w, "node-1", None).await;
    w.wait_for("multi", "ENIs removed", |o| attachments(o).is_empty())
        .await;
    assert!(w.managed_enis(None).await.is_empty());
}

/// Issue 12 #13: a subnet given by ID in another VPC is a clear condition, not an EC2
/// error loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn subnet_in_another_vpc_is_a_condition() {
    let mut w = World::new().await;
    w.node("node-1", &[("ng", "multi-eni")]).await;
    let vpc = w
        .ec2
        .create_vpc()
        .cidr_block("10.9.0.0/16")
        .send()
        .await
        .expect("vpc")
        .vpc()
        .and_then(|v| v.vpc_id())
        .expect("vpc id")
        .to_string();
    let elsewhere = w
        .ec2
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("10.9.1.0/24")
        .availability_zone(common::AZ)
        .send()
        .await
        .expect("subnet")
        .subnet()
        .and_then(|s| s.subnet_id())
        .expect("subnet id")
        .to_string();
    w.start_controller(&[]);
    w.apply_nodeeni(&plain("vpc", &elsewhere, 2)).await;
    let obj = w
        .wait_for("vpc", "SubnetInOtherVPC", |o| {
            condition(o, "Ready").is_some_and(|c| c.reason == "SubnetInOtherVPC")
        })
        .await;
    let message = condition(&obj, "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains(&vpc), "{message}");
    assert_eq!(w.metrics.ec2_call_count("CreateNetworkInterface"), 0);
}

/// Issue 12 #14: a Node being drained (deletionTimestamp set, finalizer holding it) keeps
/// its ENIs until the Node object is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn draining_node_keeps_its_enis_until_it_is_gone() {
    let mut w = World::new().await;
    w.node("node-1", &[("ng", "multi-eni")]).await;
    nodes(&w)
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"finalizers": ["karpenter.sh/termination"]}}),
            ),
        )
        .await
        .expect("finalizer");
    w.start_controller(&[]);
    let subnet = w.subnets["net-a"].clone();
    w.apply_nodeeni(&plain("drain", &subnet, 2)).await;
    let obj = w.wait_for("drain", "Ready", ready).await;
    let eni = attachments(&obj)[0].eni_id.clone();
    nodes(&w)
        .delete("node-1", &DeleteParams::default())
        .await
        .expect("delete node");
    // Make the controller look again (spec change) and wait for that pass.
    w.apply_nodeeni(&format!(
        "{}  description: drained\n",
        plain("drain", &subnet, 2)
    ))
    .await;
    let obj = w
        .wait_for("drain", "the pass after the drain started", |o| {
            o.status.as_ref().and_then(|s| s.observed_generation) == o.metadata.generation
        })
        .await;
    assert!(eni_exists(&w, &eni).await, "the ENI went while pods drain");
    assert_eq!(attachments(&obj).len(), 1);
    assert_eq!(w.metrics.ec2_call_count("DetachNetworkInterface"), 0);

    nodes(&w)
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("drained");
    w.wait_for("drain", "ENI removed", |o| attachments(o).is_empty())
        .await;
    assert!(!eni_exists(&w, &eni).await);
}

/// A kubeconfig acting as `user` (impersonation through the admin credentials), so RBAC
/// applies to each replica on its own.
fn kubeconfig_as(w: &World, user: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&w.api.kubeconfig).expect("kubeconfig");
    let mut doc: serde_json::Value = serde_yaml_ng::from_str(&text).expect("kubeconfig yaml");
    for u in doc["users"].as_array_mut().expect("users") {
        u["user"]["as"] = serde_json::json!(user);
    }
    let path = w.api.dir().join(format!("kubeconfig-{user}"));
    std::fs::write(&path, serde_yaml_ng::to_string(&doc).expect("yaml")).expect("write");
    path
}

fn spawn_replica(
    w: &World,
    user: &str,
    kubeconfig: &std::path::Path,
    ec2: &str,
) -> eni_testkit::Child {
    let mut args: Vec<String> = [
        "AWS_ACCESS_KEY_ID=testing",
        "AWS_SECRET_ACCESS_KEY=testing",
        "AWS_REGION=us-east-1",
        "AWS_EC2_METADATA_DISABLED=true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("KUBECONFIG={}", kubeconfig.display()));
    args.push(env!("CARGO_BIN_EXE_eni-controller").to_string());
    for a in [
        "--cluster-name",
        CLUSTER,
        "--leader-elect=true",
        "--leader-election-namespace=eni-test",
        "--leader-election-lease-duration=6s",
        "--leader-election-renew-deadline=4s",
        "--leader-election-retry-period=1s",
        "--metrics-addr=127.0.0.1:0",
        "--in-flight-poll-interval=200ms",
        "--log-level=info,eni_controller=debug",
    ] {
        args.push(a.to_string());
    }
    args.push(format!("--pod-name={user}"));
    args.push(format!("--ec2-endpoint={ec2}"));
    eni_testkit::Child::spawn(
        user,
        std::path::Path::new("/usr/bin/env"),
        &args,
        &w.api.dir().join(format!("{user}.log")),
    )
    .expect("spawn replica")
}

async fn apply_yaml<K>(api: &Api<K>, yaml: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let value: serde_json::Value = serde_yaml_ng::from_str(yaml).expect("yaml");
    let obj: K = serde_json::from_value(value).expect("object");
    let name = obj.meta().name.clone().expect("name");
    api.patch(
        &name,
        &PatchParams::apply("it").force(),
        &Patch::Apply(&obj),
    )
    .await
    .expect("apply");
}

async fn lease_holder(w: &World) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(w.kube.clone(), "eni-test");
    leases
        .get_opt("aws-multi-eni-controller")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

/// Issue 12 #5: a leader cut off from its Lease (its RBAC on leases revoked) makes no
/// mutating EC2 call once its renew deadline has passed, and the standby converges the
/// work. Each replica talks to EC2 through its own fault proxy, so calls are counted per
/// replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and moto (make test-integration)"]
async fn a_leader_that_lost_its_lease_stops_writing_to_ec2() {
    use eni_testkit::faults::FaultProxy;
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let w = World::new().await;
    let admin = w.kube.clone();
    apply_yaml(
        &Api::<Namespace>::all(admin.clone()),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: eni-test}\n",
    )
    .await;
    apply_yaml(
        &Api::<ClusterRole>::all(admin.clone()),
        "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: eni-controller}
rules:
- {apiGroups: [networking.k8s.aws], resources: [nodeenis, nodeenis/status, nodeenis/finalizers], verbs: ['*']}
- {apiGroups: [''], resources: [nodes], verbs: [get, list, watch]}
- {apiGroups: [''], resources: [namespaces], resourceNames: [kube-system], verbs: [get]}
- {apiGroups: ['', events.k8s.io], resources: [events], verbs: [create, patch]}
",
    )
    .await;
    apply_yaml(
        &Api::<ClusterRoleBinding>::all(admin.clone()),
        "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: eni-controller}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: eni-controller}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: replica-a}
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: replica-b}
",
    )
    .await;
    apply_yaml(
        &Api::<Role>::namespaced(admin.clone(), "eni-test"),
        "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: leases, namespace: eni-test}
rules:
- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: ['*']}
",
    )
    .await;
    let bindings = Api::<RoleBinding>::namespaced(admin.clone(), "eni-test");
    for user in ["replica-a", "replica-b"] {
        apply_yaml(
            &bindings,
            &format!(
                "apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: leases-{user}, namespace: eni-test}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: leases}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}
"
            ),
        )
        .await;
    }
    let proxy_a = FaultProxy::start(&w.moto.endpoint, FaultConfig::default())
        .await
        .expect("proxy a");
    let proxy_b = FaultProxy::start(&w.moto.endpoint, FaultConfig::default())
        .await
        .expect("proxy b");

    w.node("node-1", &[("ng", "multi-eni")]).await;
    let mut a = spawn_replica(
        &w,
        "replica-a",
        &kubeconfig_as(&w, "replica-a"),
        &proxy_a.endpoint,
    );
    let leader = eventually(Duration::from_secs(60), || async {
        (lease_holder(&w).await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    assert!(leader.is_some(), "replica-a never became leader");
    let _b = spawn_replica(
        &w,
        "replica-b",
        &kubeconfig_as(&w, "replica-b"),
        &proxy_b.endpoint,
    );
    let subnet = w.subnets["net-a"].clone();
    w.apply_nodeeni(&plain("fenced", &subnet, 2)).await;
    w.wait_for("fenced", "Ready", ready).await;
    assert!(
        proxy_a.stats().mutating_requests() > 0,
        "the leader did the work"
    );
    assert_eq!(
        proxy_b.stats().mutating_requests(),
        0,
        "the standby wrote to EC2"
    );

    // Cut the leader off its Lease.
    bindings
        .delete("leases-replica-a", &DeleteParams::default())
        .await
        .expect("revoke");
    let took_over = eventually(Duration::from_secs(60), || async {
        (lease_holder(&w).await.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    assert!(took_over.is_some(), "replica-b never took the Lease over");
    // B took over lease-duration after A's last renewal, so A's renew deadline passed.
    let a_calls = proxy_a.stats().mutating_requests();

    // New work: only B may do it.
    w.node("node-2", &[("ng", "multi-eni")]).await;
    w.wait_for("fenced", "Ready on two nodes", |o| {
        ready(o) && o.status.as_ref().is_some_and(|s| s.ready_attachments == 2)
    })
    .await;
    assert!(
        proxy_b.stats().mutating_requests() > 0,
        "the new leader did the work"
    );
    assert_eq!(
        proxy_a.stats().mutating_requests(),
        a_calls,
        "the old leader wrote to EC2 after its renew deadline"
    );
    let _ = a.running();
}
