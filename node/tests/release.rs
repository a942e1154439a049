//! Giving a DPDK device back to its kernel driver never blocks the daemon and never takes
//! a device from a pod: the release is deferred (and reported `InUse`) while the
//! kubelet's PodResources API says a pod holds the device, the device is advertised
//! Unhealthy from the moment it is to be given back, and a sysfs unbind the kernel blocks
//! (as it does while a DPDK process holds the vfio group) is waited for only up to the
//! deadline.
//!
//! Unit tier, like `dpdk.rs`: a fake sysfs tree with a simulated kernel, a PodResources
//! server in the test process, an unprivileged netlink socket that changes nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use eni_deviceplugin::BoundDevice;
use eni_node::daemon::{Daemon, Settings};
use eni_node::metrics::Metrics;
use eni_node::plan::{Desired, DpdkWant};
use eni_node::podresources::PodResources;
use eni_node::state;
use eni_node::sysfs::fake::FakeTree;
use eni_node::sysfs::{Binder, Policy, SimKernel, Sysfs};
use eni_proto::podresources::v1 as api;
use tokio::sync::watch;

const ENA: &str = "0000:00:07.0";
const MAC: &str = "02:d0:00:00:00:07";
const RES: &str = "intel.com/intel_sriov_netdevice";

/// The simulated kernel, with a gate on `driver/unbind`: while closed, an unbind blocks
/// the writing thread, as the kernel does while a process holds a vfio device.
#[derive(Debug, Clone)]
struct Gated {
    sim: SimKernel,
    open: Arc<(Mutex<bool>, Condvar)>,
}

impl Gated {
    fn set(&self, open: bool) {
        let (m, cv) = &*self.open;
        *m.lock().expect("lock") = open;
        cv.notify_all();
    }
}

impl Sysfs for Gated {
    fn read(&self, path: &str) -> std::io::Result<String> {
        self.sim.read(path)
    }
    fn write(&self, path: &str, value: &str) -> std::io::Result<()> {
        if path.ends_with("/driver/unbind") {
            let (m, cv) = &*self.open;
            let mut open = m.lock().expect("lock");
            while !*open {
                open = cv.wait(open).expect("wait");
            }
        }
        self.sim.write(path, value)
    }
    fn read_link(&self, path: &str) -> std::io::Result<PathBuf> {
        self.sim.read_link(path)
    }
    fn exists(&self, path: &str) -> bool {
        self.sim.exists(path)
    }
}

/// A PodResources server (the kubelet's `List`) answering what the test says.
#[derive(Debug, Clone, Default)]
struct FakeKubelet {
    answer: Arc<Mutex<api::ListPodResourcesResponse>>,
}

#[tonic::async_trait]
impl api::pod_resources_lister_server::PodResourcesLister for FakeKubelet {
    async fn list(
        &self,
        _: tonic::Request<api::ListPodResourcesRequest>,
    ) -> Result<tonic::Response<api::ListPodResourcesResponse>, tonic::Status> {
        Ok(tonic::Response::new(
            self.answer.lock().expect("lock").clone(),
        ))
    }
}

impl FakeKubelet {
    fn serve(&self, socket: &Path) {
        let listener = tokio::net::UnixListener::bind(socket).expect("bind pod-resources");
        let svc = api::pod_resources_lister_server::PodResourcesListerServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
    }

    fn holds(&self, pod: Option<&str>) {
        *self.answer.lock().expect("lock") = api::ListPodResourcesResponse {
            pod_resources: pod
                .map(|p| api::PodResources {
                    name: p.into(),
                    namespace: "default".into(),
                    containers: vec![api::ContainerResources {
                        name: "app".into(),
                        devices: vec![api::ContainerDevices {
                            resource_name: RES.into(),
                            device_ids: vec![ENA.into()],
                            topology: None,
                        }],
                    }],
                })
                .into_iter()
                .collect(),
        };
    }
}

fn want() -> Desired {
    Desired {
        node_eni: "dpdk".into(),
        eni_id: "eni-a".into(),
        mac: MAC.into(),
        device_index: 2,
        network_card_index: 0,
        mtu: 9001,
        dpdk: Some(DpdkWant {
            driver: "vfio-pci".into(),
            resource_name: RES.into(),
            pci_address: None,
        }),
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    tree: FakeTree,
    sys: Gated,
    state_dir: PathBuf,
    pod_resources: PathBuf,
}

/// A node with one ENA recorded (by a previous run, while its netdev existed) as the
/// device of `MAC`.
fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("sys");
    let state_dir = dir.path().join("run");
    let tree = FakeTree::new(&root).expect("tree");
    tree.add_ena(ENA).expect("ena");
    tree.set_iommu_group(ENA, 3, false).expect("group");
    let mut seed = state::StateFile::empty("n1");
    seed.enis.push(state::EniState {
        eni_id: "eni-a".into(),
        mac_address: MAC.into(),
        device_index: 2,
        network_card_index: 0,
        node_eni: "dpdk".into(),
        interface_name: Some("ens7".into()),
        pci_address: Some(ENA.into()),
        driver: Some("ena".into()),
        dpdk_bound: false,
        resource_name: Some(RES.into()),
    });
    state::save(&state::path(&state_dir), &seed).expect("seed");
    let sys = Gated {
        sim: SimKernel::new(&root),
        open: Arc::new((Mutex::new(true), Condvar::new())),
    };
    let pod_resources = dir.path().join("pod-resources.sock");
    Setup {
        _dir: dir,
        tree,
        sys,
        state_dir,
        pod_resources,
    }
}

fn daemon(
    s: &Setup,
    pod_resources: Option<PodResources>,
) -> (Daemon, watch::Receiver<Vec<BoundDevice>>) {
    let (tx, rx) = watch::channel(Vec::new());
    let (netlink, _events) = eni_node::netlink::connect(None).expect("netlink socket");
    let d = Daemon::new(
        Settings {
            node: "n1".into(),
            state_dir: s.state_dir.clone(),
            default_mtu: 9001,
            stable_names: false,
            sysfs_timeout: Duration::from_millis(300),
            pod_resources,
        },
        netlink,
        Binder::new(Arc::new(s.sys.clone()), Policy::default()),
        tx,
        Metrics::new(),
    );
    (d, rx)
}

fn driver(tree: &FakeTree) -> Option<String> {
    std::fs::read_link(tree.path("bus/pci/devices/0000:00:07.0/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn error_of(out: &eni_node::daemon::Outcome) -> String {
    out.reports
        .get("dpdk")
        .and_then(|r| r.iter().find(|r| r.eni_id == "eni-a"))
        .and_then(|r| r.error.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn release_waits_while_a_pod_holds_the_device() {
    let s = setup();
    let kubelet = FakeKubelet::default();
    kubelet.serve(&s.pod_resources);
    let (mut d, rx) = daemon(
        &s,
        Some(PodResources::new(&s.pod_resources, Duration::from_secs(5))),
    );
    d.reconcile(&[want()]).await.expect("bind");
    assert_eq!(driver(&s.tree).as_deref(), Some("vfio-pci"));
    assert!(!rx.borrow()[0].releasing);

    // DPDK turned off while a pod holds the device: nothing is written, the device is
    // advertised Unhealthy, kept in the state file, and the report says who holds it.
    kubelet.holds(Some("dpdk-app"));
    s.sys.sim.clear_writes();
    let mut plain = want();
    plain.dpdk = None;
    let out = d
        .reconcile(std::slice::from_ref(&plain))
        .await
        .expect("reconcile");
    assert!(s.sys.sim.writes().is_empty(), "{:?}", s.sys.sim.writes());
    assert_eq!(driver(&s.tree).as_deref(), Some("vfio-pci"));
    let err = error_of(&out);
    assert!(
        err.starts_with("InUse:") && err.contains("default/dpdk-app"),
        "{err}"
    );
    let advertised = rx.borrow().clone();
    assert_eq!(advertised.len(), 1);
    assert!(
        advertised[0].releasing,
        "advertised Unhealthy: {advertised:?}"
    );
    let st = state::load(&state::path(&s.state_dir))
        .expect("load")
        .expect("exists");
    assert!(st.enis.iter().any(|e| e.dpdk_bound), "{st:?}");

    // The attachment goes away while the pod still runs: the same, reported on its own.
    let out = d.reconcile(&[]).await.expect("reconcile");
    assert!(error_of(&out).starts_with("InUse:"), "{out:?}");
    assert!(s.sys.sim.writes().is_empty());

    // The pod is gone: given back.
    kubelet.holds(None);
    let out = d.reconcile(&[]).await.expect("reconcile");
    assert_eq!(error_of(&out), "");
    assert_eq!(driver(&s.tree).as_deref(), Some("ena"));
    assert!(rx.borrow().is_empty());

    // No answer from the kubelet: not given back on a guess.
    let s = setup();
    let (mut d, rx) = daemon(
        &s,
        Some(PodResources::new(&s.pod_resources, Duration::from_secs(1))),
    );
    d.reconcile(&[want()]).await.expect("bind");
    s.sys.sim.clear_writes();
    let out = d.reconcile(&[]).await.expect("reconcile");
    let err = error_of(&out);
    assert!(
        err.starts_with("InUse:") && err.contains("cannot ask the kubelet"),
        "{err}"
    );
    assert!(s.sys.sim.writes().is_empty());
    assert!(rx.borrow()[0].releasing);
}

#[tokio::test]
async fn a_blocked_unbind_does_not_block_the_daemon() {
    let s = setup();
    let (mut d, rx) = daemon(&s, None);
    d.reconcile(&[want()]).await.expect("bind");
    assert_eq!(driver(&s.tree).as_deref(), Some("vfio-pci"));

    // A process holds the device: the kernel blocks the unbind.
    s.sys.set(false);
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(5), d.reconcile(&[]))
        .await
        .expect("the reconcile returns although the unbind blocks")
        .expect("reconcile");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(error_of(&out).contains("has not returned"), "{out:?}");
    assert!(rx.borrow()[0].releasing, "advertised Unhealthy");

    // The next reconcile does not pile another unbind on the stuck one.
    let out = tokio::time::timeout(Duration::from_secs(5), d.reconcile(&[]))
        .await
        .expect("returns")
        .expect("reconcile");
    assert!(error_of(&out).contains("has not returned"), "{out:?}");
    let unbinds = s
        .sys
        .sim
        .writes()
        .iter()
        .filter(|w| w.path.ends_with("/unbind"))
        .count();
    assert_eq!(unbinds, 1, "{:?}", s.sys.sim.writes());

    // The holder lets go: the unbind completes in the background and the next reconcile
    // finds the device back on ena.
    s.sys.set(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = d.reconcile(&[]).await.expect("reconcile");
        if error_of(&out).is_empty() && rx.borrow().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "not given back: {out:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(driver(&s.tree).as_deref(), Some("ena"));
}

#[path = "../deviceplugin/tests/common/kubelet_dp.rs"]
#[allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
mod kubelet_dp;

/// The same against the kubelet's own PodResources server code
/// (`k8s.io/kubernetes/pkg/kubelet/apis/podresources`, in the `kubelet-dp` harness built
/// by hack/peers.sh): a pod holding the device keeps it, and it is given back once the
/// pod is gone.
#[tokio::test]
#[ignore = "integration: needs kubelet-dp from hack/peers.sh"]
async fn release_waits_for_the_pod_the_kubelets_podresources_server_lists() {
    let s = setup();
    let dp_dir = s._dir.path().join("device-plugins");
    let socket = s.pod_resources.to_string_lossy().into_owned();
    let mut kubelet = kubelet_dp::KubeletDp::start_quiet(&dp_dir, &["--pod-resources", &socket]);
    kubelet
        .expect(Duration::from_secs(20), "pod-resources served", |v| {
            kubelet_dp::is(v, "pod-resources")
        })
        .await;
    let (mut d, rx) = daemon(
        &s,
        Some(PodResources::new(&s.pod_resources, Duration::from_secs(5))),
    );
    d.reconcile(&[want()]).await.expect("bind");
    assert_eq!(driver(&s.tree).as_deref(), Some("vfio-pci"));

    let r = kubelet
        .command(&format!("hold default/dpdk-app app {RES} {ENA}"))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    s.sys.sim.clear_writes();
    let out = d.reconcile(&[]).await.expect("reconcile");
    let err = error_of(&out);
    assert!(
        err.starts_with("InUse:") && err.contains("pod default/dpdk-app (container app"),
        "{err}"
    );
    assert!(s.sys.sim.writes().is_empty(), "{:?}", s.sys.sim.writes());
    assert!(rx.borrow()[0].releasing);

    let r = kubelet.command("unhold default/dpdk-app").await;
    assert_eq!(r["ok"], true, "{r}");
    let out = d.reconcile(&[]).await.expect("reconcile");
    assert_eq!(error_of(&out), "");
    assert_eq!(driver(&s.tree).as_deref(), Some("ena"));
    assert!(rx.borrow().is_empty());
    kubelet.quit().await;
}

/// A wrong `dpdkPCIAddress` added to a bound ENI (here: the EBS root disk's address) is
/// refused and reported, and changes nothing: the device stays bound, recorded and
/// advertised, the disk is not touched.
#[tokio::test]
async fn a_wrong_address_on_a_bound_eni_changes_nothing() {
    let s = setup();
    s.tree.add_ebs_nvme("0000:00:04.0").expect("ebs");
    let (mut d, rx) = daemon(&s, None);
    d.reconcile(&[want()]).await.expect("bind");
    let before = rx.borrow().clone();
    assert_eq!(before.len(), 1);
    s.sys.sim.clear_writes();
    let mut wrong = want();
    if let Some(w) = wrong.dpdk.as_mut() {
        w.pci_address = Some("0000:00:04.0".into());
    }
    for _ in 0..2 {
        let out = d
            .reconcile(std::slice::from_ref(&wrong))
            .await
            .expect("reconcile");
        let err = error_of(&out);
        assert!(
            err.contains("0000:00:04.0") && err.contains("is not the device of MAC"),
            "{err}"
        );
        assert!(s.sys.sim.writes().is_empty(), "{:?}", s.sys.sim.writes());
        assert_eq!(*rx.borrow(), before);
        assert_eq!(driver(&s.tree).as_deref(), Some("vfio-pci"));
    }
}
