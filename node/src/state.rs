//! The node state file, `<state-dir>/enis.json`.
//!
//! This is a shared contract: `cni-helper` reads it to resolve a device index to an
//! interface name (or, for DPDK-bound ENIs, a PCI address), and the daemon itself reads it
//! back after a restart, because a device bound to a userspace-I/O driver has no netdev
//! and therefore no MAC address the kernel could tell us any more. The layout is fixed:
//!
//! ```json
//! {"version":1,"node":"ip-10-0-0-1","enis":[{"eniID":"eni-0123","macAddress":"02:00:00:00:00:01",
//!   "deviceIndex":2,"networkCardIndex":0,"nodeENI":"multus","interfaceName":"ens7",
//!   "pciAddress":"0000:00:07.0","driver":"ena","dpdkBound":false,"resourceName":null}]}
//! ```
//!
//! Every write goes to a temporary file in the same directory that is then renamed over
//! the old one, so readers see either the old or the new content, never a torn file.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Current version of the format.
pub const VERSION: u32 = 1;
/// File name inside the state directory.
pub const FILE_NAME: &str = "enis.json";

/// Content of `enis.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StateFile {
    /// Always [`VERSION`].
    pub version: u32,
    /// Node name the daemon runs for.
    pub node: String,
    /// One entry per ENI the daemon has located on the node.
    pub enis: Vec<EniState>,
}

/// One ENI on the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EniState {
    /// The ENI id.
    #[serde(rename = "eniID")]
    pub eni_id: String,
    /// Its MAC address, lower case.
    #[serde(rename = "macAddress")]
    pub mac_address: String,
    /// EC2 device index.
    #[serde(rename = "deviceIndex")]
    pub device_index: i32,
    /// EC2 network card index.
    #[serde(rename = "networkCardIndex")]
    pub network_card_index: i32,
    /// Name of the NodeENI the ENI belongs to.
    #[serde(rename = "nodeENI")]
    pub node_eni: String,
    /// Kernel interface name; `null` while the device has no netdev (DPDK-bound).
    #[serde(rename = "interfaceName")]
    pub interface_name: Option<String>,
    /// PCI address, when the device has one.
    #[serde(rename = "pciAddress")]
    pub pci_address: Option<String>,
    /// Driver the PCI device is bound to right now.
    pub driver: Option<String>,
    /// Whether the device is bound to its DPDK driver.
    #[serde(rename = "dpdkBound")]
    pub dpdk_bound: bool,
    /// Extended resource a DPDK ENI is advertised as.
    #[serde(rename = "resourceName")]
    pub resource_name: Option<String>,
}

impl StateFile {
    /// An empty state for `node`.
    pub fn empty(node: &str) -> Self {
        Self {
            version: VERSION,
            node: node.to_string(),
            enis: Vec::new(),
        }
    }
}

/// Path of the state file in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Reads the state file; `Ok(None)` when it does not exist.
pub fn load(path: &Path) -> Result<Option<StateFile>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::StateIo {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| Error::StateParse {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes `state` to `path` atomically (temporary file in the same directory, then
/// rename). Creates the directory when needed. No fsync: the file lives on a tmpfs
/// (`/run`) and describes the running system, so it is meant to vanish with a reboot, and
/// a crash of the daemon alone loses nothing that was written.
pub fn save(path: &Path, state: &StateFile) -> Result<()> {
    let io = |source| Error::StateIo {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut json = serde_json::to_vec_pretty(state).map_err(|source| Error::StateParse {
        path: path.to_path_buf(),
        source,
    })?;
    json.push(b'\n');
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(&json).map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
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
    fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(dir.path());
        std::fs::write(&p, "{not json").expect("write");
        assert!(matches!(load(&p), Err(Error::StateParse { .. })));
    }
}
