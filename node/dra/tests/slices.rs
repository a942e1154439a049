//! The slice publisher against the real kube-apiserver: every ResourceSlice it writes is
//! created (validated by the server, not dry-run), follows the inventory and its health,
//! comes back when someone deletes it, and is gone after shutdown. A DeviceClass with
//! `extendedResourceName` and a CEL selector on our attributes is created beside it.
//!
//! Integration tier (`make test-integration`): needs the peers from `hack/peers.sh`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eni_deviceplugin::device::DeviceFacts;
use eni_deviceplugin::{BoundDevice, CancellationToken, DeviceProbe, EniDetails};
use eni_dra::slice::{self, attr};
use eni_dra::{DEFAULT_DRIVER_NAME, PublisherConfig};
use eni_testkit::{ApiServer, eventually};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceSlice};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(30);
/// The PCI address of the test's netdev (ena) ENI.
const NETDEV_PCI: &str = "0000:00:09.0";
/// The resource the netdev ENIs are published under (`--dra-ena-resource`).
const NETDEV_RESOURCE: &str = "networking.k8s.aws/eni";

/// Host facts for the test's devices: healthy vfio devices unless marked gone.
#[derive(Debug, Default)]
struct Facts {
    gone: Mutex<Vec<String>>,
}

impl DeviceProbe for Facts {
    fn probe(&self, pci: &str) -> DeviceFacts {
        if self.gone.lock().expect("lock").iter().any(|g| g == pci) {
            return DeviceFacts::default();
        }
        if pci == NETDEV_PCI {
            // An ENI left on ena: no VFIO group.
            return DeviceFacts {
                present: true,
                driver: Some("ena".into()),
                numa_node: Some(0),
                ..DeviceFacts::default()
            };
        }
        DeviceFacts {
            present: true,
            driver: Some("vfio-pci".into()),
            iommu_group: Some(pci[pci.len() - 4..pci.len() - 2].into()),
            noiommu: true,
            numa_node: Some(0),
            group_device_present: true,
            vfio_container_present: true,
        }
    }
}

fn device(pci: &str, eni: &str, index: i32) -> BoundDevice {
    BoundDevice {
        pci_address: pci.into(),
        resource_name: "intel.com/intel_sriov_netdevice".into(),
        driver: "vfio-pci".into(),
        eni_id: eni.into(),
        mac_address: format!("02:00:00:00:00:{index:02x}"),
        device_index: index,
        releasing: false,
        details: EniDetails {
            node_eni: "dpdk-enis".into(),
            subnet_id: Some("subnet-0f59b4f14737be9ad".into()),
            vpc_id: Some("vpc-0123456789abcdef0".into()),
            mtu: Some(9001),
            ips: vec![format!("10.0.1.{index}/24")],
        },
    }
}

async fn node_slices(api: &Api<ResourceSlice>, node: &str) -> Vec<ResourceSlice> {
    api.list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// Waits until the node holds exactly one slice with `names` as its devices.
async fn wait_devices(api: &Api<ResourceSlice>, node: &str, names: &[&str]) -> ResourceSlice {
    let got = eventually(DEADLINE, || async {
        let s = node_slices(api, node).await;
        let [one] = s.as_slice() else { return None };
        let have: Vec<&str> = one
            .spec
            .devices
            .iter()
            .flatten()
            .map(|d| d.name.as_str())
            .collect();
        (have == names).then(|| one.clone())
    })
    .await;
    match got {
        Some(s) => s,
        None => panic!(
            "no slice with {names:?} on {node}: {:#?}",
            node_slices(api, node).await
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver (make test-integration)"]
async fn slices_follow_the_inventory_and_go_with_the_daemon() {
    let server = ApiServer::shared().await.expect("start kube-apiserver");
    let client = server.client().await.expect("client");
    let node = "dra-slices-n1";
    let nodes: Api<Node> = Api::all(client.clone());
    let n: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": node}
    }))
    .expect("node");
    let n = nodes
        .create(&PostParams::default(), &n)
        .await
        .expect("create Node");
    let uid = n.metadata.uid.expect("uid");

    let probe = Arc::new(Facts::default());
    let (tx, rx) = watch::channel(vec![
        device("0000:00:07.0", "eni-0aaaaaaaaaaaaaaa1", 2),
        device("0000:00:08.0", "eni-0aaaaaaaaaaaaaaa2", 3),
    ]);
    let mut cfg = PublisherConfig::new(DEFAULT_DRIVER_NAME, node);
    cfg.health_interval = Duration::from_millis(100);
    cfg.retry = Duration::from_millis(200);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(eni_dra::publish::run(
        cfg,
        client.clone(),
        probe.clone(),
        rx,
        shutdown.clone(),
    ));
    let api: Api<ResourceSlice> = Api::all(client.clone());

    // Both devices, with their attributes, in one pool named after the node.
    let s = wait_devices(
        &api,
        node,
        &["eni-0aaaaaaaaaaaaaaa1", "eni-0aaaaaaaaaaaaaaa2"],
    )
    .await;
    assert_eq!(s.spec.driver, DEFAULT_DRIVER_NAME);
    assert_eq!(s.spec.pool.name, node);
    assert_eq!(s.spec.pool.resource_slice_count, 1);
    let g1 = s.spec.pool.generation;
    let owner = &s.metadata.owner_references.expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Node", uid.as_str())
    );
    let d = &s.spec.devices.expect("devices")[0];
    let a: &BTreeMap<_, _> = d.attributes.as_ref().expect("attributes");
    let string = |k: &str| a[k].string.clone().unwrap_or_default();
    assert_eq!(string(slice::ATTR_PCI_BUS_ID), "0000:00:07.0");
    assert_eq!(string(slice::ATTR_PCIE_ROOT), "pci0000:00");
    assert_eq!(string(slice::ATTR_MULTUS_DEVICE_ID), "0000:00:07.0");
    assert_eq!(
        string(slice::ATTR_MULTUS_RESOURCE_NAME),
        "intel.com/intel_sriov_netdevice"
    );
    assert_eq!(string(attr::ENI_ID), "eni-0aaaaaaaaaaaaaaa1");
    assert_eq!(string(attr::SUBNET_ID), "subnet-0f59b4f14737be9ad");
    assert_eq!(string(attr::VPC_ID), "vpc-0123456789abcdef0");
    assert_eq!(string(attr::NODE_ENI), "dpdk-enis");
    assert_eq!(string(attr::DRIVER), "vfio-pci");
    assert_eq!(string(attr::MAC), "02:00:00:00:00:02");
    assert_eq!(a[attr::DEVICE_INDEX].int, Some(2));
    assert_eq!(a[attr::MTU].int, Some(9001));
    assert_eq!(a[attr::NUMA_NODE].int, Some(0));
    assert_eq!(a[attr::DPDK].bool, Some(true));

    // A device being given back leaves the slice, with a new pool generation.
    let mut devs = tx.borrow().clone();
    devs[1].releasing = true;
    tx.send_replace(devs.clone());
    let s = wait_devices(&api, node, &["eni-0aaaaaaaaaaaaaaa1"]).await;
    let g2 = s.spec.pool.generation;
    assert!(g2 > g1, "generation {g2} after {g1}");

    // A device whose PCI device vanishes (health from the device plugin's probe) too.
    probe.gone.lock().expect("lock").push("0000:00:07.0".into());
    let s = wait_devices(&api, node, &[]).await;
    assert!(s.spec.pool.generation > g2);
    probe.gone.lock().expect("lock").clear();
    devs[1].releasing = false;
    tx.send_replace(devs);
    wait_devices(
        &api,
        node,
        &["eni-0aaaaaaaaaaaaaaa1", "eni-0aaaaaaaaaaaaaaa2"],
    )
    .await;

    // The kubelet wipes a node's slices when it starts: the slice comes back.
    let name = slice::slice_name(node, DEFAULT_DRIVER_NAME);
    api.delete(&name, &DeleteParams::default())
        .await
        .expect("delete the slice");
    wait_devices(
        &api,
        node,
        &["eni-0aaaaaaaaaaaaaaa1", "eni-0aaaaaaaaaaaaaaa2"],
    )
    .await;

    // A netdev ENI (left on ena, `--dra-ena-resource`): published beside the DPDK
    // ones, with driver ena and dpdk false, and a DeviceClass selecting it by resource.
    let mut with_netdev = tx.borrow().clone();
    let mut netdev = device(NETDEV_PCI, "eni-0aaaaaaaaaaaaaaa9", 9);
    netdev.driver = "ena".into();
    netdev.resource_name = NETDEV_RESOURCE.into();
    with_netdev.push(netdev);
    tx.send_replace(with_netdev);
    let s = wait_devices(
        &api,
        node,
        &[
            "eni-0aaaaaaaaaaaaaaa1",
            "eni-0aaaaaaaaaaaaaaa2",
            "eni-0aaaaaaaaaaaaaaa9",
        ],
    )
    .await;
    let d = &s.spec.devices.expect("devices")[2];
    let a: &BTreeMap<_, _> = d.attributes.as_ref().expect("attributes");
    let string = |k: &str| a[k].string.clone().unwrap_or_default();
    assert_eq!(string(attr::DRIVER), "ena");
    assert_eq!(a[attr::DPDK].bool, Some(false));
    assert_eq!(string(slice::ATTR_PCI_BUS_ID), NETDEV_PCI);
    assert_eq!(string(slice::ATTR_MULTUS_DEVICE_ID), NETDEV_PCI);
    assert_eq!(string(slice::ATTR_MULTUS_RESOURCE_NAME), NETDEV_RESOURCE);
    assert_eq!(string(attr::VPC_ID), "vpc-0123456789abcdef0");

    // A DeviceClass as the node chart renders it: extendedResourceName and a CEL
    // selector on our attributes (created, so the server validated both).
    let classes: Api<DeviceClass> = Api::all(client.clone());
    let class: DeviceClass = serde_json::from_value(serde_json::json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
        "metadata": {"name": "dra-slices-test-class"},
        "spec": {
            "extendedResourceName": "intel.com/intel_sriov_netdevice",
            "selectors": [{"cel": {"expression":
                "device.driver == 'eni.networking.k8s.aws' && device.attributes['k8s.cni.cncf.io'].resourceName == 'intel.com/intel_sriov_netdevice' && device.attributes['eni.networking.k8s.aws'].dpdk"}}]
        }
    }))
    .expect("class");
    classes
        .create(&PostParams::default(), &class)
        .await
        .expect("create DeviceClass");
    classes
        .delete("dra-slices-test-class", &DeleteParams::default())
        .await
        .expect("delete DeviceClass");
    let netdev_class: DeviceClass = serde_json::from_value(serde_json::json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
        "metadata": {"name": "dra-slices-test-netdev"},
        "spec": {"selectors": [{"cel": {"expression": format!(
            "device.driver == 'eni.networking.k8s.aws' && device.attributes['k8s.cni.cncf.io'].resourceName == '{NETDEV_RESOURCE}' && !device.attributes['eni.networking.k8s.aws'].dpdk")}}]}
    }))
    .expect("class");
    classes
        .create(&PostParams::default(), &netdev_class)
        .await
        .expect("create the netdev DeviceClass");
    classes
        .delete("dra-slices-test-netdev", &DeleteParams::default())
        .await
        .expect("delete the netdev DeviceClass");

    // Shutdown removes the node's slices.
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("stops")
        .expect("task")
        .expect("clean-up");
    assert!(node_slices(&api, node).await.is_empty());
    nodes
        .delete(node, &DeleteParams::default())
        .await
        .expect("delete Node");
}
