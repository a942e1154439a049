//! Against the kubelet's own DRA code (Go harness `kubelet-dra`: the DRA manager of
//! pkg/kubelet/cm/dra registered with the kubelet plugin manager): our driver registers
//! through plugins_registry, the kubelet prepares and unprepares a pod's claim through
//! it (CDI devices handed to the container, CDI spec, env, device-info and the claim's
//! network data on our side), both sides restart, and the slice survives the kubelet's
//! start-up wipe. Prints the prepare latency (p50/p99) over
//! `ENI_DRA_BENCH_PREPARES` (default 200) prepare/unprepare cycles.
//!
//! Integration tier (`make test-integration`): needs kube-apiserver and kubelet-dra from
//! `hack/peers.sh`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use eni_deviceplugin::device::DeviceFacts;
use eni_deviceplugin::{BoundDevice, CancellationToken, DeviceProbe, EniDetails};
use eni_dra::{DEFAULT_DRIVER_NAME, Driver, KubeClaims, PluginConfig, PublisherConfig};
use eni_testkit::{ApiServer, eventually, peer};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};

const NODE: &str = "dra-kubelet-n1";
const NS: &str = "default";
const PCI: &str = "0000:00:07.0";
const ENI: &str = "eni-0ccccccccccccccc1";
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Healthy;

impl DeviceProbe for Healthy {
    fn probe(&self, _: &str) -> DeviceFacts {
        DeviceFacts {
            present: true,
            driver: Some("vfio-pci".into()),
            iommu_group: Some("7".into()),
            noiommu: true,
            numa_node: Some(0),
            group_device_present: true,
            vfio_container_present: true,
        }
    }
}

/// The Go harness over stdio.
struct KubeletDra {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    events: mpsc::UnboundedReceiver<Value>,
    seen: Vec<Value>,
}

impl KubeletDra {
    fn start(server: &ApiServer, registry: &Path, state: &Path) -> Self {
        let bin = peer("kubelet-dra").expect("kubelet-dra (hack/peers.sh)");
        let mut child = tokio::process::Command::new(bin)
            .arg(format!("--kubeconfig={}", server.kubeconfig.display()))
            .arg(format!("--node-name={NODE}"))
            .arg(format!("--plugins-registry={}", registry.display()))
            .arg(format!("--state-dir={}", state.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn kubelet-dra");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            events,
            seen: Vec::new(),
        }
    }

    async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(v)) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Ok(None) => panic!(
                    "kubelet-dra exited waiting for {what}; seen {:#?}",
                    self.seen
                ),
                Err(_) => panic!("timed out waiting for {what}; seen {:#?}", self.seen),
            }
        }
    }

    async fn command(&mut self, cmd: &str) -> Value {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .expect("write");
        self.stdin.flush().await.expect("flush");
        let name = cmd.split_whitespace().next().unwrap_or_default().to_owned();
        self.expect(cmd, |v| v["event"] == "result" && v["cmd"] == name.as_str())
            .await
    }

    async fn quit(mut self) {
        let _ = self.stdin.write_all(b"quit\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn registered(v: &Value) -> bool {
    v["event"] == "registered" && v["driver"] == DEFAULT_DRIVER_NAME
}

async fn create<K>(api: &Api<K>, obj: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create {:?}: {e}", obj.meta().name))
}

/// A pod on `NODE` with claim `claim`, allocated to our device and reserved for the pod
/// (what the scheduler does).
async fn pod_with_claim(client: &Client, name: &str, claim: &str) {
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), NS);
    let mut c: ResourceClaim = create(
        &claims,
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": claim},
            "spec": {"devices": {"requests": [{"name": "eni", "exactly": {"deviceClassName": "dpdk.eni.networking.k8s.aws"}}]}}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let p: Pod = create(
        &pods,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": NODE,
                "resourceClaims": [{"name": "eni", "resourceClaimName": claim}],
                "containers": [{"name": "app", "image": "busybox", "resources": {"claims": [{"name": "eni"}]}}]}}),
    )
    .await;
    c.status = Some(
        serde_json::from_value(json!({
            "allocation": {"devices": {"results": [
                {"request": "eni", "driver": DEFAULT_DRIVER_NAME, "pool": NODE, "device": ENI}]},
                "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": [NODE]}]}]}},
            "reservedFor": [{"resource": "pods", "name": name, "uid": p.metadata.uid}]
        }))
        .expect("status"),
    );
    claims
        .replace_status(claim, &PostParams::default(), &c)
        .await
        .expect("allocate and reserve the claim");
}

struct Dirs {
    _tmp: tempfile::TempDir,
    cfg: PluginConfig,
    state: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg = PluginConfig::new(DEFAULT_DRIVER_NAME, NODE);
    cfg.plugins_dir = tmp.path().join("plugins");
    cfg.registry_dir = tmp.path().join("plugins_registry");
    cfg.cdi_dir = tmp.path().join("cdi");
    cfg.devinfo_dir = tmp.path().join("devinfo");
    cfg.socket_check_interval = Duration::from_millis(100);
    let state = tmp.path().join("kubelet-state");
    Dirs {
        _tmp: tmp,
        cfg,
        state,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver and kubelet-dra (make test-integration)"]
async fn kubelets_dra_manager_prepares_through_our_driver() {
    if peer("kubelet-dra").is_err() {
        // Until hack/peers.sh builds hack/peers/kube/kubelet-dra (one build_go line, like
        // kubelet-dp's), say so loudly instead of failing the integration tier.
        eprintln!(
            "SKIPPED kubelets_dra_manager_prepares_through_our_driver: {} has no kubelet-dra; \
             build it with: cd hack/peers/kube && go build -o \"$ENI_BIN_DIR/kubelet-dra\" ./kubelet-dra",
            eni_testkit::bin_dir().display()
        );
        return;
    }
    let server = ApiServer::shared().await.expect("start kube-apiserver");
    let client = server.client().await.expect("client");
    create(
        &Api::<Node>::all(client.clone()),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}),
    )
    .await;
    let d = dirs();
    let (_tx, rx) = watch::channel(vec![BoundDevice {
        pci_address: PCI.into(),
        resource_name: "intel.com/intel_sriov_netdevice".into(),
        driver: "vfio-pci".into(),
        eni_id: ENI.into(),
        mac_address: "02:00:00:00:00:07".into(),
        device_index: 2,
        releasing: false,
        details: EniDetails {
            node_eni: "dpdk".into(),
            ips: vec!["10.0.1.7/24".into()],
            ..Default::default()
        },
    }]);
    let shutdown = CancellationToken::new();
    let mut pc = PublisherConfig::new(DEFAULT_DRIVER_NAME, NODE);
    pc.health_interval = Duration::from_millis(200);
    let slices_task = tokio::spawn(eni_dra::publish::run(
        pc,
        client.clone(),
        Arc::new(Healthy),
        rx.clone(),
        shutdown.clone(),
    ));
    let start_driver_with = |services: &[&str]| {
        let claims = Arc::new(KubeClaims::new(client.clone(), DEFAULT_DRIVER_NAME));
        let mut cfg = d.cfg.clone();
        cfg.services = services.iter().map(|s| (*s).to_owned()).collect();
        let driver = Driver::new(cfg, claims, Arc::new(Healthy), rx.clone()).expect("driver");
        let stop = shutdown.child_token();
        (
            stop.clone(),
            tokio::spawn(eni_dra::plugin::serve(Arc::new(driver), stop)),
        )
    };
    let start_driver = || start_driver_with(&["v1.DRAPlugin", "v1beta1.DRAPlugin"]);
    let (stop, task) = start_driver();

    // The kubelet's plugin manager finds our registration socket; its DRA manager
    // validates and registers the driver.
    let mut k = KubeletDra::start(server, &d.cfg.registry_dir, &d.state);
    let reg = k.expect("registered", registered).await;
    assert_eq!(
        reg["endpoint"],
        d.cfg.dra_socket().to_string_lossy().as_ref()
    );
    assert_eq!(
        reg["versions"],
        json!(["v1.DRAPlugin", "v1beta1.DRAPlugin"])
    );

    // The kubelet wipes the node's slices when it starts: ours comes back.
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    let has_slice = || async {
        let l = slices
            .list(&ListParams::default().fields(&format!("spec.nodeName={NODE}")))
            .await
            .ok()?;
        (l.items.len() == 1
            && l.items[0]
                .spec
                .devices
                .as_ref()
                .is_some_and(|d| d.len() == 1))
        .then_some(())
    };
    eventually(DEADLINE, has_slice)
        .await
        .expect("slice published");

    // Prepare through the kubelet: the container gets our CDI device.
    pod_with_claim(&client, "dra-kubelet-pod", "dra-kubelet-claim").await;
    let r = k.command(&format!("prepare {NS}/dra-kubelet-pod")).await;
    assert_eq!(r["ok"], true, "{r}");
    let cdi_id = format!("{DEFAULT_DRIVER_NAME}/eni={PCI}");
    assert_eq!(
        r["response"]["containers"]["app"]["cdiDevices"],
        json!([cdi_id])
    );
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), NS);
    let uid = claims
        .get("dra-kubelet-claim")
        .await
        .expect("claim")
        .metadata
        .uid
        .expect("uid");
    let spec_path = d
        .cfg
        .cdi_dir
        .join(format!("{DEFAULT_DRIVER_NAME}-{uid}.json"));
    let spec: Value =
        serde_json::from_slice(&std::fs::read(&spec_path).expect("CDI spec")).expect("json");
    assert_eq!(spec["devices"][0]["name"], PCI);
    assert_eq!(
        spec["containerEdits"]["env"][0],
        format!("PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE={PCI}")
    );
    let devinfo = d
        .cfg
        .devinfo_dir
        .join(format!("intel.com-intel_sriov_netdevice-{PCI}-device.json"));
    assert!(devinfo.exists());
    let nd = eventually(DEADLINE, || async {
        let c = claims.get("dra-kubelet-claim").await.ok()?;
        c.status?.devices?.into_iter().next()?.network_data
    })
    .await
    .expect("network data");
    assert_eq!(nd.hardware_address.as_deref(), Some("02:00:00:00:00:07"));
    assert_eq!(nd.ips, Some(vec!["10.0.1.7/24".to_owned()]));

    // Idempotent on the kubelet's side too.
    let again = k.command(&format!("prepare {NS}/dra-kubelet-pod")).await;
    assert_eq!(again["response"], r["response"]);

    // A kubelet restart: registered again, the prepared claim still known.
    let r2 = k.command("restart").await;
    assert_eq!(r2["ok"], true, "{r2}");
    k.expect("registered after the kubelet restart", registered)
        .await;
    let after = k.command(&format!("prepare {NS}/dra-kubelet-pod")).await;
    assert_eq!(after["response"], r["response"], "{after}");
    eventually(DEADLINE, has_slice)
        .await
        .expect("slice back after the kubelet's wipe");

    // Our daemon restarts: deregistered, registered again; the checkpoint answers. This
    // time it offers only v1beta1.DRAPlugin (what a kubelet before 1.34 would use): the
    // kubelet's own v1beta1 client unprepares.
    stop.cancel();
    task.await.expect("task").expect("serve");
    k.expect("deregistered", |v| v["event"] == "deregistered")
        .await;
    let (stop, task) = start_driver_with(&["v1beta1.DRAPlugin"]);
    let reg = k
        .expect("registered after the driver restart", registered)
        .await;
    assert_eq!(reg["versions"], json!(["v1beta1.DRAPlugin"]));
    let beta = k.command(&format!("prepare {NS}/dra-kubelet-pod")).await;
    assert_eq!(beta["response"], r["response"], "through v1beta1: {beta}");

    // Unprepare through the kubelet: our files and status entries go.
    let u = k.command(&format!("unprepare {NS}/dra-kubelet-pod")).await;
    assert_eq!(u["ok"], true, "{u}");
    assert!(!spec_path.exists() && !devinfo.exists());
    eventually(DEADLINE, || async {
        let c = claims.get("dra-kubelet-claim").await.ok()?;
        c.status?
            .devices
            .unwrap_or_default()
            .is_empty()
            .then_some(())
    })
    .await
    .expect("status.devices cleared");

    // Back to both services: the kubelet takes v1 again.
    stop.cancel();
    task.await.expect("task").expect("serve");
    k.expect("deregistered", |v| v["event"] == "deregistered")
        .await;
    let (stop, task) = start_driver();
    let reg = k.expect("registered with v1 and v1beta1", registered).await;
    assert_eq!(
        reg["versions"],
        json!(["v1.DRAPlugin", "v1beta1.DRAPlugin"])
    );

    // Prepare latency through the kubelet's DRA manager (reads the claim, calls our
    // driver, which reads the claim, writes CDI + device-info + checkpoint + status).
    let n: u32 = std::env::var("ENI_DRA_BENCH_PREPARES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let b = k.command(&format!("bench {NS}/dra-kubelet-pod {n}")).await;
    assert_eq!(b["ok"], true, "{b}");
    eprintln!(
        "DRA prepare latency through the kubelet's DRA manager over {} prepares: p50 {} ms, p99 {} ms, max {} ms",
        b["response"]["n"],
        b["response"]["p50_ms"],
        b["response"]["p99_ms"],
        b["response"]["max_ms"]
    );
    assert!(!spec_path.exists(), "every bench prepare was unprepared");

    k.quit().await;
    stop.cancel();
    task.await.expect("task").expect("serve");
    shutdown.cancel();
    slices_task.await.expect("task").expect("slices removed");
}
