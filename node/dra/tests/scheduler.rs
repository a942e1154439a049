//! The real kube-scheduler allocates devices from the ResourceSlices our publisher
//! writes: a claim with a CEL selector on our attributes lands on the node whose ENI
//! matches, a pod asking for `intel.com/intel_sriov_netdevice` in `limits` is served
//! through the DeviceClass's `extendedResourceName` (KEP-5004), and a pod asking for more
//! devices than exist stays Pending with the scheduler's reason.
//!
//! Integration tier (`make test-integration`): needs kube-apiserver and kube-scheduler
//! from `hack/peers.sh`. No kubelet: pods are bound, not run.

use std::time::Duration;

use eni_deviceplugin::device::DeviceFacts;
use eni_deviceplugin::snapshot::DeviceEntry;
use eni_deviceplugin::{BoundDevice, EniDetails};
use eni_dra::{DEFAULT_DRIVER_NAME, SlicePublisher, slice};
use eni_testkit::{ApiServer, Child, eventually, free_port, peer};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaim};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};

const DEADLINE: Duration = Duration::from_secs(90);
const RESOURCE: &str = "intel.com/intel_sriov_netdevice";
const NS: &str = "default";

fn entry(pci: &str, eni: &str, index: i32, subnet: &str) -> DeviceEntry {
    DeviceEntry::new(
        BoundDevice {
            pci_address: pci.into(),
            resource_name: RESOURCE.into(),
            driver: "vfio-pci".into(),
            eni_id: eni.into(),
            mac_address: format!("02:00:00:00:00:{index:02x}"),
            device_index: index,
            releasing: false,
            details: EniDetails {
                node_eni: "dpdk".into(),
                subnet_id: Some(subnet.into()),
                vpc_id: None,
                mtu: Some(9001),
                ips: Vec::new(),
            },
        },
        DeviceFacts {
            present: true,
            driver: Some("vfio-pci".into()),
            iommu_group: Some(index.to_string()),
            noiommu: true,
            numa_node: Some(0),
            group_device_present: true,
            vfio_container_present: true,
        },
    )
}

async fn create<K>(api: &Api<K>, obj: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create {:?}: {e}", obj.meta().name))
}

/// A schedulable Node (no kubelet: its status is written here).
async fn node(client: &Client, name: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut n: Node = create(
        &nodes,
        serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}),
    )
    .await;
    n.status = Some(
        serde_json::from_value(serde_json::json!({
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "test node", "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]
        }))
        .expect("status"),
    );
    nodes
        .replace_status(name, &PostParams::default(), &n)
        .await
        .expect("node status");
    // The apiserver's TaintNodesByCondition admission taints a new Node not-ready; with no
    // node lifecycle controller here, nothing would lift it.
    nodes
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"taints": null}})),
        )
        .await
        .expect("untaint the node");
}

async fn publish(client: &Client, node: &str, entries: &[DeviceEntry]) {
    let p = SlicePublisher::new(client.clone(), DEFAULT_DRIVER_NAME, node);
    let owner = p.owner().await;
    let devices = slice::devices(entries, |_| None);
    p.sync(owner.as_ref(), &devices)
        .await
        .expect("publish slice");
}

fn pod(name: &str, claim: Option<&str>, limit: Option<u32>) -> serde_json::Value {
    let mut container = serde_json::json!({"name": "app", "image": "busybox",
        "resources": {"requests": {"cpu": "10m"}}});
    if let Some(n) = limit {
        container["resources"]["limits"] = serde_json::json!({ RESOURCE: n.to_string() });
        container["resources"]["requests"][RESOURCE] = n.to_string().into();
    }
    let mut p = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [container], "terminationGracePeriodSeconds": 0}});
    if let Some(c) = claim {
        p["spec"]["resourceClaims"] = serde_json::json!([{"name": "eni", "resourceClaimName": c}]);
        p["spec"]["containers"][0]["resources"]["claims"] = serde_json::json!([{"name": "eni"}]);
    }
    p
}

async fn scheduled(pods: &Api<Pod>, name: &str) -> String {
    let got = eventually(DEADLINE, || async {
        pods.get(name).await.ok()?.spec?.node_name
    })
    .await;
    match got {
        Some(n) => n,
        None => panic!(
            "pod {name} not scheduled: {:#?}",
            pods.get(name).await.ok().and_then(|p| p.status)
        ),
    }
}

async fn allocated_pool(claims: &Api<ResourceClaim>, name: &str) -> (String, String) {
    let r = eventually(DEADLINE, || async {
        let c = claims.get(name).await.ok()?;
        let r = c.status?.allocation?.devices?.results?.into_iter().next()?;
        Some((r.pool, r.device))
    })
    .await;
    r.unwrap_or_else(|| panic!("claim {name} not allocated"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and kube-scheduler (make test-integration)"]
async fn scheduler_allocates_from_our_slices() {
    let server = ApiServer::shared().await.expect("start kube-apiserver");
    let client = server.client().await.expect("client");
    let port = free_port();
    let _scheduler = Child::spawn(
        "kube-scheduler",
        &peer("kube-scheduler").expect("kube-scheduler peer"),
        &[
            format!("--kubeconfig={}", server.kubeconfig.display()),
            format!(
                "--authentication-kubeconfig={}",
                server.kubeconfig.display()
            ),
            format!("--authorization-kubeconfig={}", server.kubeconfig.display()),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            "--v=2".into(),
        ],
        &server.dir().join("kube-scheduler.log"),
    )
    .expect("start kube-scheduler");

    // Node a: one ENI in subnet A; node b: two in subnet B.
    node(&client, "dra-sched-a").await;
    node(&client, "dra-sched-b").await;
    publish(
        &client,
        "dra-sched-a",
        &[entry(
            "0000:00:07.0",
            "eni-0aaaaaaaaaaaaaaa1",
            2,
            "subnet-a",
        )],
    )
    .await;
    publish(
        &client,
        "dra-sched-b",
        &[
            entry("0000:00:07.0", "eni-0bbbbbbbbbbbbbbb1", 2, "subnet-b"),
            entry("0000:00:08.0", "eni-0bbbbbbbbbbbbbbb2", 3, "subnet-b"),
        ],
    )
    .await;
    // The DeviceClass as the node chart renders it.
    create(
        &Api::<DeviceClass>::all(client.clone()),
        serde_json::json!({"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
            "metadata": {"name": "dpdk.eni.networking.k8s.aws"},
            "spec": {"extendedResourceName": RESOURCE, "selectors": [{"cel": {"expression":
                format!("device.driver == '{DEFAULT_DRIVER_NAME}' && device.attributes['k8s.cni.cncf.io'].resourceName == '{RESOURCE}'")}}]}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), NS);

    // A claim selecting subnet B and device index 3: node b's second ENI.
    create(
        &claims,
        serde_json::json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": "eni-subnet-b"},
            "spec": {"devices": {"requests": [{"name": "eni", "exactly": {
                "deviceClassName": "dpdk.eni.networking.k8s.aws",
                "selectors": [{"cel": {"expression":
                    "device.attributes['eni.networking.k8s.aws'].subnetID == 'subnet-b' && device.attributes['eni.networking.k8s.aws'].deviceIndex == 3"}}]}}]}}}),
    )
    .await;
    create(&pods, pod("cel-pod", Some("eni-subnet-b"), None)).await;
    assert_eq!(scheduled(&pods, "cel-pod").await, "dra-sched-b");
    assert_eq!(
        allocated_pool(&claims, "eni-subnet-b").await,
        ("dra-sched-b".to_owned(), "eni-0bbbbbbbbbbbbbbb2".to_owned())
    );

    // Extended-resource mapping: the pod asks in limits, as with the device plugin.
    create(&pods, pod("limits-pod", None, Some(1))).await;
    let node_of = scheduled(&pods, "limits-pod").await;
    let generated = eventually(DEADLINE, || async {
        let st = pods
            .get("limits-pod")
            .await
            .ok()?
            .status?
            .extended_resource_claim_status?;
        Some(st.resource_claim_name)
    })
    .await
    .expect("extendedResourceClaimStatus");
    let (pool, device) = allocated_pool(&claims, &generated).await;
    assert_eq!(pool, node_of, "the device is on the pod's node");
    assert!(device.starts_with("eni-0"), "{device}");

    // Two devices are left on b, none on a (if limits-pod took a's) or one each: asking for
    // three on one node can never fit.
    create(&pods, pod("greedy-pod", None, Some(3))).await;
    let reason = eventually(DEADLINE, || async {
        let p = pods.get("greedy-pod").await.ok()?;
        let c = p
            .status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
        Some((c.reason.unwrap_or_default(), c.message.unwrap_or_default()))
    })
    .await
    .expect("PodScheduled=False");
    assert_eq!(reason.0, "Unschedulable", "{reason:?}");
    assert!(!reason.1.is_empty(), "{reason:?}");
    eprintln!("over-ask stays Pending: {}", reason.1);
    assert!(
        pods.get("greedy-pod")
            .await
            .expect("pod")
            .spec
            .and_then(|s| s.node_name)
            .is_none()
    );

    // Clean up what other tests in this binary could trip on.
    for p in pods.list(&ListParams::default()).await.expect("pods").items {
        let _ = pods
            .delete(&p.metadata.name.unwrap_or_default(), &Default::default())
            .await;
    }
}
