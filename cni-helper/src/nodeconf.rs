//! cni-helper's node-local configuration: where the node daemon's state file is and which
//! IMDS endpoint to ask. It lives in a file on the node, written by whoever installs
//! cni-helper (the node chart), never in a network config: a NetworkAttachmentDefinition
//! author must not be able to point resolution at files or servers they control.
//!
//! ```json
//! {"stateDir": "/run/aws-multi-eni", "imdsEndpoint": "http://169.254.169.254"}
//! ```
//!
//! Both keys are optional; a missing file means the defaults. The file's path is
//! [`DEFAULT_PATH`], or `$CNI_HELPER_CONFIG` (the container runtime's environment, which a
//! network config cannot set).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the node-local config is read from by default.
pub const DEFAULT_PATH: &str = "/etc/aws-multi-eni/cni-helper.json";
/// Environment variable naming another file (for tests and unusual installs).
pub const PATH_ENV: &str = "CNI_HELPER_CONFIG";

/// The node-local configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    /// The node daemon's state directory (holds `enis.json`).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// IMDS endpoint (`http://host[:port]`); default: `$AWS_EC2_METADATA_SERVICE_ENDPOINT`,
    /// else `http://169.254.169.254`.
    #[serde(default)]
    pub imds_endpoint: Option<String>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(eni_state::DEFAULT_STATE_DIR)
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            imds_endpoint: None,
        }
    }
}

/// The node-local config file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    /// Unreadable.
    #[error("cni-helper node config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not valid.
    #[error("cni-helper node config {path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// The file to read: `$CNI_HELPER_CONFIG` when set, else [`DEFAULT_PATH`].
pub fn path_from(env: Option<&str>) -> PathBuf {
    env.filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_PATH), PathBuf::from)
}

/// Reads the node-local config; the defaults when the file does not exist.
pub fn load(path: &Path) -> Result<NodeConfig, NodeConfigError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(NodeConfig::default()),
        Err(source) => {
            return Err(NodeConfigError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let invalid = |problem: String| NodeConfigError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    let c: NodeConfig = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if !c.state_dir.is_absolute() {
        return Err(invalid("stateDir must be an absolute path".into()));
    }
    if let Some(ep) = &c.imds_endpoint {
        crate::imds::Endpoint::parse(ep).map_err(|e| invalid(format!("imdsEndpoint: {e}")))?;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_means_defaults() {
        let c = load(Path::new("/nonexistent/cni-helper.json")).expect("defaults");
        assert_eq!(c, NodeConfig::default());
        assert_eq!(c.state_dir, PathBuf::from("/run/aws-multi-eni"));
        assert_eq!(path_from(None), PathBuf::from(DEFAULT_PATH));
        assert_eq!(path_from(Some("")), PathBuf::from(DEFAULT_PATH));
        assert_eq!(path_from(Some("/x.json")), PathBuf::from("/x.json"));
    }

    #[test]
    fn reads_and_validates_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.json");
        std::fs::write(
            &p,
            r#"{"stateDir":"/var/run/eni","imdsEndpoint":"http://127.0.0.1:1338"}"#,
        )
        .expect("write");
        let c = load(&p).expect("valid");
        assert_eq!(c.state_dir, PathBuf::from("/var/run/eni"));
        assert_eq!(c.imds_endpoint.as_deref(), Some("http://127.0.0.1:1338"));
        for bad in [
            r#"{"stateDir":"relative"}"#,
            r#"{"imdsEndpoint":"https://169.254.169.254"}"#,
            r#"{"stateDirr":"/typo"}"#,
            "nope",
        ] {
            std::fs::write(&p, bad).expect("write");
            let e = load(&p).expect_err(bad);
            assert!(e.to_string().contains("c.json"), "{e}");
        }
    }
}
