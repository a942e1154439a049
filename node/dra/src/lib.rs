//! DRA driver (`resource.k8s.io/v1`) for the ENIs the node daemon manages.
//!
//! The node daemon's device inventory (the [`eni_deviceplugin::BoundDevice`] set on a
//! `tokio::sync::watch` channel, with the device plugin's health evaluation on top) is
//! published as this node's ResourceSlice: one pool named after the node, one device per
//! healthy ENI, named by its ENI id, with attributes users select on in CEL
//! ([`slice::attr`], the standard `resource.kubernetes.io/pciBusID` and `pcieRoot`, and
//! the two Multus reads: `k8s.cni.cncf.io/deviceID` and `k8s.cni.cncf.io/resourceName`).
//!
//! * [`slice`]: pure construction of the slice and the plan from what the API server
//!   holds to what we want (pool generation bumped on every change);
//! * [`publish`]: the API writes and the loop that keeps the slice current;
//! * [`prepare`]: pure NodePrepareResources logic (which allocated devices are ours,
//!   refusals, the claim's network data);
//! * [`cdi`]: CDI spec files (the device plugin's device nodes and environment);
//! * [`checkpoint`]: prepared claims on disk (idempotence across restarts);
//! * [`plugin`]: the kubelet plugin (gRPC `v1.DRAPlugin`, plugin-watcher registration,
//!   claim status writes).

pub mod cdi;
pub mod checkpoint;
mod error;
pub mod plugin;
pub mod prepare;
pub mod publish;
pub mod slice;

pub use error::Error;
pub use plugin::{Claims, Driver, KubeClaims, PluginConfig};
pub use publish::{PublisherConfig, SlicePublisher};

/// Default DRA driver name: in the project's API group's domain (`networking.k8s.aws`).
pub const DEFAULT_DRIVER_NAME: &str = "eni.networking.k8s.aws";
