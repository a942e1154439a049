//! The EC2 operations the controller needs, behind one narrow trait.
//!
//! [`Ec2`] is what the reconciler calls; [`aws::AwsEc2`] is its only real adapter (the
//! AWS SDK). The types here are the controller's own view of EC2 objects: just the
//! fields it reads, already parsed.

pub mod aws;
mod error;

use std::collections::BTreeMap;
use std::future::Future;

pub use error::{Ec2Error, ErrorKind};

/// A network interface as the controller sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eni {
    /// `eni-...`.
    pub id: String,
    /// Subnet the ENI lives in.
    pub subnet_id: String,
    /// MAC address.
    pub mac_address: Option<String>,
    /// Primary private IPv4 address.
    pub private_ip: Option<String>,
    /// `available`, `in-use`, `attaching`, `detaching`, ...
    pub status: String,
    /// Security groups, sorted.
    pub security_groups: Vec<String>,
    /// Description (empty when unset).
    pub description: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Current attachment.
    pub attachment: Option<Attachment>,
    /// Secondary private IPv4 addresses (the primary excluded), sorted.
    pub secondary_ips: Vec<String>,
    /// /28 IPv4 prefixes, sorted.
    pub ipv4_prefixes: Vec<String>,
}

/// An ENI's attachment to an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// `eni-attach-...`.
    pub id: String,
    /// Instance the ENI is attached to.
    pub instance_id: String,
    /// Device index on the instance.
    pub device_index: i32,
    /// Network card index.
    pub network_card_index: i32,
    /// Attachment state.
    pub state: AttachmentState,
    /// Whether EC2 deletes the ENI when the instance terminates.
    pub delete_on_termination: bool,
}

/// State of an attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachmentState {
    /// Attach in progress.
    Attaching,
    /// Attached.
    Attached,
    /// Detach in progress.
    Detaching,
    /// Detached (the ENI is about to become `available`).
    Detached,
}

impl AttachmentState {
    /// Parses EC2's attachment status string.
    pub fn parse(s: &str) -> Self {
        match s {
            "attaching" => Self::Attaching,
            "detaching" => Self::Detaching,
            "detached" => Self::Detached,
            _ => Self::Attached,
        }
    }
}

/// What a new ENI looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEni {
    /// Subnet to create it in.
    pub subnet_id: String,
    /// Security groups.
    pub security_groups: Vec<String>,
    /// Description.
    pub description: String,
    /// Tags, set in the create call itself.
    pub tags: BTreeMap<String, String>,
    /// Idempotency token (at most 64 ASCII characters).
    pub client_token: String,
}

/// An EC2 instance as far as ENI placement is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// `i-...`.
    pub id: String,
    /// e.g. `m5.large`.
    pub instance_type: String,
    /// VPC of the primary ENI.
    pub vpc_id: String,
    /// Availability zone.
    pub availability_zone: String,
    /// Lifecycle state (`pending`, `running`, `stopping`, `stopped`, `shutting-down`,
    /// `terminated`).
    pub state: String,
    /// ENIs attached to it (by anyone): (ENI, device index, network card).
    pub enis: Vec<AttachedEni>,
}

impl AttachedEni {
    /// Who holds this ENI, for messages about the device index it occupies.
    pub fn holder(&self) -> Holder {
        if let Some(n) = &self.nodeeni {
            Holder::NodeEni(n.clone())
        } else if self.description.starts_with(VPC_CNI_DESCRIPTION_PREFIX) {
            Holder::VpcCni
        } else {
            Holder::Unknown
        }
    }
}

/// Description prefix of the ENIs the Amazon VPC CNI (ipamd) creates and attaches.
pub const VPC_CNI_DESCRIPTION_PREFIX: &str = "aws-K8S-";

/// Who holds an ENI that occupies a wanted device index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// The Amazon VPC CNI: it attaches its ENIs at the next free index.
    VpcCni,
    /// Another NodeENI of this cluster.
    NodeEni(String),
    /// Neither: someone attached it by hand or with another tool.
    Unknown,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::VpcCni => f.write_str(
                "an ENI of the Amazon VPC CNI (leave its indexes to it: use deviceIndex 2 or higher, see docs/install.md)",
            ),
            Self::NodeEni(n) => write!(f, "an ENI of NodeENI {n}"),
            Self::Unknown => f.write_str("an ENI not managed by the VPC CNI or by this controller"),
        }
    }
}

impl Instance {
    /// Whether the instance is being terminated or is gone: its ENIs are released (EC2
    /// deletes those with DeleteOnTermination itself).
    pub fn is_terminating(&self) -> bool {
        matches!(self.state.as_str(), "shutting-down" | "terminated")
    }
}

/// One ENI attached to an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedEni {
    /// The ENI.
    pub eni_id: String,
    /// Its device index.
    pub device_index: i32,
    /// Its network card.
    pub network_card_index: i32,
    /// Its description (the Amazon VPC CNI writes `aws-K8S-<instance-id>`).
    pub description: String,
    /// The NodeENI it was created for, when it is one of this cluster's.
    pub nodeeni: Option<String>,
}

/// ENI limits of an instance type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceLimits {
    /// Maximum ENIs over all network cards.
    pub max_enis: i32,
    /// Maximum ENIs per network card: (card index, maximum).
    pub cards: Vec<(i32, i32)>,
    /// `Ipv4AddressesPerInterface`: the primary address, each secondary address and each
    /// /28 prefix count one.
    pub ipv4_per_interface: Option<i32>,
    /// The hypervisor is Nitro (`/28` prefixes are possible); `None` when EC2 did not say.
    pub nitro: Option<bool>,
}

/// A subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subnet {
    /// `subnet-...`.
    pub id: String,
    /// Its VPC.
    pub vpc_id: String,
    /// Its availability zone.
    pub availability_zone: String,
    /// IPv4 CIDR block.
    pub cidr: String,
    /// `Name` tag.
    pub name: Option<String>,
}

/// A security group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityGroup {
    /// `sg-...`.
    pub id: String,
    /// Group name.
    pub name: String,
    /// `Name` tag.
    pub name_tag: Option<String>,
    /// Its VPC.
    pub vpc_id: String,
}

/// Which ENIs to describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EniQuery {
    /// Every ENI carrying this tag with this value (all pages).
    Tag(String, String),
    /// These ENIs; missing ones are simply absent from the answer.
    Ids(Vec<String>),
}

/// Which subnets or security groups to describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupQuery {
    /// By ID.
    Ids(Vec<String>),
    /// By `Name` tag within a VPC.
    NameTags {
        /// The VPC.
        vpc_id: String,
        /// The names.
        names: Vec<String>,
    },
    /// By group name within a VPC (security groups only).
    GroupNames {
        /// The VPC.
        vpc_id: String,
        /// The names.
        names: Vec<String>,
    },
}

/// The EC2 API surface the controller uses.
///
/// Every method is one EC2 action (describes follow pagination). Implementations map
/// failures to [`Ec2Error`] with a [`ErrorKind`] the planner can act on.
pub trait Ec2: Send + Sync + 'static {
    /// `DescribeNetworkInterfaces`.
    fn describe_enis(
        &self,
        query: EniQuery,
    ) -> impl Future<Output = Result<Vec<Eni>, Ec2Error>> + Send;

    /// `DescribeInstances` for these IDs.
    fn describe_instances(
        &self,
        ids: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Instance>, Ec2Error>> + Send;

    /// `DescribeInstanceTypes`.
    fn describe_instance_types(
        &self,
        types: Vec<String>,
    ) -> impl Future<Output = Result<BTreeMap<String, InstanceLimits>, Ec2Error>> + Send;

    /// `DescribeSubnets`.
    fn describe_subnets(
        &self,
        query: LookupQuery,
    ) -> impl Future<Output = Result<Vec<Subnet>, Ec2Error>> + Send;

    /// `DescribeSecurityGroups`.
    fn describe_security_groups(
        &self,
        query: LookupQuery,
    ) -> impl Future<Output = Result<Vec<SecurityGroup>, Ec2Error>> + Send;

    /// `CreateNetworkInterface` with tags and a client token.
    fn create_eni(&self, eni: NewEni) -> impl Future<Output = Result<Eni, Ec2Error>> + Send;

    /// `AttachNetworkInterface`; returns the attachment ID.
    fn attach_eni(
        &self,
        eni_id: String,
        instance_id: String,
        device_index: i32,
        network_card_index: i32,
    ) -> impl Future<Output = Result<String, Ec2Error>> + Send;

    /// `ModifyNetworkInterfaceAttribute` (`Attachment.DeleteOnTermination`).
    fn set_delete_on_termination(
        &self,
        eni_id: String,
        attachment_id: String,
        delete: bool,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// `ModifyNetworkInterfaceAttribute` (`SecurityGroupId`).
    fn set_security_groups(
        &self,
        eni_id: String,
        groups: Vec<String>,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// `ModifyNetworkInterfaceAttribute` (`Description`).
    fn set_description(
        &self,
        eni_id: String,
        description: String,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// `DetachNetworkInterface`.
    fn detach_eni(
        &self,
        attachment_id: String,
        force: bool,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// `DeleteNetworkInterface`.
    fn delete_eni(&self, eni_id: String) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// `AssignPrivateIpAddresses` with `SecondaryPrivateIpAddressCount` (`prefixes` false)
    /// or `Ipv4PrefixCount` (`prefixes` true); returns what EC2 assigned (addresses, or
    /// prefixes in CIDR notation).
    fn assign_ips(
        &self,
        eni_id: String,
        count: i32,
        prefixes: bool,
    ) -> impl Future<Output = Result<Vec<String>, Ec2Error>> + Send;

    /// `UnassignPrivateIpAddresses` of these secondary addresses or /28 prefixes (CIDR
    /// notation).
    fn unassign_ips(
        &self,
        eni_id: String,
        units: Vec<String>,
        prefixes: bool,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;

    /// `CreateTags` on one ENI (adopting an ENI created before it carried this
    /// controller's ownership tags).
    fn tag_eni(
        &self,
        eni_id: String,
        tags: BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), Ec2Error>> + Send;
}
