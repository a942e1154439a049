//! Finding a local network interface by MAC through sysfs (`/sys/class/net/*/address`).
//!
//! sysfs shows the network namespace of whoever mounted it; `ip netns exec` remounts it,
//! and a CNI plugin runs in the node's namespace, so this is the node's view.

use std::path::{Path, PathBuf};

/// Default sysfs directory of network interfaces.
pub const SYS_CLASS_NET: &str = "/sys/class/net";

/// Looks up local interfaces (a trait so tests can stub it).
pub trait NetDevices {
    /// Where the lookup happens (for messages).
    fn describe(&self) -> String;
    /// The name of the interface with this MAC, if any.
    fn by_mac(&self, mac: &str) -> std::io::Result<Option<String>>;
}

/// sysfs-backed lookup.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new(Path::new(SYS_CLASS_NET))
    }
}

impl Sysfs {
    /// Lookup under `root` (a `/sys/class/net`-like directory).
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
}

/// Lower-cases a MAC for comparison.
pub fn normalize_mac(mac: &str) -> String {
    mac.trim().to_ascii_lowercase()
}

#[derive(Debug)]
struct Candidate {
    name: String,
    has_device: bool,
    stacked: bool,
}

impl NetDevices for Sysfs {
    fn describe(&self) -> String {
        format!("interfaces in {}", self.root.display())
    }

    fn by_mac(&self, mac: &str) -> std::io::Result<Option<String>> {
        let want = normalize_mac(mac);
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let dir = entry.path();
            let Ok(addr) = std::fs::read_to_string(dir.join("address")) else {
                continue;
            };
            if normalize_mac(&addr) != want {
                continue;
            }
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).map(|s| s.trim().to_owned());
            // VLANs, ipvlans and the like share their parent's MAC: their iflink differs
            // from their ifindex. Prefer the real device.
            let stacked = matches!((read("ifindex"), read("iflink")), (Ok(a), Ok(b)) if a != b);
            found.push(Candidate {
                name: entry.file_name().to_string_lossy().into_owned(),
                has_device: dir.join("device").exists(),
                stacked,
            });
        }
        found.sort_by(|a, b| {
            (b.has_device, !b.stacked)
                .cmp(&(a.has_device, !a.stacked))
                .then_with(|| a.name.cmp(&b.name))
        });
        Ok(found.into_iter().next().map(|c| c.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(root: &Path, name: &str, mac: &str, index: u32, link: u32, device: bool) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("address"), format!("{mac}\n")).expect("write");
        std::fs::write(d.join("ifindex"), format!("{index}\n")).expect("write");
        std::fs::write(d.join("iflink"), format!("{link}\n")).expect("write");
        if device {
            std::fs::create_dir_all(d.join("device")).expect("mkdir");
        }
    }

    #[test]
    fn finds_by_mac_case_insensitively() {
        let dir = tempfile::tempdir().expect("tempdir");
        iface(dir.path(), "eth0", "02:00:00:00:00:01", 2, 2, true);
        iface(dir.path(), "ens7", "02:00:00:00:00:aa", 3, 3, false);
        let s = Sysfs::new(dir.path());
        assert_eq!(
            s.by_mac("02:00:00:00:00:AA").expect("io").as_deref(),
            Some("ens7")
        );
        assert_eq!(s.by_mac("02:00:00:00:00:ff").expect("io"), None);
    }

    #[test]
    fn prefers_the_real_device_over_stacked_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        iface(dir.path(), "a-vlan", "02:00:00:00:00:aa", 4, 3, false);
        iface(dir.path(), "ens7", "02:00:00:00:00:aa", 3, 3, true);
        let s = Sysfs::new(dir.path());
        assert_eq!(
            s.by_mac("02:00:00:00:00:aa").expect("io").as_deref(),
            Some("ens7")
        );
    }

    #[test]
    fn missing_root_is_an_error() {
        let s = Sysfs::new(Path::new("/nonexistent/sys/class/net"));
        assert!(s.by_mac("02:00:00:00:00:aa").is_err());
    }
}
