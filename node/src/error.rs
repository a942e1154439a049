//! Errors of the node daemon.

use std::path::PathBuf;

/// Everything that can go wrong while configuring ENIs on the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A sysfs file could not be read or written.
    #[error("sysfs: cannot {op} {path}: {source}")]
    Sysfs {
        /// `read`, `write` or `readlink`.
        op: &'static str,
        /// The path (under the sysfs root).
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// sysfs holds something we did not expect (bad vendor id, missing driver, ...).
    #[error("malformed sysfs: {0}")]
    MalformedSysfs(String),
    /// The PCI device is not an ENA network function (and not a network controller
    /// allowed by `--force-non-ena`).
    #[error(
        "PCI device {pci} is {name}, class {class}: not an Amazon ENA network function \
         (vendor 0x1d0f, device 0ec2/1ec2/ec20/ec21, class 0x02); refusing to rebind it{}",
        if *forced { " (--force-non-ena only extends to network controllers)" }
        else { " (--force-non-ena allows other network controllers, never disks or bridges)" }
    )]
    NotEna {
        /// PCI address.
        pci: String,
        /// Vendor id.
        vendor: u16,
        /// Device id.
        device: u16,
        /// Vendor and device name from the PCI ID database.
        name: String,
        /// Class name from the PCI ID database.
        class: String,
        /// Whether `--force-non-ena` was given.
        forced: bool,
    },
    /// vfio-pci needs an IOMMU group and the no-IOMMU opt-in was not given.
    #[error(
        "PCI device {pci} has no IOMMU group: vfio-pci needs an IOMMU{}; to use vfio's unsafe \
         no-IOMMU mode (no DMA isolation, taints the kernel) start eni-manager with \
         --enable-unsafe-noiommu-mode (chart value vfio.enableUnsafeNoIOMMUMode=true)",
        if *noiommu_on { " (vfio's enable_unsafe_noiommu_mode is on, but eni-manager was not allowed to use it)" } else { "" }
    )]
    NeedsIommu {
        /// PCI address.
        pci: String,
        /// Whether the vfio module parameter is on already.
        noiommu_on: bool,
    },
    /// The kernel driver we want to bind to is not loaded.
    #[error("driver {driver} is not loaded (no {path}); load it first, e.g. `modprobe {driver}`")]
    DriverNotLoaded {
        /// Driver name.
        driver: String,
        /// Directory that is missing.
        path: PathBuf,
    },
    /// After the bind sequence the device is not bound as expected.
    #[error("PCI device {pci}: expected driver {expected}, found {found}")]
    BindNotVerified {
        /// PCI address.
        pci: String,
        /// What we wanted.
        expected: String,
        /// What the `driver` symlink says (`none` when absent).
        found: String,
    },
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] eni_state::Error),
    /// The network namespace given with `--netns` could not be entered.
    #[error("cannot enter network namespace {path}: {reason}")]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A netlink request failed.
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    /// A netlink socket could not be opened.
    #[error("netlink socket: {0}")]
    NetlinkSocket(std::io::Error),
    /// The kubelet's PodResources API could not be asked.
    #[error("cannot ask the kubelet which pods hold devices ({socket}): {reason}")]
    PodResources {
        /// The pod-resources socket.
        socket: PathBuf,
        /// Why.
        reason: String,
    },
    /// A sysfs driver operation did not return in time (the kernel blocks an unbind while
    /// a process holds the device). It goes on in the background.
    #[error(
        "PCI device {pci}: {op} has not returned after {elapsed:?} (the kernel blocks \
         unbinding a device a process still holds); not waiting for it"
    )]
    SysfsStuck {
        /// PCI address.
        pci: String,
        /// `bind` or `release`.
        op: &'static str,
        /// How long it has been running.
        elapsed: std::time::Duration,
    },
    /// A blocking sysfs task failed (panicked).
    #[error("sysfs task failed: {0}")]
    SysfsTask(String),
    /// The process could not start (a listener, a directory, ...).
    #[error("cannot {what}: {source}")]
    Setup {
        /// What failed.
        what: &'static str,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The kubelet device plugin stopped.
    #[error("device plugin: {0}")]
    DevicePlugin(String),
    /// A Kubernetes API call failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
