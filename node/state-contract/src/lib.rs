//! The node state file, `<state-dir>/enis.json`: the one contract between the node daemon
//! (`eni-manager`, the only writer) and `cni-helper` (a reader, once per CNI call).
//!
//! The daemon records every ENI it located on the node: cni-helper resolves a device index
//! to an interface name, or for a DPDK-bound ENI (no netdev any more) to its PCI address;
//! the daemon reads it back after a restart, because a device bound to vfio-pci has no
//! netdev and so no MAC the kernel could still show.
//!
//! ```json
//! {"version":1,"node":"ip-10-0-0-1","enis":[{"eniID":"eni-0123","macAddress":"02:00:00:00:00:01",
//!   "deviceIndex":2,"networkCardIndex":0,"nodeENI":"multus","interfaceName":"ens7",
//!   "pciAddress":"0000:00:07.0","driver":"ena","dpdkBound":false,"resourceName":null}]}
//! ```
//!
//! With a NodeENI `ipam` section, `pools` holds each ENI's pod address pool (keyed by ENI
//! id): the addresses and /28 prefixes assigned to it in EC2 that cni-helper may hand to
//! pods, with the subnet's CIDR and gateway. The daemon writes it under the allocation
//! lock (see [`alloc`]), so cni-helper never allocates from a pool that was just shrunk.
//!
//! Compatibility rules (both sides use this crate, so they cannot drift):
//!
//! * [`save`] writes a temporary file in the same directory and renames it over the old
//!   one: a reader sees the old or the new content, never a torn file.
//! * [`load`] is tolerant within a version: unknown fields are ignored and every field but
//!   `version` and an entry's `deviceIndex` may be absent (a newer daemon may add fields, an
//!   older one may not have written some). A different `version` is an error: the meaning
//!   of the fields changed and guessing could hand a pod the wrong device.

pub mod alloc;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Current version of the format.
pub const VERSION: u32 = 1;
/// File name inside the state directory.
pub const FILE_NAME: &str = "enis.json";
/// The daemon's default state directory (a tmpfs: the file describes the running system
/// and must vanish with a reboot).
pub const DEFAULT_STATE_DIR: &str = "/run/aws-multi-eni";

/// Content of `enis.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StateFile {
    /// Always [`VERSION`] when written by this crate.
    pub version: u32,
    /// Node name the daemon runs for.
    #[serde(default)]
    pub node: String,
    /// One entry per ENI the daemon has located on the node.
    #[serde(default)]
    pub enis: Vec<EniState>,
    /// Pod address pools by ENI id (only ENIs of a NodeENI with `ipam`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<String, PodPool>,
}

/// The pod addresses of one ENI that cni-helper may hand out.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodPool {
    /// The subnet's CIDR block (pods get its prefix length).
    #[serde(rename = "subnetCIDR", default)]
    pub subnet_cidr: String,
    /// The VPC router of the subnet (its first address + 1), the pods' gateway.
    #[serde(default)]
    pub gateway: String,
    /// Secondary addresses assigned to the ENI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// /28 prefixes assigned to the ENI (every address in them is usable).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
}

impl PodPool {
    /// Every address of the pool: the secondary addresses, then each prefix's addresses,
    /// in order; malformed entries are skipped.
    pub fn expand(&self) -> Vec<std::net::Ipv4Addr> {
        let mut out: Vec<std::net::Ipv4Addr> = self
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        for p in &self.prefixes {
            let Some((base, len)) = p.split_once('/') else {
                continue;
            };
            let (Ok(base), Ok(len)) = (base.parse::<std::net::Ipv4Addr>(), len.parse::<u32>())
            else {
                continue;
            };
            if !(24..=32).contains(&len) {
                continue;
            }
            let base = u32::from(base);
            for i in 0..(1u32 << (32 - len)) {
                out.push(std::net::Ipv4Addr::from(base + i));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether `unit` (an address or a prefix) is in the pool.
    pub fn holds(&self, unit: &str) -> bool {
        self.addresses.iter().any(|a| a == unit) || self.prefixes.iter().any(|p| p == unit)
    }
}

/// One ENI on the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EniState {
    /// The ENI id.
    #[serde(rename = "eniID", default)]
    pub eni_id: String,
    /// Its MAC address, lower case (empty: unknown).
    #[serde(rename = "macAddress", default)]
    pub mac_address: String,
    /// EC2 device index (0 is the primary ENI). `i32` as in the EC2 API and the CRD.
    #[serde(rename = "deviceIndex")]
    pub device_index: i32,
    /// EC2 network card index.
    #[serde(rename = "networkCardIndex", default)]
    pub network_card_index: i32,
    /// Name of the NodeENI the ENI belongs to.
    #[serde(rename = "nodeENI", default)]
    pub node_eni: String,
    /// Kernel interface name; `null` while the device has no netdev (DPDK-bound).
    #[serde(rename = "interfaceName", default)]
    pub interface_name: Option<String>,
    /// PCI address, when the device has one.
    #[serde(rename = "pciAddress", default)]
    pub pci_address: Option<String>,
    /// Driver the PCI device is bound to right now.
    #[serde(default)]
    pub driver: Option<String>,
    /// Whether the device is bound to its DPDK driver.
    #[serde(rename = "dpdkBound", default)]
    pub dpdk_bound: bool,
    /// Extended resource a DPDK ENI is advertised as.
    #[serde(rename = "resourceName", default)]
    pub resource_name: Option<String>,
}

impl StateFile {
    /// An empty state for `node`.
    pub fn empty(node: &str) -> Self {
        Self {
            version: VERSION,
            node: node.to_string(),
            enis: Vec::new(),
            pools: BTreeMap::new(),
        }
    }

    /// The entry at `device_index` on `network_card_index`.
    pub fn find(&self, device_index: i32, network_card_index: i32) -> Option<&EniState> {
        self.enis
            .iter()
            .find(|e| e.device_index == device_index && e.network_card_index == network_card_index)
    }
}

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file (or its directory) could not be read or written.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid state JSON.
    #[error("state file {path} is not valid: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A format version this build does not know.
    #[error("state file {path} has version {version}; this build reads version {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u64,
    },
}

/// Path of the state file in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Why [`parse`] refused some bytes.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, or not the shape of a state file.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// A version this build does not know.
    #[error("version {0}")]
    Version(u64),
}

/// Parses state file bytes (tolerantly, see the crate docs).
pub fn parse(bytes: &[u8]) -> Result<StateFile, ParseError> {
    // Look at the version first: a file of another version may not even have our shape.
    #[derive(Deserialize)]
    struct Probe {
        version: u64,
    }
    let probe: Probe = serde_json::from_slice(bytes)?;
    if probe.version != u64::from(VERSION) {
        return Err(ParseError::Version(probe.version));
    }
    Ok(serde_json::from_slice(bytes)?)
}

/// Reads the state file at `path`; `Ok(None)` when it does not exist.
pub fn load(path: &Path) -> Result<Option<StateFile>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    match parse(&bytes) {
        Ok(s) => Ok(Some(s)),
        Err(ParseError::Json(source)) => Err(Error::Parse {
            path: path.to_path_buf(),
            source,
        }),
        Err(ParseError::Version(version)) => Err(Error::Version {
            path: path.to_path_buf(),
            version,
        }),
    }
}

/// Writes `state` to `path` atomically: a temporary file in the same directory (unique per
/// process and call), then a rename. Creates the directory when needed. No fsync: the file
/// lives on a tmpfs (`/run`) and describes the running system, so it is meant to vanish
/// with a reboot, and a crash of the daemon alone loses nothing that was written.
pub fn save(path: &Path, state: &StateFile) -> Result<(), Error> {
    write_atomic(path, state)
}

/// Writes `value` as pretty JSON to `path` through a temporary file and a rename.
pub(crate) fn write_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut json = serde_json::to_vec_pretty(value).map_err(|source| Error::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    json.push(b'\n');
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| FILE_NAME.to_string());
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&json))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> EniState {
        EniState {
            eni_id: "eni-0123".into(),
            mac_address: "02:00:00:00:00:01".into(),
            device_index: 2,
            network_card_index: 0,
            node_eni: "multus".into(),
            interface_name: Some("ens7".into()),
            pci_address: None,
            driver: None,
            dpdk_bound: false,
            resource_name: None,
        }
    }

    #[test]
    fn format_is_the_shared_contract() {
        let state = StateFile {
            version: 1,
            node: "n1".into(),
            enis: vec![entry()],
            pools: BTreeMap::new(),
        };
        let v = serde_json::to_value(&state).expect("serializes");
        let expected = serde_json::json!({
            "version": 1, "node": "n1",
            "enis": [{
                "eniID": "eni-0123", "macAddress": "02:00:00:00:00:01", "deviceIndex": 2,
                "networkCardIndex": 0, "nodeENI": "multus", "interfaceName": "ens7",
                "pciAddress": null, "driver": null, "dpdkBound": false, "resourceName": null
            }]
        });
        assert_eq!(v, expected);
    }

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(&dir.path().join("sub"));
        assert_eq!(load(&p).expect("missing is fine"), None);
        let mut state = StateFile::empty("n1");
        state.enis.push(entry());
        save(&p, &state).expect("save");
        state.enis[0].dpdk_bound = true;
        save(&p, &state).expect("save again");
        assert_eq!(load(&p).expect("load"), Some(state));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)]);
    }

    #[test]
    fn a_failed_save_leaves_the_old_file_and_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(dir.path());
        save(&p, &StateFile::empty("n1")).expect("save");
        // The target is now a non-empty directory: the rename fails.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join(FILE_NAME).join("x")).expect("mkdir");
        let e = save(&path(&blocked), &StateFile::empty("n2")).expect_err("rename fails");
        assert!(matches!(e, Error::Io { .. }), "{e}");
        let left: Vec<_> = std::fs::read_dir(&blocked)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(FILE_NAME)]);
        assert_eq!(load(&p).expect("load").expect("exists").node, "n1");
    }

    #[test]
    fn load_tolerates_unknown_and_missing_fields() {
        // A newer writer added fields; an older one left optional ones out.
        let s = parse(
            br#"{"version":1,"futureTopLevel":{"x":1},"enis":[
                {"deviceIndex":3,"pciAddress":"0000:00:08.0","dpdkBound":true,"futureField":[1]},
                {"deviceIndex":2,"networkCardIndex":1,"interfaceName":"ens9"}]}"#,
        )
        .expect("tolerant");
        assert_eq!(s.node, "");
        let d = s.find(3, 0).expect("index 3");
        assert!(d.dpdk_bound);
        assert_eq!(d.pci_address.as_deref(), Some("0000:00:08.0"));
        assert_eq!(d.mac_address, "");
        assert_eq!(
            s.find(2, 1).and_then(|e| e.interface_name.as_deref()),
            Some("ens9")
        );
        assert!(s.find(2, 0).is_none());
    }

    #[test]
    fn other_versions_and_garbage_are_errors_not_guesses() {
        assert!(matches!(
            parse(br#"{"version":2,"enis":"a different shape"}"#),
            Err(ParseError::Version(2))
        ));
        assert!(matches!(parse(b"{"), Err(ParseError::Json(_))));
        assert!(matches!(parse(br#"{"enis":[]}"#), Err(ParseError::Json(_))));
        // An entry without its device index cannot be resolved: the file is invalid.
        assert!(matches!(
            parse(br#"{"version":1,"enis":[{"eniID":"eni-1"}]}"#),
            Err(ParseError::Json(_))
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(dir.path());
        std::fs::write(&p, "{not json").expect("write");
        let e = load(&p).expect_err("garbage");
        assert!(matches!(e, Error::Parse { .. }));
        assert!(e.to_string().contains(FILE_NAME), "{e}");
        std::fs::write(&p, r#"{"version":7}"#).expect("write");
        let e = load(&p).expect_err("version");
        assert!(matches!(e, Error::Version { version: 7, .. }), "{e}");
    }

    #[test]
    fn concurrent_saves_never_show_a_torn_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(dir.path());
        save(&p, &StateFile::empty("start")).expect("save");
        std::thread::scope(|s| {
            for w in 0..4 {
                let p = p.clone();
                s.spawn(move || {
                    for i in 0..50 {
                        let mut st = StateFile::empty(&format!("w{w}-{i}"));
                        st.enis = vec![entry(); i % 7];
                        save(&p, &st).expect("save");
                    }
                });
            }
            for _ in 0..200 {
                load(&p).expect("never torn").expect("exists");
            }
        });
        let left = std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(left, 1, "no temporary files left");
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn arb_entry() -> impl Strategy<Value = EniState> {
            (
                "eni-[0-9a-f]{1,8}",
                "([0-9a-f]{2}:){5}[0-9a-f]{2}",
                0i32..16,
                0i32..4,
                proptest::option::of("ens[0-9]{1,2}"),
                proptest::option::of("0000:00:[01][0-9a-f]\\.0"),
                any::<bool>(),
                proptest::option::of("[a-z]{1,5}\\.com/[a-z_]{1,10}"),
            )
                .prop_map(|(eni, mac, di, ci, ifn, pci, bound, res)| EniState {
                    eni_id: eni,
                    mac_address: mac,
                    device_index: di,
                    network_card_index: ci,
                    node_eni: "x".into(),
                    interface_name: ifn,
                    pci_address: pci,
                    driver: None,
                    dpdk_bound: bound,
                    resource_name: res,
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]
            #[test]
            fn what_is_written_is_what_is_read(enis in prop::collection::vec(arb_entry(), 0..6)) {
                let state = StateFile { version: VERSION, node: "n".into(), enis, pools: BTreeMap::new() };
                let bytes = serde_json::to_vec(&state).expect("serializes");
                prop_assert_eq!(parse(&bytes).expect("parses"), state);
            }

            #[test]
            fn never_panics(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
                let _ = parse(&bytes);
            }
        }
    }
}
