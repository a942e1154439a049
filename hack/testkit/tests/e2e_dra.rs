//! End to end, DRA variant: `hack/demo.sh up --dra` on the real kubelets, asserted.
//!
//! The DPDK ENIs are published in one ResourceSlice per node (and not advertised by the
//! device plugin); kube-scheduler allocates the demo's claim (a CEL selector on our
//! attributes) on a node with a matching ENI; that node's real kubelet (1.37.2) prepares
//! it through eni-manager's DRA plugin, which writes the claim's network data (the
//! allocated ENI's MAC and address); the pod runs there. A kubelet restart (which wipes
//! the node's slices) leaves the slice published and the driver registered again.
//!
//! Needs root, the cached peers (`make peers`: kube-scheduler, helm) and the workspace
//! binaries (`make build`), like `e2e.rs`.

use std::time::Duration;

use serde_json::Value;

mod common;
use common::demo::Demo;

fn slice_devices(demo: &Demo, node: &str) -> Option<Vec<Value>> {
    let l = demo.kubectl_json(&[
        "get",
        "resourceslices",
        "--field-selector",
        &format!("spec.nodeName={node}"),
    ])?;
    let items = l["items"].as_array()?;
    if items.len() != 1 {
        return None;
    }
    items[0]["spec"]["devices"].as_array().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: root, network namespaces, all peers; runs hack/demo.sh --dra (make test-integration)"]
async fn demo_dra_flow_on_real_kubelets() {
    let demo = Demo::new("e2e-dra", "eni-e2d-", format!("e2d{}", std::process::id()));
    let started = std::time::Instant::now();
    demo.run(&["up", "--dra"]);
    eprintln!(
        "e2e-dra: hack/demo.sh up --dra took {:?}",
        started.elapsed()
    );

    // One slice per node with its DPDK ENI; the device plugin does not advertise it.
    for node in ["node-1", "node-2"] {
        let devices = slice_devices(&demo, node).expect("one slice");
        assert_eq!(devices.len(), 1, "{node}: {devices:?}");
        let a = &devices[0]["attributes"];
        assert_eq!(a["nodeENI"]["string"], "multus-dpdk", "{a}");
        assert_eq!(a["driver"]["string"], "vfio-pci", "{a}");
        // Written into the NodeENI status by the controller, from the subnet's VPC.
        assert!(
            a["vpcID"]["string"]
                .as_str()
                .is_some_and(|v| v.starts_with("vpc-")),
            "{a}"
        );
        let n = demo.kubectl_json(&["get", "node", node]).expect("node");
        assert!(
            n["status"]["capacity"]["intel.com/intel_sriov_netdevice"].is_null()
                || n["status"]["capacity"]["intel.com/intel_sriov_netdevice"] == "0",
            "{node} still advertises the resource through the device plugin: {}",
            n["status"]["capacity"]
        );
    }

    // The claim: allocated by kube-scheduler, prepared by the pod's kubelet through
    // eni-manager, with the allocated ENI's MAC in its network data.
    let claim = demo
        .kubectl_json(&["get", "resourceclaim", "-n", "default", "eni-dra-claim"])
        .expect("claim");
    let result = &claim["status"]["allocation"]["devices"]["results"][0];
    assert_eq!(result["driver"], "eni.networking.k8s.aws");
    let (pool, device) = (
        result["pool"].as_str().expect("pool").to_owned(),
        result["device"].as_str().expect("device").to_owned(),
    );
    let pod = demo
        .kubectl_json(&["get", "pod", "-n", "default", "eni-dra-pod"])
        .expect("pod");
    assert_eq!(
        pod["spec"]["nodeName"],
        pool.as_str(),
        "the pod runs where its ENI is"
    );
    assert_eq!(pod["status"]["phase"], "Running");
    let slice_dev = slice_devices(&demo, &pool).expect("slice")[0].clone();
    assert_eq!(slice_dev["name"], device.as_str());
    let st = &claim["status"]["devices"][0];
    assert_eq!(st["device"], device.as_str());
    assert_eq!(
        st["networkData"]["hardwareAddress"],
        slice_dev["attributes"]["macAddress"]["string"]
    );
    assert_eq!(st["networkData"]["interfaceName"], "0000:00:07.0");
    assert!(
        st["networkData"]["ips"][0]
            .as_str()
            .is_some_and(|ip| ip.contains('/')),
        "{st}"
    );

    // A kubelet restart wipes the node's slices; eni-manager publishes its slice again.
    demo.run(&["kubelet-restart", &pool]);
    let back = eni_testkit::eventually(Duration::from_secs(60), || async {
        slice_devices(&demo, &pool).filter(|d| d.len() == 1)
    })
    .await;
    assert!(
        back.is_some(),
        "the slice of {pool} is back after the kubelet restart"
    );
}
