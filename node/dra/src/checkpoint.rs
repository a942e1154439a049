//! What the driver prepared, on disk, so NodePrepareResources and
//! NodeUnprepareResources are idempotent across restarts of the node daemon.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cdi::Spec;

/// Version of the checkpoint format.
pub const VERSION: u32 = 1;

/// File name of the checkpoint in the driver's plugin directory.
pub const FILE_NAME: &str = "checkpoint.json";

/// All prepared claims, by claim UID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// Prepared claims by UID.
    pub claims: BTreeMap<String, PreparedClaim>,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Self {
            version: VERSION,
            claims: BTreeMap::new(),
        }
    }
}

/// One prepared claim.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedClaim {
    /// Namespace of the claim.
    pub namespace: String,
    /// Name of the claim.
    pub name: String,
    /// The devices, in allocation order.
    pub devices: Vec<PreparedDevice>,
    /// The CDI spec written for the claim (written again when it went missing, e.g.
    /// after a reboot emptied `/var/run/cdi`).
    pub cdi_spec: Spec,
}

/// One prepared device of a claim.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    /// The claim's requests this device was allocated for.
    pub request_names: Vec<String>,
    /// Pool (the node name).
    pub pool: String,
    /// Device name in the slice.
    pub device: String,
    /// PCI address.
    pub pci_address: String,
    /// Extended resource name of the device.
    pub resource_name: String,
    /// CDI device IDs handed to the kubelet.
    pub cdi_device_ids: Vec<String>,
}

/// Errors reading or writing the checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// I/O.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not our format.
    #[error("checkpoint {path}: {detail}")]
    Format {
        /// File.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

/// Reads the checkpoint; a missing file is an empty checkpoint.
///
/// # Errors
/// Unreadable file, malformed content, or an unknown version (never silently dropped:
/// the claims in it still hold devices).
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let p = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Checkpoint::default()),
        Err(source) => return Err(CheckpointError::Io { path: p, source }),
    };
    let c: Checkpoint = serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Format {
        path: p.clone(),
        detail: e.to_string(),
    })?;
    if c.version != VERSION {
        return Err(CheckpointError::Format {
            path: p,
            detail: format!("unknown version {} (expected {VERSION})", c.version),
        });
    }
    Ok(c)
}

/// Writes the checkpoint atomically (temp file, fsync, rename).
///
/// # Errors
/// I/O errors.
pub fn save(path: &Path, c: &Checkpoint) -> Result<(), CheckpointError> {
    use std::io::Write as _;
    let io = |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(c).map_err(|e| io(std::io::Error::other(e)))?;
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&body).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_bad() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub").join(FILE_NAME);
        assert_eq!(load(&path)?, Checkpoint::default());
        let mut c = Checkpoint::default();
        c.claims.insert(
            "uid-1".into(),
            PreparedClaim {
                namespace: "ns".into(),
                name: "c".into(),
                devices: vec![PreparedDevice {
                    device: "eni-1".into(),
                    ..Default::default()
                }],
                cdi_spec: Spec::default(),
            },
        );
        save(&path, &c)?;
        assert_eq!(load(&path)?, c);
        std::fs::write(&path, br#"{"version":9,"claims":{}}"#)?;
        assert!(
            load(&path)
                .expect_err("version")
                .to_string()
                .contains("unknown version 9")
        );
        std::fs::write(&path, b"{")?;
        assert!(load(&path).is_err());
        Ok(())
    }
}
