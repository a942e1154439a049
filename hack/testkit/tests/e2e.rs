//! End to end: the `make demo` flow, asserted.
//!
//! One implementation, two faces: this test runs `hack/demo.sh up` (quiet, in its own
//! directory and namespace prefix, so it never collides with a demo someone has running)
//! and then checks what the demo only prints, plus the way back: Multus DEL, NodeENI
//! deletion, `hack/demo.sh down`.
//!
//! Needs root (network namespaces), the cached peers (`make peers`) and the workspace
//! binaries built next to this test (`cargo test --workspace` builds them; alone:
//! `make build` first).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::Value;

const RESOURCE: &str = "intel.com/intel_sriov_netdevice";

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$DEMO_BIN_DIR` when set (a shared target directory may hold another checkout's
/// binaries), else `target/<profile>` of this test binary (`target/<profile>/deps/e2e-<hash>`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = std::env::var_os("DEMO_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            exe.parent()
                .and_then(Path::parent)
                .expect("target/<profile>")
                .to_path_buf()
        });
    for b in ["eni-controller", "eni-manager", "cni-helper"] {
        assert!(
            dir.join(b).is_file(),
            "{} missing: run `make build` (eni-manager needs the eni-node test-util feature: cargo build -p eni-node --bins --features test-util)",
            dir.join(b).display()
        );
    }
    dir
}

/// A demo instance; `hack/demo.sh down` runs on drop, also when the test fails.
struct Demo {
    dir: tempfile::TempDir,
    prefix: String,
    bins: PathBuf,
}

impl Demo {
    fn demo_sh(&self, cmd: &str) -> Output {
        Command::new(repo_dir().join("hack/demo.sh"))
            .arg(cmd)
            .env("DEMO_DIR", self.dir.path())
            .env("DEMO_PREFIX", &self.prefix)
            .env("DEMO_BIN_DIR", &self.bins)
            .env("DEMO_QUIET", "1")
            .output()
            .expect("run hack/demo.sh")
    }

    fn run(&self, cmd: &str) {
        let out = self.demo_sh(cmd);
        assert!(
            out.status.success(),
            "hack/demo.sh {cmd} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn env(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.path().join("env.json")).expect("env.json"))
            .expect("env.json is JSON")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let out = self.demo_sh("down");
        if !out.status.success() {
            eprintln!(
                "hack/demo.sh down: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if std::thread::panicking() {
            // The temp dir goes away: keep the logs for the post-mortem.
            let keep = std::env::temp_dir().join(format!("{}-logs", self.prefix));
            let _ = Command::new("cp")
                .arg("-r")
                .arg(self.dir.path().join("logs"))
                .arg(&keep)
                .status();
            eprintln!("e2e: demo logs kept in {}", keep.display());
        }
    }
}

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
    let sim = repo_dir().join("hack/sim-nitro");
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
    let demo = Demo {
        dir: tempfile::Builder::new()
            .prefix("eni-e2e-")
            .tempdir()
            .expect("tempdir"),
        prefix: format!("e2e{}", std::process::id()),
        bins: bin_dir(),
    };
    let started = std::time::Instant::now();
    demo.run("up");
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
    let pod_netns = pod["netns"].as_str().expect("pod netns");
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
    let (_, pod_mac) = &plain[pod_node];
    let in_pod = links(pod_netns);
    let net1 = in_pod
        .values()
        .find(|l| l["ifname"] == "net1")
        .unwrap_or_else(|| panic!("no net1 in the pod: {in_pod:?}"));
    assert_eq!(net1["address"].as_str(), Some(pod_mac.as_str()));
    assert!(up_with_mtu(net1, 9001), "{net1}");
    let p = pods
        .get(pod["name"].as_str().expect("pod name"))
        .await
        .expect("pod");
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

    // Multus DEL: net1 leaves the pod, the ENI is back on the node, up with its MTU.
    demo.run("cni-del");
    assert!(
        !links(pod_netns).values().any(|l| l["ifname"] == "net1"),
        "net1 still in the pod"
    );
    let node_ns = netns_of(pod_node);
    poll(
        "the ENI back in the node, up with MTU 9001",
        Duration::from_secs(10),
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
    demo.run("down");
    let all = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned();
    assert!(
        !all.lines().any(|l| l.starts_with(&demo.prefix)),
        "namespaces left: {all}"
    );
    eprintln!("e2e: whole flow took {:?}", started.elapsed());
}
