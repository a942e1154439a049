//! Randomized, seeded, model-based soak of the controller (issue 12).
//!
//! It drives the real `eni-controller` binary (child processes, two replicas with leader
//! election, killed with SIGKILL) against a real etcd + kube-apiserver and moto behind the
//! EC2 fault layer, with a seeded list of operations ([`ops`]): labels, Nodes coming,
//! draining and going, NodeENIs created, edited, deleted and re-created, controller
//! crashes and leader loss, EC2 throttling storms, 5xx bursts, latency spikes, hung
//! detaches, ENIs detached or deleted behind the controller's back, and foreign ENIs at
//! wanted device indexes. Every few operations a quiet period turns the faults off and
//! polls, with a deadline, until every invariant ([`check`]) holds against EC2 (moto,
//! asked directly) and the API server. A failure prints the seed and the shortest failing
//! prefix the shrinker finds ([`run::shrink`]).
//!
//! Entry points: the `soak-controller` binary (`--help`), and the short run in
//! `controller/tests/soak.rs` (part of `make test`).
//!
//! [`ipam`] is the same idea for pod address pools (issue 17): the controller, the node
//! daemon and cni-helper under kill -9 (the `soak-ipam` binary, and the short run in
//! `tests/ipam.rs`).

pub mod check;
pub mod ipam;
pub mod link;
pub mod ops;
pub mod run;
pub mod world;

/// Errors of the harness itself (not invariant violations: those are results).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A peer could not start.
    #[error(transparent)]
    Testkit(#[from] eni_testkit::Error),
    /// The API server refused a harness request.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// moto refused a harness request.
    #[error("EC2: {0}")]
    Ec2(String),
    /// Building an object failed.
    #[error("object: {0}")]
    Json(#[from] serde_json::Error),
    /// Files.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}
