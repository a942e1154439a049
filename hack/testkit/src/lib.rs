//! Test support: real peers on loopback.
//!
//! * [`ApiServer`]: etcd + kube-apiserver on random free 127.0.0.1 ports, with a
//!   kubeconfig and an admin [`kube::Client`] factory. [`ApiServer::shared`] starts one per
//!   test binary; tests isolate themselves by object names.
//! * [`Moto`]: moto's EC2 server on a random free 127.0.0.1 port.
//! * [`ipamd::Ipamd`]: a stand-in for the VPC CNI attaching its own ENIs at the next free
//!   device index.
//! * [`faults::FaultProxy`]: the EC2 fault layer in front of moto (throttling, latency,
//!   EC2 validation moto lacks, injected errors); also the `ec2-faults` binary.
//! * [`kubelet::NodeRuntime`]: a real kubelet + containerd for one simulated node, inside
//!   its network namespace; also the `eni-kubelet` binary the demo runs per node.
//!
//! The binaries come from `hack/peers.sh`, cached in `$ENI_BIN_DIR`
//! (default `~/.cache/aws-multi-eni/bin`). Every child process is started through
//! `setpriv --pdeathsig KILL` from one long-lived spawner thread, so no process outlives
//! the test binary, even when it panics or is killed.

mod apiserver;
pub mod faults;
pub mod ipamd;
pub mod kubelet;
mod moto;
mod process;

use std::path::PathBuf;
use std::time::Duration;

pub use apiserver::ApiServer;
pub use moto::{Moto, ec2_client};
pub use process::{Child, free_port};

/// Errors starting a peer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A peer binary is not in the cache.
    #[error("{0} not found in {1}: run `hack/peers.sh` (or `make peers`) first")]
    MissingPeer(&'static str, PathBuf),
    /// Spawning or talking to a process failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A peer did not become ready in time.
    #[error("{what} was not ready after {after:?}; its log: {log}")]
    NotReady {
        /// The peer.
        what: &'static str,
        /// How long we waited.
        after: Duration,
        /// Where its output went.
        log: PathBuf,
    },
    /// A kube client error.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// A kubeconfig error.
    #[error(transparent)]
    KubeConfig(#[from] kube::config::KubeconfigError),
}

/// Selects rustls' ring backend process-wide. Test binaries that link both kube (ring)
/// and the AWS SDK (aws-lc-rs) must pick one before the first TLS connection, as the
/// binaries' `main` does.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Directory holding the cached peer binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ENI_BIN_DIR") {
        return PathBuf::from(dir);
    }
    cache_dir().join("bin")
}

/// The project's cache directory (`$ENI_CACHE_DIR`, default `~/.cache/aws-multi-eni`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ENI_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("aws-multi-eni")
}

/// Path of a cached peer binary, or [`Error::MissingPeer`].
pub fn peer(name: &'static str) -> Result<PathBuf, Error> {
    let path = bin_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingPeer(name, bin_dir()))
    }
}

/// Polls `check` until it returns `Some`, or `deadline` passes.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
