//! cni-helper: a CNI plugin when `CNI_COMMAND` is set, a small CLI otherwise.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use cni_helper::cni::{CniCode, CniEnv, CniError};
use cni_helper::config::{DelegateKind, Target};
use cni_helper::exec::CniPath;
use cni_helper::nad::{HostLocal, NadSpec};
use cni_helper::{cni, nodeconf, plugin};

/// Resolve an AWS ENI device index to this node's interface (or PCI address).
///
/// Run by a container runtime (CNI_COMMAND set) it is a CNI plugin that wraps ipvlan, macvlan
/// or host-device and fills in the ENI; see docs/cni-helper.md. Without CNI_COMMAND it is
/// this CLI.
#[derive(Debug, Parser)]
#[command(name = "cni-helper", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print the interface name (or PCI address, for DPDK-bound ENIs) at a device index.
    ///
    /// Looks in the node daemon's state file first, then asks IMDS (IMDSv2) for the MAC with
    /// that device-number and finds the local interface with that MAC.
    Resolve {
        /// ENI device index (0 is the primary ENI).
        #[arg(env = "CNI_HELPER_DEVICE_INDEX")]
        device_index: u64,
        /// Network card index.
        #[arg(
            long = "network-card",
            env = "CNI_HELPER_NETWORK_CARD",
            default_value_t = 0
        )]
        network_card: u64,
        /// The node daemon's state directory (holds enis.json). Default: the node-local
        /// config's stateDir (/etc/aws-multi-eni/cni-helper.json, or $CNI_HELPER_CONFIG),
        /// else /run/aws-multi-eni.
        #[arg(long, env = "CNI_HELPER_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// IMDS endpoint (http://host[:port]). Default: the node-local config's
        /// imdsEndpoint, else http://169.254.169.254.
        #[arg(long, env = "AWS_EC2_METADATA_SERVICE_ENDPOINT")]
        imds_endpoint: Option<String>,
    },
    /// Print a NetworkAttachmentDefinition that uses cni-helper for an ENI device index.
    Nad(NadArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum NadType {
    Ipvlan,
    Macvlan,
    HostDevice,
}

#[derive(Debug, clap::Args)]
struct NadArgs {
    /// ENI device index the network uses.
    #[arg(long, env = "CNI_HELPER_DEVICE_INDEX")]
    device_index: u64,
    /// Network card index (omitted from the config when not given: 0).
    #[arg(long = "network-card", env = "CNI_HELPER_NETWORK_CARD")]
    network_card: Option<u64>,
    /// Delegate plugin.
    #[arg(long = "type", env = "CNI_HELPER_NAD_TYPE", value_enum)]
    kind: NadType,
    /// NAD name (also the CNI network name).
    #[arg(long, env = "CNI_HELPER_NAD_NAME")]
    name: String,
    /// NAD namespace.
    #[arg(long, env = "CNI_HELPER_NAD_NAMESPACE")]
    namespace: Option<String>,
    /// ipvlan mode (l2, l3, l3s; default l2) or macvlan mode (bridge, private, vepa,
    /// passthru; default bridge).
    #[arg(long, env = "CNI_HELPER_NAD_MODE")]
    mode: Option<String>,
    /// MTU of the ipvlan/macvlan interface.
    #[arg(long, env = "CNI_HELPER_NAD_MTU")]
    mtu: Option<u32>,
    /// host-local IPAM subnet (CIDR); without it the network has no IPAM.
    #[arg(long, env = "CNI_HELPER_NAD_SUBNET")]
    subnet: Option<String>,
    /// First address host-local hands out.
    #[arg(long, env = "CNI_HELPER_NAD_RANGE_START", requires = "subnet")]
    range_start: Option<String>,
    /// Last address host-local hands out.
    #[arg(long, env = "CNI_HELPER_NAD_RANGE_END", requires = "subnet")]
    range_end: Option<String>,
    /// Gateway.
    #[arg(long, env = "CNI_HELPER_NAD_GATEWAY", requires = "subnet")]
    gateway: Option<String>,
    /// Device plugin resource (host-device / DPDK), added as the
    /// k8s.v1.cni.cncf.io/resourceName annotation.
    #[arg(long, env = "CNI_HELPER_NAD_RESOURCE_NAME")]
    resource_name: Option<String>,
    /// cniVersion of the generated config.
    #[arg(long, env = "CNI_HELPER_NAD_CNI_VERSION", default_value = "1.0.0")]
    cni_version: String,
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return cni_main();
    }
    match cli_main(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cni-helper: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The plugin: env + stdin in, result or CNI error JSON out.
fn cni_main() -> ExitCode {
    let vars: HashMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
    let reply = match (
        CniEnv::from_vars(&vars),
        std::io::stdin().read_to_end(&mut stdin),
    ) {
        (Err(e), _) => error_reply(&e),
        (Ok(_), Err(e)) => error_reply(&CniError::new(
            CniCode::IoFailure,
            format!("reading stdin: {e}"),
        )),
        (Ok(env), Ok(_)) => {
            let path = nodeconf::path_from(std::env::var(nodeconf::PATH_ENV).ok().as_deref());
            match nodeconf::load(&path) {
                Err(e) => error_reply(&CniError::new(CniCode::InvalidConfig, e.to_string())),
                Ok(node) if cni_helper::ipam::is_ipam_call(&stdin) => {
                    ipam_reply(&env, &stdin, &vars, &node.state_dir)
                }
                Ok(node) => {
                    let delegates = CniPath::new(env.path.clone());
                    let resolver =
                        |_: &cni_helper::config::NetConf| cni_helper::resolver_for(&node);
                    plugin::run(&env, &stdin, &resolver, &delegates)
                }
            }
        }
    };
    for line in &reply.log {
        eprintln!("{line}");
    }
    let mut out = std::io::stdout().lock();
    // If stdout is gone there is no one left to tell.
    let _ = out.write_all(&reply.stdout).and_then(|()| out.flush());
    ExitCode::from(u8::try_from(reply.exit).unwrap_or(1))
}

/// cni-helper run as an IPAM plugin (see `cni_helper::ipam`).
fn ipam_reply(
    env: &CniEnv,
    stdin: &[u8],
    vars: &HashMap<String, String>,
    state_dir: &std::path::Path,
) -> plugin::Reply {
    if env.command == cni::Command::Version {
        return plugin::Reply {
            stdout: cni::version_json().to_string().into_bytes(),
            exit: 0,
            log: Vec::new(),
        };
    }
    let call = match cni_helper::ipam::IpamCall::parse(stdin, vars) {
        Ok(c) => c,
        Err(e) => return error_reply(&e),
    };
    match cni_helper::ipam::run(env.command, &call, state_dir) {
        Ok(out) => plugin::Reply {
            stdout: out.map(|v| v.to_string().into_bytes()).unwrap_or_default(),
            exit: 0,
            log: Vec::new(),
        },
        Err(e) => plugin::Reply {
            stdout: e.to_json(&call.cni_version).to_string().into_bytes(),
            exit: 1,
            log: vec![format!("cni-helper (ipam): {}", e.msg)],
        },
    }
}

fn error_reply(e: &CniError) -> plugin::Reply {
    plugin::Reply {
        stdout: e.to_json(cni::CURRENT_VERSION).to_string().into_bytes(),
        exit: 1,
        log: vec![format!("cni-helper: {}", e.msg)],
    }
}

fn cli_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Resolve {
            device_index,
            network_card,
            state_dir,
            imds_endpoint,
        } => {
            let path = nodeconf::path_from(std::env::var(nodeconf::PATH_ENV).ok().as_deref());
            let node = nodeconf::load(&path)?;
            let (state_dir, imds_endpoint) = sources(state_dir, imds_endpoint, node);
            let r = cni_helper::resolver(&state_dir, imds_endpoint.as_deref());
            let res = r.resolve(device_index, network_card)?;
            match res.target {
                Target::Netdev(n) | Target::Pci(n) => println!("{n}"),
                Target::Mac(m) => {
                    anyhow::bail!("ENI {m} is known but has no interface on this node")
                }
            }
            Ok(())
        }
        Cmd::Nad(a) => {
            let spec = NadSpec {
                name: a.name,
                namespace: a.namespace,
                device_index: a.device_index,
                network_card_index: a.network_card,
                kind: match a.kind {
                    NadType::Ipvlan => DelegateKind::Ipvlan,
                    NadType::Macvlan => DelegateKind::Macvlan,
                    NadType::HostDevice => DelegateKind::HostDevice,
                },
                mode: a.mode,
                mtu: a.mtu,
                cni_version: a.cni_version,
                ipam: a.subnet.map(|subnet| HostLocal {
                    subnet,
                    range_start: a.range_start,
                    range_end: a.range_end,
                    gateway: a.gateway,
                }),
                resource_name: a.resource_name,
            };
            print!(
                "{}",
                spec.render()
                    .context("building the NetworkAttachmentDefinition")?
            );
            Ok(())
        }
    }
}

/// The CLI's state dir and IMDS endpoint: flags win over the node-local config.
fn sources(
    state_dir: Option<PathBuf>,
    imds_endpoint: Option<String>,
    node: nodeconf::NodeConfig,
) -> (PathBuf, Option<String>) {
    (
        state_dir.unwrap_or(node.state_dir),
        imds_endpoint.or(node.imds_endpoint),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use eni_state::DEFAULT_STATE_DIR;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_an_env_var() {
        fn walk(cmd: &clap::Command) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_env().is_some(),
                    "{} --{id} has no env",
                    cmd.get_name()
                );
            }
            for sub in cmd.get_subcommands() {
                walk(sub);
            }
        }
        walk(&Cli::command());
    }

    #[test]
    fn resolve_defaults_come_from_the_node_config() {
        let node = nodeconf::NodeConfig {
            state_dir: PathBuf::from("/var/run/eni"),
            imds_endpoint: Some("http://127.0.0.1:1338".into()),
        };
        assert_eq!(
            sources(None, None, node.clone()),
            (
                PathBuf::from("/var/run/eni"),
                Some("http://127.0.0.1:1338".into())
            )
        );
        assert_eq!(
            sources(Some("/x".into()), Some("http://10.0.0.1".into()), node).0,
            PathBuf::from("/x")
        );
        assert_eq!(
            sources(None, None, nodeconf::NodeConfig::default()).0,
            PathBuf::from(DEFAULT_STATE_DIR)
        );
    }

    #[test]
    fn nad_range_requires_subnet() {
        let e = Cli::try_parse_from([
            "cni-helper",
            "nad",
            "--device-index",
            "2",
            "--type",
            "ipvlan",
            "--name",
            "n",
            "--gateway",
            "10.0.0.1",
        ])
        .expect_err("needs --subnet");
        assert!(e.to_string().contains("--subnet"), "{e}");
    }
}
