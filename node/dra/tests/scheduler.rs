//! The real kube-scheduler allocates devices from the ResourceSlices our publisher
//! writes: a claim with a CEL selector on our attributes lands on the node whose ENI
//! matches, and so does a pod with a ResourceClaimTemplate (its claim made by the real
//! kube-controller-manager's resourceclaim controller); a pod asking for
//! `intel.com/intel_sriov_netdevice` in `limits` is served through the DeviceClass's
//! `extendedResourceName` (KEP-5004); a pod asking for more devices than exist, or for an
//! unhealthy ENI (the device plugin's health: not in the slice), stays Pending with the
//! scheduler's reason.
//!
//! Integration tier (`make test-integration`): needs kube-apiserver, kube-scheduler and
//! kube-controller-manager from `hack/peers.sh`. No kubelet: pods are bound, not run.

use std::time::Duration;

use eni_deviceplugin::device::DeviceFacts;
use eni_deviceplugin::snapshot::DeviceEntry;
use eni_deviceplugin::{BoundDevice, EniDetails};
use eni_dra::{DEFAULT_DRIVER_NAME, SlicePublisher, slice};
use eni_testkit::{ApiServer, Child, eventually, free_port, peer};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaim, ResourceClaimTemplate};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};

const DEADLINE: Duration = Duration::from_secs(90);
/// kube-scheduler's DynamicResources plugin's message when none of the 3 nodes can satisfy
/// a pod's claims (its own, or the one made for its extended resource).
const CANNOT_ALLOCATE: &str = "0/3 nodes are available: 3 cannot allocate all claims.";
const RESOURCE: &str = "intel.com/intel_sriov_netdevice";
const NS: &str = "default";
/// kube-controller-manager's name for the controller that makes claims from templates.
const RESOURCECLAIM_CONTROLLER: &str = "resourceclaim-controller";

fn entry(pci: &str, eni: &str, index: i32, subnet: &str) -> DeviceEntry {
    entry_with(pci, eni, index, subnet, true)
}

/// `present: false` is the device plugin's "PCI device gone" health verdict.
fn entry_with(pci: &str, eni: &str, index: i32, subnet: &str, present: bool) -> DeviceEntry {
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
            present,
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

/// A pod whose claim `eni` comes from the ResourceClaimTemplate `template`.
fn template_pod(name: &str, template: &str) -> serde_json::Value {
    let mut p = pod(name, None, None);
    p["spec"]["resourceClaims"] =
        serde_json::json!([{"name": "eni", "resourceClaimTemplateName": template}]);
    p["spec"]["containers"][0]["resources"]["claims"] = serde_json::json!([{"name": "eni"}]);
    p
}

/// A ResourceClaimTemplate asking for `count` devices of the chart's DeviceClass matching
/// the CEL expression `cel`.
fn template(name: &str, count: u32, cel: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
        "metadata": {"name": name},
        "spec": {"spec": {"devices": {"requests": [{"name": "eni", "exactly": {
            "deviceClassName": "dpdk.eni.networking.k8s.aws",
            "allocationMode": "ExactCount", "count": count,
            "selectors": [{"cel": {"expression": cel}}]}}]}}}})
}

/// The claim the resourceclaim controller made for the pod's claim `eni`.
async fn generated_claim(pods: &Api<Pod>, name: &str) -> String {
    eventually(DEADLINE, || async {
        let st = pods.get(name).await.ok()?.status?.resource_claim_statuses?;
        st.into_iter()
            .find(|s| s.name == "eni")?
            .resource_claim_name
    })
    .await
    .unwrap_or_else(|| panic!("no claim generated for pod {name}"))
}

/// The pod's `PodScheduled=False` reason and message once the message starts with
/// `expected` (an earlier attempt may say something else, e.g. that its claim is not made
/// yet); the pod stays Pending.
async fn unschedulable(pods: &Api<Pod>, name: &str, expected: &str) -> (String, String) {
    let last = std::sync::Mutex::new(None);
    let reason = eventually(DEADLINE, || async {
        let p = pods.get(name).await.ok()?;
        let c = p
            .status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
        let r = (c.reason.unwrap_or_default(), c.message.unwrap_or_default());
        let done = r.1.starts_with(expected);
        *last.lock().expect("lock") = Some(r.clone());
        done.then_some(r)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "pod {name}: no PodScheduled=False saying {expected:?}; last: {:?}",
            last.lock().expect("lock")
        )
    });
    assert!(
        pods.get(name)
            .await
            .expect("pod")
            .spec
            .and_then(|s| s.node_name)
            .is_none(),
        "{name} was bound"
    );
    reason
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
    // Only the resourceclaim controller: it makes a pod's claims from its
    // ResourceClaimTemplates (and deletes them with the pod).
    let kcm_port = free_port();
    let _controller_manager = Child::spawn(
        "kube-controller-manager",
        &peer("kube-controller-manager").expect("kube-controller-manager peer"),
        &[
            format!("--kubeconfig={}", server.kubeconfig.display()),
            format!(
                "--authentication-kubeconfig={}",
                server.kubeconfig.display()
            ),
            format!("--authorization-kubeconfig={}", server.kubeconfig.display()),
            format!("--controllers={RESOURCECLAIM_CONTROLLER}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            "--v=2".into(),
        ],
        &server.dir().join("kube-controller-manager.log"),
    )
    .expect("start kube-controller-manager");

    // Node a: one ENI in subnet A; node b: two in subnet B.
    // Node c: one ENI whose PCI device is gone (unhealthy).
    node(&client, "dra-sched-a").await;
    node(&client, "dra-sched-b").await;
    node(&client, "dra-sched-c").await;
    publish(
        &client,
        "dra-sched-c",
        &[entry_with(
            "0000:00:07.0",
            "eni-0ccccccccccccccc1",
            2,
            "subnet-c",
            false,
        )],
    )
    .await;
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

    // A ResourceClaimTemplate selecting subnet A: kube-controller-manager makes the pod's
    // claim, the scheduler allocates node a's only ENI and binds the pod there.
    let templates: Api<ResourceClaimTemplate> = Api::namespaced(client.clone(), NS);
    create(
        &templates,
        template(
            "eni-subnet-a",
            1,
            "device.attributes['eni.networking.k8s.aws'].subnetID == 'subnet-a'",
        ),
    )
    .await;
    create(&pods, template_pod("template-pod", "eni-subnet-a")).await;
    assert_eq!(scheduled(&pods, "template-pod").await, "dra-sched-a");
    let generated = generated_claim(&pods, "template-pod").await;
    assert_eq!(
        allocated_pool(&claims, &generated).await,
        ("dra-sched-a".to_owned(), "eni-0aaaaaaaaaaaaaaa1".to_owned())
    );

    // Extended-resource mapping: the pod asks in limits, as with the device plugin. The
    // only healthy device left is node b's first ENI.
    create(&pods, pod("limits-pod", None, Some(1))).await;
    let node_of = scheduled(&pods, "limits-pod").await;
    assert_eq!(node_of, "dra-sched-b");
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
    assert_eq!(
        allocated_pool(&claims, &generated).await,
        (node_of, "eni-0bbbbbbbbbbbbbbb1".to_owned()),
        "the device is on the pod's node"
    );

    // Every healthy device is taken: asking for three in limits can never fit.
    create(&pods, pod("greedy-pod", None, Some(3))).await;
    let (reason, message) = unschedulable(&pods, "greedy-pod", CANNOT_ALLOCATE).await;
    eprintln!("over-ask in limits stays Pending: {reason}: {message}");
    assert_eq!(reason, "Unschedulable", "{message}");

    // Node c's ENI is unhealthy: not in its slice, so a claim selecting it by ENI id can
    // never be allocated, though the device plugin's inventory still lists it.
    create(
        &templates,
        template(
            "eni-unhealthy",
            1,
            "device.attributes['eni.networking.k8s.aws'].eniID == 'eni-0ccccccccccccccc1'",
        ),
    )
    .await;
    create(&pods, template_pod("unhealthy-pod", "eni-unhealthy")).await;
    let (reason, message) = unschedulable(&pods, "unhealthy-pod", CANNOT_ALLOCATE).await;
    eprintln!("a claim for the unhealthy ENI stays Pending: {reason}: {message}");
    assert_eq!(reason, "Unschedulable", "{message}");
    let generated = generated_claim(&pods, "unhealthy-pod").await;
    let claim = claims.get(&generated).await.expect("claim");
    assert!(
        claim.status.and_then(|s| s.allocation).is_none(),
        "the unhealthy ENI was allocated"
    );

    // Clean up what other tests in this binary could trip on.
    for p in pods.list(&ListParams::default()).await.expect("pods").items {
        let _ = pods
            .delete(&p.metadata.name.unwrap_or_default(), &Default::default())
            .await;
    }
}
