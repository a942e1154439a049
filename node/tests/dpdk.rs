//! The daemon's DPDK path end to end on a fake sysfs tree with a simulated kernel
//! ([`SimKernel`]): bind order, state file written before the unbind, the watch channel
//! of bound devices, restart without rebinding, release when the attachment goes away,
//! refused and malformed devices reported as errors.
//!
//! Unit tier: no root. It opens an unprivileged rtnetlink socket in the test's own
//! namespace only to list links (it changes none: every ENI here is DPDK with a MAC no
//! host interface has). The MAC <-> PCI evidence a netdev would give comes from a state
//! file left by a "previous run", as after a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use eni_deviceplugin::BoundDevice;
use eni_node::daemon::{Daemon, Settings};
use eni_node::metrics::Metrics;
use eni_node::plan::{Desired, DpdkWant};
use eni_node::state;
use eni_node::sysfs::fake::FakeTree;
use eni_node::sysfs::{Binder, Policy, SimKernel, Sysfs, Write};
use tokio::sync::watch;

const ENA: &str = "0000:00:07.0";
const NVME: &str = "0000:00:04.0";
const BROKEN: &str = "0000:00:09.0";
const MAC: &str = "02:d0:00:00:00:07";

/// Wraps the simulated kernel and, at every unbind, snapshots the state file: it must
/// already record the device being unbound.
#[derive(Debug, Clone)]
struct Spy {
    sim: SimKernel,
    state: PathBuf,
    at_unbind: Arc<Mutex<Vec<String>>>,
}

impl Sysfs for Spy {
    fn read(&self, path: &str) -> std::io::Result<String> {
        self.sim.read(path)
    }
    fn write(&self, path: &str, value: &str) -> std::io::Result<()> {
        if path.ends_with("/unbind") {
            let snapshot = std::fs::read_to_string(&self.state).unwrap_or_default();
            self.at_unbind.lock().expect("lock").push(snapshot);
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

fn want(eni: &str, mac: &str, index: i32, pci: &str) -> Desired {
    Desired {
        node_eni: "dpdk".into(),
        eni_id: eni.into(),
        mac: mac.into(),
        device_index: index,
        network_card_index: 0,
        mtu: 9001,
        dpdk: Some(DpdkWant {
            driver: "vfio-pci".into(),
            resource_name: "intel.com/intel_sriov_netdevice".into(),
            pci_address: Some(pci.into()),
        }),
    }
}

fn daemon(state_dir: &Path, spy: Spy) -> (Daemon, watch::Receiver<Vec<BoundDevice>>) {
    let (tx, rx) = watch::channel(Vec::new());
    let (netlink, _events) = eni_node::netlink::connect(None).expect("netlink socket");
    let d = Daemon::new(
        Settings {
            node: "n1".into(),
            state_dir: state_dir.to_path_buf(),
            default_mtu: 9001,
            stable_names: false,
            sysfs_timeout: std::time::Duration::from_secs(10),
            pod_resources: None,
        },
        netlink,
        Binder::new(
            Arc::new(spy),
            Policy {
                force_non_ena: false,
                allow_noiommu: true,
            },
        ),
        tx,
        Metrics::new(),
    );
    (d, rx)
}

#[tokio::test]
async fn bind_record_restart_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("sys");
    let state_dir = dir.path().join("run");
    let tree = FakeTree::new(&root).expect("tree");
    tree.add_ena(ENA).expect("ena");
    tree.add_ebs_nvme(NVME).expect("EBS root disk");
    std::fs::create_dir_all(root.join("bus/pci/devices").join(BROKEN)).expect("broken dev");
    let spy = Spy {
        sim: SimKernel::new(&root),
        state: state::path(&state_dir),
        at_unbind: Arc::default(),
    };
    let desired = vec![
        want("eni-a", MAC, 2, ENA),
        want("eni-b", "02:d0:00:00:00:04", 3, NVME),
        want("eni-c", "02:d0:00:00:00:09", 4, BROKEN),
    ];

    // What a previous run recorded while the netdevs still existed. The record for the
    // EBS disk is a lie (no run of ours writes it): the binder must refuse it anyway.
    let record = |w: &Desired, driver: &str| state::EniState {
        eni_id: w.eni_id.clone(),
        mac_address: w.mac.clone(),
        device_index: w.device_index,
        network_card_index: 0,
        node_eni: w.node_eni.clone(),
        interface_name: None,
        pci_address: w.dpdk.as_ref().and_then(|d| d.pci_address.clone()),
        driver: Some(driver.into()),
        dpdk_bound: false,
        resource_name: w.dpdk.as_ref().map(|d| d.resource_name.clone()),
    };
    let mut seed = state::StateFile::empty("n1");
    seed.enis = vec![
        record(&desired[0], "ena"),
        record(&desired[1], "nvme"),
        record(&desired[2], "ena"),
    ];
    state::save(&state::path(&state_dir), &seed).expect("seed state");

    let (mut d, rx) = daemon(&state_dir, spy.clone());
    let out = d.reconcile(&desired).await.expect("reconcile");

    // Bind: no-IOMMU mode switched on, then unbind, driver_override, drivers_probe.
    let w = |p: &str, v: &str| Write {
        path: p.into(),
        value: v.into(),
    };
    assert_eq!(
        spy.sim.writes(),
        vec![
            w("module/vfio/parameters/enable_unsafe_noiommu_mode", "1"),
            w("bus/pci/devices/0000:00:07.0/driver/unbind", ENA),
            w("bus/pci/devices/0000:00:07.0/driver_override", "vfio-pci"),
            w("bus/pci/drivers_probe", ENA),
        ]
    );
    // The state file recorded MAC <-> PCI <-> device index before the unbind.
    let at_unbind = spy.at_unbind.lock().expect("lock").clone();
    assert_eq!(at_unbind.len(), 1);
    let pre: state::StateFile = serde_json::from_str(&at_unbind[0]).expect("state before unbind");
    let e = pre
        .enis
        .iter()
        .find(|e| e.mac_address == MAC)
        .expect("recorded");
    assert_eq!(e.pci_address.as_deref(), Some(ENA));
    assert_eq!(e.device_index, 2);
    assert!(!e.dpdk_bound);

    // Reports: bound, refused, malformed.
    let reports = &out.reports["dpdk"];
    let a = reports.iter().find(|r| r.eni_id == "eni-a").expect("a");
    assert!(a.dpdk_bound, "{a:?}");
    assert_eq!(a.error, None);
    assert_eq!(a.driver.as_deref(), Some("vfio-pci"));
    assert_eq!(a.interface_name, None);
    assert!(
        a.device_name
            .as_deref()
            .unwrap_or("")
            .contains("Elastic Network Adapter"),
        "{a:?}"
    );
    let b = reports.iter().find(|r| r.eni_id == "eni-b").expect("b");
    assert!(!b.dpdk_bound);
    assert!(
        b.error
            .as_deref()
            .unwrap_or("")
            .contains("not an Amazon ENA"),
        "{b:?}"
    );
    assert_eq!(
        tree.path("bus/pci/devices/0000:00:04.0/driver")
            .read_link()
            .ok(),
        Some("../../drivers/nvme".into())
    );
    let c = reports.iter().find(|r| r.eni_id == "eni-c").expect("c");
    assert!(c.error.as_deref().unwrap_or("").contains("sysfs"), "{c:?}");
    assert_eq!((out.configured, out.failed), (1, 2));

    // The state file after: only the bound device, without an interface name.
    let st = state::load(&state::path(&state_dir))
        .expect("load")
        .expect("exists");
    assert_eq!(st.node, "n1");
    assert_eq!(st.enis.len(), 1, "{st:?}");
    let e = &st.enis[0];
    assert!(e.dpdk_bound);
    assert_eq!(e.interface_name, None);
    assert_eq!(e.pci_address.as_deref(), Some(ENA));
    assert_eq!(e.driver.as_deref(), Some("vfio-pci"));
    assert_eq!(
        e.resource_name.as_deref(),
        Some("intel.com/intel_sriov_netdevice")
    );

    // The device plugin's channel.
    let expected = vec![BoundDevice {
        pci_address: ENA.into(),
        resource_name: "intel.com/intel_sriov_netdevice".into(),
        driver: "vfio-pci".into(),
        eni_id: "eni-a".into(),
        mac_address: MAC.into(),
        device_index: 2,
        releasing: false,
        // Without NodeENI details set, only the NodeENI name from the state file.
        details: eni_deviceplugin::EniDetails {
            node_eni: e.node_eni.clone(),
            ..Default::default()
        },
    }];
    assert_eq!(*rx.borrow(), expected);
    drop(d);

    // Restart: the state file is read back, the channel is filled before any reconcile,
    // and reconciling writes nothing (no rebind, no flap).
    let spy2 = Spy {
        sim: SimKernel::new(&root),
        state: state::path(&state_dir),
        at_unbind: Arc::default(),
    };
    let (mut d, rx) = daemon(&state_dir, spy2.clone());
    assert_eq!(*rx.borrow(), expected);
    let out = d
        .reconcile(&desired[..1])
        .await
        .expect("reconcile after restart");
    assert!(spy2.sim.writes().is_empty(), "{:?}", spy2.sim.writes());
    assert!(out.reports["dpdk"][0].dpdk_bound);
    assert_eq!(*rx.borrow(), expected);

    // The attachment goes away: the device goes back to ena.
    d.reconcile(&[])
        .await
        .expect("reconcile without attachments");
    assert_eq!(
        spy2.sim.writes(),
        vec![
            w("bus/pci/devices/0000:00:07.0/driver_override", "\n"),
            w("bus/pci/devices/0000:00:07.0/driver/unbind", ENA),
            w("bus/pci/drivers_probe", ENA),
        ]
    );
    assert_eq!(
        tree.path("bus/pci/devices/0000:00:07.0/driver")
            .read_link()
            .ok(),
        Some("../../drivers/ena".into())
    );
    assert!(rx.borrow().is_empty());
    let st = state::load(&state::path(&state_dir))
        .expect("load")
        .expect("exists");
    assert!(st.enis.is_empty());
}
