//! Running the delegate plugin from `CNI_PATH`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::cni::{CniCode, CniError};

/// Errors running a delegate.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Not found in any `CNI_PATH` directory.
    #[error("delegate plugin {plugin:?} not found in CNI_PATH ({})", dirs.join(":"))]
    NotFound {
        /// The plugin type.
        plugin: String,
        /// The directories searched.
        dirs: Vec<String>,
    },
    /// Spawning or talking to it failed.
    #[error("running delegate {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl ExecError {
    /// The CNI error for this.
    pub fn to_cni(&self) -> CniError {
        let code = match self {
            ExecError::NotFound { .. } => CniCode::DelegateNotFound,
            ExecError::Spawn { .. } => CniCode::DelegateFailed,
        };
        CniError::new(code, self.to_string())
    }
}

/// What a delegate printed and how it exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// Its stdout, unchanged.
    pub stdout: Vec<u8>,
}

impl Output {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs delegate plugins (a trait so tests can stub it).
pub trait Delegates {
    /// Finds a plugin binary.
    fn find(&self, plugin: &str) -> Result<PathBuf, ExecError>;
    /// Runs it with `CNI_COMMAND=command` (the rest of the CNI environment is inherited).
    fn run(&self, plugin: &str, command: &str, stdin: &[u8]) -> Result<Output, ExecError>;
}

/// Plugins from the `CNI_PATH` directories.
#[derive(Debug, Clone)]
pub struct CniPath {
    dirs: Vec<String>,
}

impl CniPath {
    /// Searches `dirs` in order.
    pub fn new(dirs: Vec<String>) -> Self {
        Self { dirs }
    }
}

impl Delegates for CniPath {
    fn find(&self, plugin: &str) -> Result<PathBuf, ExecError> {
        let not_found = || ExecError::NotFound {
            plugin: plugin.to_owned(),
            dirs: self.dirs.clone(),
        };
        if plugin.is_empty() || plugin.contains('/') || plugin.starts_with('.') {
            return Err(not_found());
        }
        self.dirs
            .iter()
            .map(|d| PathBuf::from(d).join(plugin))
            .find(|p| p.is_file())
            .ok_or_else(not_found)
    }

    fn run(&self, plugin: &str, command: &str, stdin: &[u8]) -> Result<Output, ExecError> {
        let path = self.find(plugin)?;
        let spawn_err = |source| ExecError::Spawn {
            path: path.clone(),
            source,
        };
        let mut child = Command::new(&path)
            .env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut input) = child.stdin.take() {
            match input.write_all(stdin) {
                // A plugin may exit without reading its config (e.g. VERSION).
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other.map_err(spawn_err)?,
            }
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        Ok(Output {
            code: out.status.code(),
            stdout: out.stdout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_in_order_and_rejects_paths() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        std::fs::write(b.path().join("ipvlan"), "").expect("write");
        let p = CniPath::new(vec![
            a.path().display().to_string(),
            b.path().display().to_string(),
        ]);
        assert_eq!(p.find("ipvlan").expect("found"), b.path().join("ipvlan"));
        let e = p.find("macvlan").expect_err("missing");
        assert_eq!(e.to_cni().code, CniCode::DelegateNotFound);
        assert!(e.to_string().contains(&a.path().display().to_string()));
        assert!(p.find("../b/ipvlan").is_err());
    }

    #[test]
    fn runs_a_plugin_and_captures_stdout() {
        // `cat` as a "plugin" echoes its config: enough to check the plumbing.
        let p = CniPath::new(vec!["/bin".into(), "/usr/bin".into()]);
        let out = p.run("cat", "ADD", b"{\"x\":1}").expect("runs");
        assert!(out.success());
        assert_eq!(out.stdout, b"{\"x\":1}");
        let out = p.run("false", "ADD", b"").expect("runs");
        assert_eq!(out.code, Some(1));
    }
}
