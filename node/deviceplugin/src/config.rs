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
    /// Where successful allocations are counted.
    pub allocations: crate::Allocations,
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
            allocations: crate::Allocations::default(),
        }
    }
}

impl Config {
    /// Both directories a plugin socket may live in.
    pub fn socket_dirs(&self) -> [&std::path::Path; 2] {
        [&self.device_plugin_dir, &self.plugins_registry_dir]
    }

    /// Directory the plugin sockets live in for the configured mode.
    pub fn socket_dir(&self) -> &std::path::Path {
        match self.registration {
            RegistrationMode::DevicePlugin => &self.device_plugin_dir,
            RegistrationMode::PluginsRegistry => &self.plugins_registry_dir,
        }
    }
}

/// Longest socket file name [`socket_name`] produces. A Unix socket path must fit in
/// `sun_path` (108 bytes with the terminating NUL); this leaves 43 bytes for the
/// directory, enough for `/var/lib/kubelet/device-plugins/` and
/// `/var/lib/kubelet/plugins_registry/`.
pub const MAX_SOCKET_NAME: usize = 64;

/// Longest Unix socket path (`sun_path` is 108 bytes, NUL included).
pub const MAX_SOCKET_PATH: usize = 107;

/// File name of the plugin socket for `resource`, e.g.
/// `aws-multi-eni-intel.com_intel_sriov_netdevice.sock`: the resource name with every
/// character outside `[A-Za-z0-9._-]` replaced by `_`. A name that would make it longer
/// than [`MAX_SOCKET_NAME`] (a valid resource name can be 317 characters: a 253-character
/// domain, `/`, a 63-character name) is cut and given a hash of the full name, so it
/// stays unique and the same across restarts:
/// `aws-multi-eni-<first 28 characters>-<16 hex digits>.sock`.
pub fn socket_name(resource: &str) -> String {
    const PREFIX: &str = "aws-multi-eni-";
    const SUFFIX: &str = ".sock";
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
    if PREFIX.len() + safe.len() + SUFFIX.len() <= MAX_SOCKET_NAME {
        return format!("{PREFIX}{safe}{SUFFIX}");
    }
    // 14 + 28 + 1 + 16 + 5 = 64.
    let head: String = safe.chars().take(28).collect();
    format!(
        "{PREFIX}{head}-{:016x}{SUFFIX}",
        fnv1a64(resource.as_bytes())
    )
}

/// FNV-1a, 64 bits: a stable hash (unlike std's `DefaultHasher`, whose output may change
/// between Rust releases), so a socket keeps its name across upgrades.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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

    /// The longest valid extended resource name: a 253-character DNS subdomain, `/`, a
    /// 63-character name.
    fn longest_resource_name(tail: char) -> String {
        let label = "a".repeat(63);
        let domain = format!("{label}.{label}.{label}.{}", "b".repeat(61));
        assert_eq!(domain.len(), 253);
        let name = format!("{}{tail}", "n".repeat(62));
        format!("{domain}/{name}")
    }

    #[test]
    fn long_resource_names_get_short_unique_stable_socket_names() {
        let long = longest_resource_name('x');
        assert_eq!(long.len(), 317);
        let name = socket_name(&long);
        assert_eq!(name.len(), MAX_SOCKET_NAME, "{name}");
        assert!(name.starts_with("aws-multi-eni-aaaa") && name.ends_with(".sock"));
        // Unique: names differing only in their last character get different sockets.
        assert_ne!(name, socket_name(&longest_resource_name('y')));
        // Stable across releases (a fixed hash, not std's).
        assert_eq!(socket_name(&long), name);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        // Fits under both kubelet directories.
        for dir in Config::default().socket_dirs() {
            assert!(dir.join(&name).as_os_str().len() <= MAX_SOCKET_PATH);
        }
        // Short names stay readable.
        let exact = format!("x.io/{}", "n".repeat(MAX_SOCKET_NAME - 19 - 5));
        assert_eq!(socket_name(&exact).len(), MAX_SOCKET_NAME);
        assert!(socket_name(&exact).ends_with("nnnn.sock"));
        assert_eq!(socket_name(&format!("{exact}n")).len(), MAX_SOCKET_NAME);
    }

    #[test]
    fn socket_name_is_flat() {
        assert_eq!(
            socket_name("intel.com/intel_sriov_netdevice"),
            "aws-multi-eni-intel.com_intel_sriov_netdevice.sock"
        );
    }
}
