//! The `enis.json` contract end to end: a state file the daemon itself wrote is what
//! cni-helper's resolver reads (both sides use the `eni-state` crate; this checks the wiring,
//! not just the types).
//!
//! Unit tier, like `dpdk.rs`: fake sysfs tree with the simulated kernel, an unprivileged
//! rtnetlink socket only to list links; every ENI is DPDK with a MAC no host interface has,
//! its MAC <-> PCI record left by a "previous run" (as after a restart).

use std::sync::Arc;

use cni_helper::ImdsOrBroken;
use cni_helper::config::Target;
use cni_helper::resolve::Resolver;
use cni_helper::state::StateFile as StateDir;
use eni_node::daemon::{Daemon, Settings};
use eni_node::metrics::Metrics;
use eni_node::plan::{Desired, DpdkWant};
use eni_node::state;
use eni_node::sysfs::fake::FakeTree;
use eni_node::sysfs::{Binder, Policy, SimKernel};
use tokio::sync::watch;

const ENA: &str = "0000:00:07.0";
const MAC: &str = "02:d0:00:00:00:17";

fn want() -> Desired {
    Desired {
        node_eni: "dpdk".into(),
        eni_id: "eni-contract".into(),
        mac: MAC.into(),
        device_index: 2,
        network_card_index: 0,
        mtu: 9001,
        dpdk: Some(DpdkWant {
            driver: "vfio-pci".into(),
            resource_name: "intel.com/intel_sriov_netdevice".into(),
            pci_address: Some(ENA.into()),
        }),
    }
}

#[tokio::test]
async fn cni_helper_resolves_what_the_daemon_wrote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("sys");
    let state_dir = dir.path().join("run");
    let net = dir.path().join("class-net");
    std::fs::create_dir_all(&net).expect("mkdir");
    let tree = FakeTree::new(&root).expect("tree");
    tree.add_ena(ENA).expect("ena");

    // What a previous run recorded while the ENI's netdev still existed: the evidence of
    // which device the MAC has.
    let mut seed = state::StateFile::empty("n1");
    seed.enis.push(state::EniState {
        eni_id: "eni-contract".into(),
        mac_address: MAC.into(),
        device_index: 2,
        network_card_index: 0,
        node_eni: "dpdk".into(),
        interface_name: Some("ens7".into()),
        pci_address: Some(ENA.into()),
        driver: Some("ena".into()),
        dpdk_bound: false,
        resource_name: Some("intel.com/intel_sriov_netdevice".into()),
    });
    state::save(&state::path(&state_dir), &seed).expect("seed");

    let (tx, _rx) = watch::channel(Vec::new());
    let (netlink, _events) = eni_node::netlink::connect(None).expect("netlink socket");
    let mut daemon = Daemon::new(
        Settings {
            node: "n1".into(),
            state_dir: state_dir.clone(),
            default_mtu: 9001,
            stable_names: false,
            sysfs_timeout: std::time::Duration::from_secs(10),
            pod_resources: None,
        },
        netlink,
        Binder::new(
            Arc::new(SimKernel::new(&root)),
            Policy {
                force_non_ena: false,
                allow_noiommu: true,
            },
        ),
        tx,
        Metrics::new(),
    );
    let out = daemon.reconcile(&[want()]).await.expect("reconcile");
    assert!(out.reports["dpdk"][0].dpdk_bound, "{out:?}");

    // cni-helper's resolver, on the daemon's state dir; no IMDS, an empty sysfs.
    let resolver = Resolver {
        state: StateDir::in_dir(&state_dir),
        metadata: None::<ImdsOrBroken>,
        netdevs: cni_helper::sysfs::Sysfs::new(&net),
    };
    let r = resolver
        .resolve(2, 0)
        .expect("resolves from the state file");
    assert_eq!(r.target, Target::Pci(ENA.into()));
    assert_eq!(r.source, "state file");
    let e = resolver.resolve(3, 0).expect_err("nothing at index 3");
    assert!(
        e.tried.iter().any(|t| t.contains("eni-contract@2/0")),
        "{:?}",
        e.tried
    );

    // The attachment goes away: the daemon releases the device and rewrites the file;
    // cni-helper no longer resolves the index.
    daemon.reconcile(&[]).await.expect("reconcile");
    let e = resolver.resolve(2, 0).expect_err("released");
    assert!(
        e.tried.iter().any(|t| t.contains("no ENI at that index")),
        "{:?}",
        e.tried
    );
}
