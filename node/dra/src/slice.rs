//! Pure construction of this node's ResourceSlice from the device inventory, and the
//! plan that turns the slices the API server holds into the one we want.

use std::collections::BTreeMap;

use eni_deviceplugin::device::DeviceKind;
use eni_deviceplugin::snapshot::DeviceEntry;
use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use sha2::Digest as _;

/// Standard attribute: the device's PCI address.
pub const ATTR_PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";
/// Standard attribute: the PCIe root complex the device hangs off (`pci0000:00`).
pub const ATTR_PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
/// Multus: the device ID it puts in the delegate's config (the PCI address).
pub const ATTR_MULTUS_DEVICE_ID: &str = "k8s.cni.cncf.io/deviceID";
/// Multus: the resource name a NetworkAttachmentDefinition's
/// `k8s.v1.cni.cncf.io/resourceName` annotation names.
pub const ATTR_MULTUS_RESOURCE_NAME: &str = "k8s.cni.cncf.io/resourceName";

/// Our own attributes (in the driver's domain, written unqualified).
pub mod attr {
    /// ENI id (`eni-0123...`).
    pub const ENI_ID: &str = "eniID";
    /// MAC address, lower case.
    pub const MAC: &str = "macAddress";
    /// EC2 device index.
    pub const DEVICE_INDEX: &str = "deviceIndex";
    /// Subnet id.
    pub const SUBNET_ID: &str = "subnetID";
    /// VPC id (when known).
    pub const VPC_ID: &str = "vpcID";
    /// MTU.
    pub const MTU: &str = "mtu";
    /// Driver the device is bound to (`vfio-pci`, `ena`).
    pub const DRIVER: &str = "driver";
    /// `true` for DPDK (vfio-pci) devices.
    pub const DPDK: &str = "dpdk";
    /// The NodeENI the ENI belongs to.
    pub const NODE_ENI: &str = "nodeENI";
    /// NUMA node (when the host reports one).
    pub const NUMA_NODE: &str = "numaNode";
    /// The extended resource name the device belongs to.
    pub const RESOURCE_NAME: &str = "resourceName";
}

/// Longest string attribute value the API server accepts.
pub const MAX_STRING_ATTRIBUTE: usize = 64;

/// Most devices one ResourceSlice may hold.
pub const MAX_DEVICES_PER_SLICE: usize = 128;

/// Label on our slices with the (hashed) node name, for humans and selectors.
pub const LABEL_NODE: &str = "eni.networking.k8s.aws/node";

/// The device's name in the slice: the ENI id when it is a valid DNS label (it always is
/// for EC2's `eni-<hex>`), else `pci-` and the PCI address with `:` and `.` as `-`.
pub fn device_name(eni_id: &str, pci_address: &str) -> String {
    if is_dns_label(eni_id) {
        return eni_id.to_owned();
    }
    let pci: String = pci_address
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    format!("pci-{pci}")
}

/// RFC 1123 label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The PCIe root of `pci_address` when sysfs does not say (fake trees): the root bus of
/// its domain and bus, `pci<domain>:<bus>` (right for devices on a root bus, as ENIs are).
pub fn pcie_root_from_address(pci_address: &str) -> Option<String> {
    let mut parts = pci_address.split(':');
    let (domain, bus) = (parts.next()?, parts.next()?);
    (domain.len() == 4 && bus.len() == 2).then(|| format!("pci{domain}:{bus}"))
}

fn string(v: impl Into<String>) -> Option<DeviceAttribute> {
    let v = v.into();
    (v.len() <= MAX_STRING_ATTRIBUTE).then(|| DeviceAttribute {
        string: Some(v),
        ..Default::default()
    })
}

fn int(v: i64) -> Option<DeviceAttribute> {
    Some(DeviceAttribute {
        int: Some(v),
        ..Default::default()
    })
}

fn boolean(v: bool) -> Option<DeviceAttribute> {
    Some(DeviceAttribute {
        bool: Some(v),
        ..Default::default()
    })
}

/// The slice's device for one inventory entry. `pcie_root` is what sysfs says (the
/// address-derived root is used otherwise). A string attribute longer than the API
/// server's limit is left out (a NodeENI name may be longer).
pub fn device(entry: &DeviceEntry, pcie_root: Option<&str>) -> Device {
    let d = &entry.device;
    let root = pcie_root
        .map(str::to_owned)
        .or_else(|| pcie_root_from_address(&d.pci_address));
    let mut attrs: Vec<(&str, Option<DeviceAttribute>)> = vec![
        (ATTR_PCI_BUS_ID, string(&d.pci_address)),
        (ATTR_MULTUS_DEVICE_ID, string(&d.pci_address)),
        (ATTR_MULTUS_RESOURCE_NAME, string(&d.resource_name)),
        (attr::RESOURCE_NAME, string(&d.resource_name)),
        (attr::ENI_ID, string(&d.eni_id)),
        (attr::MAC, string(d.mac_address.to_ascii_lowercase())),
        (attr::DEVICE_INDEX, int(i64::from(d.device_index))),
        (attr::DRIVER, string(&d.driver)),
        (attr::DPDK, boolean(entry.kind == DeviceKind::Vfio)),
    ];
    if let Some(root) = root {
        attrs.push((ATTR_PCIE_ROOT, string(root)));
    }
    if let Some(n) = entry.facts.numa_node {
        attrs.push((attr::NUMA_NODE, int(n)));
    }
    let x = &d.details;
    if !x.node_eni.is_empty() {
        attrs.push((attr::NODE_ENI, string(&x.node_eni)));
    }
    if let Some(s) = &x.subnet_id {
        attrs.push((attr::SUBNET_ID, string(s)));
    }
    if let Some(v) = &x.vpc_id {
        attrs.push((attr::VPC_ID, string(v)));
    }
    if let Some(m) = x.mtu {
        attrs.push((attr::MTU, int(i64::from(m))));
    }
    let attributes: BTreeMap<String, DeviceAttribute> = attrs
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), v?)))
        .collect();
    Device {
        name: device_name(&d.eni_id, &d.pci_address),
        attributes: Some(attributes),
        ..Default::default()
    }
}

/// The devices to publish: healthy entries only (an unhealthy or departing ENI is taken
/// out of the slice, so the scheduler allocates it to no new claim), sorted by name,
/// duplicates by name dropped, at most [`MAX_DEVICES_PER_SLICE`].
pub fn devices<'a>(
    entries: impl IntoIterator<Item = &'a DeviceEntry>,
    pcie_root: impl Fn(&str) -> Option<String>,
) -> Vec<Device> {
    let mut by_name: BTreeMap<String, Device> = BTreeMap::new();
    for e in entries.into_iter().filter(|e| e.health.is_healthy()) {
        let dev = device(e, pcie_root(&e.device.pci_address).as_deref());
        by_name.entry(dev.name.clone()).or_insert(dev);
    }
    by_name.into_values().take(MAX_DEVICES_PER_SLICE).collect()
}

/// Name of this node's slice for `driver`: `<node>-<driver>` (a DNS subdomain), or,
/// when that is too long, the node name's first 180 characters and a hash.
pub fn slice_name(node: &str, driver: &str) -> String {
    let name = format!("{node}-{driver}");
    if name.len() <= 253 {
        return name;
    }
    let hash = hex::encode(&sha2::Sha256::digest(name.as_bytes())[..8]);
    let head: String = node.chars().take(180).collect();
    format!("{}-{hash}", head.trim_end_matches(['-', '.']))
}

/// Who owns a slice: the Node, so the slices go with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeOwner {
    /// Node name.
    pub name: String,
    /// Node UID.
    pub uid: String,
}

/// This node's slice: one pool named after the node, one slice in it.
pub fn slice(
    driver: &str,
    node: &str,
    owner: Option<&NodeOwner>,
    generation: i64,
    devices: Vec<Device>,
) -> ResourceSlice {
    ResourceSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(node, driver)),
            owner_references: owner.map(|o| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: o.name.clone(),
                    uid: o.uid.clone(),
                    controller: Some(true),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: ResourceSliceSpec {
            driver: driver.to_owned(),
            node_name: Some(node.to_owned()),
            pool: ResourcePool {
                name: node.to_owned(),
                generation,
                resource_slice_count: 1,
            },
            devices: Some(devices),
            ..Default::default()
        },
    }
}

/// What to do to make the API server hold exactly the slice we want.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlicePlan {
    /// Create this slice (ours does not exist).
    pub create: Option<ResourceSlice>,
    /// Replace ours with this one (carries the resourceVersion it read).
    pub replace: Option<ResourceSlice>,
    /// Delete these other slices of the driver on this node (older layouts, leftovers).
    pub delete: Vec<String>,
}

impl SlicePlan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.create.is_none() && self.replace.is_none() && self.delete.is_empty()
    }
}

/// Plans the writes from the driver's slices on this node (`existing`) to one slice
/// holding `want`. Any change publishes a pool generation above every existing one, so
/// consumers never mix an old slice with the new one; an up-to-date slice is left alone.
pub fn plan(
    existing: &[ResourceSlice],
    driver: &str,
    node: &str,
    owner: Option<&NodeOwner>,
    want: &[Device],
) -> SlicePlan {
    let name = slice_name(node, driver);
    let max_generation = existing
        .iter()
        .map(|s| s.spec.pool.generation)
        .max()
        .unwrap_or(0);
    let ours = existing
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name.as_str()));
    let delete: Vec<String> = existing
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .filter(|n| *n != name)
        .collect();
    let up_to_date = ours.is_some_and(|s| {
        s.spec.pool.generation == max_generation
            && s.spec.pool.name == node
            && s.spec.pool.resource_slice_count == 1
            && s.spec.node_name.as_deref() == Some(node)
            && s.spec.devices.as_deref().unwrap_or_default() == want
            && (owner.is_none()
                || s.metadata.owner_references
                    == slice(driver, node, owner, 0, Vec::new())
                        .metadata
                        .owner_references)
    });
    if up_to_date && delete.is_empty() {
        return SlicePlan::default();
    }
    let generation = if up_to_date {
        max_generation
    } else {
        max_generation + 1
    };
    let mut next = slice(driver, node, owner, generation, want.to_vec());
    let mut plan = SlicePlan {
        delete,
        ..SlicePlan::default()
    };
    match ours {
        Some(_) if up_to_date => {}
        Some(cur) => {
            next.metadata
                .resource_version
                .clone_from(&cur.metadata.resource_version);
            plan.replace = Some(next);
        }
        None => plan.create = Some(next),
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use eni_deviceplugin::device::DeviceFacts;
    use eni_deviceplugin::{BoundDevice, EniDetails};

    fn entry(pci: &str, eni: &str, healthy: bool) -> DeviceEntry {
        let device = BoundDevice {
            pci_address: pci.into(),
            resource_name: "intel.com/intel_sriov_netdevice".into(),
            driver: "vfio-pci".into(),
            eni_id: eni.into(),
            mac_address: "02:AB:00:00:00:01".into(),
            device_index: 2,
            releasing: !healthy,
            details: EniDetails {
                node_eni: "dpdk".into(),
                subnet_id: Some("subnet-1".into()),
                vpc_id: None,
                mtu: Some(9001),
                ips: vec!["10.0.1.5/24".into()],
            },
        };
        let facts = DeviceFacts {
            present: true,
            driver: Some("vfio-pci".into()),
            iommu_group: Some("7".into()),
            noiommu: true,
            numa_node: Some(1),
            group_device_present: true,
            vfio_container_present: true,
        };
        let e = DeviceEntry::new(device, facts);
        assert_eq!(e.health.is_healthy(), healthy, "{:?}", e.health);
        e
    }

    fn s(a: &DeviceAttribute) -> &str {
        a.string.as_deref().unwrap_or_default()
    }

    #[test]
    fn names() {
        assert_eq!(device_name("eni-0123abcd", "0000:00:07.0"), "eni-0123abcd");
        assert_eq!(device_name("ENI_X", "0000:00:07.0"), "pci-0000-00-07-0");
        assert!(is_dns_label("pci-0000-00-07-0"));
        assert!(!is_dns_label("-a") && !is_dns_label("") && !is_dns_label(&"a".repeat(64)));
        assert_eq!(
            pcie_root_from_address("0000:00:07.0").as_deref(),
            Some("pci0000:00")
        );
        assert_eq!(pcie_root_from_address("junk"), None);
        assert_eq!(
            slice_name("n1", "eni.networking.k8s.aws"),
            "n1-eni.networking.k8s.aws"
        );
        let long = slice_name(&"n".repeat(250), "eni.networking.k8s.aws");
        assert!(long.len() <= 253, "{}", long.len());
    }

    #[test]
    fn device_attributes() {
        let d = device(&entry("0000:00:07.0", "eni-1", true), None);
        assert_eq!(d.name, "eni-1");
        let a = d.attributes.expect("attributes");
        assert_eq!(s(&a[ATTR_PCI_BUS_ID]), "0000:00:07.0");
        assert_eq!(s(&a[ATTR_PCIE_ROOT]), "pci0000:00");
        assert_eq!(s(&a[ATTR_MULTUS_DEVICE_ID]), "0000:00:07.0");
        assert_eq!(
            s(&a[ATTR_MULTUS_RESOURCE_NAME]),
            "intel.com/intel_sriov_netdevice"
        );
        assert_eq!(s(&a[attr::ENI_ID]), "eni-1");
        assert_eq!(s(&a[attr::MAC]), "02:ab:00:00:00:01");
        assert_eq!(a[attr::DEVICE_INDEX].int, Some(2));
        assert_eq!(a[attr::NUMA_NODE].int, Some(1));
        assert_eq!(a[attr::MTU].int, Some(9001));
        assert_eq!(a[attr::DPDK].bool, Some(true));
        assert_eq!(s(&a[attr::DRIVER]), "vfio-pci");
        assert_eq!(s(&a[attr::SUBNET_ID]), "subnet-1");
        assert_eq!(s(&a[attr::NODE_ENI]), "dpdk");
        assert!(!a.contains_key(attr::VPC_ID));
        assert!(a.len() <= 32);
        let with_root = device(&entry("0000:00:07.0", "eni-1", true), Some("pci0000:10"));
        assert_eq!(
            s(&with_root.attributes.expect("a")[ATTR_PCIE_ROOT]),
            "pci0000:10"
        );
        let mut long = entry("0000:00:07.0", "eni-1", true);
        long.device.details.node_eni = "x".repeat(65);
        let a = device(&long, None).attributes.expect("a");
        assert!(
            !a.contains_key(attr::NODE_ENI),
            "too long for the API server"
        );
    }

    #[test]
    fn only_healthy_devices_sorted() {
        let es = [
            entry("0000:00:08.0", "eni-b", true),
            entry("0000:00:07.0", "eni-a", true),
            entry("0000:00:09.0", "eni-c", false),
        ];
        let ds = devices(&es, |_| None);
        let names: Vec<&str> = ds.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["eni-a", "eni-b"]);
    }

    fn existing(name: &str, generation: i64, devices: Vec<Device>) -> ResourceSlice {
        let mut s = slice("d.example.com", "n1", None, generation, devices);
        s.metadata.name = Some(name.into());
        s.metadata.resource_version = Some("7".into());
        s
    }

    #[test]
    fn plan_creates_bumps_and_leaves_alone() {
        let want = devices(&[entry("0000:00:07.0", "eni-a", true)], |_| None);
        let name = slice_name("n1", "d.example.com");
        // Nothing there: create at generation 1.
        let p = plan(&[], "d.example.com", "n1", None, &want);
        let c = p.create.expect("create");
        assert_eq!(c.spec.pool.generation, 1);
        assert_eq!(c.spec.pool.name, "n1");
        assert_eq!(c.spec.node_name.as_deref(), Some("n1"));
        assert!(p.replace.is_none() && p.delete.is_empty());
        // Up to date: nothing.
        let cur = existing(&name, 3, want.clone());
        assert!(
            plan(
                std::slice::from_ref(&cur),
                "d.example.com",
                "n1",
                None,
                &want
            )
            .is_empty()
        );
        // Changed devices: replace with the next generation and the resourceVersion read.
        let p = plan(std::slice::from_ref(&cur), "d.example.com", "n1", None, &[]);
        let r = p.replace.expect("replace");
        assert_eq!(r.spec.pool.generation, 4);
        assert_eq!(r.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(r.spec.devices, Some(vec![]));
        // A leftover slice with a higher generation: ours goes above it, the leftover goes.
        let old = existing("leftover", 9, Vec::new());
        let p = plan(&[cur, old], "d.example.com", "n1", None, &want);
        assert_eq!(p.replace.expect("replace").spec.pool.generation, 10);
        assert_eq!(p.delete, ["leftover"]);
        // An owner appears: replaced.
        let owner = NodeOwner {
            name: "n1".into(),
            uid: "u1".into(),
        };
        let cur = existing(&name, 3, want.clone());
        let p = plan(&[cur], "d.example.com", "n1", Some(&owner), &want);
        let r = p.replace.expect("replace");
        assert_eq!(r.metadata.owner_references.expect("owner")[0].uid, "u1");
    }
}
