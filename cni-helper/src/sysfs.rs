//! Finding a local network interface by MAC through sysfs (`/sys/class/net/*/address`).
//!
//! sysfs shows the network namespace of whoever mounted it; `ip netns exec` remounts it,
//! and a CNI plugin runs in the node's namespace, so this is the node's view.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Default sysfs directory of network interfaces.
pub const SYS_CLASS_NET: &str = "/sys/class/net";

/// Default sysfs directory of PCI devices.
pub const SYS_PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// The calling process's network namespace's `/proc/net`.
pub const PROC_NET: &str = "/proc/self/net";

/// Looks up local interfaces (a trait so tests can stub it).
pub trait NetDevices {
    /// Where the lookup happens (for messages).
    fn describe(&self) -> String;
    /// The name of the interface with this MAC, if any.
    fn by_mac(&self, mac: &str) -> std::io::Result<Option<String>>;
    /// Interfaces that carry a default route (IPv4 or IPv6, main table).
    fn default_route_interfaces(&self) -> std::io::Result<BTreeSet<String>>;
    /// The network interfaces of a PCI device (none when it is bound to vfio-pci, or is
    /// not a network device).
    fn pci_netdevs(&self, pci: &str) -> std::io::Result<Vec<String>>;
    /// An interface's MAC address, lower case.
    fn mac_of(&self, name: &str) -> Option<String>;
}

/// sysfs-backed lookup.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
    pci_root: PathBuf,
    proc_net: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new(Path::new(SYS_CLASS_NET))
    }
}

impl Sysfs {
    /// Lookup under `root` (a `/sys/class/net`-like directory), with the real PCI devices
    /// and `/proc/net`.
    pub fn new(root: &Path) -> Self {
        Self::with_paths(root, Path::new(SYS_PCI_DEVICES), Path::new(PROC_NET))
    }

    /// Lookup with every source moved (tests).
    pub fn with_paths(class_net: &Path, pci_devices: &Path, proc_net: &Path) -> Self {
        Self {
            root: class_net.to_path_buf(),
            pci_root: pci_devices.to_path_buf(),
            proc_net: proc_net.to_path_buf(),
        }
    }
}

/// Interfaces with a default route in the text of `/proc/net/route` and
/// `/proc/net/ipv6_route`.
pub fn parse_default_routes(route: &str, ipv6_route: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // Iface Destination Gateway Flags RefCnt Use Metric Mask ... (hex, header line first)
    for line in route.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000" {
            out.insert(f[0].to_owned());
        }
    }
    // dest dest_len src src_len next_hop metric refcnt use flags iface (no header)
    const RTF_REJECT: u32 = 0x0200;
    for line in ipv6_route.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[1] != "00" || f[0].bytes().any(|b| b != b'0') {
            continue;
        }
        let flags = u32::from_str_radix(f[8], 16).unwrap_or(0);
        if flags & RTF_REJECT == 0 && f[9] != "lo" {
            out.insert(f[9].to_owned());
        }
    }
    out
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

    fn default_route_interfaces(&self) -> std::io::Result<BTreeSet<String>> {
        let route = std::fs::read_to_string(self.proc_net.join("route"))?;
        // A kernel without IPv6 has no ipv6_route.
        let v6 = std::fs::read_to_string(self.proc_net.join("ipv6_route")).unwrap_or_default();
        Ok(parse_default_routes(&route, &v6))
    }

    fn pci_netdevs(&self, pci: &str) -> std::io::Result<Vec<String>> {
        if pci.is_empty() || pci.contains('/') || pci.starts_with('.') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{pci:?} is not a PCI address"),
            ));
        }
        let dir = self.pci_root.join(pci).join("net");
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                let mut names: Vec<String> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                Ok(names)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn mac_of(&self, name: &str) -> Option<String> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        std::fs::read_to_string(self.root.join(name).join("address"))
            .ok()
            .map(|m| normalize_mac(&m))
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
    fn default_routes_from_proc_net() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            ens5\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            ens5\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            ens7\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00450003     ens6\n\
            fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     ens7\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        let got = parse_default_routes(route, v6);
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec!["ens5".to_owned(), "ens6".to_owned()]
        );
        assert!(parse_default_routes("", "").is_empty());
    }

    #[test]
    fn netdevs_of_a_pci_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pci = dir.path().join("pci");
        std::fs::create_dir_all(pci.join("0000:00:05.0/net/ens5")).expect("mkdir");
        std::fs::create_dir_all(pci.join("0000:00:06.0")).expect("mkdir");
        let s = Sysfs::with_paths(dir.path(), &pci, dir.path());
        assert_eq!(s.pci_netdevs("0000:00:05.0").expect("io"), vec!["ens5"]);
        assert!(s.pci_netdevs("0000:00:06.0").expect("io").is_empty());
        assert!(s.pci_netdevs("0000:00:07.0").expect("io").is_empty());
        assert!(s.pci_netdevs("../../etc").is_err());
        iface(dir.path(), "ens5", "02:00:00:00:00:AA", 2, 2, true);
        assert_eq!(s.mac_of("ens5").as_deref(), Some("02:00:00:00:00:aa"));
        assert_eq!(s.mac_of("../x"), None);
    }

    #[test]
    fn missing_root_is_an_error() {
        let s = Sysfs::new(Path::new("/nonexistent/sys/class/net"));
        assert!(s.by_mac("02:00:00:00:00:aa").is_err());
    }
}
