//! The `NodeENI` API (`networking.k8s.aws/v1alpha1`), shared by the controller and the
//! node daemon.
//!
//! The wire format is a superset of the older Go controller's CRD: every manifest written
//! for it applies unchanged, including both DPDK spellings (`dpdkEnabled` from its README
//! and `enableDPDK` from its code). What the API server can reject up front is rejected
//! there, through OpenAPI patterns and ranges and CEL rules generated from these types.
//!
//! [`crd()`] builds the `CustomResourceDefinition`; `charts/aws-multi-eni-controller/crds/`
//! holds the committed YAML and a test fails when the two drift apart.

mod crd;
mod spec;
mod status;

pub use crd::{crd, crd_yaml};
pub use spec::{
    DEFAULT_DEVICE_INDEX, DEFAULT_DPDK_DRIVER, DEFAULT_DPDK_RESOURCE_NAME,
    DEFAULT_IPAM_WARM_TARGET, DPDK_DRIVERS, IpamMode, IpamSpec, MAX_DEVICE_INDEX,
    MAX_IPAM_ADDRESSES, MAX_MTU, MIN_MTU, NodeENI, NodeENISpec, PREFIX_ADDRESSES,
};
pub use status::{
    AttachmentStatus, ENIAttachment, EniPool, InterfaceIpam, InterfaceReport, NodeENIStatus,
    NodeReport, condition,
};

/// API group of the `NodeENI` resource.
pub const GROUP: &str = "networking.k8s.aws";
/// Finalizer the controller puts on every `NodeENI` (the same as the older controller's,
/// so objects it created are finalized by this one).
pub const FINALIZER: &str = "nodeeni.networking.k8s.aws/finalizer";

/// Tags the controller puts on every ENI it creates. They make ENIs discoverable with one
/// paginated `DescribeNetworkInterfaces` and let a restarted controller adopt its own ENIs.
pub mod tags {
    /// Cluster that owns the ENI (value: the controller's `--cluster-name`).
    pub const CLUSTER: &str = "aws-multi-eni.k8s.aws/cluster";
    /// Identity of the cluster that owns the ENI: the UID of its `kube-system`
    /// namespace (or `--cluster-id`). Two clusters that share a name in one account
    /// never touch each other's ENIs.
    pub const CLUSTER_ID: &str = "aws-multi-eni.k8s.aws/cluster-id";
    /// Name of the `NodeENI` the ENI was created for.
    pub const NODE_ENI: &str = "aws-multi-eni.k8s.aws/nodeeni";
    /// Name of the Kubernetes Node the ENI belongs to.
    pub const NODE: &str = "aws-multi-eni.k8s.aws/node";
    /// EC2 instance the ENI is meant for.
    pub const INSTANCE: &str = "aws-multi-eni.k8s.aws/instance-id";
    /// Device index the ENI is meant to be attached at.
    pub const DEVICE_INDEX: &str = "aws-multi-eni.k8s.aws/device-index";
    /// Tag `Name`, shown in the EC2 console.
    pub const NAME: &str = "Name";
    /// The Amazon VPC CNI (ipamd) leaves an ENI alone when this tag is `true`: no pod
    /// IPs on it, no reclaiming. Every ENI the controller creates or adopts carries it.
    pub const NO_MANAGE: &str = "node.k8s.amazonaws.com/no_manage";
}

/// Errors raised while interpreting a `NodeENI`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CRD could not be rendered as YAML.
    #[error("cannot render the CRD as YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
}
