//! What a device looks like on the host (facts read from sysfs and `/dev`), and the pure
//! health evaluation on top of those facts.

use std::path::{Path, PathBuf};

use crate::BoundDevice;

/// Driver name of VFIO-bound (DPDK) devices.
pub const VFIO_PCI: &str = "vfio-pci";

/// How a device is handed to a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// Bound to `vfio-pci`: `/dev/vfio/vfio` plus the group device are passed in.
    Vfio,
    /// Bound to a kernel network driver (non-DPDK ENI): only the PCI address is passed
    /// (env + Multus device-info), `host-device` moves the netdev.
    Netdev,
}

impl DeviceKind {
    /// Kind for a device bound to `driver`.
    pub fn for_driver(driver: &str) -> Self {
        if driver == VFIO_PCI {
            Self::Vfio
        } else {
            Self::Netdev
        }
    }
}

/// Facts about one PCI device, as read from the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    /// `<sysfs>/bus/pci/devices/<addr>` exists.
    pub present: bool,
    /// Basename of the `driver` link.
    pub driver: Option<String>,
    /// Basename of the `iommu_group` link (the group number).
    pub iommu_group: Option<String>,
    /// `iommu_group/name` reads `vfio-noiommu`.
    pub noiommu: bool,
    /// `numa_node`, `None` when missing or negative.
    pub numa_node: Option<i64>,
    /// The host group device (`/dev/vfio/<n>` or `/dev/vfio/noiommu-<n>`) exists.
    pub group_device_present: bool,
    /// The VFIO container device `/dev/vfio/vfio` exists.
    pub vfio_container_present: bool,
}

impl DeviceFacts {
    /// Paths of the VFIO group device, when the device has an IOMMU group.
    pub fn vfio_group(&self) -> Option<VfioGroup> {
        self.iommu_group
            .as_deref()
            .map(|g| VfioGroup::new(g, self.noiommu))
    }
}

/// The VFIO group device of a device: where it is on the host and where the container
/// sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioGroup {
    /// Group number.
    pub group: String,
    /// Host path: `/dev/vfio/<n>`, or `/dev/vfio/noiommu-<n>` in no-IOMMU mode.
    pub host_path: String,
    /// Container path: always `/dev/vfio/<n>` (what DPDK opens).
    pub container_path: String,
}

impl VfioGroup {
    /// Paths for group `group`.
    pub fn new(group: &str, noiommu: bool) -> Self {
        let host_path = if noiommu {
            format!("/dev/vfio/noiommu-{group}")
        } else {
            format!("/dev/vfio/{group}")
        };
        Self {
            group: group.to_owned(),
            host_path,
            container_path: format!("/dev/vfio/{group}"),
        }
    }

    /// Name of the host device relative to `/dev`.
    pub fn dev_relative(&self) -> &str {
        self.host_path.trim_start_matches("/dev/")
    }
}

/// Health of a device, with the reason when unhealthy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Usable.
    Healthy,
    /// Not usable, and why.
    Unhealthy(String),
}

impl Health {
    /// The kubelet's string for it.
    pub fn as_kubelet_str(&self) -> &'static str {
        match self {
            Self::Healthy => eni_proto::deviceplugin::v1beta1::HEALTHY,
            Self::Unhealthy(_) => eni_proto::deviceplugin::v1beta1::UNHEALTHY,
        }
    }

    /// Whether the device is usable.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Self::Healthy)
    }
}

/// Health of `device` given what the host says about it.
pub fn evaluate_health(device: &BoundDevice, facts: &DeviceFacts) -> Health {
    if device.releasing {
        return Health::Unhealthy("being given back to its kernel driver".to_owned());
    }
    if !facts.present {
        return Health::Unhealthy(format!("PCI device {} vanished", device.pci_address));
    }
    match facts.driver.as_deref() {
        Some(d) if d == device.driver => {}
        Some(d) => {
            return Health::Unhealthy(format!("bound to {d}, expected {}", device.driver));
        }
        None => {
            return Health::Unhealthy(format!("not bound to a driver, expected {}", device.driver));
        }
    }
    if DeviceKind::for_driver(&device.driver) == DeviceKind::Vfio {
        let Some(group) = facts.vfio_group() else {
            return Health::Unhealthy("no IOMMU group".to_owned());
        };
        if !facts.group_device_present {
            return Health::Unhealthy(format!("{} is missing", group.host_path));
        }
        if !facts.vfio_container_present {
            return Health::Unhealthy("/dev/vfio/vfio is missing".to_owned());
        }
    }
    Health::Healthy
}

/// Reads [`DeviceFacts`] from the host. The production implementation is
/// [`SysfsProbe`]; tests may inject their own.
pub trait DeviceProbe: Send + Sync + std::fmt::Debug + 'static {
    /// Facts about the PCI device at `pci_address`. Never fails: anything unreadable is
    /// reported as absent.
    fn probe(&self, pci_address: &str) -> DeviceFacts;
}

/// Reads sysfs under `sysfs_root` and checks group devices under `dev_root`.
#[derive(Clone, Debug)]
pub struct SysfsProbe {
    sysfs_root: PathBuf,
    dev_root: PathBuf,
}

impl SysfsProbe {
    /// A probe for the given roots (`/sys` and `/dev` in production).
    pub fn new(sysfs_root: impl Into<PathBuf>, dev_root: impl Into<PathBuf>) -> Self {
        Self {
            sysfs_root: sysfs_root.into(),
            dev_root: dev_root.into(),
        }
    }
}

fn link_basename(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

impl DeviceProbe for SysfsProbe {
    fn probe(&self, pci_address: &str) -> DeviceFacts {
        // Reject anything that could walk out of the devices directory.
        if pci_address.is_empty() || pci_address.contains('/') || pci_address.starts_with('.') {
            return DeviceFacts::default();
        }
        let dir = self.sysfs_root.join("bus/pci/devices").join(pci_address);
        if !dir.exists() {
            return DeviceFacts::default();
        }
        let iommu_group = link_basename(&dir.join("iommu_group"));
        let noiommu = std::fs::read_to_string(dir.join("iommu_group/name"))
            .map(|s| s.trim() == "vfio-noiommu")
            .unwrap_or(false);
        let numa_node = std::fs::read_to_string(dir.join("numa_node"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0);
        let group_device_present = iommu_group.as_deref().is_some_and(|g| {
            let group = VfioGroup::new(g, noiommu);
            self.dev_root.join(group.dev_relative()).exists()
        });
        DeviceFacts {
            present: true,
            driver: link_basename(&dir.join("driver")),
            iommu_group,
            noiommu,
            numa_node,
            group_device_present,
            vfio_container_present: self.dev_root.join("vfio/vfio").exists(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(driver: &str) -> BoundDevice {
        BoundDevice {
            pci_address: "0000:00:07.0".into(),
            resource_name: "intel.com/intel_sriov_netdevice".into(),
            driver: driver.into(),
            eni_id: "eni-1".into(),
            mac_address: "02:00:00:00:00:01".into(),
            device_index: 1,
            releasing: false,
            details: Default::default(),
        }
    }

    fn good() -> DeviceFacts {
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

    #[test]
    fn healthy_vfio() {
        assert_eq!(evaluate_health(&dev("vfio-pci"), &good()), Health::Healthy);
    }

    #[test]
    fn a_device_being_given_back_is_unhealthy() {
        let mut d = dev("vfio-pci");
        d.releasing = true;
        let h = evaluate_health(&d, &good());
        assert!(
            matches!(h, Health::Unhealthy(ref r) if r.contains("given back")),
            "{h:?}"
        );
    }

    #[test]
    fn vanished_is_unhealthy() {
        let h = evaluate_health(&dev("vfio-pci"), &DeviceFacts::default());
        assert!(
            matches!(h, Health::Unhealthy(ref r) if r.contains("vanished")),
            "{h:?}"
        );
    }

    #[test]
    fn wrong_driver_is_unhealthy() {
        let facts = DeviceFacts {
            driver: Some("ena".into()),
            ..good()
        };
        let h = evaluate_health(&dev("vfio-pci"), &facts);
        assert!(
            matches!(h, Health::Unhealthy(ref r) if r.contains("bound to ena")),
            "{h:?}"
        );
        let facts = DeviceFacts {
            driver: None,
            ..good()
        };
        assert!(!evaluate_health(&dev("vfio-pci"), &facts).is_healthy());
    }

    #[test]
    fn missing_group_device_is_unhealthy() {
        let facts = DeviceFacts {
            group_device_present: false,
            ..good()
        };
        let h = evaluate_health(&dev("vfio-pci"), &facts);
        assert!(
            matches!(h, Health::Unhealthy(ref r) if r.contains("/dev/vfio/noiommu-7")),
            "{h:?}"
        );
        let facts = DeviceFacts {
            iommu_group: None,
            ..good()
        };
        assert!(!evaluate_health(&dev("vfio-pci"), &facts).is_healthy());
        let facts = DeviceFacts {
            vfio_container_present: false,
            ..good()
        };
        let h = evaluate_health(&dev("vfio-pci"), &facts);
        assert!(
            matches!(h, Health::Unhealthy(ref r) if r.contains("/dev/vfio/vfio")),
            "{h:?}"
        );
    }

    #[test]
    fn netdev_needs_no_vfio() {
        let facts = DeviceFacts {
            driver: Some("ena".into()),
            iommu_group: None,
            group_device_present: false,
            ..good()
        };
        assert_eq!(evaluate_health(&dev("ena"), &facts), Health::Healthy);
    }

    #[test]
    fn group_paths() {
        let g = VfioGroup::new("3", true);
        assert_eq!(g.host_path, "/dev/vfio/noiommu-3");
        assert_eq!(g.container_path, "/dev/vfio/3");
        assert_eq!(g.dev_relative(), "vfio/noiommu-3");
        let g = VfioGroup::new("3", false);
        assert_eq!(g.host_path, "/dev/vfio/3");
    }

    #[test]
    fn sysfs_probe_reads_fake_tree() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let sys = tmp.path().join("sys");
        let devroot = tmp.path().join("dev");
        let d = sys.join("bus/pci/devices/0000:00:07.0");
        std::fs::create_dir_all(&d)?;
        std::fs::create_dir_all(sys.join("kernel/iommu_groups/7"))?;
        std::fs::write(sys.join("kernel/iommu_groups/7/name"), "vfio-noiommu\n")?;
        std::os::unix::fs::symlink("../../../../bus/pci/drivers/vfio-pci", d.join("driver"))?;
        std::os::unix::fs::symlink(sys.join("kernel/iommu_groups/7"), d.join("iommu_group"))?;
        std::fs::write(d.join("numa_node"), "1\n")?;
        let probe = SysfsProbe::new(&sys, &devroot);
        let f = probe.probe("0000:00:07.0");
        assert_eq!(
            f,
            DeviceFacts {
                present: true,
                driver: Some("vfio-pci".into()),
                iommu_group: Some("7".into()),
                noiommu: true,
                numa_node: Some(1),
                group_device_present: false,
                vfio_container_present: false,
            }
        );
        std::fs::create_dir_all(devroot.join("vfio"))?;
        std::fs::write(devroot.join("vfio/noiommu-7"), "")?;
        std::fs::write(devroot.join("vfio/vfio"), "")?;
        let f = probe.probe("0000:00:07.0");
        assert!(f.group_device_present && f.vfio_container_present);
        std::fs::write(d.join("numa_node"), "-1\n")?;
        assert_eq!(probe.probe("0000:00:07.0").numa_node, None);
        assert_eq!(probe.probe("0000:00:08.0"), DeviceFacts::default());
        assert_eq!(probe.probe("../x"), DeviceFacts::default());
        Ok(())
    }
}
