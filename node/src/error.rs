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
    /// The PCI device is not an ENA and `--force-non-ena` was not given.
    #[error(
        "PCI device {pci} is {name} ({vendor:#06x}:{device:#06x}), not an Amazon ENA (vendor 0x1d0f); \
         refusing to rebind it (pass --force-non-ena to override)"
    )]
    NotEna {
        /// PCI address.
        pci: String,
        /// Vendor id.
        vendor: u16,
        /// Device id.
        device: u16,
        /// Name from the PCI ID database.
        name: String,
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
    /// A Kubernetes API call failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
