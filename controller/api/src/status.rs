//! `NodeENI` status: what the controller and the node daemons observed.
//!
//! The controller is the only writer of everything here except `nodeReports`; each node
//! daemon owns its own `nodeReports` entry (a list map keyed by `nodeName`, written with
//! server-side apply under its own field manager), so the two never overwrite each other.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a `NodeENI`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeENIStatus {
    /// `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: every desired ENI is attached. Reasons when false are listed in the
    /// NodeENI reference (e.g. `SubnetNotFound`, `DeviceIndexInUse`, `InstanceENILimit`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// ENIs wanted over all selected Nodes (selected Nodes x subnets).
    #[serde(default)]
    pub desired_attachments: i32,

    /// ENIs attached and in use.
    #[serde(default)]
    pub ready_attachments: i32,

    /// Subnets the ENIs are created in, resolved from the spec.
    #[serde(rename = "subnetIDs", default, skip_serializing_if = "Vec::is_empty")]
    pub subnet_ids: Vec<String>,

    /// Security groups the ENIs carry, resolved from the spec.
    #[serde(
        rename = "securityGroupIDs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub security_group_ids: Vec<String>,

    /// One entry per (Node, subnet) ENI the controller manages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<ENIAttachment>,

    /// What each node daemon did with its ENIs. Each entry is owned by that node's daemon.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["nodeName"]))]
    pub node_reports: Vec<NodeReport>,
}

/// Lifecycle of one managed ENI, as written to `status.attachments[].status`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum AttachmentStatus {
    /// Being created.
    Creating,
    /// Created, attach requested.
    Attaching,
    /// Attached to the instance.
    Attached,
    /// Detach requested.
    Detaching,
    /// Detached, being deleted.
    Deleting,
    /// Cannot proceed; see the `Ready` condition and events.
    Failed,
}

impl AttachmentStatus {
    /// The value as written to the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "Creating",
            Self::Attaching => "Attaching",
            Self::Attached => "Attached",
            Self::Detaching => "Detaching",
            Self::Deleting => "Deleting",
            Self::Failed => "Failed",
        }
    }
}

/// One ENI attached (or being attached) to one Node.
///
/// Field names are those of the older controller, so existing
/// `kubectl get nodeeni -o custom-columns=...` one-liners keep working.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ENIAttachment {
    /// Node name.
    #[serde(rename = "nodeID")]
    pub node_id: String,
    /// EC2 instance of the Node.
    #[serde(rename = "instanceID")]
    pub instance_id: String,
    /// The ENI.
    #[serde(rename = "eniID", default)]
    pub eni_id: String,
    /// The attachment, once attached.
    #[serde(rename = "attachmentID", default)]
    pub attachment_id: String,
    /// Subnet of the ENI.
    #[serde(rename = "subnetID", default)]
    pub subnet_id: String,
    /// CIDR block of the subnet.
    #[serde(
        rename = "subnetCIDR",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub subnet_cidr: Option<String>,
    /// VPC of the subnet (the DRA driver publishes it as a device attribute).
    #[serde(rename = "vpcID", default, skip_serializing_if = "Option::is_none")]
    pub vpc_id: Option<String>,
    /// Device index on the instance.
    #[serde(default)]
    pub device_index: i32,
    /// Network card the ENI is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_card_index: Option<i32>,
    /// MTU the node daemon applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<i32>,
    /// MAC address of the ENI; the node daemon finds the interface by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    /// Primary private IPv4 address of the ENI.
    #[serde(
        rename = "privateIPAddress",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub private_ip_address: Option<String>,
    /// `Creating`, `Attaching`, `Attached`, `Detaching`, `Deleting` or `Failed`. Not an
    /// enum in the schema: statuses the older controller wrote (`attached`) stay valid,
    /// so its objects can be restored and its entries kept until they are adopted.
    #[schemars(length(max = 32))]
    pub status: String,
    /// Last time this entry changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<Time>,
    /// Whether DPDK is wanted for this ENI.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dpdk_enabled: bool,
    /// Whether the node daemon has bound the ENI to its DPDK driver.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dpdk_bound: bool,
    /// Driver the ENI is (to be) bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpdk_driver: Option<String>,
    /// Extended resource the ENI is advertised as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpdk_resource_name: Option<String>,
    /// PCI address of the ENI's device, as found by the node daemon.
    #[serde(
        rename = "dpdkPCIAddress",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dpdk_pci_address: Option<String>,

    /// `ClientToken` of the create that made (or will make) this slot's ENI. Recorded
    /// before the create is sent, replaced whenever a new ENI is wanted, so a retried
    /// create never returns an ENI that is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,

    /// The ENI's pod address pool, when the NodeENI has an `ipam` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<EniPool>,
}

/// The pod address pool of one ENI, as the controller assigned it in EC2.
///
/// `addresses` and `prefixes` are what the node may hand to pods (the node daemon copies
/// them into its state file); `releasing` were taken out of the pool and are unassigned
/// in EC2 once the node's report lists them as `released`. The counts are for people
/// (`kubectl get neni -o yaml`): pool size, in use and free as of the node's last report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EniPool {
    /// `secondaryIPs` or `prefixes`: what the controller assigns on this ENI (can be
    /// `secondaryIPs` under a `prefixes` spec, see the `IPAM` condition).
    pub mode: String,
    /// Secondary private IPv4 addresses in the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// /28 IPv4 prefixes in the pool (every address in them is usable).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    /// Addresses or prefixes being released: no longer handed out, unassigned in EC2
    /// once the node reports them `released`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releasing: Vec<String>,
    /// Pod addresses in the pool.
    #[serde(default)]
    pub pool_size: i32,
    /// Pod addresses in use, as the node last reported.
    #[serde(default)]
    pub in_use: i32,
    /// Pod addresses free.
    #[serde(default)]
    pub free: i32,
}

/// What one node daemon did with the ENIs attached to its Node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// Node name (list map key).
    pub node_name: String,
    /// When the daemon last wrote this report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<Time>,
    /// One entry per ENI of this NodeENI on the Node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceReport>,
}

/// What the node daemon did with one ENI.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceReport {
    /// The ENI.
    #[serde(rename = "eniID")]
    pub eni_id: String,
    /// Its MAC address.
    #[serde(default)]
    pub mac_address: String,
    /// Its device index.
    #[serde(default)]
    pub device_index: i32,
    /// Kernel interface name, while the ENI has a netdev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<String>,
    /// Whether the interface is administratively up.
    #[serde(default)]
    pub up: bool,
    /// MTU set on the interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<i32>,
    /// PCI address of the device.
    #[serde(
        rename = "pciAddress",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pci_address: Option<String>,
    /// Driver the device is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Vendor and device name from the PCI ID database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    /// Whether the device is bound to its DPDK driver.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dpdk_bound: bool,
    /// Extended resource the device is advertised as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<String>,
    /// Why the daemon could not configure the ENI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The ENI's pod address pool as the node holds it, when the NodeENI has `ipam`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<InterfaceIpam>,
}

/// The node's side of one ENI's pod address pool.
///
/// Written by the node daemon from one snapshot taken under the allocation lock.
/// `released` is the handshake for shrinking: the daemon lists an address or prefix there
/// only once it has seen it in the controller's `releasing` list, removed it from the
/// pool cni-helper hands out, and found no pod using it; only then does the controller
/// unassign it in EC2.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceIpam {
    /// Addresses and prefixes the node may hand out (its copy of the controller's pool).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool: Vec<String>,
    /// Addresses given to pods (allocations of containers that still exist).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_use: Vec<String>,
    /// Addresses or prefixes of the controller's `releasing` list the node no longer
    /// hands out and no pod uses: safe to unassign.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<String>,
}

/// Condition types and reasons.
pub mod condition {
    /// Every desired ENI is attached.
    pub const READY: &str = "Ready";

    /// Reason: all ENIs attached.
    pub const ALL_ATTACHED: &str = "AllAttached";
    /// Reason: ENIs are being created, attached or removed.
    pub const PROGRESSING: &str = "Progressing";
    /// Reason: no Node matches the selector.
    pub const NO_MATCHING_NODES: &str = "NoMatchingNodes";
    /// Reason: a subnet name or ID does not exist (in the Node's VPC).
    pub const SUBNET_NOT_FOUND: &str = "SubnetNotFound";
    /// Reason: a subnet name matches more than one subnet.
    pub const SUBNET_AMBIGUOUS: &str = "SubnetAmbiguous";
    /// Reason: a subnet given by ID is in another VPC than the Node.
    pub const SUBNET_IN_OTHER_VPC: &str = "SubnetInOtherVPC";
    /// Reason: none of the NodeENI's subnets is in a selected Node's availability zone.
    pub const NO_SUBNET_IN_ZONE: &str = "NoSubnetInZone";
    /// Reason: a selected Node's instance does not exist in EC2.
    pub const INSTANCE_NOT_FOUND: &str = "InstanceNotFound";
    /// Reason: an ENI the status lists carries no ownership tags and is not where the
    /// status says: it is left alone (and the finalizer kept) until someone removes it.
    pub const NOT_ADOPTED: &str = "NotAdopted";
    /// Reason: a security group name or ID does not exist.
    pub const SECURITY_GROUP_NOT_FOUND: &str = "SecurityGroupNotFound";
    /// Reason: another ENI already occupies the device index.
    pub const DEVICE_INDEX_IN_USE: &str = "DeviceIndexInUse";
    /// Reason: the instance type cannot take another ENI.
    pub const INSTANCE_ENI_LIMIT: &str = "InstanceENILimit";
    /// Reason: a Node has no usable AWS providerID.
    pub const INVALID_PROVIDER_ID: &str = "InvalidProviderID";
    /// Reason: the Kubernetes API failed a request of the controller.
    pub const API_ERROR: &str = "APIError";
    /// Reason: EC2 refused a request.
    pub const EC2_ERROR: &str = "EC2Error";
    /// Reason: the NodeENI is being deleted.
    pub const DELETING: &str = "Deleting";

    /// Pod address pools (only with `spec.ipam`): True when every ENI's pool is within
    /// its bounds.
    pub const IPAM: &str = "IPAM";
    /// Reason (IPAM, True): every pool holds between minimum and warm target free
    /// addresses (or is at its maximum).
    pub const POOL_READY: &str = "PoolReady";
    /// Reason (IPAM, False): addresses are being assigned or released.
    pub const POOL_PROGRESSING: &str = "PoolProgressing";
    /// Reason (IPAM): `prefixes` was asked for but an instance type is not Nitro; those
    /// ENIs get secondary addresses instead. The message names the instance types.
    pub const PREFIXES_UNSUPPORTED: &str = "PrefixesUnsupported";
    /// Reason (IPAM, False): an ENI is at its address limit with fewer free addresses
    /// than `minimum` (pods on it may get CNI error 11 until some are freed).
    pub const POOL_AT_LIMIT: &str = "PoolAtLimit";
}
