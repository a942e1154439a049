//! End to end: the `make demo` flow, asserted.
//!
//! One implementation, two faces: this test runs `hack/demo.sh up` (quiet, in its own
//! directory and namespace prefix, so it never collides with a demo someone has running)
//! and then checks what the demo only prints, through the API server and `kubectl exec`:
//! real kubelets (one per node, with containerd) report our resource in capacity, run the
//! pod that asks for it with the device plugin's env and device nodes and the ENI as net1,
//! with a VPC address of the ENI's pool (issue 17: `spec.ipam` on the NodeENI, the
//! controller assigning it through the EC2 fault layer, the node daemon's pool, cni-helper
//! as the IPAM of the host-device delegate Multus runs, or ipvlan where the kernel has it)
//! that DescribeNetworkInterfaces lists on that ENI, back in the pool after the pod's DEL
//! and handed to the next pod;
//! a kubelet restart brings capacity back and leaves the pod alone; after the pod is
//! deleted the device is free for a second pod. Then the way back: NodeENI deletion,
//! `hack/demo.sh down`.
//!
//! Needs root (network namespaces), the cached peers (`make peers`) and the workspace
//! binaries built next to this test (`cargo test --workspace` builds them; alone:
//! `make build` first).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::Value;

mod common;
use common::demo::Demo;

const RESOURCE: &str = "intel.com/intel_sriov_netdevice";

fn cmd_json(program: &str, args: &[&str]) -> Value {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Links of a namespace (`ip -j link`), by MAC address.
fn links(netns: &str) -> BTreeMap<String, Value> {
    let v = cmd_json("ip", &["-n", netns, "-j", "link", "show"]);
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| Some((l["address"].as_str()?.to_string(), l.clone())))
        .collect()
}

fn up_with_mtu(link: &Value, mtu: u64) -> bool {
    link["mtu"].as_u64() == Some(mtu)
        && link["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP"))
}

/// The ENIs moto knows, as `hack/sim-nitro enis` prints them.
fn moto_enis(env: &Value) -> Vec<Value> {
    let py = eni_testkit::cache_dir().join("moto-venv/bin/python");
    let sim = common::demo::repo_dir().join("hack/sim-nitro");
    let moto = env["moto"].as_str().expect("moto endpoint");
    let v = cmd_json(
        py.to_str().expect("utf-8 path"),
        &[
            sim.to_str().expect("utf-8 path"),
            "--endpoint",
            moto,
            "enis",
        ],
    );
    v.as_array().cloned().unwrap_or_default()
}

/// Asserts what the pod got: `PCIDEVICE_*` env naming one DPDK ENI, its vfio group device
/// and `/dev/vfio/vfio`, and `net1` with the plain ENI's MAC and MTU 9001. Returns the PCI
/// address and the container ID.
fn assert_pod_has_devices(demo: &Demo, pod: &str, mac: &str) -> (String, String) {
    let var = "PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE";
    let envs = demo.exec(pod, &["env"]);
    let pci = envs
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{var}=")))
        .unwrap_or_else(|| panic!("{pod}: no {var} in {envs}"))
        .to_string();
    assert!(pci.starts_with("0000:"), "{pod}: {var}={pci}");
    let info = envs
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{var}_INFO=")))
        .unwrap_or_else(|| panic!("{pod}: no {var}_INFO in {envs}"));
    let info: Value = serde_json::from_str(info).expect("_INFO is JSON");
    let group = info[&pci]["vfio"]["dev-mount"]
        .as_str()
        .unwrap_or_else(|| panic!("{pod}: no vfio dev-mount in {info}"))
        .to_string();
    let dev = demo.exec(pod, &["ls", "/dev/vfio"]);
    for want in ["vfio", group.trim_start_matches("/dev/vfio/")] {
        assert!(
            dev.split_whitespace().any(|d| d == want),
            "{pod}: /dev/vfio has {dev:?}, not {want}"
        );
    }
    let links = demo.exec(pod, &["ip", "-o", "link", "show", "net1"]);
    assert!(
        links.contains(mac) && links.contains("mtu 9001"),
        "{pod}: net1 is not the ENI {mac} with MTU 9001: {links}"
    );
    let container = demo.kubectl(
        &[
            "get",
            "pod",
            "-n",
            "default",
            pod,
            "-o",
            "jsonpath={.status.containerStatuses[0].containerID} {.status.containerStatuses[0].restartCount}",
        ],
    )
    .expect("pod container");
    (pci, container)
}

/// The IPv4 address of `net1` in the pod (`a.b.c.d/len`).
fn pod_vpc_address(demo: &Demo, pod: &str) -> String {
    let out = demo.exec(pod, &["ip", "addr", "show", "dev", "net1"]);
    out.lines()
        .find_map(|l| l.trim().strip_prefix("inet "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{pod}: no IPv4 address on net1: {out}"))
        .to_string()
}

/// The addresses `ipam.json` in a node's state directory holds on `eni`, with the pods
/// holding them.
fn allocations(node: &Value, eni: &str) -> BTreeMap<String, String> {
    let dir = node["stateDir"].as_str().expect("stateDir");
    let Ok(bytes) = std::fs::read(Path::new(dir).join("ipam.json")) else {
        return BTreeMap::new();
    };
    let v: Value = serde_json::from_slice(&bytes).expect("ipam.json is JSON");
    v["allocations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["eniID"] == eni)
        .filter_map(|a| {
            Some((
                a["address"].as_str()?.to_string(),
                a["podName"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// The pool the node daemon keeps for `eni` in its state file (`enis.json` `pools`).
fn node_pool(node: &Value, eni: &str) -> Vec<String> {
    let dir = node["stateDir"].as_str().expect("stateDir");
    let v: Value = serde_json::from_slice(
        &std::fs::read(Path::new(dir).join("enis.json")).expect("enis.json"),
    )
    .expect("enis.json is JSON");
    v["pools"][eni]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(String::from))
        .collect()
}

/// The secondary addresses EC2 lists on `eni` (DescribeNetworkInterfaces through the
/// fault layer, which models what EC2 does with assigned addresses: the ground truth).
async fn ec2_secondary_addresses(env: &Value, eni: &str) -> Vec<String> {
    let ec2 = eni_testkit::ec2_client(env["ec2"].as_str().expect("ec2 endpoint"));
    let out = ec2
        .describe_network_interfaces()
        .network_interface_ids(eni)
        .send()
        .await
        .expect("DescribeNetworkInterfaces");
    let e = out.network_interfaces().first().expect("the ENI");
    e.private_ip_addresses()
        .iter()
        .filter(|a| a.primary() != Some(true))
        .filter_map(|a| a.private_ip_address().map(String::from))
        .collect()
}

/// UNIX seconds `ago` before now (the kubelet's heartbeats have whole seconds).
fn unix_seconds_ago(ago: Duration) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(now.saturating_sub(ago).as_secs()).expect("seconds fit i64")
}

async fn poll<T, F, Fut>(what: &str, deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eni_testkit::eventually(deadline, check)
        .await
        .unwrap_or_else(|| panic!("timed out after {deadline:?} waiting for {what}"))
}

fn nodeeni_api(client: &kube::Client) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.k8s.aws", "v1alpha1", "NodeENI"),
        "nodeenis",
    );
    Api::all_with(client.clone(), &ar)
}

fn capacity(node: &k8s_openapi::api::core::v1::Node) -> Option<String> {
    node.status
        .as_ref()?
        .capacity
        .as_ref()?
        .get(RESOURCE)
        .map(|q| q.0.clone())
}

fn allocatable(node: &k8s_openapi::api::core::v1::Node) -> Option<String> {
    node.status
        .as_ref()?
        .allocatable
        .as_ref()?
        .get(RESOURCE)
        .map(|q| q.0.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: root, network namespaces, all peers; runs hack/demo.sh (make test-integration)"]
async fn demo_flow_nodeeni_to_pod_interface_and_back() {
    let demo = Demo::new("e2e", "eni-e2e-", format!("e2e{}", std::process::id()));
    let started = std::time::Instant::now();
    demo.run(&["up"]);
    eprintln!("e2e: hack/demo.sh up took {:?}", started.elapsed());
    let env = demo.env();

    eni_testkit::install_crypto_provider();
    let kc = Kubeconfig::read_from(env["kubeconfig"].as_str().expect("kubeconfig")).expect("read");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    let client = kube::Client::try_from(config).expect("client");
    let nodeenis = nodeeni_api(&client);
    let nodes_api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "default");

    let nodes: Vec<Value> = env["nodes"].as_array().cloned().expect("nodes");
    let instance_of = |node: &str| -> String {
        nodes
            .iter()
            .find(|n| n["name"] == node)
            .and_then(|n| n["instance"].as_str())
            .expect("node instance")
            .to_string()
    };
    let netns_of = |node: &str| -> String {
        nodes
            .iter()
            .find(|n| n["name"] == node)
            .and_then(|n| n["netns"].as_str())
            .expect("node netns")
            .to_string()
    };

    // NodeENIs Ready, one attachment per node each; remember every attachment.
    let mut plain: BTreeMap<String, (String, String)> = BTreeMap::new(); // node -> (eni, mac)
    let mut dpdk: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (name, dpdk_enabled) in [("multus-plain", false), ("multus-dpdk", true)] {
        let ne = nodeenis.get(name).await.expect("get NodeENI");
        let status = &ne.data["status"];
        let ready = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready")
            .unwrap_or_else(|| panic!("{name}: no Ready condition: {status}"));
        assert_eq!(ready["status"], "True", "{name}: {status}");
        let atts = status["attachments"].as_array().expect("attachments");
        assert_eq!(atts.len(), nodes.len(), "{name}: {status}");
        for a in atts {
            let node = a["nodeID"].as_str().expect("nodeID").to_string();
            let eni = a["eniID"].as_str().expect("eniID").to_string();
            let mac = a["macAddress"].as_str().expect("macAddress").to_string();
            assert_eq!(a["instanceID"].as_str(), Some(instance_of(&node).as_str()));
            assert_eq!(a["mtu"], 9001, "{a}");
            if dpdk_enabled {
                dpdk.entry(node).or_default().push((eni, mac));
            } else {
                plain.insert(node, (eni, mac));
            }
        }
    }

    // Attached in moto, at the right index on the right instance.
    let enis = moto_enis(&env);
    for (node, (eni, mac)) in &plain {
        let e = enis
            .iter()
            .find(|e| e["id"] == eni.as_str())
            .unwrap_or_else(|| panic!("{eni} not in moto"));
        assert_eq!(e["instance"].as_str(), Some(instance_of(node).as_str()));
        assert_eq!(e["deviceIndex"], 1);
        assert_eq!(e["attachmentStatus"], "attached");
        assert_eq!(e["mac"].as_str(), Some(mac.as_str()));
    }
    for (node, list) in &dpdk {
        for (eni, _) in list {
            let e = enis
                .iter()
                .find(|e| e["id"] == eni.as_str())
                .unwrap_or_else(|| panic!("{eni} not in moto"));
            assert_eq!(e["instance"].as_str(), Some(instance_of(node).as_str()));
            assert_eq!(e["deviceIndex"], 2);
            assert_eq!(e["attachmentStatus"], "attached");
        }
    }

    // Node capacity = DPDK ENIs on that node (the demo waited for it).
    for n in &nodes {
        let name = n["name"].as_str().expect("name");
        let want = dpdk.get(name).map_or(0, Vec::len).to_string();
        let node = nodes_api.get(name).await.expect("node");
        assert_eq!(capacity(&node), Some(want.clone()), "{name} capacity");
        // Healthy too: bound to vfio-pci, group device present.
        assert_eq!(allocatable(&node), Some(want), "{name} allocatable");
    }

    // A dpdkPCIAddress one digit off names the EBS root disk every simulated Nitro node
    // has (1d0f:8061 at 0000:00:04.0): refused on every node and reported, the disk stays
    // on nvme, the bound ENA stays bound and advertised.
    let ebs = "0000:00:04.0";
    let merge = |v: Value| kube::api::Patch::Merge(v);
    nodeenis
        .patch(
            "multus-dpdk",
            &kube::api::PatchParams::default(),
            &merge(serde_json::json!({"spec": {"dpdkPCIAddress": ebs}})),
        )
        .await
        .expect("patch dpdkPCIAddress");
    for (node, list) in &dpdk {
        let (eni, _) = &list[0];
        let report = poll(
            &format!("{node}: the wrong dpdkPCIAddress reported"),
            Duration::from_secs(30),
            || {
                let nodeenis = nodeenis.clone();
                async move {
                    let ne = nodeenis.get("multus-dpdk").await.ok()?;
                    let r = ne.data["status"]["nodeReports"]
                        .as_array()?
                        .iter()
                        .find(|r| r["nodeName"] == node.as_str())?
                        .clone();
                    let i = r["interfaces"]
                        .as_array()?
                        .iter()
                        .find(|i| i["eniID"] == eni.as_str())?
                        .clone();
                    i["error"].as_str()?.contains(ebs).then_some(i)
                }
            },
        )
        .await;
        assert!(
            report["error"]
                .as_str()
                .unwrap_or_default()
                .contains("is not the device of MAC"),
            "{report}"
        );
        let sysfs = nodes
            .iter()
            .find(|n| n["name"] == node.as_str())
            .and_then(|n| n["sysfs"].as_str())
            .expect("node sysfs");
        for nvme in ["0000:00:04.0", "0000:00:1e.0", "0000:00:1f.0"] {
            let link = std::fs::read_link(
                Path::new(sysfs)
                    .join("bus/pci/devices")
                    .join(nvme)
                    .join("driver"),
            )
            .expect("nvme driver link");
            assert!(link.ends_with("nvme"), "{node} {nvme}: {}", link.display());
        }
    }
    for n in &nodes {
        let name = n["name"].as_str().expect("name");
        let want = dpdk.get(name).map_or(0, Vec::len).to_string();
        let node = nodes_api.get(name).await.expect("node");
        assert_eq!(allocatable(&node), Some(want), "{name} allocatable");
    }
    nodeenis
        .patch(
            "multus-dpdk",
            &kube::api::PatchParams::default(),
            &merge(serde_json::json!({"spec": {"dpdkPCIAddress": null}})),
        )
        .await
        .expect("remove dpdkPCIAddress");

    // The plain ENI: up with MTU 9001 in its node (node-2); node-1's is in the pod as net1.
    let pod = &env["pod"];
    let pod_node = pod["node"].as_str().expect("pod node");
    let pod_name = pod["name"].as_str().expect("pod name");
    for (node, (_, mac)) in &plain {
        if node == pod_node {
            continue;
        }
        let l = links(&netns_of(node));
        let link = l
            .get(mac)
            .unwrap_or_else(|| panic!("{node}: no link {mac}"));
        assert!(up_with_mtu(link, 9001), "{node}: {link}");
    }

    // The Nodes as their kubelets report them: Ready, real cpu/memory/pods, and our
    // resource beside them.
    for n in &nodes {
        let name = n["name"].as_str().expect("name");
        let node = nodes_api.get(name).await.expect("node");
        let status = node.status.as_ref().expect("node status");
        let info = status.node_info.as_ref().expect("nodeInfo");
        assert_eq!(info.kubelet_version, "v1.37.2", "{name}");
        assert!(
            info.container_runtime_version.starts_with("containerd://"),
            "{name}: {}",
            info.container_runtime_version
        );
        let cap = status.capacity.as_ref().expect("capacity");
        for r in ["cpu", "memory", "pods"] {
            assert!(cap.contains_key(r), "{name}: no {r} in capacity {cap:?}");
        }
        assert!(
            status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            "{name} not Ready"
        );
    }

    // The pod: Running, with what the kubelet got from our device plugin's Allocate
    // (env, vfio device nodes) and what Multus + cni-helper gave it (net1 = the ENI).
    let (_, pod_mac) = &plain[pod_node];
    let p = pods.get(pod_name).await.expect("pod");
    assert_eq!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );
    let (dpdk_eni_pci, pod_container) = assert_pod_has_devices(&demo, pod_name, pod_mac);
    let status: Value = serde_json::from_str(
        p.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("k8s.v1.cni.cncf.io/network-status"))
            .expect("network-status annotation"),
    )
    .expect("network-status is JSON");
    assert!(
        status
            .as_array()
            .expect("list")
            .iter()
            .any(|s| s["interface"] == "net1" && s["mac"] == pod_mac.as_str()),
        "{status}"
    );

    // Its VPC address (issue 17): the controller assigned it to the ENI net1 sits on (EC2
    // lists it there), the node daemon put it in the node's pool, cni-helper (the eni-vpc
    // network's IPAM, run by the delegate Multus ran) recorded it for the pod's container.
    let (pod_eni, _) = &plain[pod_node];
    let pod_node_v = nodes
        .iter()
        .find(|n| n["name"] == pod_node)
        .expect("pod node")
        .clone();
    let with_len = pod_vpc_address(&demo, pod_name);
    let (vpc_addr, len) = with_len.split_once('/').expect("address/len");
    assert_eq!(
        len, "24",
        "the subnet's prefix length (multi-eni-a is a /24)"
    );
    let vpc_addr = vpc_addr.to_string();
    assert!(
        ec2_secondary_addresses(&env, pod_eni)
            .await
            .contains(&vpc_addr),
        "{vpc_addr} is not assigned to {pod_eni} in EC2"
    );
    assert!(
        node_pool(&pod_node_v, pod_eni).contains(&vpc_addr),
        "{vpc_addr} is not in {pod_node}'s pool of {pod_eni}"
    );
    let held = allocations(&pod_node_v, pod_eni);
    assert_eq!(
        held.keys().collect::<Vec<_>>(),
        [&vpc_addr],
        "{pod_node}'s allocations of {pod_eni}: {held:?}"
    );
    assert_eq!(held[&vpc_addr], pod_name, "the holder of {vpc_addr}");
    eprintln!(
        "e2e: {pod_name} got {with_len} on {pod_eni} ({} delegate)",
        env["vpcNetwork"]["delegate"]
    );

    // Kubelet restart: the device plugin registers again and capacity is back; the
    // running pod is untouched (same container, no restart, net1 still there).
    let restarted = std::time::Instant::now();
    demo.run(&["kubelet-restart", pod_node]);
    // "Back" is when the new kubelet serves `kubectl exec` again (the API server refuses to
    // proxy plain requests to a node whose address resolves to loopback).
    poll(
        "the restarted kubelet serving kubectl exec",
        Duration::from_secs(60),
        || {
            let ok = demo
                .kubectl(&["exec", "-n", "default", pod_name, "--", "true"])
                .is_some();
            async move { ok.then_some(()) }
        },
    )
    .await;
    let back = restarted.elapsed();
    let restart_secs = unix_seconds_ago(back);
    poll(
        "capacity and allocatable 1 in a status the restarted kubelet posted",
        Duration::from_secs(30),
        || {
            let api = nodes_api.clone();
            async move {
                let node = api.get(pod_node).await.ok()?;
                let heartbeat = node
                    .status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .iter()
                    .find(|c| c.type_ == "Ready")?
                    .last_heartbeat_time
                    .as_ref()?
                    .0
                    .as_second();
                (heartbeat >= restart_secs
                    && capacity(&node).as_deref() == Some("1")
                    && allocatable(&node).as_deref() == Some("1"))
                .then_some(())
            }
        },
    )
    .await;
    eprintln!(
        "e2e: kubelet restart: kubelet answering after {back:?}, capacity {RESOURCE}=1 posted {:?} after that",
        restarted.elapsed().saturating_sub(back)
    );
    let (_, again) = assert_pod_has_devices(&demo, pod_name, pod_mac);
    assert_eq!(again, pod_container, "the pod's container changed");

    // Pod deletion: the kubelet runs the CNI DEL (the ENI is back on the node, up with its
    // MTU) and the device is free again: a second pod gets it.
    pods.delete(pod_name, &DeleteParams::default())
        .await
        .expect("delete pod");
    poll("the pod gone", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { pods.get_opt(pod_name).await.ok()?.is_none().then_some(()) }
    })
    .await;
    let node_ns = netns_of(pod_node);
    poll(
        "the ENI back in the node, up with MTU 9001",
        Duration::from_secs(20),
        || {
            let l = links(&node_ns);
            async move { l.get(pod_mac).filter(|l| up_with_mtu(l, 9001)).map(|_| ()) }
        },
    )
    .await;
    // The CNI DEL gave the address back: no allocation holds it, it stays in the pool and
    // assigned to the ENI in EC2 (a pool of one: nothing to shrink) ...
    poll(
        "the pod's address gone from the allocations",
        Duration::from_secs(20),
        || {
            let held = allocations(&pod_node_v, pod_eni);
            async move { held.is_empty().then_some(()) }
        },
    )
    .await;
    assert!(
        node_pool(&pod_node_v, pod_eni).contains(&vpc_addr),
        "{vpc_addr} left {pod_node}'s pool"
    );
    demo.run(&["pod", "eni-e2e-second"]);
    let (second_pci, _) = assert_pod_has_devices(&demo, "eni-e2e-second", pod_mac);
    assert_eq!(
        second_pci, dpdk_eni_pci,
        "the second pod got another device"
    );
    // ... and the second pod on that ENI gets it again, still assigned to the ENI in EC2.
    assert_eq!(
        pod_vpc_address(&demo, "eni-e2e-second"),
        with_len,
        "the second pod did not reuse the address"
    );
    assert!(
        ec2_secondary_addresses(&env, pod_eni)
            .await
            .contains(&vpc_addr),
        "{vpc_addr} is no longer assigned to {pod_eni} in EC2"
    );
    assert_eq!(
        allocations(&pod_node_v, pod_eni),
        BTreeMap::from([(vpc_addr.clone(), "eni-e2e-second".to_string())])
    );
    pods.delete("eni-e2e-second", &DeleteParams::default())
        .await
        .expect("delete the second pod");
    poll("the second pod gone", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            pods.get_opt("eni-e2e-second")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    poll(
        "the ENI back in the node after the second pod",
        Duration::from_secs(20),
        || {
            let l = links(&node_ns);
            async move { l.get(pod_mac).filter(|l| up_with_mtu(l, 9001)).map(|_| ()) }
        },
    )
    .await;

    // NodeENI deletion: ENIs, interfaces, PCI devices and capacity go away.
    for name in ["multus-plain", "multus-dpdk"] {
        nodeenis
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete NodeENI");
    }
    poll("the NodeENIs gone", Duration::from_secs(60), || {
        let api = nodeenis.clone();
        async move {
            api.list(&Default::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        }
    })
    .await;
    let ours: Vec<String> = plain
        .values()
        .map(|(e, _)| e.clone())
        .chain(dpdk.values().flatten().map(|(e, _)| e.clone()))
        .collect();
    poll("the ENIs deleted in moto", Duration::from_secs(30), || {
        let left: Vec<Value> = moto_enis(&env)
            .into_iter()
            .filter(|e| ours.iter().any(|o| e["id"] == o.as_str()))
            .collect();
        async move { left.is_empty().then_some(()) }
    })
    .await;
    let macs: Vec<String> = plain
        .values()
        .map(|(_, m)| m.clone())
        .chain(dpdk.values().flatten().map(|(_, m)| m.clone()))
        .collect();
    for n in &nodes {
        let name = n["name"].as_str().expect("name").to_string();
        let ns = netns_of(&name);
        poll(
            &format!("{name}: the ENI interfaces gone"),
            Duration::from_secs(10),
            || {
                let l = links(&ns);
                let gone = !macs.iter().any(|m| l.contains_key(m));
                async move { gone.then_some(()) }
            },
        )
        .await;
        let sys = PathBuf::from(n["sysfs"].as_str().expect("sysfs"));
        for pci in ["0000:00:06.0", "0000:00:07.0"] {
            assert!(
                !sys.join("bus/pci/devices").join(pci).exists(),
                "{name}: PCI device {pci} still there"
            );
        }
        poll(
            &format!("{name}: capacity of {RESOURCE} back to 0"),
            Duration::from_secs(20),
            || {
                let api = nodes_api.clone();
                let name = name.clone();
                async move {
                    let node = api.get(&name).await.ok()?;
                    matches!(capacity(&node).as_deref(), None | Some("0")).then_some(())
                }
            },
        )
        .await;
    }

    // Down leaves nothing behind.
    demo.run(&["down"]);
    let all = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned();
    assert!(
        !all.lines().any(|l| l.starts_with(demo.prefix())),
        "namespaces left: {all}"
    );
    eprintln!("e2e: whole flow took {:?}", started.elapsed());
}
