//! The node daemon's state file, `<state-dir>/enis.json` (read-only here).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// File name of the state file inside the state directory.
pub const STATE_FILE: &str = "enis.json";
/// The state file format version this reader understands.
pub const STATE_VERSION: u64 = 1;

/// The state file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// Format version (1).
    pub version: u64,
    /// The node's name.
    #[serde(default)]
    pub node: String,
    /// ENIs attached to this node.
    #[serde(default)]
    pub enis: Vec<EniState>,
}

/// One ENI of the node.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EniState {
    /// `eni-...`.
    #[serde(rename = "eniID", default)]
    pub eni_id: String,
    /// MAC address.
    #[serde(default)]
    pub mac_address: Option<String>,
    /// Device index.
    pub device_index: u64,
    /// Network card index.
    #[serde(default)]
    pub network_card_index: u64,
    /// The NodeENI it belongs to.
    #[serde(rename = "nodeENI", default)]
    pub node_eni: Option<String>,
    /// Kernel interface name (null when DPDK-bound).
    #[serde(default)]
    pub interface_name: Option<String>,
    /// PCI address.
    #[serde(default)]
    pub pci_address: Option<String>,
    /// Bound driver.
    #[serde(default)]
    pub driver: Option<String>,
    /// Bound to a userspace (DPDK) driver.
    #[serde(default)]
    pub dpdk_bound: bool,
    /// Device plugin resource name.
    #[serde(default)]
    pub resource_name: Option<String>,
}

impl NodeState {
    /// Finds the ENI at a device index on a network card.
    pub fn find(&self, device_index: u64, network_card_index: u64) -> Option<&EniState> {
        self.enis
            .iter()
            .find(|e| e.device_index == device_index && e.network_card_index == network_card_index)
    }
}

/// Errors reading the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No state file (no node daemon on this node, or not written yet).
    #[error("{0} does not exist")]
    NotFound(PathBuf),
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid state JSON.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A format version we do not know.
    #[error("{path} has version {version}, this cni-helper reads version {STATE_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u64,
    },
}

/// Source of the node state (a trait so tests can stub it).
pub trait StateSource {
    /// Where the state comes from (for messages).
    fn describe(&self) -> String;
    /// Loads the state.
    fn load(&self) -> Result<NodeState, StateError>;
}

/// The state file in a directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join(STATE_FILE),
        }
    }
}

impl StateSource for StateFile {
    fn describe(&self) -> String {
        format!("state file {}", self.path.display())
    }

    fn load(&self) -> Result<NodeState, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(self.path.clone()));
            }
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        parse(&bytes).map_err(|e| match e {
            ParseError::Json(source) => StateError::Parse {
                path: self.path.clone(),
                source,
            },
            ParseError::Version(version) => StateError::Version {
                path: self.path.clone(),
                version,
            },
        })
    }
}

/// Errors of [`parse`].
#[derive(Debug)]
pub enum ParseError {
    /// Bad JSON.
    Json(serde_json::Error),
    /// Unknown version.
    Version(u64),
}

/// Parses state file bytes.
pub fn parse(bytes: &[u8]) -> Result<NodeState, ParseError> {
    let state: NodeState = serde_json::from_slice(bytes).map_err(ParseError::Json)?;
    if state.version != STATE_VERSION {
        return Err(ParseError::Version(state.version));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"version":1,"node":"ip-10-0-0-1","enis":[
        {"eniID":"eni-1","macAddress":"02:00:00:00:00:02","deviceIndex":2,"networkCardIndex":0,
         "nodeENI":"multus","interfaceName":"ens7","pciAddress":"0000:00:07.0","driver":"ena",
         "dpdkBound":false,"resourceName":null},
        {"eniID":"eni-2","macAddress":"02:00:00:00:00:03","deviceIndex":3,"networkCardIndex":0,
         "nodeENI":"dpdk","interfaceName":null,"pciAddress":"0000:00:08.0","driver":"vfio-pci",
         "dpdkBound":true,"resourceName":"intel.com/intel_sriov_netdevice"},
        {"eniID":"eni-3","macAddress":"02:00:00:00:00:04","deviceIndex":2,"networkCardIndex":1,
         "nodeENI":"card1","interfaceName":"ens9","pciAddress":null,"driver":null,
         "dpdkBound":false,"resourceName":null}]}"#;

    #[test]
    fn parses_the_contract() {
        let s = parse(SAMPLE.as_bytes()).expect("valid");
        assert_eq!(s.node, "ip-10-0-0-1");
        let e = s.find(2, 0).expect("present");
        assert_eq!(e.interface_name.as_deref(), Some("ens7"));
        let d = s.find(3, 0).expect("present");
        assert!(d.dpdk_bound);
        assert_eq!(d.interface_name, None);
        assert_eq!(d.pci_address.as_deref(), Some("0000:00:08.0"));
        assert_eq!(
            s.find(2, 1).and_then(|e| e.interface_name.as_deref()),
            Some("ens9")
        );
        assert!(s.find(4, 0).is_none());
    }

    #[test]
    fn rejects_other_versions_and_garbage() {
        assert!(matches!(
            parse(br#"{"version":2,"node":"n","enis":[]}"#),
            Err(ParseError::Version(2))
        ));
        assert!(matches!(parse(b"{"), Err(ParseError::Json(_))));
    }

    #[test]
    fn reads_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = StateFile::in_dir(dir.path());
        assert!(matches!(f.load(), Err(StateError::NotFound(_))));
        std::fs::write(dir.path().join(STATE_FILE), SAMPLE).expect("write");
        assert_eq!(f.load().expect("valid").enis.len(), 3);
        std::fs::write(dir.path().join(STATE_FILE), "nope").expect("write");
        let e = f.load().expect_err("invalid");
        assert!(e.to_string().contains("enis.json"), "{e}");
    }
}
