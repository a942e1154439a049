//! `NodeENI` spec: what the user asks for.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::NodeENIStatus;

/// Device index used when the spec does not name one (index 0 is the primary ENI).
pub const DEFAULT_DEVICE_INDEX: i32 = 1;
/// Largest device index the API server accepts. No EC2 instance type has more than 64
/// network interfaces; the controller checks the real per-instance-type limit at run time.
pub const MAX_DEVICE_INDEX: i32 = 63;
/// Smallest MTU accepted (the IPv4 minimum datagram size).
pub const MIN_MTU: i32 = 576;
/// Largest MTU accepted (EC2 jumbo frames).
pub const MAX_MTU: i32 = 9001;
/// Kernel driver DPDK ENIs are bound to when the spec does not name one.
pub const DEFAULT_DPDK_DRIVER: &str = "vfio-pci";
/// Extended resource DPDK ENIs are advertised as when the spec does not name one; the name
/// the SR-IOV network device plugin uses, so existing pod specs keep working.
pub const DEFAULT_DPDK_RESOURCE_NAME: &str = "intel.com/intel_sriov_netdevice";
/// Userspace-I/O drivers a DPDK ENI may be bound to.
pub const DPDK_DRIVERS: [&str; 3] = ["vfio-pci", "uio_pci_generic", "igb_uio"];
/// Free pod addresses per ENI the controller aims for when `ipam.warmTarget` is not set.
pub const DEFAULT_IPAM_WARM_TARGET: i32 = 8;
/// Largest `ipam.warmTarget`, `ipam.minimum` and `ipam.maximumPerENI` accepted (no instance
/// type has more than 50 addresses or 49 /28 prefixes on an ENI: 49 x 16 = 784).
pub const MAX_IPAM_ADDRESSES: i32 = 1024;
/// Addresses in one /28 prefix.
pub const PREFIX_ADDRESSES: i32 = 16;

/// Attach secondary ENIs to every Node matching a label selector.
///
/// For each selected Node the controller creates one ENI per subnet (in the Node's
/// VPC), with the given security groups, and attaches it to the Node's EC2 instance at
/// `deviceIndex` (multi-subnet: `deviceIndex`, `deviceIndex + 1`, ... in subnet order,
/// the same on every Node). The node daemon brings the interfaces up, sets the MTU and,
/// for DPDK, binds them to a userspace-I/O driver and advertises them to the kubelet.
// Several `printcolumn(...)` entries repeat the same keys by design.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "networking.k8s.aws",
    version = "v1alpha1",
    kind = "NodeENI",
    plural = "nodeenis",
    singular = "nodeeni",
    shortname = "neni",
    category = "aws",
    status = "NodeENIStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "Attach secondary AWS ENIs to every Node matching a label selector.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Whether every desired ENI is attached",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        description = "ENIs wanted over all selected nodes",
        json_path = ".status.desiredAttachments"
    ),
    printcolumn(
        name = "Attached",
        type_ = "integer",
        description = "ENIs attached",
        json_path = ".status.readyAttachments"
    ),
    printcolumn(
        name = "Index",
        type_ = "integer",
        description = "Device index of the first ENI",
        json_path = ".spec.deviceIndex"
    ),
    printcolumn(
        name = "Subnets",
        type_ = "string",
        priority = 1,
        description = "Subnets the ENIs are created in",
        json_path = ".status.subnetIDs"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        description = "Why the NodeENI is not Ready",
        json_path = r#".status.conditions[?(@.type=="Ready")].reason"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.subnetID) || has(self.subnetName) || (has(self.subnetIDs) && size(self.subnetIDs) > 0) || (has(self.subnetNames) && size(self.subnetNames) > 0)",
        "message": "a subnet is required: set subnetID, subnetIDs, subnetName or subnetNames",
        "fieldPath": ".subnetID",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "(has(self.securityGroupIDs) && size(self.securityGroupIDs) > 0) || (has(self.securityGroupNames) && size(self.securityGroupNames) > 0)",
        "message": "a security group is required: set securityGroupIDs or securityGroupNames",
        "fieldPath": ".securityGroupIDs",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!has(self.dpdkEnabled) || !has(self.enableDPDK) || self.dpdkEnabled == self.enableDPDK",
        "message": "dpdkEnabled and enableDPDK are two spellings of one setting and must agree",
        "fieldPath": ".enableDPDK"
    },
    {
        "rule": "!has(self.ipam) || !((has(self.dpdkEnabled) && self.dpdkEnabled) || (has(self.enableDPDK) && self.enableDPDK))",
        "message": "ipam needs the ENI's netdev (ipvlan or host-device on it): it cannot be combined with DPDK",
        "fieldPath": ".ipam"
    },
    {
        "rule": "(has(self.deviceIndex) ? self.deviceIndex : 1) + (has(self.subnetID) ? 1 : 0) + (has(self.subnetIDs) ? size(self.subnetIDs) : 0) + (has(self.subnetName) ? 1 : 0) + (has(self.subnetNames) ? size(self.subnetNames) : 0) <= 64",
        "message": "the last subnet's device index (deviceIndex + number of subnets - 1, counting subnetID, subnetIDs, subnetName and subnetNames) exceeds the largest EC2 device index (63)",
        "fieldPath": ".deviceIndex"
    }
]))]
pub struct NodeENISpec {
    /// Labels a Node must carry (all of them, exact values) to get the ENIs.
    pub node_selector: BTreeMap<String, String>,

    /// Subnet to create the ENI in.
    #[serde(rename = "subnetID", default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^subnet-([0-9a-f]{8}|[0-9a-f]{17})$"))]
    pub subnet_id: Option<String>,

    /// Subnets to create ENIs in: one ENI per subnet per Node (in its zone), the subnet at
    /// position k of the spec's list at device index `deviceIndex + k` on every Node.
    #[serde(rename = "subnetIDs", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(regex(pattern = r"^subnet-([0-9a-f]{8}|[0-9a-f]{17})$"))
    )]
    pub subnet_ids: Vec<String>,

    /// Subnet to create the ENI in, by its `Name` tag, looked up in the Node's VPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub subnet_name: Option<String>,

    /// Subnets by `Name` tag, looked up in the Node's VPC; like `subnetIDs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 255)))]
    pub subnet_names: Vec<String>,

    /// Security groups for the ENI.
    #[serde(
        rename = "securityGroupIDs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(
        length(max = 16),
        inner(regex(pattern = r"^sg-([0-9a-f]{8}|[0-9a-f]{17})$"))
    )]
    pub security_group_ids: Vec<String>,

    /// Security groups by group name (or, failing that, `Name` tag) in the Node's VPC;
    /// added to `securityGroupIDs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 255)))]
    pub security_group_names: Vec<String>,

    /// Device index of the first subnet's ENI; the subnet at position k of the spec's
    /// list (subnetID, subnetIDs, subnetName, subnetNames) gets deviceIndex + k, the
    /// same on every Node (a subnet outside a Node's zone leaves its index unused there).
    /// 0 is the instance's primary ENI; leave 1 to the Amazon VPC CNI on busy nodes.
    #[serde(default = "default_device_index")]
    #[schemars(range(min = 1, max = 63))]
    pub device_index: i32,

    /// Delete the ENI when the instance terminates.
    #[serde(default = "default_true")]
    pub delete_on_termination: bool,

    /// Description set on the ENI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub description: Option<String>,

    /// MTU the node daemon sets on the interface (default: the daemon's `--default-mtu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 576, max = 9001))]
    pub mtu: Option<i32>,

    /// Bind the ENI to a userspace-I/O driver for DPDK and advertise it to the kubelet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpdk_enabled: Option<bool>,

    /// Same as `dpdkEnabled` (the spelling the older controller's code read).
    #[serde(
        rename = "enableDPDK",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub enable_dpdk: Option<bool>,

    /// Driver DPDK ENIs are bound to (default `vfio-pci`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["vfio-pci", "uio_pci_generic", "igb_uio"]))]
    pub dpdk_driver: Option<String>,

    /// Extended resource DPDK ENIs are advertised as (default
    /// `intel.com/intel_sriov_netdevice`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 253),
        regex(
            pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
        )
    )]
    pub dpdk_resource_name: Option<String>,

    /// PCI address of the device to bind, when the node daemon should not find it from
    /// the ENI's MAC address (e.g. `0000:00:06.0`).
    #[serde(
        rename = "dpdkPCIAddress",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$"))]
    pub dpdk_pci_address: Option<String>,

    /// Pod addresses from the VPC: the controller keeps a warm pool of secondary IPv4
    /// addresses (or /28 prefixes) assigned to each ENI and cni-helper hands them to pods
    /// (the `ipam` of an ipvlan or host-device NetworkAttachmentDefinition) without an EC2
    /// call on the pod's path. Absent: no addresses are assigned (as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamSpec>,
}

/// How pod addresses are assigned to the ENI in EC2.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum IpamMode {
    /// Secondary private IPv4 addresses, one at a time (every instance type).
    #[default]
    #[serde(rename = "secondaryIPs")]
    SecondaryIps,
    /// /28 IPv4 prefixes, 16 addresses each (Nitro instance types only; others fall back
    /// to secondary addresses with the `IPAM` condition saying so).
    #[serde(rename = "prefixes")]
    Prefixes,
}

impl IpamMode {
    /// The value as written to the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SecondaryIps => "secondaryIPs",
            Self::Prefixes => "prefixes",
        }
    }
}

/// The warm pool of pod addresses on each ENI of this NodeENI.
///
/// Per ENI, the controller keeps the number of free (assigned in EC2, not used by a pod)
/// addresses between `minimum` and `warmTarget`: below `minimum` it assigns up to
/// `warmTarget` free, above `warmTarget` it releases free ones down to it. Addresses in use
/// are never released. The pool never exceeds `maximumPerENI` nor the instance type's
/// `Ipv4AddressesPerInterface`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.minimum) || self.minimum <= (has(self.warmTarget) ? self.warmTarget : 8)",
        "message": "minimum must not exceed warmTarget (default 8)",
        "fieldPath": ".minimum"
    },
    {
        "rule": "!has(self.maximumPerENI) || !has(self.mode) || self.mode != 'prefixes' || self.maximumPerENI >= 16",
        "message": "in prefixes mode the pool grows by 16 addresses: maximumPerENI must be at least 16",
        "fieldPath": ".maximumPerENI"
    }
]))]
pub struct IpamSpec {
    /// `secondaryIPs` (default) or `prefixes` (/28 prefixes, Nitro instance types only).
    #[serde(default)]
    pub mode: IpamMode,

    /// Free addresses to keep per ENI (refill up to this, release above it).
    #[serde(default = "default_warm_target")]
    #[schemars(range(min = 1, max = 1024))]
    pub warm_target: i32,

    /// Refill when fewer addresses than this are free (default: half of `warmTarget`,
    /// rounded up). At most `warmTarget`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1024))]
    pub minimum: Option<i32>,

    /// Most pod addresses assigned to one ENI (in use and free together; in prefixes mode
    /// counted as 16 per prefix). Default: what the instance type allows.
    #[serde(
        rename = "maximumPerENI",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 1024))]
    pub maximum_per_eni: Option<i32>,
}

impl Default for IpamSpec {
    fn default() -> Self {
        Self {
            mode: IpamMode::default(),
            warm_target: DEFAULT_IPAM_WARM_TARGET,
            minimum: None,
            maximum_per_eni: None,
        }
    }
}

impl IpamSpec {
    /// The refill threshold: `minimum`, or half of `warmTarget` rounded up; never above
    /// `warmTarget`.
    pub fn minimum(&self) -> i32 {
        let warm = self.warm_target.max(0);
        self.minimum.unwrap_or((warm + 1) / 2).clamp(0, warm)
    }
}

fn default_warm_target() -> i32 {
    DEFAULT_IPAM_WARM_TARGET
}

fn default_device_index() -> i32 {
    DEFAULT_DEVICE_INDEX
}

fn default_true() -> bool {
    true
}

impl NodeENISpec {
    /// Whether DPDK is enabled, under either spelling.
    pub fn dpdk(&self) -> bool {
        self.dpdk_enabled.or(self.enable_dpdk).unwrap_or(false)
    }

    /// The driver DPDK ENIs are bound to.
    pub fn dpdk_driver(&self) -> &str {
        self.dpdk_driver.as_deref().unwrap_or(DEFAULT_DPDK_DRIVER)
    }

    /// The extended resource DPDK ENIs are advertised as.
    pub fn dpdk_resource_name(&self) -> &str {
        self.dpdk_resource_name
            .as_deref()
            .unwrap_or(DEFAULT_DPDK_RESOURCE_NAME)
    }

    /// Subnet IDs named directly, in spec order, without duplicates.
    pub fn subnet_ids(&self) -> Vec<String> {
        dedup(self.subnet_id.iter().chain(&self.subnet_ids))
    }

    /// Subnet names to resolve, in spec order, without duplicates.
    pub fn subnet_names(&self) -> Vec<String> {
        dedup(self.subnet_name.iter().chain(&self.subnet_names))
    }

    /// Whether `labels` satisfy the node selector (every key present with its value).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }
}

fn dedup<'a>(items: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        if !out.contains(item) {
            out.push(item.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> NodeENISpec {
        serde_yaml_ng::from_str(yaml).expect("spec parses")
    }

    #[test]
    fn defaults_match_the_older_controller() {
        let s = spec("nodeSelector: {ng: multi-eni}\nsubnetID: subnet-0123456789abcdef0\n");
        assert_eq!(s.device_index, 1);
        assert!(s.delete_on_termination);
        assert!(!s.dpdk());
        assert_eq!(s.dpdk_driver(), "vfio-pci");
        assert_eq!(s.dpdk_resource_name(), "intel.com/intel_sriov_netdevice");
        assert_eq!(s.ipam, None, "no IPAM unless asked");
    }

    #[test]
    fn ipam_defaults() {
        let s = spec("nodeSelector: {}\nipam: {}\n");
        let ipam = s.ipam.expect("ipam section");
        assert_eq!(ipam, IpamSpec::default());
        assert_eq!(ipam.mode, IpamMode::SecondaryIps);
        assert_eq!(ipam.warm_target, 8);
        assert_eq!(ipam.minimum(), 4);
        let s =
            spec("nodeSelector: {}\nipam: {mode: prefixes, warmTarget: 3, maximumPerENI: 32}\n");
        let ipam = s.ipam.expect("ipam section");
        assert_eq!(ipam.mode, IpamMode::Prefixes);
        assert_eq!(ipam.minimum(), 2);
        assert_eq!(ipam.maximum_per_eni, Some(32));
        let explicit = IpamSpec {
            minimum: Some(9),
            ..IpamSpec::default()
        };
        assert_eq!(explicit.minimum(), 8, "clamped to warmTarget");
        assert!(serde_yaml_ng::from_str::<IpamSpec>("mode: addresses\n").is_err());
    }

    #[test]
    fn both_dpdk_spellings_are_read() {
        assert!(spec("nodeSelector: {}\ndpdkEnabled: true\n").dpdk());
        assert!(spec("nodeSelector: {}\nenableDPDK: true\n").dpdk());
        assert!(!spec("nodeSelector: {}\nenableDPDK: false\n").dpdk());
    }

    #[test]
    fn subnets_keep_order_and_drop_duplicates() {
        let s = spec(
            "nodeSelector: {}\nsubnetID: subnet-aaaaaaaa\nsubnetIDs: [subnet-bbbbbbbb, subnet-aaaaaaaa]\nsubnetName: a\nsubnetNames: [b, a]\n",
        );
        assert_eq!(s.subnet_ids(), ["subnet-aaaaaaaa", "subnet-bbbbbbbb"]);
        assert_eq!(s.subnet_names(), ["a", "b"]);
    }

    #[test]
    fn selector_needs_every_label() {
        let s = spec("nodeSelector: {ng: multi-eni, zone: a}\n");
        let mut labels = BTreeMap::from([("ng".to_string(), "multi-eni".to_string())]);
        assert!(!s.selects(&labels));
        labels.insert("zone".into(), "a".into());
        assert!(s.selects(&labels));
        labels.insert("zone".into(), "b".into());
        assert!(!s.selects(&labels));
    }
}
