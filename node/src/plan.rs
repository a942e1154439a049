//! The pure part of a reconcile: what the node should look like (from the NodeENIs),
//! what it looks like (links, PCI devices, the previous state file), and the steps in
//! between. No I/O here; [`crate::daemon`] observes, calls [`plan`], executes.

use std::collections::{BTreeMap, BTreeSet};

use eni_api::{AttachmentStatus, NodeENI};

use crate::state::EniState;
use crate::sysfs::PciInfo;

/// DPDK settings of one attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpdkWant {
    /// Driver to bind to (`vfio-pci`, ...).
    pub driver: String,
    /// Extended resource to advertise the device as.
    pub resource_name: String,
    /// PCI address given in the NodeENI spec (`dpdkPCIAddress`): accepted only when it
    /// is the device behind the ENI's MAC.
    pub pci_address: Option<String>,
}

/// One ENI attached to this node, as the NodeENI status says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// NodeENI name.
    pub node_eni: String,
    /// ENI id.
    pub eni_id: String,
    /// MAC address, normalised to lower case.
    pub mac: String,
    /// EC2 device index.
    pub device_index: i32,
    /// EC2 network card index.
    pub network_card_index: i32,
    /// MTU to set.
    pub mtu: u32,
    /// DPDK settings, when DPDK is enabled.
    pub dpdk: Option<DpdkWant>,
}

/// Normalises a MAC address (`02:AB:..` -> `02:ab:..`); `None` when malformed.
pub fn normalize_mac(mac: &str) -> Option<String> {
    let parts: Vec<&str> = mac.trim().split([':', '-']).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    Some(parts.join(":").to_ascii_lowercase())
}

/// Formats link-layer address bytes as `aa:bb:..`.
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The attachments of `node` in `nodeenis` that are attached and have a MAC address.
/// MTU: the attachment's, else the spec's, else `default_mtu`. DPDK settings come from
/// the spec only.
pub fn desired_from_nodeenis<'a>(
    nodeenis: impl IntoIterator<Item = &'a NodeENI>,
    node: &str,
    default_mtu: u32,
) -> Vec<Desired> {
    let mut out = Vec::new();
    for ne in nodeenis {
        let Some(name) = ne.metadata.name.as_deref() else {
            continue;
        };
        let Some(status) = &ne.status else { continue };
        for a in &status.attachments {
            if a.node_id != node || a.status != AttachmentStatus::Attached.as_str() {
                continue;
            }
            let Some(mac) = a.mac_address.as_deref().and_then(normalize_mac) else {
                continue;
            };
            let mtu = a
                .mtu
                .or(ne.spec.mtu)
                .and_then(|m| u32::try_from(m).ok())
                .filter(|m| *m > 0)
                .unwrap_or(default_mtu);
            // DPDK settings from the spec only: any node daemon may write status (its own
            // report), so status must not decide what another node binds.
            let dpdk = ne.spec.dpdk().then(|| DpdkWant {
                driver: ne.spec.dpdk_driver().to_string(),
                resource_name: ne.spec.dpdk_resource_name().to_string(),
                pci_address: ne.spec.dpdk_pci_address.clone(),
            });
            out.push(Desired {
                node_eni: name.to_string(),
                eni_id: a.eni_id.clone(),
                mac,
                device_index: a.device_index,
                network_card_index: a.network_card_index.unwrap_or(0),
                mtu,
                dpdk,
            });
        }
    }
    out.sort_by(|a, b| (a.device_index, &a.mac).cmp(&(b.device_index, &b.mac)));
    out
}

/// A network interface as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Link {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC address, lower case.
    pub mac: String,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Alternative names.
    pub alt_names: Vec<String>,
    /// PCI address behind it (from sysfs), when it has one.
    pub pci_address: Option<String>,
}

/// Everything a reconcile observed.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// All links in the namespace.
    pub links: Vec<Link>,
    /// PCI devices of interest, by address: what sysfs said, or why it could not be read.
    pub pci: BTreeMap<String, Result<PciInfo, String>>,
    /// The state file as last written.
    pub previous: Vec<EniState>,
    /// ifindexes of the interfaces carrying a default route (the primary interface).
    pub primary: BTreeSet<u32>,
}

impl Observed {
    /// PCI addresses the planner may ask about: explicit ones, those behind the links of
    /// wanted MACs, and those in the previous state.
    pub fn pci_candidates(
        desired: &[Desired],
        links: &[Link],
        previous: &[EniState],
    ) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for d in desired {
            if let Some(p) = d.dpdk.as_ref().and_then(|w| w.pci_address.clone()) {
                out.insert(p);
            }
            if let Some(p) = links
                .iter()
                .find(|l| l.mac == d.mac)
                .and_then(|l| l.pci_address.clone())
            {
                out.insert(p);
            }
        }
        out.extend(previous.iter().filter_map(|e| e.pci_address.clone()));
        out
    }
}

/// One change to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `ip link set <name> up`.
    SetUp {
        /// ifindex.
        index: u32,
    },
    /// `ip link set <name> mtu <mtu>`.
    SetMtu {
        /// ifindex.
        index: u32,
        /// New MTU.
        mtu: u32,
    },
    /// `ip link property add dev <name> altname <alt>`.
    AddAltName {
        /// ifindex.
        index: u32,
        /// The alternative name.
        alt: String,
    },
    /// Bind the PCI device to a userspace-I/O driver (after recording it in the state).
    Bind {
        /// PCI address.
        pci: String,
        /// Driver.
        driver: String,
    },
}

/// The plan for one attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniPlan {
    /// The attachment.
    pub desired: Desired,
    /// Its interface, when it has one.
    pub link: Option<Link>,
    /// Its PCI address, when known.
    pub pci: Option<String>,
    /// What sysfs says about that PCI device.
    pub pci_info: Option<PciInfo>,
    /// Steps, in order.
    pub actions: Vec<Action>,
    /// Why it cannot be (fully) configured; reported, not fatal.
    pub problem: Option<String>,
}

impl EniPlan {
    /// The state-file entry this ENI has once the plan is carried out (or, with
    /// `bound_now = false` for a DPDK ENI, the record written before binding).
    pub fn entry(&self, bound: bool) -> Option<EniState> {
        if self.link.is_none() && self.pci.is_none() {
            return None;
        }
        let dpdk = self.desired.dpdk.as_ref();
        Some(EniState {
            eni_id: self.desired.eni_id.clone(),
            mac_address: self.desired.mac.clone(),
            device_index: self.desired.device_index,
            network_card_index: self.desired.network_card_index,
            node_eni: self.desired.node_eni.clone(),
            interface_name: if bound {
                None
            } else {
                self.link.as_ref().map(|l| l.name.clone())
            },
            pci_address: self.pci.clone(),
            driver: if bound {
                dpdk.map(|w| w.driver.clone())
            } else {
                self.pci_info.as_ref().and_then(|i| i.driver.clone())
            },
            dpdk_bound: bound,
            resource_name: dpdk.map(|w| w.resource_name.clone()),
        })
    }

    /// Whether the plan ends with the device bound to its DPDK driver.
    pub fn wants_bound(&self) -> bool {
        self.desired.dpdk.is_some() && self.pci.is_some() && self.problem.is_none()
    }
}

/// A device to give back to its kernel driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Its previous state entry.
    pub entry: EniState,
    /// The userspace-I/O driver it is bound to.
    pub dpdk_driver: String,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// One per attachment of this node.
    pub enis: Vec<EniPlan>,
    /// Devices to give back.
    pub releases: Vec<Release>,
}

/// Planner options.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Also make ENI N reachable as `eth<N>`.
    pub stable_names: bool,
}

/// Computes the plan. Rules: interfaces are found by MAC only; device index 0 (the
/// primary ENI) is never touched; only links whose MAC belongs to an attachment are
/// touched; a DPDK ENI's PCI device is the one behind its MAC (the netdev's, or the state
/// file's once the netdev is gone), and an explicit `dpdkPCIAddress` is accepted only when
/// it names that same device; a device (or MAC) claimed by two attachments is left alone
/// and both are reported; a DPDK device already bound to its driver is left alone (no
/// flaps after a restart); a device recorded in the state file that is no longer wanted
/// for DPDK and sits on a userspace-I/O driver, or on no driver at all, is released.
pub fn plan(desired: &[Desired], observed: &Observed, opts: Options) -> Plan {
    let mut out = Plan::default();
    let claims = claims(desired, observed);
    for d in desired {
        let mut p = EniPlan {
            desired: d.clone(),
            link: find_by_mac(&observed.links, &d.mac).cloned(),
            pci: None,
            pci_info: None,
            actions: Vec::new(),
            problem: None,
        };
        if d.device_index == 0 {
            p.link = None;
            p.problem =
                Some("device index 0 is the primary ENI; the daemon never touches it".into());
            out.enis.push(p);
            continue;
        }
        if let Some(l) = p
            .link
            .as_ref()
            .filter(|l| observed.primary.contains(&l.index))
        {
            p.problem = Some(format!(
                "interface {} carries the default route (the primary ENI); the daemon never touches it",
                l.name
            ));
            p.link = None;
            out.enis.push(p);
            continue;
        }
        let claim = &claims.by_mac[d.mac.as_str()];
        if let Some(conflict) = claims.conflict(d) {
            p.link = None;
            p.pci = claim.device.clone();
            p.problem = Some(conflict);
            out.enis.push(p);
            continue;
        }
        p.pci = claim.device.clone();
        if let Some(pci) = &p.pci {
            match observed.pci.get(pci) {
                Some(Ok(info)) => p.pci_info = Some(info.clone()),
                Some(Err(e)) if d.dpdk.is_some() => p.problem = Some(e.clone()),
                _ => {}
            }
        }
        if let Some(w) = &d.dpdk
            && let Some(problem) = claim.explicit_mismatch(&d.mac, w)
        {
            p.problem = Some(problem);
            out.enis.push(p);
            continue;
        }
        let primary_pci = observed
            .links
            .iter()
            .filter(|l| observed.primary.contains(&l.index))
            .find(|l| l.pci_address.is_some() && l.pci_address == p.pci);
        if let (Some(l), Some(_)) = (primary_pci, &d.dpdk) {
            p.problem = Some(format!(
                "PCI device {} is the primary interface {}; refusing to bind it",
                l.pci_address.as_deref().unwrap_or_default(),
                l.name
            ));
            out.enis.push(p);
            continue;
        }
        match &d.dpdk {
            Some(want) => plan_dpdk(&mut p, want),
            None => plan_netdev(&mut p, observed, opts),
        }
        out.enis.push(p);
    }

    // Devices recorded earlier that are no longer wanted bound: given back when they sit
    // on a userspace-I/O driver, or on no driver at all (a crash between unbind and
    // probe, or a bind that never took).
    for e in &observed.previous {
        // Only records of DPDK ENIs (bound, or recorded just before binding).
        if !(e.dpdk_bound || e.resource_name.is_some()) {
            continue;
        }
        let Some(pci) = &e.pci_address else { continue };
        // Still wanted for DPDK (even with a problem reported, e.g. a wrong
        // dpdkPCIAddress added later): left as it is.
        let still = out
            .enis
            .iter()
            .any(|p| p.desired.dpdk.is_some() && p.pci.as_ref() == Some(pci));
        // A device two attachments fight over stays as it is until one gives up.
        if still || claims.contested.contains(pci.as_str()) {
            continue;
        }
        let driver = match observed.pci.get(pci) {
            // Gone (detached): nothing to give back.
            Some(Err(_)) | None => continue,
            Some(Ok(info)) => match info.driver.as_deref() {
                None => None,
                Some(d) if crate::sysfs::USERSPACE_DRIVERS.contains(&d) => Some(d.to_string()),
                // On a kernel driver already: nothing to do.
                Some(_) => continue,
            },
        };
        if out
            .releases
            .iter()
            .any(|r| r.entry.pci_address.as_ref() == Some(pci))
        {
            continue;
        }
        out.releases.push(Release {
            entry: e.clone(),
            dpdk_driver: driver.unwrap_or_else(|| {
                e.driver
                    .clone()
                    .filter(|d| crate::sysfs::USERSPACE_DRIVERS.contains(&d.as_str()))
                    .unwrap_or_else(|| eni_api::DEFAULT_DPDK_DRIVER.to_string())
            }),
        });
    }
    out
}

/// Where one MAC's device is, by evidence.
#[derive(Debug, Default)]
struct Claim {
    /// The device behind the MAC: its netdev's, else the state file's record (unless a
    /// live netdev with another MAC sits on that device now).
    device: Option<String>,
    /// Where that came from, for messages.
    source: &'static str,
}

impl Claim {
    /// Why an explicit `dpdkPCIAddress` is refused, if it is.
    fn explicit_mismatch(&self, mac: &str, want: &DpdkWant) -> Option<String> {
        let explicit = want.pci_address.as_deref()?;
        match self.device.as_deref() {
            Some(dev) if dev == explicit => None,
            Some(dev) => Some(format!(
                "dpdkPCIAddress {explicit} is not the device of MAC {mac}: that is {dev} \
                 (from {}); refusing to bind either (remove dpdkPCIAddress or correct it)",
                self.source
            )),
            None => Some(format!(
                "cannot verify dpdkPCIAddress {explicit}: no interface with MAC {mac} and no \
                 record of it, so nothing shows that {explicit} is this ENI; refusing to bind it"
            )),
        }
    }
}

/// Who claims which device.
#[derive(Debug, Default)]
struct Claims<'a> {
    by_mac: BTreeMap<&'a str, Claim>,
    /// Claimants per device (by MAC-derived device, and by explicit address).
    by_device: BTreeMap<String, Vec<&'a Desired>>,
    /// Claimants per MAC.
    per_mac: BTreeMap<&'a str, Vec<&'a Desired>>,
    /// Devices claimed more than once.
    contested: BTreeSet<String>,
}

impl Claims<'_> {
    /// A report naming every claimant, when `d`'s MAC or device is claimed twice.
    fn conflict(&self, d: &Desired) -> Option<String> {
        let mut names: Vec<&Desired> = self
            .per_mac
            .get(d.mac.as_str())
            .cloned()
            .unwrap_or_default();
        let mut what = format!("MAC {}", d.mac);
        for pci in device_claims(d, &self.by_mac[d.mac.as_str()]) {
            if let Some(c) = self.by_device.get(&pci)
                && c.len() > 1
            {
                names.extend(c.iter().copied());
                what = format!("PCI device {pci}");
            }
        }
        let mut unique: Vec<&Desired> = Vec::new();
        for n in names.drain(..) {
            if !unique.iter().any(|u| std::ptr::eq(*u, n)) {
                unique.push(n);
            }
        }
        if unique.len() < 2 {
            return None;
        }
        let mut list: Vec<String> = unique.iter().map(|c| claimant(c)).collect();
        list.sort();
        Some(format!(
            "{what} is claimed by {}; refusing to configure it until only one claims it",
            list.join(" and ")
        ))
    }
}

fn claimant(d: &Desired) -> String {
    let mut s = format!("NodeENI {} (ENI {}, MAC {}", d.node_eni, d.eni_id, d.mac);
    if let Some(w) = &d.dpdk {
        s.push_str(&format!(", DPDK resource {}", w.resource_name));
        if let Some(p) = &w.pci_address {
            s.push_str(&format!(", dpdkPCIAddress {p}"));
        }
    }
    s.push(')');
    s
}

/// The devices `d` claims: the one behind its MAC and, for DPDK, an explicit address.
fn device_claims(d: &Desired, claim: &Claim) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    out.extend(claim.device.clone());
    if let Some(p) = d.dpdk.as_ref().and_then(|w| w.pci_address.clone()) {
        out.insert(p);
    }
    out
}

fn claims<'a>(desired: &'a [Desired], observed: &Observed) -> Claims<'a> {
    let mut c = Claims::default();
    for d in desired {
        c.per_mac.entry(d.mac.as_str()).or_default().push(d);
        if c.by_mac.contains_key(d.mac.as_str()) {
            continue;
        }
        let live = find_by_mac(&observed.links, &d.mac).and_then(|l| l.pci_address.clone());
        let claim = match live {
            Some(dev) => Claim {
                device: Some(dev),
                source: "its interface",
            },
            None => {
                let recorded = observed
                    .previous
                    .iter()
                    .find(|e| e.mac_address == d.mac)
                    .and_then(|e| e.pci_address.clone())
                    // A netdev with another MAC on that device now: the record is stale.
                    .filter(|p| {
                        !observed
                            .links
                            .iter()
                            .any(|l| l.pci_address.as_ref() == Some(p) && l.mac != d.mac)
                    });
                Claim {
                    device: recorded,
                    source: "the state file",
                }
            }
        };
        c.by_mac.insert(d.mac.as_str(), claim);
    }
    for d in desired {
        if d.device_index == 0 {
            continue;
        }
        for pci in device_claims(d, &c.by_mac[d.mac.as_str()]) {
            let v = c.by_device.entry(pci).or_default();
            if !v.iter().any(|x| std::ptr::eq(*x, d)) {
                v.push(d);
            }
        }
    }
    let contested: BTreeSet<String> = c
        .by_device
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, _)| k.clone())
        .collect();
    let mut contested = contested;
    for (mac, v) in &c.per_mac {
        if v.len() > 1 {
            contested.extend(c.by_mac[mac].device.clone());
        }
    }
    c.contested = contested;
    c
}

/// The interface with `mac`. VLANs, bonds, bridges and macvlans can share a NIC's MAC:
/// prefer the one backed by a PCI device, then the lowest ifindex (created first).
fn find_by_mac<'a>(links: &'a [Link], mac: &str) -> Option<&'a Link> {
    links
        .iter()
        .filter(|l| l.mac == mac)
        .min_by_key(|l| (l.pci_address.is_none(), l.index))
}

fn plan_netdev(p: &mut EniPlan, observed: &Observed, opts: Options) {
    let d = &p.desired;
    let Some(link) = &p.link else {
        p.problem = Some(match &p.pci {
            Some(pci) => format!(
                "no interface with MAC {} yet (PCI device {pci} has no netdev)",
                d.mac
            ),
            None => format!("no interface with MAC {} on the node yet", d.mac),
        });
        return;
    };
    if link.mtu != d.mtu {
        p.actions.push(Action::SetMtu {
            index: link.index,
            mtu: d.mtu,
        });
    }
    if !link.up {
        p.actions.push(Action::SetUp { index: link.index });
    }
    if opts.stable_names {
        let alt = format!("eth{}", d.device_index);
        if link.name != alt && !link.alt_names.contains(&alt) {
            match observed
                .links
                .iter()
                .find(|l| l.index != link.index && (l.name == alt || l.alt_names.contains(&alt)))
            {
                Some(other) => {
                    p.problem = Some(format!(
                        "stable name {alt} is taken by interface {}; not adding it",
                        other.name
                    ));
                }
                None => p.actions.push(Action::AddAltName {
                    index: link.index,
                    alt,
                }),
            }
        }
    }
}

fn plan_dpdk(p: &mut EniPlan, want: &DpdkWant) {
    if p.problem.is_some() {
        return;
    }
    let Some(pci) = p.pci.clone() else {
        p.problem = Some(format!(
            "cannot find the PCI device of MAC {}: no interface with that MAC has a PCI device \
             and the NodeENI sets no dpdkPCIAddress",
            p.desired.mac
        ));
        return;
    };
    let Some(info) = &p.pci_info else {
        p.problem = Some(format!("PCI device {pci} not found in sysfs"));
        return;
    };
    if info.driver.as_deref() != Some(want.driver.as_str()) {
        p.actions.push(Action::Bind {
            pci,
            driver: want.driver.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(mac: &str, idx: i32) -> Desired {
        Desired {
            node_eni: "ne".into(),
            eni_id: format!("eni-{idx}"),
            mac: mac.into(),
            device_index: idx,
            network_card_index: 0,
            mtu: 9001,
            dpdk: None,
        }
    }

    fn dpdk(mut d: Desired) -> Desired {
        d.dpdk = Some(DpdkWant {
            driver: "vfio-pci".into(),
            resource_name: "intel.com/intel_sriov_netdevice".into(),
            pci_address: None,
        });
        d
    }

    fn link(index: u32, name: &str, mac: &str) -> Link {
        Link {
            index,
            name: name.into(),
            mac: mac.into(),
            mtu: 1500,
            up: false,
            alt_names: vec![],
            pci_address: None,
        }
    }

    fn ena(addr: &str, driver: Option<&str>) -> PciInfo {
        PciInfo {
            address: addr.into(),
            vendor: 0x1d0f,
            device: 0xec20,
            class: 0x020000,
            driver: driver.map(Into::into),
            numa_node: Some(0),
            iommu_group: None,
            noiommu: false,
        }
    }

    const M1: &str = "02:00:00:00:00:01";
    const M2: &str = "02:00:00:00:00:02";

    #[test]
    fn mac_normalisation() {
        assert_eq!(
            normalize_mac("02:AB:cd:00:00:01").as_deref(),
            Some("02:ab:cd:00:00:01")
        );
        assert_eq!(
            normalize_mac("02-ab-cd-00-00-01").as_deref(),
            Some("02:ab:cd:00:00:01")
        );
        assert_eq!(normalize_mac("02:ab:cd:00:00"), None);
        assert_eq!(normalize_mac("zz:ab:cd:00:00:01"), None);
        assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 1]), "02:ab:00:00:00:01");
    }

    #[test]
    fn found_by_mac_brought_up_and_mtu_set_others_untouched() {
        let obs = Observed {
            links: vec![
                link(1, "eth0", "02:00:00:00:00:99"),
                link(7, "ens7", M1),
                link(8, "ens8", M2),
            ],
            ..Default::default()
        };
        let p = plan(&[want(M1, 2)], &obs, Options::default());
        assert_eq!(p.enis.len(), 1);
        assert_eq!(
            p.enis[0].link.as_ref().map(|l| l.name.as_str()),
            Some("ens7")
        );
        assert_eq!(
            p.enis[0].actions,
            vec![
                Action::SetMtu {
                    index: 7,
                    mtu: 9001
                },
                Action::SetUp { index: 7 }
            ]
        );
        assert!(p.releases.is_empty());
    }

    #[test]
    fn a_mac_shared_with_a_vlan_or_bond_resolves_to_the_pci_device() {
        let mut nic = link(9, "ens7", M1);
        nic.pci_address = Some("0000:00:07.0".into());
        let obs = Observed {
            links: vec![link(3, "bond0", M1), nic],
            ..Default::default()
        };
        let p = plan(&[want(M1, 2)], &obs, Options::default());
        assert_eq!(p.enis[0].link.as_ref().map(|l| l.index), Some(9));
    }

    #[test]
    fn configured_interface_needs_nothing() {
        let mut l = link(7, "ens7", M1);
        l.up = true;
        l.mtu = 9001;
        let obs = Observed {
            links: vec![l],
            ..Default::default()
        };
        let p = plan(
            &[want(M1, 2)],
            &obs,
            Options {
                stable_names: false,
            },
        );
        assert!(p.enis[0].actions.is_empty());
        assert_eq!(p.enis[0].problem, None);
    }

    #[test]
    fn missing_interface_is_a_reported_problem() {
        let p = plan(&[want(M1, 2)], &Observed::default(), Options::default());
        assert!(p.enis[0].actions.is_empty());
        assert!(p.enis[0].problem.as_deref().unwrap_or("").contains(M1));
        assert_eq!(p.enis[0].entry(false), None);
    }

    #[test]
    fn primary_device_index_is_never_touched() {
        let obs = Observed {
            links: vec![link(1, "eth0", M1)],
            ..Default::default()
        };
        let p = plan(&[want(M1, 0)], &obs, Options { stable_names: true });
        assert!(p.enis[0].actions.is_empty());
        assert!(p.enis[0].problem.is_some());
        assert_eq!(p.enis[0].link, None);
    }

    #[test]
    fn the_interface_with_the_default_route_is_never_touched() {
        let mut primary = link(1, "ens5", M1);
        primary.pci_address = Some("0000:00:05.0".into());
        let mut obs = Observed {
            links: vec![primary],
            primary: [1].into(),
            ..Default::default()
        };
        obs.pci
            .insert("0000:00:05.0".into(), Ok(ena("0000:00:05.0", Some("ena"))));
        let p = plan(&[want(M1, 2)], &obs, Options { stable_names: true });
        assert!(p.enis[0].actions.is_empty());
        assert!(
            p.enis[0]
                .problem
                .as_deref()
                .unwrap_or("")
                .contains("default route")
        );
        // Nor is its PCI device bound when named explicitly under another MAC.
        let mut d = dpdk(want(M2, 3));
        if let Some(w) = d.dpdk.as_mut() {
            w.pci_address = Some("0000:00:05.0".into());
        }
        let p = plan(&[d], &obs, Options::default());
        assert!(p.enis[0].actions.is_empty());
        assert!(
            p.enis[0]
                .problem
                .as_deref()
                .unwrap_or("")
                .contains("0000:00:05.0")
        );
    }

    #[test]
    fn duplicate_mac_is_refused_for_both() {
        let obs = Observed {
            links: vec![link(7, "ens7", M1)],
            ..Default::default()
        };
        let p = plan(&[want(M1, 2), want(M1, 3)], &obs, Options::default());
        for e in &p.enis {
            assert!(e.actions.is_empty());
            let msg = e.problem.as_deref().unwrap_or("");
            assert!(msg.contains("eni-2") && msg.contains("eni-3"), "{msg}");
        }
    }

    #[test]
    fn stable_names_add_an_altname_unless_present_or_taken() {
        let obs = Observed {
            links: vec![link(7, "ens7", M1)],
            ..Default::default()
        };
        let p = plan(&[want(M1, 2)], &obs, Options { stable_names: true });
        assert!(p.enis[0].actions.contains(&Action::AddAltName {
            index: 7,
            alt: "eth2".into()
        }));

        let mut l = link(7, "ens7", M1);
        l.alt_names = vec!["eth2".into()];
        let obs = Observed {
            links: vec![l],
            ..Default::default()
        };
        let p = plan(&[want(M1, 2)], &obs, Options { stable_names: true });
        assert!(
            !p.enis[0]
                .actions
                .iter()
                .any(|a| matches!(a, Action::AddAltName { .. }))
        );

        let obs = Observed {
            links: vec![link(2, "eth2", "02:00:00:00:00:99"), link(7, "ens7", M1)],
            ..Default::default()
        };
        let p = plan(&[want(M1, 2)], &obs, Options { stable_names: true });
        assert!(
            !p.enis[0]
                .actions
                .iter()
                .any(|a| matches!(a, Action::AddAltName { .. }))
        );
        assert!(p.enis[0].problem.as_deref().unwrap_or("").contains("eth2"));
    }

    #[test]
    fn dpdk_binds_by_the_pci_address_behind_the_mac() {
        let mut l = link(7, "ens7", M1);
        l.pci_address = Some("0000:00:07.0".into());
        let mut obs = Observed {
            links: vec![l],
            ..Default::default()
        };
        obs.pci
            .insert("0000:00:07.0".into(), Ok(ena("0000:00:07.0", Some("ena"))));
        let p = plan(&[dpdk(want(M1, 2))], &obs, Options::default());
        assert_eq!(
            p.enis[0].actions,
            vec![Action::Bind {
                pci: "0000:00:07.0".into(),
                driver: "vfio-pci".into()
            }]
        );
        // The record written before binding still names the interface.
        let pre = p.enis[0].entry(false).expect("entry");
        assert_eq!(pre.interface_name.as_deref(), Some("ens7"));
        assert_eq!(pre.driver.as_deref(), Some("ena"));
        let post = p.enis[0].entry(true).expect("entry");
        assert_eq!(post.interface_name, None);
        assert_eq!(post.pci_address.as_deref(), Some("0000:00:07.0"));
        assert!(post.dpdk_bound);
        assert_eq!(
            post.resource_name.as_deref(),
            Some("intel.com/intel_sriov_netdevice")
        );
    }

    #[test]
    fn restart_with_state_does_not_rebind() {
        let prev = EniState {
            eni_id: "eni-2".into(),
            mac_address: M1.into(),
            device_index: 2,
            network_card_index: 0,
            node_eni: "ne".into(),
            interface_name: None,
            pci_address: Some("0000:00:07.0".into()),
            driver: Some("vfio-pci".into()),
            dpdk_bound: true,
            resource_name: Some("intel.com/intel_sriov_netdevice".into()),
        };
        let mut obs = Observed {
            previous: vec![prev.clone()],
            ..Default::default()
        };
        obs.pci.insert(
            "0000:00:07.0".into(),
            Ok(ena("0000:00:07.0", Some("vfio-pci"))),
        );
        let p = plan(&[dpdk(want(M1, 2))], &obs, Options::default());
        assert!(p.enis[0].actions.is_empty());
        assert!(p.releases.is_empty());
        assert_eq!(p.enis[0].entry(true), Some(prev));
    }

    #[test]
    fn dpdk_off_or_attachment_gone_releases() {
        let prev = EniState {
            eni_id: "eni-2".into(),
            mac_address: M1.into(),
            device_index: 2,
            network_card_index: 0,
            node_eni: "ne".into(),
            interface_name: None,
            pci_address: Some("0000:00:07.0".into()),
            driver: Some("vfio-pci".into()),
            dpdk_bound: true,
            resource_name: None,
        };
        let mut obs = Observed {
            previous: vec![prev],
            ..Default::default()
        };
        obs.pci.insert(
            "0000:00:07.0".into(),
            Ok(ena("0000:00:07.0", Some("vfio-pci"))),
        );
        // Attachment gone.
        let p = plan(&[], &obs, Options::default());
        assert_eq!(p.releases.len(), 1);
        assert_eq!(p.releases[0].dpdk_driver, "vfio-pci");
        // DPDK turned off: released, and the interface is waited for.
        let p = plan(&[want(M1, 2)], &obs, Options::default());
        assert_eq!(p.releases.len(), 1);
        assert!(p.enis[0].problem.is_some());
        // Already given back by someone else: nothing to do.
        obs.pci
            .insert("0000:00:07.0".into(), Ok(ena("0000:00:07.0", Some("ena"))));
        assert!(plan(&[], &obs, Options::default()).releases.is_empty());
        // Device gone (ENI detached): nothing to do.
        obs.pci.insert("0000:00:07.0".into(), Err("gone".into()));
        assert!(plan(&[], &obs, Options::default()).releases.is_empty());
    }

    #[test]
    fn dpdk_without_pci_address_or_unreadable_device_is_reported() {
        let obs = Observed {
            links: vec![link(7, "ens7", M1)],
            ..Default::default()
        };
        let p = plan(&[dpdk(want(M1, 2))], &obs, Options::default());
        assert!(p.enis[0].actions.is_empty());
        assert!(
            p.enis[0]
                .problem
                .as_deref()
                .unwrap_or("")
                .contains("dpdkPCIAddress")
        );

        let mut d = dpdk(want(M1, 2));
        if let Some(w) = d.dpdk.as_mut() {
            w.pci_address = Some("0000:00:09.0".into());
        }
        let mut l = link(7, "ens7", M1);
        l.pci_address = Some("0000:00:09.0".into());
        let mut obs = Observed {
            links: vec![l],
            ..Default::default()
        };
        obs.pci.insert(
            "0000:00:09.0".into(),
            Err("sysfs: cannot read vendor".into()),
        );
        let p = plan(&[d], &obs, Options::default());
        assert!(p.enis[0].actions.is_empty());
        assert_eq!(
            p.enis[0].problem.as_deref(),
            Some("sysfs: cannot read vendor")
        );
    }

    #[test]
    fn desired_takes_this_nodes_attached_enis_only() {
        let ne: NodeENI = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
            "metadata": {"name": "multus"},
            "spec": {"nodeSelector": {}, "mtu": 1500, "dpdkEnabled": false},
            "status": {"attachments": [
                {"nodeID": "n1", "instanceID": "i-1", "eniID": "eni-a", "macAddress": "02:AA:00:00:00:01", "deviceIndex": 2, "status": "Attached"},
                {"nodeID": "n1", "instanceID": "i-1", "eniID": "eni-b", "macAddress": "02:aa:00:00:00:02", "deviceIndex": 3, "status": "Attached", "mtu": 9000,
                 "dpdkEnabled": true, "dpdkDriver": "vfio-pci", "dpdkResourceName": "x.io/y", "dpdkPCIAddress": "0000:00:08.0"},
                {"nodeID": "n1", "instanceID": "i-1", "eniID": "eni-c", "macAddress": "02:aa:00:00:00:03", "deviceIndex": 4, "status": "Attaching"},
                {"nodeID": "n2", "instanceID": "i-1", "eniID": "eni-d", "macAddress": "02:aa:00:00:00:04", "deviceIndex": 2, "status": "Attached"},
                {"nodeID": "n1", "instanceID": "i-1", "eniID": "eni-e", "deviceIndex": 5, "status": "Attached"}
            ]}
        }))
        .expect("nodeeni");
        let d = desired_from_nodeenis([&ne], "n1", 9001);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].mac, "02:aa:00:00:00:01");
        assert_eq!(d[0].mtu, 1500);
        assert_eq!(d[0].dpdk, None);
        assert_eq!(d[1].mtu, 9000);
        // DPDK fields in the status do not turn DPDK on: the spec says off.
        assert_eq!(d[1].dpdk, None);
    }

    #[test]
    fn dpdk_settings_come_from_the_spec_never_from_status() {
        // Status is writable by every node daemon; only the spec may say what to bind.
        let ne: NodeENI = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
            "metadata": {"name": "dpdk"},
            "spec": {"nodeSelector": {}, "dpdkEnabled": true, "dpdkDriver": "vfio-pci",
                     "dpdkResourceName": "intel.com/intel_sriov_netdevice"},
            "status": {"attachments": [
                {"nodeID": "n1", "instanceID": "i-1", "eniID": "eni-b", "macAddress": "02:aa:00:00:00:02",
                 "deviceIndex": 3, "status": "Attached", "dpdkEnabled": true, "dpdkDriver": "uio_pci_generic",
                 "dpdkResourceName": "evil.io/root-disk", "dpdkPCIAddress": "0000:00:04.0"}
            ]}
        }))
        .expect("nodeeni");
        let d = desired_from_nodeenis([&ne], "n1", 9001);
        assert_eq!(
            d[0].dpdk,
            Some(DpdkWant {
                driver: "vfio-pci".into(),
                resource_name: "intel.com/intel_sriov_netdevice".into(),
                pci_address: None,
            })
        );
    }

    fn bound_record(mac: &str, pci: &str, resource: &str) -> EniState {
        EniState {
            eni_id: "eni-2".into(),
            mac_address: mac.into(),
            device_index: 2,
            network_card_index: 0,
            node_eni: "ne".into(),
            interface_name: None,
            pci_address: Some(pci.into()),
            driver: Some("vfio-pci".into()),
            dpdk_bound: true,
            resource_name: Some(resource.into()),
        }
    }

    fn explicit(mut d: Desired, pci: &str) -> Desired {
        if let Some(w) = d.dpdk.as_mut() {
            w.pci_address = Some(pci.into());
        }
        d
    }

    fn with_pci(mut l: Link, pci: &str) -> Link {
        l.pci_address = Some(pci.into());
        l
    }

    fn problem(p: &EniPlan) -> &str {
        p.problem.as_deref().unwrap_or("")
    }

    #[test]
    fn explicit_address_is_accepted_only_for_the_device_behind_the_mac() {
        let mut obs = Observed {
            links: vec![with_pci(link(7, "ens7", M1), "0000:00:07.0")],
            ..Default::default()
        };
        obs.pci
            .insert("0000:00:07.0".into(), Ok(ena("0000:00:07.0", Some("ena"))));
        // The EBS root disk, one digit off the documented example.
        let mut ebs = ena("0000:00:04.0", Some("nvme"));
        ebs.device = 0x8061;
        ebs.class = 0x010802;
        obs.pci.insert("0000:00:04.0".into(), Ok(ebs));

        // Right address: bound.
        let p = plan(
            &[explicit(dpdk(want(M1, 2)), "0000:00:07.0")],
            &obs,
            Options::default(),
        );
        assert_eq!(p.enis[0].problem, None);
        assert_eq!(p.enis[0].actions.len(), 1);

        // Wrong address: neither device is touched, and the report names both.
        let p = plan(
            &[explicit(dpdk(want(M1, 2)), "0000:00:04.0")],
            &obs,
            Options::default(),
        );
        assert!(p.enis[0].actions.is_empty());
        let msg = problem(&p.enis[0]);
        assert!(
            msg.contains("0000:00:04.0") && msg.contains("0000:00:07.0"),
            "{msg}"
        );

        // Nothing shows which device the MAC has: not bound on the NodeENI's word.
        let p = plan(
            &[explicit(dpdk(want(M2, 3)), "0000:00:07.0")],
            &obs,
            Options::default(),
        );
        assert!(p.enis[0].actions.is_empty());
        assert!(problem(&p.enis[0]).contains("cannot verify"), "{p:?}");

        // Once bound, the state file is the evidence (the netdev is gone).
        let mut obs = Observed {
            previous: vec![bound_record(
                M1,
                "0000:00:07.0",
                "intel.com/intel_sriov_netdevice",
            )],
            ..Default::default()
        };
        obs.pci.insert(
            "0000:00:07.0".into(),
            Ok(ena("0000:00:07.0", Some("vfio-pci"))),
        );
        let p = plan(
            &[explicit(dpdk(want(M1, 2)), "0000:00:07.0")],
            &obs,
            Options::default(),
        );
        assert_eq!(p.enis[0].problem, None);
        assert!(p.enis[0].actions.is_empty());
        assert!(p.releases.is_empty());

        // A stale record: another ENI's netdev sits on that device now.
        obs.links = vec![with_pci(link(9, "ens9", M2), "0000:00:07.0")];
        obs.pci
            .insert("0000:00:07.0".into(), Ok(ena("0000:00:07.0", Some("ena"))));
        let p = plan(&[dpdk(want(M1, 2))], &obs, Options::default());
        assert!(p.enis[0].actions.is_empty(), "{p:?}");
        assert!(p.enis[0].problem.is_some());
    }

    #[test]
    fn a_device_claimed_twice_is_refused_naming_both_claimants() {
        // Multi-subnet NodeENI with one dpdkPCIAddress for both of its ENIs.
        let mut obs = Observed {
            links: vec![
                with_pci(link(7, "ens7", M1), "0000:00:07.0"),
                with_pci(link(8, "ens8", M2), "0000:00:08.0"),
            ],
            ..Default::default()
        };
        for a in ["0000:00:07.0", "0000:00:08.0"] {
            obs.pci.insert(a.into(), Ok(ena(a, Some("ena"))));
        }
        let mut a = explicit(dpdk(want(M1, 2)), "0000:00:07.0");
        a.eni_id = "eni-aaa".into();
        let mut b = explicit(dpdk(want(M2, 3)), "0000:00:07.0");
        b.eni_id = "eni-bbb".into();
        let p = plan(&[a, b], &obs, Options::default());
        for e in &p.enis {
            assert!(e.actions.is_empty(), "{e:?}");
            let msg = problem(e);
            assert!(
                msg.contains("eni-aaa") && msg.contains("eni-bbb") && msg.contains("claimed"),
                "{msg}"
            );
        }

        // Two NodeENIs with different resource names for one ENI; it was bound under
        // the first: it is neither advertised twice nor released, and both are told.
        let mut obs = Observed {
            previous: vec![bound_record(M1, "0000:00:07.0", "x.io/a")],
            ..Default::default()
        };
        obs.pci.insert(
            "0000:00:07.0".into(),
            Ok(ena("0000:00:07.0", Some("vfio-pci"))),
        );
        let mut a = dpdk(want(M1, 2));
        a.node_eni = "first".into();
        let mut b = dpdk(want(M1, 2));
        b.node_eni = "second".into();
        if let Some(w) = b.dpdk.as_mut() {
            w.resource_name = "x.io/b".into();
        }
        let p = plan(&[a, b], &obs, Options::default());
        assert!(p.releases.is_empty(), "{p:?}");
        for e in &p.enis {
            assert!(e.actions.is_empty());
            assert!(!e.wants_bound());
            let msg = problem(e);
            assert!(
                msg.contains("NodeENI first") && msg.contains("NodeENI second"),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_device_left_without_a_driver_is_given_back() {
        // Bound earlier, then the daemon crashed between unbind and probe.
        let mut obs = Observed {
            previous: vec![bound_record(
                M1,
                "0000:00:07.0",
                "intel.com/intel_sriov_netdevice",
            )],
            ..Default::default()
        };
        obs.pci
            .insert("0000:00:07.0".into(), Ok(ena("0000:00:07.0", None)));
        let p = plan(&[], &obs, Options::default());
        assert_eq!(p.releases.len(), 1);
        assert_eq!(p.releases[0].dpdk_driver, "vfio-pci");
        // Still wanted for DPDK: bound again instead.
        let p = plan(&[dpdk(want(M1, 2))], &obs, Options::default());
        assert!(p.releases.is_empty());
        assert_eq!(
            p.enis[0].actions,
            vec![Action::Bind {
                pci: "0000:00:07.0".into(),
                driver: "vfio-pci".into()
            }]
        );

        // Recorded just before a bind that never took, then DPDK turned off.
        let mut pre = bound_record(M1, "0000:00:07.0", "intel.com/intel_sriov_netdevice");
        pre.dpdk_bound = false;
        pre.driver = Some("ena".into());
        pre.interface_name = Some("ens7".into());
        obs.previous = vec![pre.clone()];
        let p = plan(&[want(M1, 2)], &obs, Options::default());
        assert_eq!(p.releases.len(), 1, "{p:?}");
        assert_eq!(p.releases[0].entry, pre);

        // A plain ENI's record whose device has no driver is not ours to probe.
        pre.resource_name = None;
        obs.previous = vec![pre];
        assert!(
            plan(&[want(M1, 2)], &obs, Options::default())
                .releases
                .is_empty()
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_link() -> impl Strategy<Value = Link> {
            (1u32..40, 0u8..12, 500u32..9100, any::<bool>(), 0u8..4).prop_map(
                |(index, m, mtu, up, alt)| Link {
                    index,
                    name: format!("if{index}"),
                    mac: format!("02:00:00:00:00:{m:02x}"),
                    mtu,
                    up,
                    alt_names: if alt == 0 {
                        vec![format!("eth{}", m % 4)]
                    } else {
                        vec![]
                    },
                    pci_address: None,
                },
            )
        }

        fn arb_desired() -> impl Strategy<Value = Desired> {
            (0u8..12, 0i32..6, 576u32..9002).prop_map(|(m, idx, mtu)| Desired {
                node_eni: "ne".into(),
                eni_id: format!("eni-{m}"),
                mac: format!("02:00:00:00:00:{m:02x}"),
                device_index: idx,
                network_card_index: 0,
                mtu,
                dpdk: None,
            })
        }

        proptest! {
            /// Whatever the node looks like, the plan only ever changes links whose MAC
            /// belongs to an attachment at a non-zero device index, never a link with a
            /// default route, and never adds an altname some other link already has.
            #[test]
            fn only_owned_links_are_touched(
                links in proptest::collection::vec(arb_link(), 0..12),
                desired in proptest::collection::vec(arb_desired(), 0..8),
                primary in proptest::collection::btree_set(1u32..40, 0..3),
                stable in any::<bool>(),
            ) {
                let obs = Observed { links: links.clone(), primary: primary.clone(), ..Default::default() };
                let p = plan(&desired, &obs, Options { stable_names: stable });
                prop_assert_eq!(p.enis.len(), desired.len());
                for e in &p.enis {
                    for a in &e.actions {
                        let index = match a {
                            Action::SetUp { index } | Action::SetMtu { index, .. } | Action::AddAltName { index, .. } => *index,
                            Action::Bind { .. } => { prop_assert!(false, "no DPDK here"); 0 }
                        };
                        prop_assert!(!primary.contains(&index));
                        prop_assert_ne!(e.desired.device_index, 0);
                        let link = e.link.as_ref().expect("acted on a link");
                        prop_assert_eq!(link.index, index);
                        prop_assert_eq!(&link.mac, &e.desired.mac);
                        if let Action::AddAltName { alt, .. } = a {
                            prop_assert!(!links.iter().any(|l| l.index != index && (&l.name == alt || l.alt_names.contains(alt))));
                        }
                    }
                }
            }

            #[test]
            fn mac_normalisation_is_idempotent(bytes in proptest::array::uniform6(any::<u8>())) {
                let upper = format_mac(&bytes).to_uppercase();
                let n = normalize_mac(&upper).expect("valid");
                let again = normalize_mac(&n);
                prop_assert_eq!(again.as_deref(), Some(n.as_str()));
                prop_assert_eq!(n, format_mac(&bytes));
            }
        }
    }
}
