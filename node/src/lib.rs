//! aws-multi-eni node daemon (`eni-manager`).
//!
//! Configures on its own node the ENIs the controller attached to it:
//!
//! * [`plan`]: pure planning (desired attachments + observed links/PCI devices/state ->
//!   actions), unit tested;
//! * [`netlink`]: rtnetlink links and link events, optionally inside another netns;
//! * [`sysfs`]: PCI inspection and driver (re)binding behind the narrow [`sysfs::Sysfs`]
//!   trait (with the `test-util` feature: a simulated kernel and fake trees for tests
//!   and the local demo);
//! * [`inventory`]: ENI facts (NodeENI, subnet, MTU, IPs) published with the devices;
//! * [`state`]: the `enis.json` state file shared with cni-helper;
//! * [`pool`]: pod address pools (NodeENI `ipam`): the published pool into the state
//!   file, usage and releases into the report, under the allocation lock; no EC2 call;
//! * [`podresources`]: which devices running pods hold (kubelet PodResources `List`);
//! * [`report`]: this node's `status.nodeReports` entry (server-side apply);
//! * [`daemon`]: the reconcile loop; [`metrics`]: Prometheus and health endpoints;
//! * [`app`]: the process wiring `main` calls.
//!
//! The set of DPDK-bound devices is published on a `tokio::sync::watch` channel of
//! [`eni_deviceplugin::BoundDevice`] for the device plugin.

pub mod app;
pub mod config;
pub mod daemon;
pub mod error;
pub mod inventory;
pub mod metrics;
pub mod netlink;
pub mod plan;
pub mod podresources;
pub mod pool;
pub mod report;
pub mod state;
pub mod sysfs;

pub use error::{Error, Result};
