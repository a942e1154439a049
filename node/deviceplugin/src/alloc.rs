//! Pure functions behind `Allocate` and `GetPreferredAllocation`.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use eni_proto::deviceplugin::v1beta1 as api;

use crate::device::DeviceKind;
use crate::snapshot::{DeviceEntry, Snapshot};

/// Host and container path of the VFIO container device.
pub const VFIO_CONTAINER_DEVICE: &str = "/dev/vfio/vfio";

/// Why an allocation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// The container request named no device.
    #[error("allocate for resource {resource}: no device ID in the request")]
    Empty {
        /// Resource name.
        resource: String,
    },
    /// The device is not (or no longer) advertised under this resource.
    #[error(
        "allocate for resource {resource}: unknown device ID {id:?} (not advertised by this plugin)"
    )]
    Unknown {
        /// Resource name.
        resource: String,
        /// Requested ID.
        id: String,
    },
    /// The device is advertised but unhealthy.
    #[error("allocate for resource {resource}: device {id} is Unhealthy: {reason}")]
    Unhealthy {
        /// Resource name.
        resource: String,
        /// Requested ID.
        id: String,
        /// Why.
        reason: String,
    },
    /// The same ID twice in one container request.
    #[error("allocate for resource {resource}: device {id} requested twice")]
    Duplicate {
        /// Resource name.
        resource: String,
        /// Requested ID.
        id: String,
    },
}

impl From<AllocError> for tonic::Status {
    fn from(e: AllocError) -> Self {
        match e {
            AllocError::Unhealthy { .. } => tonic::Status::failed_precondition(e.to_string()),
            _ => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}

/// `PCIDEVICE_<RESOURCE>`: upper case, `.` and `/` replaced by `_` (the SR-IOV network
/// device plugin's convention).
pub fn env_name(resource: &str) -> String {
    let mut s = String::from("PCIDEVICE_");
    s.extend(resource.chars().map(|c| match c {
        '.' | '/' => '_',
        c => c.to_ascii_uppercase(),
    }));
    s
}

/// Multus device-info file name: `<resource with / as ->-<pci>-device.json`.
pub fn devinfo_file_name(resource: &str, pci_address: &str) -> String {
    format!("{}-{pci_address}-device.json", resource.replace('/', "-"))
}

/// Multus device-info (spec 1.1.0) for a PCI device.
pub fn devinfo_json(pci_address: &str) -> String {
    serde_json::json!({
        "type": "pci",
        "version": "1.1.0",
        "pci": { "pci-address": pci_address },
    })
    .to_string()
}

/// Looks up every requested ID; refuses unknown, unhealthy and repeated IDs.
pub fn resolve<'a>(
    snapshot: &'a Snapshot,
    resource: &str,
    ids: &[String],
) -> Result<Vec<&'a DeviceEntry>, AllocError> {
    if ids.is_empty() {
        return Err(AllocError::Empty {
            resource: resource.to_owned(),
        });
    }
    let mut seen = HashSet::new();
    ids.iter()
        .map(|id| {
            if !seen.insert(id.as_str()) {
                return Err(AllocError::Duplicate {
                    resource: resource.to_owned(),
                    id: id.clone(),
                });
            }
            let entry = snapshot
                .devices
                .get(id)
                .ok_or_else(|| AllocError::Unknown {
                    resource: resource.to_owned(),
                    id: id.clone(),
                })?;
            match &entry.health {
                crate::device::Health::Healthy => Ok(entry),
                crate::device::Health::Unhealthy(reason) => Err(AllocError::Unhealthy {
                    resource: resource.to_owned(),
                    id: id.clone(),
                    reason: reason.clone(),
                }),
            }
        })
        .collect()
}

/// The container's share of an `AllocateResponse` for already resolved devices:
/// `/dev/vfio/vfio` and each distinct group device (VFIO devices only), env
/// `PCIDEVICE_<RESOURCE>` (comma-joined IDs in request order) and
/// `PCIDEVICE_<RESOURCE>_INFO` (JSON per ID).
pub fn container_response(
    resource: &str,
    entries: &[&DeviceEntry],
) -> api::ContainerAllocateResponse {
    let mut devices = Vec::new();
    let mut groups = BTreeSet::new();
    let mut info = serde_json::Map::new();
    for e in entries {
        let pci = &e.device.pci_address;
        let mut dev_info = serde_json::Map::new();
        dev_info.insert("generic".into(), serde_json::json!({ "deviceID": pci }));
        if e.kind == DeviceKind::Vfio {
            if devices.is_empty() {
                devices.push(api::DeviceSpec {
                    container_path: VFIO_CONTAINER_DEVICE.into(),
                    host_path: VFIO_CONTAINER_DEVICE.into(),
                    permissions: "mrw".into(),
                });
            }
            if let Some(g) = e.facts.vfio_group() {
                dev_info.insert(
                    "vfio".into(),
                    serde_json::json!({ "mount": VFIO_CONTAINER_DEVICE, "dev-mount": g.container_path }),
                );
                if groups.insert(g.host_path.clone()) {
                    devices.push(api::DeviceSpec {
                        container_path: g.container_path,
                        host_path: g.host_path,
                        permissions: "mrw".into(),
                    });
                }
            }
        }
        info.insert(pci.clone(), serde_json::Value::Object(dev_info));
    }
    let name = env_name(resource);
    let ids: Vec<&str> = entries
        .iter()
        .map(|e| e.device.pci_address.as_str())
        .collect();
    let envs = [
        (
            format!("{name}_INFO"),
            serde_json::Value::Object(info).to_string(),
        ),
        (name, ids.join(",")),
    ]
    .into_iter()
    .collect();
    api::ContainerAllocateResponse {
        envs,
        devices,
        ..Default::default()
    }
}

/// NUMA-aware preferred allocation for one container.
///
/// Every must-include ID comes first. The rest is filled from the available IDs, trying
/// to stay on one NUMA node: the node of the must-include devices if it can fill the
/// request, otherwise the node that fits the request most tightly (keeping larger nodes
/// free for larger requests); when no single node can, nodes are used largest first.
/// Devices without NUMA information form their own group, picked last on ties. Within a
/// node, IDs are taken in sorted order, so the answer is deterministic.
pub fn preferred_allocation(
    available: &[String],
    must_include: &[String],
    size: usize,
    numa_of: impl Fn(&str) -> Option<i64>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(size);
    for id in must_include {
        if !out.contains(id) {
            out.push(id.clone());
        }
    }
    if out.len() >= size {
        return out;
    }
    let mut need = size - out.len();
    let mut groups: BTreeMap<Option<i64>, BTreeSet<&String>> = BTreeMap::new();
    for id in available {
        if !out.contains(id) {
            groups.entry(numa_of(id)).or_default().insert(id);
        }
    }
    // The NUMA node most of the must-include devices sit on.
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for id in must_include {
        if let Some(n) = numa_of(id) {
            *counts.entry(n).or_default() += 1;
        }
    }
    let must_node = counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(n, _)| *n);

    // Rank: prefer the must-include node, then nodes that can hold the rest alone
    // (smallest first), then larger nodes; unknown NUMA last.
    let mut order: Vec<(Option<i64>, usize)> = groups.iter().map(|(k, v)| (*k, v.len())).collect();
    order.sort_by(|a, b| {
        let key = |(node, len): &(Option<i64>, usize)| {
            let preferred = must_node.is_some() && *node == must_node && *len >= need;
            let fits = *len >= need;
            (
                !preferred,
                !fits,
                if fits { *len } else { usize::MAX - *len },
                node.is_none(),
                *node,
            )
        };
        key(a).cmp(&key(b))
    });
    for (node, _) in order {
        if need == 0 {
            break;
        }
        if let Some(ids) = groups.get(&node) {
            for id in ids.iter().take(need) {
                out.push((*id).clone());
            }
            need = need.saturating_sub(ids.len());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoundDevice;
    use crate::device::{DeviceFacts, Health};

    const RES: &str = "intel.com/intel_sriov_netdevice";

    fn entry(pci: &str, group: &str, noiommu: bool, healthy: bool) -> DeviceEntry {
        let facts = DeviceFacts {
            present: true,
            driver: Some(if healthy { "vfio-pci" } else { "ena" }.into()),
            iommu_group: Some(group.into()),
            noiommu,
            numa_node: Some(0),
            group_device_present: true,
            vfio_container_present: true,
        };
        DeviceEntry::new(
            BoundDevice {
                pci_address: pci.into(),
                resource_name: RES.into(),
                driver: "vfio-pci".into(),
                eni_id: format!("eni-{group}"),
                mac_address: "02:00:00:00:00:01".into(),
                device_index: 1,
                releasing: false,
                details: Default::default(),
            },
            facts,
        )
    }

    fn snap(entries: Vec<DeviceEntry>) -> Snapshot {
        Snapshot {
            devices: entries
                .into_iter()
                .map(|e| (e.device.pci_address.clone(), e))
                .collect(),
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn env_name_convention() {
        assert_eq!(env_name(RES), "PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE");
        assert_eq!(
            env_name("aws.amazon.com/dpdk"),
            "PCIDEVICE_AWS_AMAZON_COM_DPDK"
        );
    }

    #[test]
    fn devinfo_convention() -> Result<(), serde_json::Error> {
        assert_eq!(
            devinfo_file_name(RES, "0000:00:07.0"),
            "intel.com-intel_sriov_netdevice-0000:00:07.0-device.json"
        );
        let v: serde_json::Value = serde_json::from_str(&devinfo_json("0000:00:07.0"))?;
        assert_eq!(
            v,
            serde_json::json!({"type":"pci","version":"1.1.0","pci":{"pci-address":"0000:00:07.0"}})
        );
        Ok(())
    }

    #[test]
    fn allocate_one_noiommu() -> Result<(), Box<dyn std::error::Error>> {
        let s = snap(vec![entry("0000:00:07.0", "0", true, true)]);
        let got = resolve(&s, RES, &ids(&["0000:00:07.0"]))?;
        let r = container_response(RES, &got);
        assert_eq!(
            r.devices,
            vec![
                api::DeviceSpec {
                    container_path: "/dev/vfio/vfio".into(),
                    host_path: "/dev/vfio/vfio".into(),
                    permissions: "mrw".into()
                },
                api::DeviceSpec {
                    container_path: "/dev/vfio/0".into(),
                    host_path: "/dev/vfio/noiommu-0".into(),
                    permissions: "mrw".into()
                },
            ]
        );
        assert_eq!(
            r.envs["PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE"],
            "0000:00:07.0"
        );
        let info: serde_json::Value =
            serde_json::from_str(&r.envs["PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE_INFO"])?;
        assert_eq!(
            info,
            serde_json::json!({"0000:00:07.0":{"generic":{"deviceID":"0000:00:07.0"},
                "vfio":{"mount":"/dev/vfio/vfio","dev-mount":"/dev/vfio/0"}}})
        );
        Ok(())
    }

    #[test]
    fn allocate_several_with_iommu() -> Result<(), AllocError> {
        let s = snap(vec![
            entry("0000:00:07.0", "3", false, true),
            entry("0000:00:08.0", "4", false, true),
            entry("0000:00:09.0", "4", false, true),
        ]);
        let got = resolve(
            &s,
            RES,
            &ids(&["0000:00:09.0", "0000:00:07.0", "0000:00:08.0"]),
        )?;
        let r = container_response(RES, &got);
        let paths: Vec<(&str, &str)> = r
            .devices
            .iter()
            .map(|d| (d.host_path.as_str(), d.container_path.as_str()))
            .collect();
        assert_eq!(
            paths,
            vec![
                ("/dev/vfio/vfio", "/dev/vfio/vfio"),
                ("/dev/vfio/4", "/dev/vfio/4"),
                ("/dev/vfio/3", "/dev/vfio/3"),
            ]
        );
        assert_eq!(
            r.envs["PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE"],
            "0000:00:09.0,0000:00:07.0,0000:00:08.0"
        );
        Ok(())
    }

    #[test]
    fn unknown_unhealthy_duplicate_empty_refused() {
        let s = snap(vec![
            entry("0000:00:07.0", "0", true, true),
            entry("0000:00:08.0", "1", true, false),
        ]);
        let e = resolve(&s, RES, &ids(&["0000:00:07.0", "0000:00:99.0"])).err();
        assert!(matches!(e, Some(AllocError::Unknown { ref id, .. }) if id == "0000:00:99.0"));
        let e = resolve(&s, RES, &ids(&["0000:00:08.0"])).err();
        assert!(
            matches!(e, Some(AllocError::Unhealthy { ref reason, .. }) if reason.contains("ena"))
        );
        let e = resolve(&s, RES, &ids(&["0000:00:07.0", "0000:00:07.0"])).err();
        assert!(matches!(e, Some(AllocError::Duplicate { .. })));
        assert!(matches!(
            resolve(&s, RES, &[]),
            Err(AllocError::Empty { .. })
        ));
        let status = tonic::Status::from(AllocError::Unknown {
            resource: RES.into(),
            id: "x".into(),
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("unknown device ID \"x\""));
    }

    #[test]
    fn netdev_allocation_has_no_device_specs() {
        let mut e = entry("0000:00:06.0", "0", false, true);
        e.kind = DeviceKind::Netdev;
        let r = container_response("aws.amazon.com/eni", &[&e]);
        assert!(r.devices.is_empty());
        assert_eq!(r.envs["PCIDEVICE_AWS_AMAZON_COM_ENI"], "0000:00:06.0");
        assert!(!r.envs["PCIDEVICE_AWS_AMAZON_COM_ENI_INFO"].contains("vfio"));
        let _ = Health::Healthy;
    }

    fn numa(id: &str) -> Option<i64> {
        match id.as_bytes().first() {
            Some(b'a') => Some(0),
            Some(b'b') => Some(1),
            _ => None,
        }
    }

    #[test]
    fn preferred_stays_on_one_node() {
        let avail = ids(&["a1", "b1", "a2", "b2", "b3"]);
        // Two fit on both nodes; node 0 has exactly two: tightest fit.
        assert_eq!(
            preferred_allocation(&avail, &[], 2, numa),
            ids(&["a1", "a2"])
        );
        // Three only fit on node 1.
        assert_eq!(
            preferred_allocation(&avail, &[], 3, numa),
            ids(&["b1", "b2", "b3"])
        );
    }

    #[test]
    fn preferred_honours_must_include_and_its_node() {
        let avail = ids(&["a1", "b1", "a2", "b2", "b3"]);
        assert_eq!(
            preferred_allocation(&avail, &ids(&["b2"]), 2, numa),
            ids(&["b2", "b1"])
        );
        // Must-include larger than size: returned as is.
        assert_eq!(
            preferred_allocation(&avail, &ids(&["a1", "b1"]), 1, numa),
            ids(&["a1", "b1"])
        );
    }

    #[test]
    fn preferred_spans_nodes_when_needed() {
        let avail = ids(&["a1", "b1", "a2", "b2", "b3", "x1"]);
        let got = preferred_allocation(&avail, &[], 5, numa);
        assert_eq!(got, ids(&["b1", "b2", "b3", "a1", "a2"]));
        let got = preferred_allocation(&avail, &[], 9, numa);
        assert_eq!(got.len(), 6);
    }
}
