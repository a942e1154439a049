//! CDI (Container Device Interface) spec files for prepared claims: the same device
//! nodes, `PCIDEVICE_*` environment and Multus device-info the device plugin's
//! `Allocate` gives, so a DPDK application sees no difference between the two paths.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use eni_deviceplugin::alloc;
use eni_deviceplugin::snapshot::DeviceEntry;
use serde::{Deserialize, Serialize};

/// CDI spec version written (device nodes with `hostPath` need 0.5.0 or later).
pub const CDI_VERSION: &str = "0.6.0";

/// CDI class of our devices (the vendor is the driver name).
pub const CDI_CLASS: &str = "eni";

/// Default directory of CDI spec files the container runtime reads.
pub const DEFAULT_CDI_DIR: &str = "/var/run/cdi";

/// A CDI spec file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// CDI version.
    pub cdi_version: String,
    /// `vendor/class`.
    pub kind: String,
    /// The devices (one per allocated ENI, named by its PCI address).
    pub devices: Vec<SpecDevice>,
    /// Edits applied when any of the spec's devices is injected.
    pub container_edits: ContainerEdits,
}

/// One CDI device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecDevice {
    /// Device name (the PCI address: Multus takes the text after `=` of the CDI ID as
    /// the device ID).
    pub name: String,
    /// Edits for this device.
    pub container_edits: ContainerEdits,
}

/// CDI container edits (the subset we use).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    /// `NAME=value` entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Device nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
}

/// A device node to create in the container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    /// Path in the container.
    pub path: String,
    /// Path on the host, when it differs (`/dev/vfio/noiommu-<n>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// cgroup permissions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
}

/// `vendor/class` of the driver's devices.
pub fn kind(driver: &str) -> String {
    format!("{driver}/{CDI_CLASS}")
}

/// Fully qualified CDI device ID (`vendor/class=name`).
pub fn device_id(driver: &str, pci_address: &str) -> String {
    format!("{}={pci_address}", kind(driver))
}

/// File name of a claim's spec: `<driver>-<claim uid>.json` (one file per claim, so
/// unprepare removes exactly what prepare wrote).
pub fn spec_file_name(driver: &str, claim_uid: &str) -> String {
    format!("{driver}-{claim_uid}.json")
}

/// The spec of one claim's devices. Environment per resource as the device plugin sets
/// it (`PCIDEVICE_<RESOURCE>` with the comma-joined PCI addresses in allocation order,
/// `PCIDEVICE_<RESOURCE>_INFO`), `/dev/vfio/vfio` once, and each device's VFIO group
/// device (host `/dev/vfio/noiommu-<n>` in no-IOMMU mode, `/dev/vfio/<n>` inside).
pub fn spec(driver: &str, entries: &[&DeviceEntry]) -> Spec {
    let mut by_resource: BTreeMap<&str, Vec<&DeviceEntry>> = BTreeMap::new();
    for e in entries {
        by_resource
            .entry(e.device.resource_name.as_str())
            .or_default()
            .push(e);
    }
    let mut edits = ContainerEdits::default();
    let mut group_nodes: BTreeMap<String, DeviceNode> = BTreeMap::new();
    for (resource, es) in &by_resource {
        let r = alloc::container_response(resource, es);
        let env: BTreeMap<_, _> = r.envs.into_iter().collect();
        edits
            .env
            .extend(env.into_iter().map(|(k, v)| format!("{k}={v}")));
        for d in r.devices {
            let node = DeviceNode {
                host_path: (d.host_path != d.container_path).then_some(d.host_path),
                path: d.container_path,
                permissions: Some("rw".into()),
            };
            if node.path == alloc::VFIO_CONTAINER_DEVICE {
                if !edits.device_nodes.contains(&node) {
                    edits.device_nodes.push(node);
                }
            } else {
                group_nodes.insert(node.path.clone(), node);
            }
        }
    }
    let devices = entries
        .iter()
        .map(|e| {
            let group = e
                .facts
                .vfio_group()
                .filter(|_| e.kind == eni_deviceplugin::device::DeviceKind::Vfio)
                .and_then(|g| group_nodes.get(&g.container_path).cloned());
            SpecDevice {
                name: e.device.pci_address.clone(),
                container_edits: ContainerEdits {
                    device_nodes: group.into_iter().collect(),
                    ..ContainerEdits::default()
                },
            }
        })
        .collect();
    Spec {
        cdi_version: CDI_VERSION.into(),
        kind: kind(driver),
        devices,
        container_edits: edits,
    }
}

/// Writes `spec` as `dir/name` atomically (temp file, then rename).
///
/// # Errors
/// I/O errors.
pub fn write(dir: &Path, name: &str, spec: &Spec) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let body = serde_json::to_vec_pretty(spec).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Removes `dir/name`; a missing file is fine.
///
/// # Errors
/// I/O errors other than not found.
pub fn remove(dir: &Path, name: &str) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(name)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eni_deviceplugin::BoundDevice;
    use eni_deviceplugin::device::DeviceFacts;

    fn entry(pci: &str, group: &str) -> DeviceEntry {
        DeviceEntry::new(
            BoundDevice {
                pci_address: pci.into(),
                resource_name: "intel.com/intel_sriov_netdevice".into(),
                driver: "vfio-pci".into(),
                eni_id: "eni-1".into(),
                mac_address: "02:00:00:00:00:01".into(),
                device_index: 2,
                releasing: false,
                details: Default::default(),
            },
            DeviceFacts {
                present: true,
                driver: Some("vfio-pci".into()),
                iommu_group: Some(group.into()),
                noiommu: true,
                numa_node: None,
                group_device_present: true,
                vfio_container_present: true,
            },
        )
    }

    #[test]
    fn netdev_eni_gets_env_and_no_device_node() {
        let mut e = entry("0000:00:09.0", "9");
        e.device.driver = "ena".into();
        e.device.resource_name = "networking.k8s.aws/eni".into();
        e.facts.driver = Some("ena".into());
        e.facts.iommu_group = None;
        e.facts.group_device_present = false;
        let e = DeviceEntry::new(e.device, e.facts);
        assert!(e.health.is_healthy(), "{:?}", e.health);
        let s = spec("eni.networking.k8s.aws", &[&e]);
        assert!(s.container_edits.device_nodes.is_empty(), "{s:?}");
        assert!(s.devices[0].container_edits.device_nodes.is_empty());
        assert_eq!(s.devices[0].name, "0000:00:09.0");
        assert_eq!(
            s.container_edits.env[0],
            "PCIDEVICE_NETWORKING_K8S_AWS_ENI=0000:00:09.0"
        );
    }

    #[test]
    fn spec_matches_the_device_plugin() {
        let (a, b) = (entry("0000:00:07.0", "3"), entry("0000:00:08.0", "4"));
        let s = spec("eni.networking.k8s.aws", &[&a, &b]);
        assert_eq!(s.kind, "eni.networking.k8s.aws/eni");
        assert_eq!(
            device_id("eni.networking.k8s.aws", "0000:00:07.0"),
            "eni.networking.k8s.aws/eni=0000:00:07.0"
        );
        assert_eq!(
            s.container_edits.env[0],
            "PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE=0000:00:07.0,0000:00:08.0"
        );
        let info = s.container_edits.env[1]
            .strip_prefix("PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE_INFO=")
            .expect("info env");
        let info: serde_json::Value = serde_json::from_str(info).expect("json");
        assert_eq!(
            info["0000:00:08.0"]["vfio"]["dev-mount"],
            serde_json::json!("/dev/vfio/4")
        );
        assert_eq!(
            s.container_edits.device_nodes,
            [DeviceNode {
                path: "/dev/vfio/vfio".into(),
                host_path: None,
                permissions: Some("rw".into())
            }]
        );
        assert_eq!(s.devices[0].name, "0000:00:07.0");
        assert_eq!(
            s.devices[1].container_edits.device_nodes,
            [DeviceNode {
                path: "/dev/vfio/4".into(),
                host_path: Some("/dev/vfio/noiommu-4".into()),
                permissions: Some("rw".into())
            }]
        );
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["cdiVersion"], "0.6.0");
        assert!(json["devices"][1]["containerEdits"]["deviceNodes"][0]["hostPath"].is_string());
    }

    #[test]
    fn write_and_remove() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = spec("d.example.com", &[&entry("0000:00:07.0", "3")]);
        let p = write(dir.path(), "x.json", &s)?;
        let back: Spec =
            serde_json::from_slice(&std::fs::read(&p)?).map_err(std::io::Error::other)?;
        assert_eq!(back, s);
        remove(dir.path(), "x.json")?;
        remove(dir.path(), "x.json")?;
        assert!(!p.exists());
        Ok(())
    }
}
