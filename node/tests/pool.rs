//! Pod address pools (NodeENI `ipam`) on the node: the `eni-manager` binary against the
//! real kube-apiserver copies the pool the controller published into the state file,
//! reports usage from the allocation file (written here through the contract crate, as
//! cni-helper writes it), releases what the controller wants back only when no pod uses
//! it, and survives kill -9 without losing or inventing anything. It never calls EC2 (it
//! has no EC2 client).
//!
//! Integration tier (`make test-integration`): needs root (network namespaces) and the
//! peers from `hack/peers.sh`.

mod common;

use std::time::Duration;

use common::{Manager, Netns};
use eni_api::{InterfaceIpam, NodeENI, crd};
use eni_state::alloc::Allocation;
use eni_testkit::{ApiServer, eventually};
use kube::api::{Api, Patch, PatchParams, PostParams};

const ENI: &str = "eni-0bbbbbbbbbbbbbbb1";
const MAC: &str = "02:5e:00:00:01:0a";

async fn set_pool(
    api: &Api<NodeENI>,
    name: &str,
    node: &str,
    addresses: &[&str],
    releasing: &[&str],
) {
    api.patch_status(
        name,
        &PatchParams::apply("test-controller").force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
            "metadata": {"name": name},
            "status": {"attachments": [{
                "nodeID": node, "instanceID": "i-0123456789abcdef0", "eniID": ENI,
                "attachmentID": "attach-1", "subnetID": "subnet-0f59b4f14737be9ad",
                "subnetCIDR": "10.40.1.0/24", "deviceIndex": 2, "macAddress": MAC,
                "status": "Attached",
                "ipam": {"mode": "secondaryIPs", "addresses": addresses, "releasing": releasing}
            }]}
        })),
    )
    .await
    .expect("patch status");
}

async fn node_report(api: &Api<NodeENI>, name: &str, node: &str) -> Option<InterfaceIpam> {
    let o = api.get(name).await.ok()?;
    o.status?
        .node_reports
        .into_iter()
        .find(|r| r.node_name == node)?
        .interfaces
        .into_iter()
        .find(|i| i.eni_id == ENI)?
        .ipam
}

fn allocate(state_dir: &std::path::Path, container: &str, address: &str) {
    let mut l = eni_state::alloc::lock(state_dir).expect("lock");
    l.allocations.allocations.push(Allocation {
        eni_id: ENI.into(),
        address: address.into(),
        container_id: container.into(),
        if_name: "net1".into(),
        network: "vpc".into(),
        ..Allocation::default()
    });
    l.save().expect("save allocations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs root and kube-apiserver (make test-integration)"]
async fn pool_in_state_file_usage_reported_release_only_when_free() {
    let server = ApiServer::shared().await.expect("start kube-apiserver");
    let client = server.install_crd(&crd()).await.expect("install the CRD");
    let api: Api<NodeENI> = Api::all(client.clone());
    let ns = Netns::new("pool");
    let node = format!("test-node-{}", ns.name);
    let name = format!("it-{}", ns.name);
    let obj: NodeENI = serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
        "metadata": {"name": name},
        "spec": {"nodeSelector": {"ng": "multi-eni"}, "subnetID": "subnet-0f59b4f14737be9ad",
                 "securityGroupIDs": ["sg-05da196f3314d4af8"], "deviceIndex": 2,
                 "ipam": {"warmTarget": 2}}
    }))
    .expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create NodeENI");
    set_pool(
        &api,
        &name,
        &node,
        &["10.40.1.10", "10.40.1.11", "10.40.1.12"],
        &[],
    )
    .await;
    ns.add_dummy("ens7", MAC);

    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    let mut mgr = Manager::start(&server.kubeconfig, &node, &ns.path(), dir.path(), &[]);
    mgr.wait_ready(Duration::from_secs(30));

    // The pool reaches the state file, with the subnet and the VPC router.
    let pool = eventually(Duration::from_secs(20), || {
        let path = eni_state::path(&state_dir);
        async move {
            let s = eni_state::load(&path).ok()??;
            let p = s.pools.get(ENI)?.clone();
            (p.addresses.len() == 3).then_some(p)
        }
    })
    .await
    .unwrap_or_else(|| panic!("no pool in the state file\nlog:\n{}", mgr.log_text()));
    assert_eq!(pool.subnet_cidr, "10.40.1.0/24");
    assert_eq!(pool.gateway, "10.40.1.1");

    // A pod takes an address (as cni-helper records it): usage is reported.
    allocate(&state_dir, "c1", "10.40.1.12");
    let r = eventually(Duration::from_secs(20), || {
        let api = api.clone();
        let (name, node) = (name.clone(), node.clone());
        async move {
            node_report(&api, &name, &node)
                .await
                .filter(|r| r.in_use == ["10.40.1.12"])
        }
    })
    .await
    .unwrap_or_else(|| panic!("usage not reported\nlog:\n{}", mgr.log_text()));
    assert_eq!(r.pool.len(), 3);

    // The controller wants .11 and .12 back: .11 is released, .12 (in use) is not, and
    // neither is in the pool cni-helper hands out any more.
    set_pool(
        &api,
        &name,
        &node,
        &["10.40.1.10"],
        &["10.40.1.11", "10.40.1.12"],
    )
    .await;
    let r = eventually(Duration::from_secs(20), || {
        let api = api.clone();
        let (name, node) = (name.clone(), node.clone());
        async move {
            node_report(&api, &name, &node)
                .await
                .filter(|r| r.released == ["10.40.1.11"])
        }
    })
    .await
    .unwrap_or_else(|| panic!("release not reported\nlog:\n{}", mgr.log_text()));
    assert_eq!(r.pool, ["10.40.1.10"]);
    let s = eni_state::load(&eni_state::path(&state_dir))
        .expect("state")
        .expect("state file");
    assert_eq!(s.pools[ENI].addresses, ["10.40.1.10"]);

    // kill -9 in the middle of things; a new daemon reports the same from the files.
    mgr.child.kill().expect("kill -9");
    let _ = mgr.child.wait();
    // The pod goes while the daemon is down.
    {
        let mut l = eni_state::alloc::lock(&state_dir).expect("lock");
        l.allocations.release("c1", "net1");
        l.save().expect("save");
    }
    let mut mgr = Manager::start(&server.kubeconfig, &node, &ns.path(), dir.path(), &[]);
    mgr.wait_ready(Duration::from_secs(30));
    let r = eventually(Duration::from_secs(20), || {
        let api = api.clone();
        let (name, node) = (name.clone(), node.clone());
        async move {
            node_report(&api, &name, &node)
                .await
                .filter(|r| r.released == ["10.40.1.11", "10.40.1.12"])
        }
    })
    .await
    .unwrap_or_else(|| panic!("restart lost the pool\nlog:\n{}", mgr.log_text()));
    assert!(r.in_use.is_empty());
    assert_eq!(r.pool, ["10.40.1.10"]);
    assert!(
        !mgr.log_text().to_lowercase().contains("ec2"),
        "the node daemon never talks to EC2"
    );
}

/// The periodic reconcile of allocations against the pods that still exist: addresses
/// held for pods the API server no longer lists on this node (deleted while the node was
/// down, or replaced by a pod of the same name) are freed; those of live pods and those
/// that name no pod (left to CNI DEL and GC) stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs root and kube-apiserver (make test-integration)"]
async fn allocations_of_pods_that_no_longer_exist_are_freed() {
    use k8s_openapi::api::core::v1::Pod;
    let server = ApiServer::shared().await.expect("start kube-apiserver");
    let client = server.install_crd(&crd()).await.expect("install the CRD");
    let ns = Netns::new("podrec");
    let node = format!("test-node-{}", ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut uids = Vec::new();
    for name in ["alive", "replaced"] {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-{}", ns.name)},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        }))
        .expect("pod");
        let p = pods
            .create(&PostParams::default(), &p)
            .await
            .expect("create pod");
        uids.push(p.metadata.uid.expect("uid"));
    }
    // A pod of another node with the name of a gone one: it does not count.
    let other: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("gone-{}", ns.name)},
        "spec": {"nodeName": "another-node", "containers": [{"name": "c", "image": "busybox"}]},
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &other)
        .await
        .expect("create pod");

    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    {
        let mut l = eni_state::alloc::lock(&state_dir).expect("lock");
        for (container, address, pod, uid) in [
            ("c-alive", "10.40.1.10", "alive", uids[0].as_str()),
            ("c-gone", "10.40.1.11", "gone", "u-gone"),
            ("c-replaced", "10.40.1.12", "replaced", "the-old-uid"),
            ("c-anonymous", "10.40.1.13", "", ""),
        ] {
            l.allocations.allocations.push(Allocation {
                eni_id: ENI.into(),
                address: address.into(),
                container_id: container.into(),
                if_name: "net1".into(),
                network: "vpc".into(),
                pod_namespace: if pod.is_empty() { "" } else { "default" }.into(),
                pod_name: if pod.is_empty() {
                    String::new()
                } else {
                    format!("{pod}-{}", ns.name)
                },
                pod_uid: uid.into(),
            });
        }
        l.save().expect("save allocations");
    }
    let mut mgr = Manager::start(
        &server.kubeconfig,
        &node,
        &ns.path(),
        dir.path(),
        &["--ipam-reconcile-period", "1s"],
    );
    mgr.wait_ready(Duration::from_secs(30));
    let held = |dir: &std::path::Path| -> Vec<String> {
        eni_state::alloc::lock(dir)
            .expect("lock")
            .allocations
            .allocations
            .iter()
            .map(|a| a.container_id.clone())
            .collect()
    };
    let left = eventually(Duration::from_secs(30), || {
        let h = held(&state_dir);
        async move { (h.len() == 2).then_some(h) }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "allocations not reconciled: {:?}\nlog:\n{}",
            held(&state_dir),
            mgr.log_text()
        )
    });
    assert_eq!(left, ["c-alive", "c-anonymous"]);
    assert!(
        mgr.log_text()
            .contains("freed the address of a pod that no longer exists"),
        "{}",
        mgr.log_text()
    );
    for name in ["alive", "replaced", "gone"] {
        let _ = pods
            .delete(&format!("{name}-{}", ns.name), &Default::default())
            .await;
    }
}
