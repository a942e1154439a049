//! The node daemon's state file, `<state-dir>/enis.json` (read-only here).
//!
//! The format is the `eni-state` crate's, shared with the daemon that writes it.

use std::path::{Path, PathBuf};

pub use eni_state::{EniState, FILE_NAME as STATE_FILE, StateFile as NodeState};

/// Errors reading the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No state file (no node daemon on this node, or not written yet).
    #[error("{0} does not exist")]
    NotFound(PathBuf),
    /// Unreadable, invalid, or of another version.
    #[error(transparent)]
    Load(#[from] eni_state::Error),
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
            path: eni_state::path(dir),
        }
    }
}

impl StateSource for StateFile {
    fn describe(&self) -> String {
        format!("state file {}", self.path.display())
    }

    fn load(&self) -> Result<NodeState, StateError> {
        eni_state::load(&self.path)?.ok_or_else(|| StateError::NotFound(self.path.clone()))
    }
}

/// The entry at a device index on a network card (indexes as cni-helper parses them).
pub fn find(state: &NodeState, device_index: u64, network_card_index: u64) -> Option<&EniState> {
    let d = i32::try_from(device_index).ok()?;
    let c = i32::try_from(network_card_index).ok()?;
    state.find(d, c)
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
        let s = eni_state::parse(SAMPLE.as_bytes()).expect("valid");
        assert_eq!(s.node, "ip-10-0-0-1");
        let e = find(&s, 2, 0).expect("present");
        assert_eq!(e.interface_name.as_deref(), Some("ens7"));
        let d = find(&s, 3, 0).expect("present");
        assert!(d.dpdk_bound);
        assert_eq!(d.interface_name, None);
        assert_eq!(d.pci_address.as_deref(), Some("0000:00:08.0"));
        assert_eq!(
            find(&s, 2, 1).and_then(|e| e.interface_name.as_deref()),
            Some("ens9")
        );
        assert!(find(&s, 4, 0).is_none());
        assert!(find(&s, u64::MAX, 0).is_none());
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
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"version":2,"node":"n","enis":[]}"#,
        )
        .expect("write");
        let e = f.load().expect_err("other version");
        assert!(e.to_string().contains("version 2"), "{e}");
    }
}
