//! The `eni-manager` binary against the real kube-apiserver, configuring dummy interfaces
//! in a network namespace made by the test.
//!
//! Integration tier (`make test-integration`): needs root (network namespaces) and the
//! peers from `hack/peers.sh`.

mod common;

use std::time::{Duration, Instant};

use common::{Manager, Netns, is_up, mtu, poll};
use eni_api::{NodeENI, crd};
use eni_testkit::{ApiServer, eventually};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

async fn client_with_crd() -> (Client, &'static ApiServer) {
    let server = ApiServer::shared().await.expect("start kube-apiserver");
    let client = server.install_crd(&crd()).await.expect("install the CRD");
    (client, server)
}

/// Creates NodeENI `name` and writes its status attachments as the controller would.
async fn nodeeni_with_attachments(client: &Client, name: &str, attachments: serde_json::Value) {
    let api: Api<NodeENI> = Api::all(client.clone());
    let obj: NodeENI = serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
        "metadata": {"name": name},
        "spec": {"nodeSelector": {"ng": "multi-eni"}, "subnetID": "subnet-0f59b4f14737be9ad",
                 "securityGroupIDs": ["sg-05da196f3314d4af8"], "deviceIndex": 2}
    }))
    .expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create NodeENI");
    set_attachments(client, name, attachments).await;
}

async fn set_attachments(client: &Client, name: &str, attachments: serde_json::Value) {
    let api: Api<NodeENI> = Api::all(client.clone());
    api.patch_status(
        name,
        &PatchParams::apply("test-controller").force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
            "metadata": {"name": name},
            "status": {"attachments": attachments}
        })),
    )
    .await
    .expect("patch status");
}

async fn set_spec_dpdk(client: &Client, name: &str, on: bool) {
    let api: Api<NodeENI> = Api::all(client.clone());
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {
            "dpdkEnabled": on, "dpdkDriver": "vfio-pci",
            "dpdkResourceName": "intel.com/intel_sriov_netdevice"
        }})),
    )
    .await
    .expect("patch spec");
}

fn attachment(node: &str, eni: &str, mac: &str, index: i32, mtu: Option<i32>) -> serde_json::Value {
    let mut a = serde_json::json!({
        "nodeID": node, "instanceID": "i-0123456789abcdef0", "eniID": eni,
        "attachmentID": format!("attach-{eni}"), "subnetID": "subnet-0f59b4f14737be9ad",
        "deviceIndex": index, "macAddress": mac, "status": "Attached"
    });
    if let Some(m) = mtu {
        a["mtu"] = m.into();
    }
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs root and kube-apiserver (make test-integration)"]
async fn hotplugged_enis_are_configured_within_a_second() {
    let (client, server) = client_with_crd().await;
    let ns = Netns::new("hp");
    let node = format!("test-node-{}", ns.name);
    let name = format!("it-{}", ns.name);
    let (mac_a, mac_b, mac_other) = (
        "02:5e:00:00:00:0a",
        "02:5e:00:00:00:0b",
        "02:5e:00:00:00:0c",
    );
    nodeeni_with_attachments(
        &client,
        &name,
        serde_json::json!([
            attachment(&node, "eni-0aaaaaaaaaaaaaaa1", mac_a, 2, None),
            attachment(
                &node,
                "eni-0aaaaaaaaaaaaaaa2",
                &mac_b.to_uppercase(),
                3,
                Some(1500)
            ),
            // Another node's ENI with the MAC of the un-owned interface: not ours.
            attachment(
                "some-other-node",
                "eni-0aaaaaaaaaaaaaaa3",
                mac_other,
                2,
                None
            ),
        ]),
    )
    .await;

    // An interface the daemon does not own, present before it starts.
    ns.add_dummy("other0", mac_other);
    let before = ns.link("other0").expect("other0");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut mgr = Manager::start(
        &server.kubeconfig,
        &node,
        &ns.path(),
        dir.path(),
        &["--stable-names"],
    );
    mgr.wait_ready(Duration::from_secs(30));

    // Hot-plug: the ENIs appear after the daemon started.
    let plugged = Instant::now();
    ns.add_dummy("ens7", mac_a);
    ns.add_dummy("ens8", mac_b);
    let a = poll(Duration::from_secs(1), || {
        ns.link("ens7").filter(|l| is_up(l) && mtu(l) == 9001)
    });
    let took = plugged.elapsed();
    assert!(
        a.is_some(),
        "ens7 not up with MTU 9001 within 1 s: {:?}\nlog:\n{}",
        ns.link("ens7"),
        mgr.log_text()
    );
    let b = poll(Duration::from_secs(1), || {
        ns.link("ens8").filter(|l| is_up(l) && mtu(l) == 1500)
    });
    assert!(
        b.is_some(),
        "ens8 not up with MTU 1500: {:?}\nlog:\n{}",
        ns.link("ens8"),
        mgr.log_text()
    );
    println!("hot-plug -> configured: {took:?}");

    // Stable names: eth2 / eth3 resolve to the ENIs at device index 2 / 3.
    let eth2 = poll(Duration::from_secs(1), || ns.link("eth2")).expect("eth2 resolves");
    assert_eq!(eth2["ifname"], "ens7");
    let eth3 = poll(Duration::from_secs(1), || ns.link("eth3")).expect("eth3 resolves");
    assert_eq!(eth3["ifname"], "ens8");

    // The un-owned interface is untouched.
    let after = ns.link("other0").expect("other0");
    assert_eq!(is_up(&after), is_up(&before));
    assert_eq!(mtu(&after), mtu(&before));
    assert!(after.get("altnames").is_none(), "{after}");

    // The report shows up in the NodeENI status, next to the controller's attachments.
    let api: Api<NodeENI> = Api::all(client.clone());
    let report = eventually(Duration::from_secs(10), || {
        let api = api.clone();
        let (name, node) = (name.clone(), node.clone());
        async move {
            let ne = api.get(&name).await.ok()?;
            let status = ne.status?;
            let r = status
                .node_reports
                .into_iter()
                .find(|r| r.node_name == node)?;
            (r.interfaces.len() == 2 && r.interfaces.iter().all(|i| i.up))
                .then_some((r, status.attachments))
        }
    })
    .await;
    let (report, attachments) =
        report.unwrap_or_else(|| panic!("no nodeReports entry; log:\n{}", mgr.log_text()));
    assert_eq!(
        attachments.len(),
        3,
        "the controller's attachments are intact"
    );
    let ens7 = report
        .interfaces
        .iter()
        .find(|i| i.mac_address == mac_a)
        .expect("ens7 report");
    assert_eq!(ens7.interface_name.as_deref(), Some("ens7"));
    assert_eq!(ens7.mtu, Some(9001));
    assert_eq!(ens7.error, None);
    let ens8 = report
        .interfaces
        .iter()
        .find(|i| i.mac_address == mac_b)
        .expect("ens8 report");
    assert_eq!(ens8.mtu, Some(1500));

    // The managed fields show the daemon's own field manager.
    let ne = api.get(&name).await.expect("get");
    let managers: Vec<String> = ne
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.contains(&format!("eni-manager-{node}")),
        "{managers:?}"
    );

    // The state file for cni-helper.
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("state/enis.json")).expect("state file"),
    )
    .expect("json");
    assert_eq!(state["version"], 1);
    assert_eq!(state["node"], node.as_str());
    let enis = state["enis"].as_array().expect("enis");
    assert_eq!(enis.len(), 2);
    assert_eq!(enis[0]["interfaceName"], "ens7");
    assert_eq!(enis[0]["deviceIndex"], 2);
    assert_eq!(enis[0]["nodeENI"], name.as_str());
    assert_eq!(enis[1]["interfaceName"], "ens8");

    // Metrics.
    let metrics = common::http_get(mgr.metrics_port, "/metrics").expect("metrics");
    assert!(
        metrics.contains("eni_manager_interfaces_configured 2"),
        "{metrics}"
    );

    // Report writes settle: each write comes back as a watch event that must not cause
    // another write.
    let writes = mgr.log_text().matches("node report written").count();
    assert!(
        (1..=6).contains(&writes),
        "{writes} report writes:\n{}",
        mgr.log_text()
    );

    // The controller drops the attachments: the daemon removes its report entry.
    set_attachments(&client, &name, serde_json::json!([])).await;
    let gone = eventually(Duration::from_secs(10), || {
        let api = api.clone();
        let (name, node) = (name.clone(), node.clone());
        async move {
            let ne = api.get(&name).await.ok()?;
            let reports = ne.status.map(|s| s.node_reports).unwrap_or_default();
            (!reports.iter().any(|r| r.node_name == node)).then_some(())
        }
    })
    .await;
    assert!(
        gone.is_some(),
        "report not removed; log:\n{}",
        mgr.log_text()
    );
    api.delete(&name, &DeleteParams::default())
        .await
        .expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs root and kube-apiserver (make test-integration)"]
async fn restart_reapplies_nothing_and_resync_repairs_drift() {
    let (client, server) = client_with_crd().await;
    let ns = Netns::new("rs");
    let node = format!("test-node-{}", ns.name);
    let name = format!("it-{}", ns.name);
    let mac = "02:5e:00:00:01:0a";
    ns.add_dummy("ens9", mac);
    // The primary interface (it carries the default route), wrongly listed as an ENI.
    let primary_mac = "02:5e:00:00:01:05";
    ns.add_dummy("ens5", primary_mac);
    ns.ip(&["link", "set", "ens5", "up"]);
    ns.ip(&["addr", "add", "10.99.0.2/24", "dev", "ens5"]);
    ns.ip(&["route", "add", "default", "via", "10.99.0.1"]);
    nodeeni_with_attachments(
        &client,
        &name,
        serde_json::json!([
            attachment(&node, "eni-0bbbbbbbbbbbbbbb1", mac, 4, Some(4000)),
            attachment(&node, "eni-0bbbbbbbbbbbbbbb2", primary_mac, 5, Some(4000)),
        ]),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut mgr = Manager::start(&server.kubeconfig, &node, &ns.path(), dir.path(), &[]);
        mgr.wait_ready(Duration::from_secs(30));
        let ok = poll(Duration::from_secs(2), || {
            ns.link("ens9").filter(|l| is_up(l) && mtu(l) == 4000)
        });
        assert!(
            ok.is_some(),
            "ens9 not configured; log:\n{}",
            mgr.log_text()
        );
        assert!(ns.link("eth4").is_none(), "no stable names unless asked");
        let primary = ns
            .link("ens5")
            .unwrap_or_else(|| panic!("ens5 gone: {}\nlog:\n{}", ns.ip(&["link"]), mgr.log_text()));
        assert_eq!(mtu(&primary), 1500, "the primary interface was touched");
        let api: Api<NodeENI> = Api::all(client.clone());
        let reported = eventually(Duration::from_secs(10), || {
            let api = api.clone();
            let (name, node) = (name.clone(), node.clone());
            async move {
                let r = api.get(&name).await.ok()?.status?.node_reports;
                let ifs = r.into_iter().find(|r| r.node_name == node)?.interfaces;
                ifs.into_iter().find(|i| i.device_index == 5)?.error
            }
        })
        .await;
        assert!(
            reported.as_deref().unwrap_or("").contains("default route"),
            "{reported:?}"
        );
    }
    // Restart: nothing to change, and the daemon says so (no link changes counted).
    let mut mgr = Manager::start(
        &server.kubeconfig,
        &node,
        &ns.path(),
        dir.path(),
        &["--resync-period", "1s"],
    );
    mgr.wait_ready(Duration::from_secs(30));
    let metrics = common::http_get(mgr.metrics_port, "/metrics").expect("metrics");
    assert!(
        metrics.contains("eni_manager_link_changes_total 0"),
        "{metrics}"
    );
    // Someone changes the MTU behind the daemon's back: the link event repairs it.
    ns.ip(&["link", "set", "ens9", "mtu", "1500"]);
    let ok = poll(Duration::from_secs(1), || {
        ns.link("ens9").filter(|l| mtu(l) == 4000)
    });
    assert!(ok.is_some(), "drift not repaired; log:\n{}", mgr.log_text());
    Api::<NodeENI>::all(client)
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete");
}

/// The DPDK path through the binary, as the local demo runs it: a fake sysfs tree with
/// `--simulate-pci-kernel`, the ENI's netdev in the namespace pointing at its fake PCI
/// device, found by MAC -> netdev -> PCI address and bound to vfio-pci.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs root and kube-apiserver (make test-integration)"]
async fn dpdk_eni_found_by_mac_is_bound_and_reported() {
    use eni_node::sysfs::fake::FakeTree;
    let (client, server) = client_with_crd().await;
    let ns = Netns::new("dp");
    let node = format!("test-node-{}", ns.name);
    let name = format!("it-{}", ns.name);
    let mac = "02:5e:00:00:02:07";
    let pci = "0000:00:07.0";
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = FakeTree::new(&dir.path().join("sys")).expect("fake sysfs");
    tree.add_ena(pci).expect("ena");
    tree.add_netdev("ens7", pci).expect("netdev link");
    ns.add_dummy("ens7", mac);
    let mut a = attachment(&node, "eni-0ccccccccccccccc1", mac, 2, None);
    a["dpdkEnabled"] = true.into();
    a["dpdkDriver"] = "vfio-pci".into();
    a["dpdkResourceName"] = "intel.com/intel_sriov_netdevice".into();
    nodeeni_with_attachments(&client, &name, serde_json::json!([a])).await;
    // DPDK is the spec's decision (the daemon ignores the DPDK fields of the status).
    set_spec_dpdk(&client, &name, true).await;

    let mut mgr = Manager::start(
        &server.kubeconfig,
        &node,
        &ns.path(),
        dir.path(),
        // No kubelet here: nobody to ask which pods hold devices.
        &[
            "--simulate-pci-kernel",
            "--enable-unsafe-noiommu-mode",
            "--pod-resources-socket=",
        ],
    );
    mgr.wait_ready(Duration::from_secs(30));
    let api: Api<NodeENI> = Api::all(client.clone());
    let report = eventually(Duration::from_secs(10), || {
        let api = api.clone();
        let (name, node) = (name.clone(), node.clone());
        async move {
            let r = api.get(&name).await.ok()?.status?.node_reports;
            let i = r
                .into_iter()
                .find(|r| r.node_name == node)?
                .interfaces
                .pop()?;
            i.dpdk_bound.then_some(i)
        }
    })
    .await
    .unwrap_or_else(|| panic!("not reported bound; log:\n{}", mgr.log_text()));
    assert_eq!(report.pci_address.as_deref(), Some(pci));
    assert_eq!(report.driver.as_deref(), Some("vfio-pci"));
    assert_eq!(report.interface_name, None);
    assert_eq!(
        report.resource_name.as_deref(),
        Some("intel.com/intel_sriov_netdevice")
    );
    assert!(
        report
            .device_name
            .as_deref()
            .unwrap_or("")
            .contains("Elastic Network Adapter"),
        "{report:?}"
    );
    assert_eq!(
        std::fs::read_link(tree.path("bus/pci/devices/0000:00:07.0/driver")).expect("driver link"),
        std::path::PathBuf::from("../../drivers/vfio-pci")
    );
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("state/enis.json")).expect("state file"),
    )
    .expect("json");
    assert_eq!(state["enis"][0]["pciAddress"], pci);
    assert_eq!(state["enis"][0]["dpdkBound"], true);
    assert_eq!(state["enis"][0]["interfaceName"], serde_json::Value::Null);

    // DPDK turned off: the device goes back to ena.
    let mut a = attachment(&node, "eni-0ccccccccccccccc1", mac, 2, None);
    a["dpdkEnabled"] = false.into();
    set_attachments(&client, &name, serde_json::json!([a])).await;
    set_spec_dpdk(&client, &name, false).await;
    let back = poll(Duration::from_secs(5), || {
        std::fs::read_link(tree.path("bus/pci/devices/0000:00:07.0/driver"))
            .ok()
            .filter(|l| l.ends_with("ena"))
    });
    assert!(back.is_some(), "not given back; log:\n{}", mgr.log_text());
    api.delete(&name, &DeleteParams::default())
        .await
        .expect("delete");
}
