//! cni-helper: resolves an ENI device index to this node's interface (or PCI address) and
//! runs a delegate CNI plugin (ipvlan, macvlan, host-device) on it.
//!
//! * [`config`]: the network config (pure; unit tested and fuzzed).
//! * [`resolve`]: state file, then IMDS + sysfs, behind the [`state::StateSource`],
//!   [`imds::Metadata`] and [`sysfs::NetDevices`] traits.
//! * [`plugin`]: the CNI commands, delegating through [`exec::Delegates`].
//! * [`nad`]: NetworkAttachmentDefinition generation for the CLI.
//! * [`nodeconf`]: the node-local config (state dir, IMDS endpoint).
//! * [`ipam`]: cni-helper as the IPAM plugin of its delegate: pod addresses from the
//!   ENI's pool in the state file, allocations under a lock, no EC2 call.

pub mod cni;
pub mod config;
pub mod exec;
pub mod imds;
pub mod ipam;
pub mod nad;
pub mod nodeconf;
pub mod plugin;
pub mod resolve;
pub mod state;
pub mod sysfs;

use std::path::Path;

use crate::imds::Imds;
use crate::plugin::ResolveEni;
use crate::resolve::Resolver;
use crate::state::StateFile;
use crate::sysfs::Sysfs;

/// The real resolution sources for a state dir and IMDS endpoint (None: the environment,
/// then the default). `AWS_EC2_METADATA_DISABLED=true` turns IMDS off, as in the AWS SDKs;
/// an unusable endpoint too (the resolution error says which).
pub fn resolver(
    state_dir: &Path,
    imds_endpoint: Option<&str>,
) -> Resolver<StateFile, ImdsOrBroken, Sysfs> {
    let env = std::env::var(imds::ENDPOINT_ENV).ok();
    let url = imds::endpoint_from(imds_endpoint, env.as_deref());
    let disabled =
        std::env::var(imds::DISABLED_ENV).is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    Resolver {
        state: StateFile::in_dir(state_dir),
        metadata: Some(match Imds::new(&url) {
            _ if disabled => ImdsOrBroken::Disabled,
            Ok(i) => ImdsOrBroken::Imds(i),
            Err(e) => ImdsOrBroken::Broken(e.to_string()),
        }),
        netdevs: Sysfs::default(),
    }
}

/// The resolver for this node: the state dir and IMDS endpoint come from the node-local
/// config ([`nodeconf`]), never from the network config.
pub fn resolver_for(node: &nodeconf::NodeConfig) -> Box<dyn ResolveEni> {
    Box::new(resolver(&node.state_dir, node.imds_endpoint.as_deref()))
}

/// IMDS, or why it cannot be used.
#[derive(Debug)]
pub enum ImdsOrBroken {
    /// A client.
    Imds(Imds),
    /// `AWS_EC2_METADATA_DISABLED=true`.
    Disabled,
    /// The endpoint error.
    Broken(String),
}

impl imds::Metadata for ImdsOrBroken {
    fn describe(&self) -> String {
        match self {
            Self::Imds(i) => i.describe(),
            Self::Broken(_) | Self::Disabled => "IMDS".into(),
        }
    }

    fn find(
        &self,
        device_index: u64,
        network_card_index: u64,
    ) -> Result<(Option<imds::ImdsEni>, Vec<imds::ImdsEni>), imds::ImdsError> {
        match self {
            Self::Imds(i) => i.find(device_index, network_card_index),
            Self::Broken(e) => Err(imds::ImdsError::Endpoint(e.clone())),
            Self::Disabled => Err(imds::ImdsError::Disabled),
        }
    }
}
