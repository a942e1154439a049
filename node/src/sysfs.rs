//! PCI devices in sysfs: inspecting them and moving them between kernel drivers.
//!
//! All file-system access goes through the narrow [`Sysfs`] trait (read a file, write a
//! file, read a symlink, all relative to the sysfs root). [`RealSysfs`] is the only
//! production adapter: it does plain file I/O under `--sysfs-root`. Everything the daemon
//! knows about PCI binding is in [`Binder`], written against the trait.
//!
//! Testing honestly: on a fake tree (plain files, directories and symlinks in a temp dir,
//! built with [`fake::FakeTree`]) a write to `drivers_probe` binds nothing, because no
//! kernel is watching. [`SimKernel`] wraps [`RealSysfs`] and plays the kernel's part:
//! every write goes to the real file *and* is logged, and writes to `.../driver/unbind` and
//! `bus/pci/drivers_probe` update the `driver` symlink (and the no-IOMMU group) the way the
//! PCI core and vfio-pci would. Unit tests and the local demo (`--simulate-pci-kernel`)
//! use it; what it cannot show is a real driver's probe failing, which is why the binder
//! always verifies the `driver` symlink after probing instead of trusting the writes.

use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Vendor id of Amazon. Shared by the ENA NIC and by Nitro's NVMe controllers (EBS,
/// instance store) and accelerators: the vendor alone identifies nothing.
pub const AMAZON_VENDOR: u16 = 0x1d0f;
/// Device ids of the Elastic Network Adapter (PF, VF, and their LLQ variants).
pub const ENA_DEVICE_IDS: [u16; 4] = [0x0ec2, 0x1ec2, 0xec20, 0xec21];
/// PCI base class of network controllers (`class` reads `0x02xxxx`).
pub const NETWORK_CLASS: u8 = 0x02;
/// sysfs path of the vfio no-IOMMU module parameter.
pub const NOIOMMU_PARAM: &str = "module/vfio/parameters/enable_unsafe_noiommu_mode";
/// Name an IOMMU group has when vfio created it in no-IOMMU mode.
pub const NOIOMMU_GROUP_NAME: &str = "vfio-noiommu";
/// Drivers the daemon is willing to bind devices to.
pub const USERSPACE_DRIVERS: [&str; 3] = eni_api::DPDK_DRIVERS;

/// Narrow access to a sysfs tree. Paths are relative to the sysfs root.
pub trait Sysfs: Send + Sync + Debug {
    /// Reads a whole file.
    fn read(&self, path: &str) -> io::Result<String>;
    /// Writes `value` to an existing file (sysfs attributes are never created).
    fn write(&self, path: &str, value: &str) -> io::Result<()>;
    /// Reads a symlink.
    fn read_link(&self, path: &str) -> io::Result<PathBuf>;
    /// Whether the path exists (following symlinks).
    fn exists(&self, path: &str) -> bool;
}

/// The real adapter: plain file I/O under a root directory (`/sys` in production).
#[derive(Debug, Clone)]
pub struct RealSysfs {
    root: PathBuf,
}

impl RealSysfs {
    /// sysfs rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Sysfs for RealSysfs {
    fn read(&self, path: &str) -> io::Result<String> {
        std::fs::read_to_string(self.root.join(path))
    }

    fn write(&self, path: &str, value: &str) -> io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(self.root.join(path))?;
        f.write_all(value.as_bytes())
    }

    fn read_link(&self, path: &str) -> io::Result<PathBuf> {
        std::fs::read_link(self.root.join(path))
    }

    fn exists(&self, path: &str) -> bool {
        self.root.join(path).exists()
    }
}

/// Whether `s` is a PCI address in sysfs form (`0000:00:07.0`, lower-case hex).
pub fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
}

/// What sysfs says about one PCI device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciInfo {
    /// PCI address.
    pub address: String,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code (`0xCCSSPP`: base class, subclass, programming interface).
    pub class: u32,
    /// Driver bound right now (basename of the `driver` symlink).
    pub driver: Option<String>,
    /// NUMA node, when sysfs knows it (`-1` is reported as `None`).
    pub numa_node: Option<i32>,
    /// IOMMU group number, when the device has one.
    pub iommu_group: Option<String>,
    /// Whether that group is a vfio no-IOMMU group (device `/dev/vfio/noiommu-N`).
    pub noiommu: bool,
}

impl PciInfo {
    /// Whether the device is an Amazon ENA: a network-class function with Amazon's
    /// vendor id *and* one of the ENA device ids. (`1d0f:8061` is the EBS root disk.)
    pub fn is_ena(&self) -> bool {
        self.vendor == AMAZON_VENDOR && self.is_network() && ENA_DEVICE_IDS.contains(&self.device)
    }

    /// Whether the function is a network controller (PCI base class `0x02`).
    pub fn is_network(&self) -> bool {
        base_class(self.class) == NETWORK_CLASS
    }

    /// Vendor and device names from the PCI ID database.
    pub fn device_name(&self) -> String {
        device_name(self.vendor, self.device)
    }

    /// Class name from the PCI ID database (`Mass storage controller / Non-Volatile
    /// memory controller [010802]`).
    pub fn class_name(&self) -> String {
        class_name(self.class)
    }

    /// Path of the vfio group device, once bound to vfio-pci.
    pub fn vfio_group_device(&self) -> Option<String> {
        let group = self.iommu_group.as_ref()?;
        Some(if self.noiommu {
            format!("/dev/vfio/noiommu-{group}")
        } else {
            format!("/dev/vfio/{group}")
        })
    }
}

fn base_class(class: u32) -> u8 {
    ((class >> 16) & 0xff) as u8
}

/// `"<class> / <subclass> [cccccc]"` from the PCI ID database.
pub fn class_name(class: u32) -> String {
    let code = format!("[{class:06x}]");
    let (base, sub) = (base_class(class), ((class >> 8) & 0xff) as u8);
    if let Some(s) = pci_ids::Subclass::from_cid_sid(base, sub) {
        return format!("{} / {} {code}", s.class().name(), s.name());
    }
    match pci_ids::Classes::iter().find(|c| c.id() == base) {
        Some(c) => format!("{} {code}", c.name()),
        None => format!("unknown class {code}"),
    }
}

/// `"<vendor name> <device name> [vvvv:dddd]"` from the PCI ID database.
pub fn device_name(vendor: u16, device: u16) -> String {
    let ids = format!("[{vendor:04x}:{device:04x}]");
    if let Some(d) = pci_ids::Device::from_vid_pid(vendor, device) {
        return format!("{} {} {ids}", d.vendor().name(), d.name());
    }
    match pci_ids::Vendors::iter().find(|v| v.id() == vendor) {
        Some(v) => format!("{} unknown device {ids}", v.name()),
        None => format!("unknown device {ids}"),
    }
}

fn dev_path(pci: &str, attr: &str) -> String {
    format!("bus/pci/devices/{pci}/{attr}")
}

fn link_basename(p: &Path) -> Option<String> {
    p.file_name().map(|n| n.to_string_lossy().into_owned())
}

fn sysfs_err(op: &'static str, path: &str) -> impl FnOnce(io::Error) -> Error {
    let path = PathBuf::from(path);
    move |source| Error::Sysfs { op, path, source }
}

fn parse_hex_id(s: &str, what: &str, pci: &str) -> Result<u16> {
    let t = s.trim();
    let digits = t.strip_prefix("0x").unwrap_or(t);
    u16::from_str_radix(digits, 16)
        .map_err(|_| Error::MalformedSysfs(format!("{pci}: {what} is {t:?}, not a 16-bit hex id")))
}

/// Reads a netdev's PCI address (`class/net/<if>/device` symlink), when it has one.
pub fn netdev_pci_address(sys: &dyn Sysfs, ifname: &str) -> Option<String> {
    if ifname.contains('/') || ifname.starts_with('.') {
        return None;
    }
    let target = sys.read_link(&format!("class/net/{ifname}/device")).ok()?;
    link_basename(&target).filter(|a| is_pci_address(a))
}

/// Reads what sysfs knows about the PCI device at `pci`.
pub fn inspect(sys: &dyn Sysfs, pci: &str) -> Result<PciInfo> {
    if !is_pci_address(pci) {
        return Err(Error::MalformedSysfs(format!(
            "{pci:?} is not a PCI address like 0000:00:07.0"
        )));
    }
    let vendor_path = dev_path(pci, "vendor");
    let vendor = parse_hex_id(
        &sys.read(&vendor_path)
            .map_err(sysfs_err("read", &vendor_path))?,
        "vendor",
        pci,
    )?;
    let device_path = dev_path(pci, "device");
    let device = parse_hex_id(
        &sys.read(&device_path)
            .map_err(sysfs_err("read", &device_path))?,
        "device",
        pci,
    )?;
    let class_path = dev_path(pci, "class");
    let class_text = sys
        .read(&class_path)
        .map_err(sysfs_err("read", &class_path))?;
    let class = {
        let t = class_text.trim();
        u32::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16)
            .ok()
            .filter(|c| *c <= 0xff_ffff)
            .ok_or_else(|| {
                Error::MalformedSysfs(format!("{pci}: class is {t:?}, not a 24-bit hex code"))
            })?
    };
    let driver = current_driver(sys, pci)?;
    let numa_node = sys
        .read(&dev_path(pci, "numa_node"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|n| *n >= 0);
    let iommu_group = sys
        .read_link(&dev_path(pci, "iommu_group"))
        .ok()
        .and_then(|p| link_basename(&p));
    let noiommu = iommu_group.is_some()
        && sys
            .read(&dev_path(pci, "iommu_group/name"))
            .map(|n| n.trim() == NOIOMMU_GROUP_NAME)
            .unwrap_or(false);
    Ok(PciInfo {
        address: pci.to_string(),
        vendor,
        device,
        class,
        driver,
        numa_node,
        iommu_group,
        noiommu,
    })
}

fn current_driver(sys: &dyn Sysfs, pci: &str) -> Result<Option<String>> {
    let path = dev_path(pci, "driver");
    match sys.read_link(&path) {
        Ok(target) => link_basename(&target)
            .map(Some)
            .ok_or_else(|| Error::MalformedSysfs(format!("{path} points at {}", target.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(sysfs_err("readlink", &path)(e)),
    }
}

/// What the binder may do beyond binding ENAs to vfio-pci on an IOMMU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Also rebind network controllers (PCI class `0x02`) that are not ENAs. Never extends
    /// to any other class: storage, bridges, accelerators are refused whatever this says.
    pub force_non_ena: bool,
    /// Accept vfio's unsafe no-IOMMU mode (switching it on when needed) for devices
    /// without an IOMMU group. Off: such devices are refused with an explanation.
    pub allow_noiommu: bool,
}

/// Moves PCI devices between their kernel driver and a userspace-I/O driver.
#[derive(Debug, Clone)]
pub struct Binder {
    sys: Arc<dyn Sysfs>,
    policy: Policy,
}

/// Result of [`Binder::bind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindOutcome {
    /// The device after the operation.
    pub info: PciInfo,
    /// Whether anything was written (false: it was bound already).
    pub changed: bool,
}

impl Binder {
    /// A binder over `sys` with `policy`.
    pub fn new(sys: Arc<dyn Sysfs>, policy: Policy) -> Self {
        Self { sys, policy }
    }

    /// The sysfs adapter.
    pub fn sysfs(&self) -> &dyn Sysfs {
        self.sys.as_ref()
    }

    /// A clone of the sysfs adapter (for work moved to a blocking thread).
    pub fn sysfs_arc(&self) -> Arc<dyn Sysfs> {
        self.sys.clone()
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Inspects the device at `pci`.
    pub fn inspect(&self, pci: &str) -> Result<PciInfo> {
        inspect(self.sys.as_ref(), pci)
    }

    /// Whether the daemon may move `info` between drivers at all: an ENA, or (with
    /// `force_non_ena`) another network controller. Nothing else, ever.
    pub fn check_movable(&self, info: &PciInfo) -> Result<()> {
        if info.is_ena() || (self.policy.force_non_ena && info.is_network()) {
            return Ok(());
        }
        Err(Error::NotEna {
            pci: info.address.clone(),
            vendor: info.vendor,
            device: info.device,
            name: info.device_name(),
            class: info.class_name(),
            forced: self.policy.force_non_ena,
        })
    }

    /// Binds `pci` to `driver`: unbind from the current driver, write `driver_override`,
    /// write the address to `bus/pci/drivers_probe`, then verify the `driver` symlink.
    /// Does nothing when it is bound to `driver` already. Refuses non-ENA devices unless
    /// forced, and drivers other than the userspace-I/O ones.
    pub fn bind(&self, pci: &str, driver: &str) -> Result<BindOutcome> {
        let sys = self.sys.as_ref();
        if !USERSPACE_DRIVERS.contains(&driver) {
            return Err(Error::MalformedSysfs(format!(
                "{driver:?} is not a userspace-I/O driver (one of {USERSPACE_DRIVERS:?})"
            )));
        }
        let info = inspect(sys, pci)?;
        if info.driver.as_deref() == Some(driver) {
            return Ok(BindOutcome {
                info,
                changed: false,
            });
        }
        self.check_movable(&info)?;
        let driver_dir = format!("bus/pci/drivers/{driver}");
        if !sys.exists(&driver_dir) {
            return Err(Error::DriverNotLoaded {
                driver: driver.to_string(),
                path: PathBuf::from(driver_dir),
            });
        }
        if driver == "vfio-pci" && info.iommu_group.is_none() {
            self.ensure_noiommu(pci)?;
        }
        let override_path = dev_path(pci, "driver_override");
        if !sys.exists(&override_path) {
            return Err(Error::MalformedSysfs(format!(
                "{override_path} is missing (kernel without driver_override?)"
            )));
        }
        if info.driver.is_some() {
            let unbind = dev_path(pci, "driver/unbind");
            sys.write(&unbind, pci)
                .map_err(sysfs_err("write", &unbind))?;
        }
        sys.write(&override_path, driver)
            .map_err(sysfs_err("write", &override_path))?;
        let probe = "bus/pci/drivers_probe";
        sys.write(probe, pci).map_err(sysfs_err("write", probe))?;
        let after = inspect(sys, pci)?;
        if after.driver.as_deref() != Some(driver) {
            return Err(Error::BindNotVerified {
                pci: pci.to_string(),
                expected: driver.to_string(),
                found: after.driver.unwrap_or_else(|| "none".into()),
            });
        }
        Ok(BindOutcome {
            info: after,
            changed: true,
        })
    }

    /// Gives `pci` back to its kernel driver: clear `driver_override`, unbind from
    /// `dpdk_driver` (when bound to it), probe, and verify that some other driver took it.
    /// Does nothing when it is not bound to `dpdk_driver`.
    pub fn release(&self, pci: &str, dpdk_driver: &str) -> Result<BindOutcome> {
        let sys = self.sys.as_ref();
        let info = inspect(sys, pci)?;
        if info.driver.as_deref() != Some(dpdk_driver) && info.driver.is_some() {
            return Ok(BindOutcome {
                info,
                changed: false,
            });
        }
        // A state file naming the wrong device must not make us unbind a disk either.
        self.check_movable(&info)?;
        let override_path = dev_path(pci, "driver_override");
        sys.write(&override_path, "\n")
            .map_err(sysfs_err("write", &override_path))?;
        if info.driver.is_some() {
            let unbind = dev_path(pci, "driver/unbind");
            sys.write(&unbind, pci)
                .map_err(sysfs_err("write", &unbind))?;
        }
        let probe = "bus/pci/drivers_probe";
        sys.write(probe, pci).map_err(sysfs_err("write", probe))?;
        let after = inspect(sys, pci)?;
        match after.driver.as_deref() {
            Some(d) if d != dpdk_driver => Ok(BindOutcome {
                info: after,
                changed: true,
            }),
            other => Err(Error::BindNotVerified {
                pci: pci.to_string(),
                expected: "its kernel driver".into(),
                found: other.unwrap_or("none").to_string(),
            }),
        }
    }

    /// Makes sure vfio accepts `pci`, which has no IOMMU group: only with the explicit
    /// opt-in, by switching vfio's no-IOMMU mode on (most EC2 instances have no IOMMU).
    fn ensure_noiommu(&self, pci: &str) -> Result<()> {
        let sys = self.sys.as_ref();
        let value = sys.read(NOIOMMU_PARAM).ok();
        let on = value
            .as_deref()
            .is_some_and(|v| matches!(v.trim(), "Y" | "1"));
        if !self.policy.allow_noiommu {
            return Err(Error::NeedsIommu {
                pci: pci.to_string(),
                noiommu_on: on,
            });
        }
        if on {
            return Ok(());
        }
        if value.is_none() {
            return Err(Error::MalformedSysfs(format!(
                "the device has no IOMMU group and vfio's no-IOMMU mode is unavailable \
                 ({NOIOMMU_PARAM} missing); load vfio with enable_unsafe_noiommu_mode=1"
            )));
        }
        tracing::warn!("no IOMMU: enabling vfio enable_unsafe_noiommu_mode (opted in)");
        sys.write(NOIOMMU_PARAM, "1")
            .map_err(sysfs_err("write", NOIOMMU_PARAM))
    }
}

/// One write seen by [`SimKernel`].
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// Path relative to the sysfs root.
    pub path: String,
    /// What was written.
    pub value: String,
}

/// A sysfs adapter over a fake tree that also plays the kernel's part (see the module
/// docs): it performs every write on the file, logs it, and then updates the tree the way
/// the PCI core would. For tests and the local demo only: compiled in with the
/// `test-util` feature, never in the shipped binary.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone)]
pub struct SimKernel {
    inner: RealSysfs,
    writes: Arc<std::sync::Mutex<Vec<Write>>>,
    native: Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>,
}

#[cfg(any(test, feature = "test-util"))]
impl SimKernel {
    /// A simulated kernel over the fake tree at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            inner: RealSysfs::new(root),
            writes: Arc::default(),
            native: Arc::default(),
        }
    }

    /// Every write so far, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.writes.lock().map(|w| w.clone()).unwrap_or_default()
    }

    /// Forgets the logged writes.
    pub fn clear_writes(&self) {
        if let Ok(mut w) = self.writes.lock() {
            w.clear();
        }
    }

    fn root(&self) -> &Path {
        self.inner.root()
    }

    fn unbind(&self, pci: &str) -> io::Result<()> {
        let link = self.root().join(dev_path(pci, "driver"));
        if let Ok(target) = std::fs::read_link(&link)
            && let Some(name) = link_basename(&target)
            && !USERSPACE_DRIVERS.contains(&name.as_str())
            && let Ok(mut native) = self.native.lock()
        {
            native.insert(pci.to_string(), name);
        }
        match std::fs::remove_file(&link) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn probe(&self, pci: &str) -> io::Result<()> {
        let root = self.root().to_path_buf();
        let link = root.join(dev_path(pci, "driver"));
        if std::fs::symlink_metadata(&link).is_ok() {
            return Ok(()); // already bound: the kernel leaves it alone
        }
        let over = std::fs::read_to_string(root.join(dev_path(pci, "driver_override")))
            .unwrap_or_default();
        let over = over.trim();
        let target = if over.is_empty() || over == "(null)" {
            self.native
                .lock()
                .ok()
                .and_then(|n| n.get(pci).cloned())
                .unwrap_or_else(|| "ena".to_string())
        } else {
            over.to_string()
        };
        if !root.join("bus/pci/drivers").join(&target).is_dir() {
            return Ok(()); // no such driver: the device stays unbound
        }
        if target == "vfio-pci"
            && std::fs::symlink_metadata(root.join(dev_path(pci, "iommu_group"))).is_err()
        {
            let noiommu = std::fs::read_to_string(root.join(NOIOMMU_PARAM)).unwrap_or_default();
            if !matches!(noiommu.trim(), "Y" | "1") {
                return Ok(()); // vfio-pci refuses a device without an IOMMU group
            }
            // vfio-pci creates a fake group for the device in no-IOMMU mode.
            let groups = root.join("kernel/iommu_groups");
            std::fs::create_dir_all(&groups)?;
            let n = std::fs::read_dir(&groups)?.count();
            let group = groups.join(n.to_string());
            std::fs::create_dir_all(&group)?;
            std::fs::write(group.join("name"), format!("{NOIOMMU_GROUP_NAME}\n"))?;
            std::os::unix::fs::symlink(
                format!("../../../../kernel/iommu_groups/{n}"),
                root.join(dev_path(pci, "iommu_group")),
            )?;
        }
        std::os::unix::fs::symlink(format!("../../drivers/{target}"), link)
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Sysfs for SimKernel {
    fn read(&self, path: &str) -> io::Result<String> {
        self.inner.read(path)
    }

    fn write(&self, path: &str, value: &str) -> io::Result<()> {
        self.inner.write(path, value)?;
        if let Ok(mut w) = self.writes.lock() {
            w.push(Write {
                path: path.to_string(),
                value: value.to_string(),
            });
        }
        let addr = value.trim();
        if path.ends_with("/unbind") && is_pci_address(addr) {
            self.unbind(addr)?;
        } else if path == "bus/pci/drivers_probe" && is_pci_address(addr) {
            self.probe(addr)?;
        } else if path == NOIOMMU_PARAM && addr == "1" {
            // The kernel shows a boolean parameter as Y/N.
            self.inner.write(path, "Y\n")?;
        }
        Ok(())
    }

    fn read_link(&self, path: &str) -> io::Result<PathBuf> {
        self.inner.read_link(path)
    }

    fn exists(&self, path: &str) -> bool {
        self.inner.exists(path)
    }
}

#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    //! Builds fake sysfs trees for tests, benchmarks and the local demo (`test-util`
    //! feature only).

    use std::io;
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};

    use super::{NOIOMMU_PARAM, dev_path};

    /// Class code of an Ethernet controller.
    pub const ETHERNET: u32 = 0x02_00_00;
    /// Class code of an NVMe controller (mass storage / non-volatile memory / NVM Express).
    pub const NVME: u32 = 0x01_08_02;
    /// Class code of a host bridge.
    pub const HOST_BRIDGE: u32 = 0x06_00_00;

    /// A fake sysfs tree in a directory.
    #[derive(Debug, Clone)]
    pub struct FakeTree {
        /// Its root.
        pub root: PathBuf,
    }

    impl FakeTree {
        /// Lays out the skeleton: `bus/pci/drivers_probe`, the `ena`, `vfio-pci` and
        /// `nvme` drivers, and vfio's no-IOMMU parameter (off).
        pub fn new(root: &Path) -> io::Result<Self> {
            let t = Self {
                root: root.to_path_buf(),
            };
            std::fs::create_dir_all(root.join("bus/pci/devices"))?;
            std::fs::create_dir_all(root.join("class/net"))?;
            std::fs::write(root.join("bus/pci/drivers_probe"), "")?;
            for d in ["ena", "vfio-pci", "nvme"] {
                t.add_driver(d)?;
            }
            let param = root.join(NOIOMMU_PARAM);
            if let Some(dir) = param.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(param, "N\n")?;
            Ok(t)
        }

        /// Adds a driver directory with `bind` and `unbind` files.
        pub fn add_driver(&self, name: &str) -> io::Result<()> {
            let d = self.root.join("bus/pci/drivers").join(name);
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join("bind"), "")?;
            std::fs::write(d.join("unbind"), "")
        }

        /// Adds a PCI device of class `class` (`0xCCSSPP`), optionally bound to `driver`.
        pub fn add_pci(
            &self,
            pci: &str,
            vendor: u16,
            device: u16,
            class: u32,
            driver: Option<&str>,
        ) -> io::Result<()> {
            let d = self.root.join("bus/pci/devices").join(pci);
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join("vendor"), format!("0x{vendor:04x}\n"))?;
            std::fs::write(d.join("device"), format!("0x{device:04x}\n"))?;
            std::fs::write(d.join("class"), format!("0x{class:06x}\n"))?;
            std::fs::write(d.join("numa_node"), "0\n")?;
            std::fs::write(d.join("driver_override"), "(null)\n")?;
            if let Some(drv) = driver {
                symlink(format!("../../drivers/{drv}"), d.join("driver"))?;
            }
            Ok(())
        }

        /// Adds an ENA device (`1d0f:ec20`, Ethernet controller) bound to `ena`.
        pub fn add_ena(&self, pci: &str) -> io::Result<()> {
            self.add_pci(pci, super::AMAZON_VENDOR, 0xec20, ETHERNET, Some("ena"))
        }

        /// Adds Nitro's EBS NVMe controller (`1d0f:8061`, class `0x010802`) bound to
        /// `nvme`: the root disk of a real instance, usually at `0000:00:04.0`.
        pub fn add_ebs_nvme(&self, pci: &str) -> io::Result<()> {
            self.add_pci(pci, super::AMAZON_VENDOR, 0x8061, NVME, Some("nvme"))
        }

        /// Adds an instance-store NVMe controller (`1d0f:cd00` or `1d0f:cd01`) bound to
        /// `nvme`.
        pub fn add_instance_store(&self, pci: &str, device: u16) -> io::Result<()> {
            self.add_pci(pci, super::AMAZON_VENDOR, device, NVME, Some("nvme"))
        }

        /// Makes `class/net/<ifname>/device` point at the PCI device.
        pub fn add_netdev(&self, ifname: &str, pci: &str) -> io::Result<()> {
            let d = self.root.join("class/net").join(ifname);
            std::fs::create_dir_all(&d)?;
            symlink(format!("../../../bus/pci/devices/{pci}"), d.join("device"))
        }

        /// Puts the device in IOMMU group `n` (a no-IOMMU one when `noiommu`).
        pub fn set_iommu_group(&self, pci: &str, n: u32, noiommu: bool) -> io::Result<()> {
            let g = self.root.join("kernel/iommu_groups").join(n.to_string());
            std::fs::create_dir_all(&g)?;
            if noiommu {
                std::fs::write(g.join("name"), "vfio-noiommu\n")?;
            }
            symlink(
                format!("../../../../kernel/iommu_groups/{n}"),
                self.root.join(dev_path(pci, "iommu_group")),
            )
        }

        /// Path of a file in the tree.
        pub fn path(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeTree;
    use super::*;

    const PCI: &str = "0000:00:07.0";

    fn setup() -> (tempfile::TempDir, FakeTree, SimKernel) {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = FakeTree::new(dir.path()).expect("tree");
        tree.add_ena(PCI).expect("ena");
        let sim = SimKernel::new(dir.path());
        (dir, tree, sim)
    }

    fn w(path: &str, value: &str) -> Write {
        Write {
            path: path.into(),
            value: value.into(),
        }
    }

    fn binder(sim: &SimKernel, force: bool) -> Binder {
        Binder::new(
            Arc::new(sim.clone()),
            Policy {
                force_non_ena: force,
                allow_noiommu: true,
            },
        )
    }

    #[test]
    fn pci_addresses_are_validated() {
        assert!(is_pci_address("0000:00:07.0"));
        assert!(is_pci_address("0000:af:1f.7"));
        assert!(!is_pci_address("0000:00:07.8"));
        assert!(!is_pci_address("00:07.0"));
        assert!(!is_pci_address("../../../etc"));
        assert!(!is_pci_address("0000:00:07.0/"));
    }

    #[test]
    fn ena_is_named_from_the_pci_id_database() {
        let (_d, _t, sim) = setup();
        let info = inspect(&sim, PCI).expect("inspect");
        assert!(info.is_ena());
        assert_eq!(info.driver.as_deref(), Some("ena"));
        assert_eq!(info.numa_node, Some(0));
        assert!(
            info.device_name().contains("Elastic Network Adapter"),
            "{}",
            info.device_name()
        );
        assert!(device_name(0xfffe, 0x0001).ends_with("[fffe:0001]"));
        assert!(info.device_name().ends_with("[1d0f:ec20]"));
    }

    #[test]
    fn bind_writes_the_right_files_in_order_and_release_restores() {
        let (_d, tree, sim) = setup();
        tree.set_iommu_group(PCI, 5, false).expect("group");
        let b = binder(&sim, false);
        let out = b.bind(PCI, "vfio-pci").expect("bind");
        assert!(out.changed);
        assert_eq!(out.info.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(out.info.vfio_group_device().as_deref(), Some("/dev/vfio/5"));
        assert_eq!(
            sim.writes(),
            vec![
                w("bus/pci/devices/0000:00:07.0/driver/unbind", PCI),
                w("bus/pci/devices/0000:00:07.0/driver_override", "vfio-pci"),
                w("bus/pci/drivers_probe", PCI),
            ]
        );
        // The unbind went to the ena driver's file, through the `driver` symlink.
        assert_eq!(
            std::fs::read_to_string(tree.path("bus/pci/drivers/ena/unbind")).expect("read"),
            PCI
        );

        sim.clear_writes();
        let back = b.release(PCI, "vfio-pci").expect("release");
        assert!(back.changed);
        assert_eq!(back.info.driver.as_deref(), Some("ena"));
        assert_eq!(
            sim.writes(),
            vec![
                w("bus/pci/devices/0000:00:07.0/driver_override", "\n"),
                w("bus/pci/devices/0000:00:07.0/driver/unbind", PCI),
                w("bus/pci/drivers_probe", PCI),
            ]
        );
        assert_eq!(
            std::fs::read_to_string(tree.path("bus/pci/drivers/vfio-pci/unbind")).expect("read"),
            PCI
        );
    }

    #[test]
    fn binding_twice_writes_nothing() {
        let (_d, tree, sim) = setup();
        tree.set_iommu_group(PCI, 5, false).expect("group");
        let b = binder(&sim, false);
        b.bind(PCI, "vfio-pci").expect("bind");
        sim.clear_writes();
        let again = b.bind(PCI, "vfio-pci").expect("bind again");
        assert!(!again.changed);
        assert!(sim.writes().is_empty());
        // Releasing a device that is not on the DPDK driver writes nothing either.
        b.release(PCI, "vfio-pci").expect("release");
        sim.clear_writes();
        assert!(!b.release(PCI, "vfio-pci").expect("release again").changed);
        assert!(sim.writes().is_empty());
    }

    #[test]
    fn no_iommu_mode_is_enabled_and_detected_only_when_opted_in() {
        let (_d, _tree, sim) = setup();
        let strict = Binder::new(Arc::new(sim.clone()), Policy::default());
        let err = strict.bind(PCI, "vfio-pci").expect_err("needs an IOMMU");
        assert!(
            matches!(
                err,
                Error::NeedsIommu {
                    noiommu_on: false,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("vfio.enableUnsafeNoIOMMUMode"),
            "{err}"
        );
        assert!(sim.writes().is_empty(), "{:?}", sim.writes());
        assert_eq!(
            inspect(&sim, PCI).expect("inspect").driver.as_deref(),
            Some("ena")
        );

        let b = binder(&sim, false);
        let out = b.bind(PCI, "vfio-pci").expect("bind");
        assert_eq!(sim.writes()[0], w(NOIOMMU_PARAM, "1"));
        assert_eq!(sim.writes().len(), 4);
        assert!(out.info.noiommu);
        assert_eq!(
            out.info.vfio_group_device().as_deref(),
            Some("/dev/vfio/noiommu-0")
        );

        // Switched on by someone else: still not used without the opt-in.
        let (_d, _tree, sim) = setup();
        sim.write(NOIOMMU_PARAM, "1").expect("param");
        sim.clear_writes();
        let strict = Binder::new(Arc::new(sim.clone()), Policy::default());
        let err = strict.bind(PCI, "vfio-pci").expect_err("needs an IOMMU");
        assert!(
            matches!(
                err,
                Error::NeedsIommu {
                    noiommu_on: true,
                    ..
                }
            ),
            "{err}"
        );
        assert!(sim.writes().is_empty());
    }

    /// Amazon's own non-network functions on a Nitro instance, at their usual addresses.
    const EBS_ROOT: &str = "0000:00:04.0";
    const STORE0: &str = "0000:00:1e.0";
    const STORE1: &str = "0000:00:1f.0";
    const BRIDGE: &str = "0000:00:00.0";

    fn nitro() -> (tempfile::TempDir, FakeTree, SimKernel) {
        let (d, tree, sim) = setup();
        tree.add_ebs_nvme(EBS_ROOT).expect("ebs");
        tree.add_instance_store(STORE0, 0xcd00).expect("store");
        tree.add_instance_store(STORE1, 0xcd01).expect("store");
        tree.add_pci(BRIDGE, 0x8086, 0x1237, fake::HOST_BRIDGE, None)
            .expect("bridge");
        for (i, p) in [EBS_ROOT, STORE0, STORE1, BRIDGE].into_iter().enumerate() {
            tree.set_iommu_group(p, 10 + i as u32, false)
                .expect("group");
        }
        (d, tree, sim)
    }

    #[test]
    fn amazon_disks_and_bridges_are_never_moved_even_forced() {
        let (_d, _tree, sim) = nitro();
        for force in [false, true] {
            for (pci, what) in [
                (EBS_ROOT, "NVMe EBS Controller"),
                (STORE0, "[1d0f:cd00]"),
                (STORE1, "NVMe SSD Controller"),
                (BRIDGE, "Bridge"),
            ] {
                let info = inspect(&sim, pci).expect("inspect");
                assert!(!info.is_ena(), "{pci}");
                let err = binder(&sim, force)
                    .bind(pci, "vfio-pci")
                    .expect_err("refused");
                assert!(matches!(err, Error::NotEna { .. }), "{err}");
                let msg = err.to_string();
                assert!(msg.contains(what), "{msg}");
                assert!(msg.contains(pci), "{msg}");
            }
            // A state file naming a driverless disk does not get it "given back" either.
            let err = binder(&sim, force)
                .release(BRIDGE, "vfio-pci")
                .expect_err("refused");
            assert!(matches!(err, Error::NotEna { .. }), "{err}");
        }
        let msg = binder(&sim, false)
            .bind(EBS_ROOT, "vfio-pci")
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("Non-Volatile memory controller"), "{msg}");
        assert!(sim.writes().is_empty(), "{:?}", sim.writes());
        assert_eq!(
            inspect(&sim, EBS_ROOT).expect("inspect").driver.as_deref(),
            Some("nvme")
        );
    }

    #[test]
    fn ena_needs_the_device_id_and_the_network_class() {
        let (_d, tree, sim) = setup();
        for (i, dev) in ENA_DEVICE_IDS.into_iter().enumerate() {
            let pci = format!("0000:00:1{i}.0");
            tree.add_pci(&pci, AMAZON_VENDOR, dev, fake::ETHERNET, Some("ena"))
                .expect("ena");
            tree.set_iommu_group(&pci, 20 + i as u32, false)
                .expect("group");
            assert!(binder(&sim, false).bind(&pci, "vfio-pci").is_ok(), "{pci}");
        }
        // An ENA device id in a storage class is not an ENA.
        tree.add_pci(
            "0000:00:19.0",
            AMAZON_VENDOR,
            0xec20,
            fake::NVME,
            Some("nvme"),
        )
        .expect("odd");
        tree.set_iommu_group("0000:00:19.0", 30, false)
            .expect("group");
        assert!(matches!(
            binder(&sim, true).bind("0000:00:19.0", "vfio-pci"),
            Err(Error::NotEna { .. })
        ));
    }

    #[test]
    fn force_extends_to_other_network_controllers_only() {
        let (_d, tree, sim) = setup();
        let nic = "0000:00:0a.0";
        tree.add_driver("i40e").expect("driver");
        tree.add_pci(nic, 0x8086, 0x1572, fake::ETHERNET, Some("i40e"))
            .expect("intel nic");
        tree.set_iommu_group(nic, 1, false).expect("group");
        let err = binder(&sim, false)
            .bind(nic, "vfio-pci")
            .expect_err("refused");
        assert!(matches!(err, Error::NotEna { vendor: 0x8086, .. }), "{err}");
        assert!(err.to_string().contains("Intel"), "{err}");
        assert!(sim.writes().is_empty());
        let forced = binder(&sim, true).bind(nic, "vfio-pci").expect("forced");
        assert_eq!(forced.info.driver.as_deref(), Some("vfio-pci"));
    }

    #[test]
    fn malformed_sysfs_is_an_error_not_a_panic() {
        let (_d, tree, sim) = setup();
        let b = binder(&sim, false);
        // Not a PCI address (and no path traversal through one).
        assert!(matches!(
            b.bind("../../../etc", "vfio-pci"),
            Err(Error::MalformedSysfs(_))
        ));
        // No such device.
        assert!(matches!(
            b.bind("0000:00:09.0", "vfio-pci"),
            Err(Error::Sysfs { .. })
        ));
        // Garbage vendor id.
        std::fs::write(tree.path("bus/pci/devices/0000:00:07.0/vendor"), "amazon\n")
            .expect("write");
        assert!(matches!(
            b.bind(PCI, "vfio-pci"),
            Err(Error::MalformedSysfs(_))
        ));
        std::fs::write(tree.path("bus/pci/devices/0000:00:07.0/vendor"), "0x1d0f\n")
            .expect("write");
        // Missing device file.
        std::fs::remove_file(tree.path("bus/pci/devices/0000:00:07.0/device")).expect("rm");
        assert!(matches!(b.bind(PCI, "vfio-pci"), Err(Error::Sysfs { .. })));
        std::fs::write(tree.path("bus/pci/devices/0000:00:07.0/device"), "0xec20\n")
            .expect("write");
        // Driver not loaded.
        assert!(matches!(
            b.bind(PCI, "igb_uio"),
            Err(Error::DriverNotLoaded { .. })
        ));
        // Not a userspace-I/O driver.
        assert!(matches!(
            b.bind(PCI, "e1000"),
            Err(Error::MalformedSysfs(_))
        ));
        // No driver_override (old kernel).
        tree.set_iommu_group(PCI, 2, false).expect("group");
        std::fs::remove_file(tree.path("bus/pci/devices/0000:00:07.0/driver_override"))
            .expect("rm");
        assert!(matches!(
            b.bind(PCI, "vfio-pci"),
            Err(Error::MalformedSysfs(_))
        ));
        assert!(sim.writes().is_empty(), "{:?}", sim.writes());
    }

    #[test]
    fn a_probe_that_does_not_take_is_reported() {
        // The real adapter on a fake tree: nobody plays the kernel, so the device ends up
        // unbound and the verification must say so.
        let (dir, tree, _sim) = setup();
        tree.set_iommu_group(PCI, 5, false).expect("group");
        let b = Binder::new(Arc::new(RealSysfs::new(dir.path())), Policy::default());
        std::fs::remove_file(tree.path("bus/pci/devices/0000:00:07.0/driver"))
            .expect("unbind by hand");
        let err = b.bind(PCI, "vfio-pci").expect_err("not verified");
        assert!(
            matches!(&err, Error::BindNotVerified { found, .. } if found == "none"),
            "{err}"
        );
        // A driver symlink that points at the wrong driver is also caught.
        tree.add_pci(
            "0000:00:08.0",
            AMAZON_VENDOR,
            0xec20,
            fake::ETHERNET,
            Some("nvme"),
        )
        .expect("dev");
        tree.set_iommu_group("0000:00:08.0", 6, false)
            .expect("group");
        let err = b
            .bind("0000:00:08.0", "vfio-pci")
            .expect_err("wrong driver");
        assert!(matches!(err, Error::BindNotVerified { .. }), "{err}");
    }
}
