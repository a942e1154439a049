//! Resolving `(deviceIndex, networkCardIndex)` to this node's interface or PCI address.
//!
//! Order: the node daemon's state file, then IMDS (MAC by device number) + sysfs (interface
//! by MAC). Every step taken is recorded so a failure says exactly what was tried.

use crate::cni::{CniCode, CniError};
use crate::config::Target;
use crate::imds::Metadata;
use crate::state::{StateError, StateSource};
use crate::sysfs::{NetDevices, normalize_mac};

/// A successful resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// What the ENI is on this node.
    pub target: Target,
    /// Which source answered (`state file` / `IMDS`).
    pub source: &'static str,
    /// What was tried on the way (for logs).
    pub tried: Vec<String>,
}

/// Nothing matched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no ENI at device index {device_index} on network card {network_card_index} could be resolved on this node; tried: {}", tried.join("; "))]
pub struct ResolveError {
    /// The device index.
    pub device_index: u64,
    /// The network card index.
    pub network_card_index: u64,
    /// What was tried, and what each source said.
    pub tried: Vec<String>,
    /// Best partial answer (the ENI's MAC, when a source knew it but no interface has it).
    pub partial: Option<Target>,
}

impl ResolveError {
    /// As a CNI error: the ENI may still be attaching, so "try again later".
    pub fn to_cni(&self) -> CniError {
        CniError::new(
            CniCode::TryAgainLater,
            format!(
                "no ENI at device index {} (network card {}) on this node",
                self.device_index, self.network_card_index
            ),
        )
        .with_details(format!("tried: {}", self.tried.join("; ")))
    }
}

/// The resolution sources.
#[derive(Debug)]
pub struct Resolver<S, M, N> {
    /// The node daemon's state.
    pub state: S,
    /// IMDS (None: skip).
    pub metadata: Option<M>,
    /// Local interfaces.
    pub netdevs: N,
}

impl<S: StateSource, M: Metadata, N: NetDevices> Resolver<S, M, N> {
    /// Resolves the ENI at `device_index` on `network_card_index`.
    pub fn resolve(
        &self,
        device_index: u64,
        network_card_index: u64,
    ) -> Result<Resolution, ResolveError> {
        let mut tried = Vec::new();
        let mut partial = None;

        match self.state.load() {
            Ok(state) => match crate::state::find(&state, device_index, network_card_index) {
                Some(eni) => {
                    let id = &eni.eni_id;
                    if eni.dpdk_bound {
                        if let Some(pci) = eni.pci_address.as_deref().filter(|p| !p.is_empty()) {
                            return Ok(Resolution {
                                target: Target::Pci(pci.to_owned()),
                                source: "state file",
                                tried,
                            });
                        }
                        tried.push(format!(
                            "{}: {id} is DPDK-bound but has no pciAddress",
                            self.state.describe()
                        ));
                    } else if let Some(name) =
                        eni.interface_name.as_deref().filter(|n| !n.is_empty())
                    {
                        return Ok(Resolution {
                            target: Target::Netdev(name.to_owned()),
                            source: "state file",
                            tried,
                        });
                    } else if let Some(mac) =
                        Some(eni.mac_address.as_str()).filter(|m| !m.is_empty())
                    {
                        match self.netdevs.by_mac(mac) {
                            Ok(Some(name)) => {
                                return Ok(Resolution {
                                    target: Target::Netdev(name),
                                    source: "state file",
                                    tried,
                                });
                            }
                            Ok(None) => tried.push(format!(
                                "{}: {id} has no interfaceName and no interface has its MAC {mac} in {}",
                                self.state.describe(),
                                self.netdevs.describe()
                            )),
                            Err(e) => tried.push(format!("{}: {e}", self.netdevs.describe())),
                        }
                        partial = Some(Target::Mac(normalize_mac(mac)));
                    } else {
                        tried.push(format!(
                            "{}: {id} has neither interfaceName nor macAddress",
                            self.state.describe()
                        ));
                    }
                }
                None => {
                    let known: Vec<String> = state
                        .enis
                        .iter()
                        .map(|e| {
                            format!("{}@{}/{}", e.eni_id, e.device_index, e.network_card_index)
                        })
                        .collect();
                    tried.push(format!(
                        "{}: no ENI at that index (has: {})",
                        self.state.describe(),
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ));
                }
            },
            Err(StateError::NotFound(p)) => {
                tried.push(format!("state file {}: does not exist", p.display()));
            }
            Err(e) => tried.push(e.to_string()),
        }

        match &self.metadata {
            None => tried.push("IMDS: not consulted".to_owned()),
            Some(md) => match md.find(device_index, network_card_index) {
                Ok((Some(eni), _)) => match self.netdevs.by_mac(&eni.mac) {
                    Ok(Some(name)) => {
                        return Ok(Resolution {
                            target: Target::Netdev(name),
                            source: "IMDS",
                            tried,
                        });
                    }
                    Ok(None) => {
                        tried.push(format!(
                            "{}: MAC {} has device-number {device_index}, but no interface in {} has that MAC (DPDK-bound ENIs are only known through the node daemon's state file)",
                            md.describe(),
                            eni.mac,
                            self.netdevs.describe()
                        ));
                        partial = Some(Target::Mac(eni.mac));
                    }
                    Err(e) => {
                        tried.push(format!("{}: {e}", self.netdevs.describe()));
                        partial = Some(Target::Mac(eni.mac));
                    }
                },
                Ok((None, seen)) => {
                    let known: Vec<String> = seen
                        .iter()
                        .map(|e| format!("{}@{}/{}", e.mac, e.device_number, e.network_card_index))
                        .collect();
                    tried.push(format!(
                        "{}: no MAC with device-number {device_index} on network card {network_card_index} (has: {})",
                        md.describe(),
                        if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                    ));
                }
                Err(e) => tried.push(format!("{}: {e}", md.describe())),
            },
        }

        Err(ResolveError {
            device_index,
            network_card_index,
            tried,
            partial,
        })
    }
}

impl<S: StateSource, M: Metadata, N: NetDevices> Resolver<S, M, N> {
    /// Refuses a target that would hand the pod the node's primary interface: the one
    /// carrying a default route, or the ENI at device index 0 (by MAC, from IMDS and the
    /// state file; by PCI address, from the state file). For a PCI address, the check
    /// covers the device's network interfaces. Fails closed when the routes cannot be read.
    ///
    /// This runs on whatever the target came from: the state file, IMDS, or a device
    /// named in the network config (`pciBusID`, `deviceID`, `runtimeConfig.deviceID`).
    /// Accepts a PCI device named in the network config (`pciBusID`, `deviceID`,
    /// `runtimeConfig.deviceID`) only when the node daemon's state file lists it at a
    /// device index other than 0: the device plugin only ever advertises such devices, so
    /// anything else was written into the config by hand.
    pub fn refuse_unmanaged(&self, pci: &str) -> Result<(), String> {
        let state = self.state.load().map_err(|e| {
            format!(
                "PCI device {pci} is named in the network config, and only devices the node daemon manages may be; {}: {e}",
                self.state.describe()
            )
        })?;
        let known = state.enis.iter().any(|e| {
            e.device_index != 0
                && e.pci_address
                    .as_deref()
                    .is_some_and(|p| p.eq_ignore_ascii_case(pci))
        });
        if known {
            Ok(())
        } else {
            Err(format!(
                "PCI device {pci} is named in the network config but is not an ENI the node daemon manages ({} does not list it)",
                self.state.describe()
            ))
        }
    }

    pub fn refuse_primary(&self, target: &Target) -> Result<(), String> {
        let (names, pci) = match target {
            Target::Netdev(n) => (vec![n.clone()], None),
            Target::Pci(p) => (
                self.netdevs
                    .pci_netdevs(p)
                    .map_err(|e| format!("cannot list the interfaces of PCI device {p}: {e}"))?,
                Some(p.as_str()),
            ),
            Target::Mac(_) => return Ok(()),
        };
        let routes = self.netdevs.default_route_interfaces().map_err(|e| {
            format!("cannot read this node's default routes to protect the primary interface: {e}")
        })?;
        let what = |n: &str| match pci {
            Some(p) => format!("PCI device {p} is interface {n}, which"),
            None => format!("interface {n}"),
        };
        if let Some(n) = names.iter().find(|n| routes.contains(*n)) {
            return Err(format!(
                "{} carries the node's default route (the primary ENI); it is never moved into a pod",
                what(n)
            ));
        }
        let state = self.state.load().ok();
        let state_primary = state
            .iter()
            .flat_map(|s| s.enis.iter())
            .filter(|e| e.device_index == 0);
        let mut primary_macs: Vec<String> = Vec::new();
        for e in state_primary {
            if let (Some(p), Some(want)) = (pci, e.pci_address.as_deref())
                && p.eq_ignore_ascii_case(want)
            {
                return Err(format!(
                    "PCI device {p} is the ENI at device index 0 (the primary ENI); it is never moved into a pod"
                ));
            }
            if !e.mac_address.is_empty() {
                primary_macs.push(normalize_mac(&e.mac_address));
            }
        }
        if names.is_empty() {
            return Ok(());
        }
        if let Some(md) = &self.metadata
            && let Ok((Some(eni), _)) = md.find(0, 0)
        {
            primary_macs.push(normalize_mac(&eni.mac));
        }
        for n in &names {
            if let Some(mac) = self.netdevs.mac_of(n)
                && primary_macs.contains(&mac)
            {
                return Err(format!(
                    "{} has MAC {mac}, the ENI at device index 0 (the primary ENI); it is never moved into a pod",
                    what(n)
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod stubs {
    //! In-memory stand-ins for the I/O traits.
    use crate::imds::{ImdsEni, ImdsError, Metadata};
    use crate::state::{NodeState, StateError, StateSource};
    use crate::sysfs::NetDevices;
    use std::cell::Cell;
    use std::collections::BTreeSet;

    /// State from a string (None: no file).
    #[derive(Debug)]
    pub struct StubState(pub Option<&'static str>);
    impl StateSource for StubState {
        fn describe(&self) -> String {
            "state file /stub/enis.json".into()
        }
        fn load(&self) -> Result<NodeState, StateError> {
            match self.0 {
                None => Err(StateError::NotFound("/stub/enis.json".into())),
                Some(s) => eni_state::parse(s.as_bytes()).map_err(|e| {
                    StateError::Load(eni_state::Error::Io {
                        path: "/stub/enis.json".into(),
                        source: std::io::Error::other(e.to_string()),
                    })
                }),
            }
        }
    }

    /// IMDS from a list; counts calls.
    #[derive(Debug, Default)]
    pub struct StubImds(pub Vec<ImdsEni>, pub Cell<usize>);
    impl Metadata for StubImds {
        fn describe(&self) -> String {
            "IMDS at http://stub".into()
        }
        fn find(&self, d: u64, c: u64) -> Result<(Option<ImdsEni>, Vec<ImdsEni>), ImdsError> {
            self.1.set(self.1.get() + 1);
            let hit = self
                .0
                .iter()
                .find(|e| e.device_number == d && e.network_card_index == c)
                .cloned();
            Ok((hit, self.0.clone()))
        }
    }

    /// Interfaces from (mac, name) pairs; `eth0` carries the default route and no PCI
    /// device has interfaces, unless a [`StubNode`] says otherwise.
    #[derive(Debug)]
    pub struct StubNet(pub Vec<(&'static str, &'static str)>);
    impl NetDevices for StubNet {
        fn describe(&self) -> String {
            "interfaces in /stub".into()
        }
        fn default_route_interfaces(&self) -> std::io::Result<BTreeSet<String>> {
            Ok(BTreeSet::from(["eth0".to_owned()]))
        }
        fn pci_netdevs(&self, _pci: &str) -> std::io::Result<Vec<String>> {
            Ok(Vec::new())
        }
        fn mac_of(&self, name: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(m, _)| m.to_ascii_lowercase())
        }
        fn by_mac(&self, mac: &str) -> std::io::Result<Option<String>> {
            Ok(self
                .0
                .iter()
                .find(|(m, _)| m.eq_ignore_ascii_case(mac))
                .map(|(_, n)| (*n).to_owned()))
        }
    }

    /// A node: interfaces (mac, name), the ones with a default route, and PCI devices with
    /// their interfaces.
    #[derive(Debug, Default)]
    pub struct StubNode {
        pub links: Vec<(&'static str, &'static str)>,
        pub routes: Vec<&'static str>,
        pub pci: Vec<(&'static str, &'static str)>,
        pub routes_unreadable: bool,
    }
    impl NetDevices for StubNode {
        fn describe(&self) -> String {
            "interfaces in /stub".into()
        }
        fn by_mac(&self, mac: &str) -> std::io::Result<Option<String>> {
            StubNet(self.links.clone()).by_mac(mac)
        }
        fn default_route_interfaces(&self) -> std::io::Result<BTreeSet<String>> {
            if self.routes_unreadable {
                return Err(std::io::Error::other("no /proc/net/route"));
            }
            Ok(self.routes.iter().map(|r| (*r).to_owned()).collect())
        }
        fn pci_netdevs(&self, pci: &str) -> std::io::Result<Vec<String>> {
            Ok(self
                .pci
                .iter()
                .filter(|(p, _)| *p == pci)
                .map(|(_, n)| (*n).to_owned())
                .collect())
        }
        fn mac_of(&self, name: &str) -> Option<String> {
            StubNet(self.links.clone()).mac_of(name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::stubs::*;
    use super::*;
    use crate::imds::ImdsEni;

    const STATE: &str = r#"{"version":1,"node":"n","enis":[
        {"eniID":"eni-a","macAddress":"02:00:00:00:00:02","deviceIndex":2,"networkCardIndex":0,"nodeENI":"x","interfaceName":"ens7","pciAddress":null,"driver":"ena","dpdkBound":false,"resourceName":null},
        {"eniID":"eni-b","macAddress":"02:00:00:00:00:03","deviceIndex":3,"networkCardIndex":0,"nodeENI":"x","interfaceName":null,"pciAddress":"0000:00:08.0","driver":"vfio-pci","dpdkBound":true,"resourceName":"intel.com/x"},
        {"eniID":"eni-c","macAddress":"02:00:00:00:00:04","deviceIndex":4,"networkCardIndex":0,"nodeENI":"x","interfaceName":null,"pciAddress":null,"driver":null,"dpdkBound":false,"resourceName":null}]}"#;

    fn imds() -> StubImds {
        StubImds(
            vec![ImdsEni {
                mac: "02:00:00:00:00:05".into(),
                device_number: 5,
                network_card_index: 0,
            }],
            Default::default(),
        )
    }

    #[test]
    fn state_file_wins_and_imds_is_not_asked() {
        let r = Resolver {
            state: StubState(Some(STATE)),
            metadata: Some(imds()),
            netdevs: StubNet(vec![]),
        };
        let res = r.resolve(2, 0).expect("resolves");
        assert_eq!(res.target, Target::Netdev("ens7".into()));
        assert_eq!(res.source, "state file");
        assert_eq!(r.metadata.as_ref().map(|m| m.1.get()), Some(0));
        let res = r.resolve(3, 0).expect("resolves");
        assert_eq!(res.target, Target::Pci("0000:00:08.0".into()));
    }

    #[test]
    fn state_entry_without_name_uses_the_mac() {
        let r = Resolver {
            state: StubState(Some(STATE)),
            metadata: None::<StubImds>,
            netdevs: StubNet(vec![("02:00:00:00:00:04", "ens9")]),
        };
        assert_eq!(
            r.resolve(4, 0).expect("resolves").target,
            Target::Netdev("ens9".into())
        );
    }

    #[test]
    fn falls_back_to_imds_and_sysfs() {
        let r = Resolver {
            state: StubState(None),
            metadata: Some(imds()),
            netdevs: StubNet(vec![("02:00:00:00:00:05", "ens8")]),
        };
        let res = r.resolve(5, 0).expect("resolves");
        assert_eq!(res.target, Target::Netdev("ens8".into()));
        assert_eq!(res.source, "IMDS");
        assert!(res.tried[0].contains("does not exist"), "{:?}", res.tried);
    }

    #[test]
    fn nothing_matches_lists_what_was_tried() {
        let r = Resolver {
            state: StubState(Some(STATE)),
            metadata: Some(imds()),
            netdevs: StubNet(vec![]),
        };
        let e = r.resolve(9, 0).expect_err("no ENI");
        assert_eq!(e.tried.len(), 2, "{:?}", e.tried);
        assert!(e.tried[0].contains("eni-a@2/0"), "{}", e.tried[0]);
        assert!(
            e.tried[1].contains("02:00:00:00:00:05@5/0"),
            "{}",
            e.tried[1]
        );
        assert_eq!(e.partial, None);
        let c = e.to_cni();
        assert_eq!(c.code, CniCode::TryAgainLater);
        assert!(c.msg.contains("device index 9"), "{}", c.msg);
        assert!(c.details.contains("IMDS at http://stub"), "{}", c.details);
    }

    fn node() -> StubNode {
        StubNode {
            links: vec![
                ("02:00:00:00:00:01", "ens5"),
                ("02:00:00:00:00:02", "ens7"),
                ("02:00:00:00:00:09", "ens9"),
            ],
            routes: vec!["ens5"],
            pci: vec![("0000:00:05.0", "ens5"), ("0000:00:09.0", "ens9")],
            routes_unreadable: false,
        }
    }

    #[test]
    fn the_primary_interface_is_never_a_target() {
        // IMDS: the primary ENI (device-number 0) is ens9's MAC... as on an instance
        // whose default route runs elsewhere; ens5 carries the default route.
        let primary = StubImds(
            vec![ImdsEni {
                mac: "02:00:00:00:00:09".into(),
                device_number: 0,
                network_card_index: 0,
            }],
            Default::default(),
        );
        let r = Resolver {
            state: StubState(Some(STATE)),
            metadata: Some(primary),
            netdevs: node(),
        };
        let e = r
            .refuse_primary(&Target::Netdev("ens5".into()))
            .expect_err("default route");
        assert!(e.contains("default route"), "{e}");
        let e = r
            .refuse_primary(&Target::Pci("0000:00:05.0".into()))
            .expect_err("default route, by PCI");
        assert!(e.contains("0000:00:05.0") && e.contains("ens5"), "{e}");
        let e = r
            .refuse_primary(&Target::Netdev("ens9".into()))
            .expect_err("device index 0");
        assert!(e.contains("device index 0"), "{e}");
        let e = r
            .refuse_primary(&Target::Pci("0000:00:09.0".into()))
            .expect_err("device index 0, by PCI");
        assert!(e.contains("device index 0"), "{e}");
        // An ordinary ENI, a vfio-bound device and a MAC-only target pass.
        r.refuse_primary(&Target::Netdev("ens7".into()))
            .expect("ordinary ENI");
        r.refuse_primary(&Target::Pci("0000:00:08.0".into()))
            .expect("no netdev");
        r.refuse_primary(&Target::Mac("02:00:00:00:00:01".into()))
            .expect("CHECK/DEL only");
    }

    #[test]
    fn index_0_in_the_state_file_and_unreadable_routes_refuse() {
        const PRIMARY: &str = r#"{"version":1,"node":"n","enis":[
            {"eniID":"eni-p","macAddress":"02:00:00:00:00:02","deviceIndex":0,"pciAddress":"0000:00:03.0"}]}"#;
        let r = Resolver {
            state: StubState(Some(PRIMARY)),
            metadata: None::<StubImds>,
            netdevs: node(),
        };
        assert!(r.refuse_primary(&Target::Netdev("ens7".into())).is_err());
        assert!(
            r.refuse_primary(&Target::Pci("0000:00:03.0".into()))
                .is_err()
        );
        let mut n = node();
        n.routes_unreadable = true;
        let r = Resolver {
            state: StubState(None),
            metadata: None::<StubImds>,
            netdevs: n,
        };
        let e = r
            .refuse_primary(&Target::Netdev("ens7".into()))
            .expect_err("fails closed");
        assert!(e.contains("default routes"), "{e}");
    }

    #[test]
    fn known_mac_without_interface_is_a_partial_answer() {
        let r = Resolver {
            state: StubState(None),
            metadata: Some(imds()),
            netdevs: StubNet(vec![]),
        };
        let e = r.resolve(5, 0).expect_err("no interface");
        assert_eq!(e.partial, Some(Target::Mac("02:00:00:00:00:05".into())));
        assert!(
            e.to_string()
                .contains("no interface in interfaces in /stub"),
            "{e}"
        );
    }
}
