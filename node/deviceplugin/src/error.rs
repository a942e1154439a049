//! Errors of the device plugin.

use std::path::PathBuf;

/// Errors that stop [`crate::run`] or one plugin endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Setting up inotify failed.
    #[error("inotify: {0}")]
    Inotify(#[source] std::io::Error),
    /// Connecting to the kubelet failed.
    #[error("connect to {path}: {source}")]
    Connect {
        /// The kubelet socket.
        path: PathBuf,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The kubelet refused or failed the registration.
    #[error("register {resource} with the kubelet: {status}")]
    Register {
        /// Resource name.
        resource: String,
        /// The gRPC status.
        status: Box<tonic::Status>,
    },
    /// A call timed out.
    #[error("{0} timed out")]
    Timeout(&'static str),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
