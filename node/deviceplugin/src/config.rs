//! Configuration of the device plugin (no CLI parsing here: the node binary owns the flags).

use std::path::PathBuf;
use std::time::Duration;

/// How the plugin makes itself known to the kubelet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RegistrationMode {
    /// Serve a socket in the device-plugin directory and call `Register` on the kubelet's
    /// `kubelet.sock` (the classic flow; re-registers after kubelet restarts).
    #[default]
    DevicePlugin,
    /// Serve a socket in the kubelet's `plugins_registry` directory that answers
    /// `pluginregistration.Registration` (`GetInfo`, `NotifyRegistrationStatus`) and the
    /// device-plugin API; the kubelet's plugin watcher discovers it.
    PluginsRegistry,
}

impl std::str::FromStr for RegistrationMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "device-plugin" => Ok(Self::DevicePlugin),
            "plugins-registry" => Ok(Self::PluginsRegistry),
            other => Err(format!(
                "unknown registration mode {other:?} (expected device-plugin or plugins-registry)"
            )),
        }
    }
}

impl std::fmt::Display for RegistrationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::DevicePlugin => "device-plugin",
            Self::PluginsRegistry => "plugins-registry",
        })
    }
}

/// Device plugin settings. [`Config::default`] gives the production paths.
///
/// Suggested flags of the node binary (clap, with env fallbacks as it prefers):
///
/// | flag | field | default |
/// |---|---|---|
/// | `--device-plugin-dir` | `device_plugin_dir` | `/var/lib/kubelet/device-plugins` |
/// | `--device-plugin-registration` | `registration` | `device-plugin` (or `plugins-registry`) |
/// | `--plugins-registry-dir` | `plugins_registry_dir` | `/var/lib/kubelet/plugins_registry` |
/// | `--sysfs-root` (shared with the binder) | `sysfs_root` | `/sys` |
/// | `--dev-root` | `dev_root` | `/dev` |
/// | `--devinfo-dir` | `devinfo_dir` | `/var/run/k8s.cni.cncf.io/devinfo/dp` |
/// | (none: eni-manager leaves it unset) | `netdev_resource` | unset |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Directory holding `kubelet.sock` and, in device-plugin mode, the plugin sockets.
    pub device_plugin_dir: PathBuf,
    /// Registration flow.
    pub registration: RegistrationMode,
    /// The kubelet's plugin-watcher directory (used in `PluginsRegistry` mode).
    pub plugins_registry_dir: PathBuf,
    /// Where sysfs is mounted (`<root>/bus/pci/devices/<addr>`); a fake tree in tests.
    pub sysfs_root: PathBuf,
    /// Where the host's `/dev` is visible to this process, to check `vfio/<group>`
    /// exists. Paths handed to the kubelet always say `/dev/...`.
    pub dev_root: PathBuf,
    /// Multus device-info directory (`<resource>-<pci>-device.json` files).
    pub devinfo_dir: PathBuf,
    /// When set, devices bound to a kernel driver (non-DPDK ENIs, e.g. `ena`) are
    /// advertised, but only under this resource name; they are ignored otherwise.
    pub netdev_resource: Option<String>,
    /// Period of the health re-check (sysfs, `/dev/vfio`). Device-set changes from the
    /// node daemon are checked at once.
    pub health_interval: Duration,
    /// Period of the stat of the plugin's own socket and of `kubelet.sock` (inotify on
    /// the directory makes this a safety net).
    pub socket_check_interval: Duration,
    /// Timeout of one `Register` call to the kubelet.
    pub register_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            device_plugin_dir: PathBuf::from("/var/lib/kubelet/device-plugins"),
            registration: RegistrationMode::DevicePlugin,
            plugins_registry_dir: PathBuf::from("/var/lib/kubelet/plugins_registry"),
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            devinfo_dir: PathBuf::from("/var/run/k8s.cni.cncf.io/devinfo/dp"),
            netdev_resource: None,
            health_interval: Duration::from_millis(500),
            socket_check_interval: Duration::from_secs(1),
            register_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Directory the plugin sockets live in for the configured mode.
    pub fn socket_dir(&self) -> &std::path::Path {
        match self.registration {
            RegistrationMode::DevicePlugin => &self.device_plugin_dir,
            RegistrationMode::PluginsRegistry => &self.plugins_registry_dir,
        }
    }
}

/// File name of the plugin socket for `resource`, e.g.
/// `aws-multi-eni-intel.com_intel_sriov_netdevice.sock`.
pub fn socket_name(resource: &str) -> String {
    let safe: String = resource
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("aws-multi-eni-{safe}.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_parses_and_prints() {
        for m in [
            RegistrationMode::DevicePlugin,
            RegistrationMode::PluginsRegistry,
        ] {
            assert_eq!(m.to_string().parse::<RegistrationMode>(), Ok(m));
        }
        assert!("kubelet".parse::<RegistrationMode>().is_err());
    }

    #[test]
    fn socket_name_is_flat() {
        assert_eq!(
            socket_name("intel.com/intel_sriov_netdevice"),
            "aws-multi-eni-intel.com_intel_sriov_netdevice.sock"
        );
    }
}
