//! Command line and environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, ValueEnum};
use eni_deviceplugin::{Config as DevicePluginConfig, RegistrationMode};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// eni-manager: the aws-multi-eni node daemon.
///
/// Configures, on its own node, the ENIs the controller attached to it (as listed in the
/// NodeENI status): finds each interface by MAC address, brings it up and sets its MTU,
/// binds DPDK ENIs to a userspace-I/O driver, and reports what it did in
/// `status.nodeReports` of each NodeENI. It reacts to netlink link events, so a
/// hot-plugged ENI is configured within a second, and resyncs periodically.
///
/// Every flag can also be set through the environment variable shown with it
/// (`NODE_NAME` is still read when `ENI_MANAGER_NODE_NAME` is unset). Boolean flags take
/// `--flag`, `--flag=true` or `--flag=false` (also yes/no, on/off, 1/0).
#[derive(Debug, Clone, Parser)]
#[command(name = "eni-manager", version, about, long_about)]
pub struct Config {
    /// Name of the Kubernetes Node this daemon runs on (from the downward API).
    #[arg(long, env = "ENI_MANAGER_NODE_NAME")]
    pub node_name: String,

    /// Root of the sysfs tree (PCI devices, drivers). Tests point it at a fake tree.
    #[arg(long, env = "ENI_MANAGER_SYSFS_ROOT", default_value = "/sys")]
    pub sysfs_root: PathBuf,

    /// Directory of the state file `enis.json` (read by cni-helper; keeps MAC <-> PCI
    /// for DPDK-bound devices across restarts). Should be on a tmpfs such as /run.
    #[arg(
        long,
        env = "ENI_MANAGER_STATE_DIR",
        default_value = "/run/aws-multi-eni"
    )]
    pub state_dir: PathBuf,

    /// MTU for ENIs whose NodeENI sets none.
    #[arg(long, env = "ENI_MANAGER_DEFAULT_MTU", default_value_t = 9001,
          value_parser = clap::value_parser!(u32).range(576..=9001))]
    pub default_mtu: u32,

    /// Also make the ENI at device index N reachable as `eth<N>`, as an alternative
    /// interface name (Linux >= 5.5). An altname rather than a rename: renaming needs
    /// the link down (a flap), races udev's predictable naming, and breaks whatever
    /// already uses the kernel name; an altname adds `eth<N>` for tools and NADs
    /// (`master: eth2`) while `ens7` keeps working.
    #[arg(long, env = "ENI_MANAGER_STABLE_NAMES", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub stable_names: bool,

    /// Operate netlink inside this network namespace (e.g. /var/run/netns/node1) while
    /// the daemon itself stays in its own namespace. For tests and the local demo.
    #[arg(long, env = "ENI_MANAGER_NETNS")]
    pub netns: Option<PathBuf>,

    /// Full resync period, a safety net behind the watch and netlink events
    /// (e.g. 30s, 5m).
    #[arg(long, env = "ENI_MANAGER_RESYNC_PERIOD", default_value = "5m",
          value_parser = humantime::parse_duration)]
    pub resync_period: Duration,

    /// How often pod address allocations are checked against the pods the API server
    /// still lists on this node; allocations of pods gone for two checks in a row are
    /// freed (0s: never; CNI DEL and GC still free addresses).
    #[arg(long, env = "ENI_MANAGER_IPAM_RECONCILE_PERIOD", default_value = "2m",
          value_parser = humantime::parse_duration)]
    pub ipam_reconcile_period: Duration,

    /// Address of the /healthz, /readyz and /metrics endpoints.
    #[arg(long, env = "ENI_MANAGER_METRICS_ADDR", default_value = "0.0.0.0:9101")]
    pub metrics_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "ENI_MANAGER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Also allow binding network controllers (PCI class 0x02) that are not Amazon ENAs
    /// for DPDK. Never extends to other classes: NVMe disks (Amazon's EBS and instance
    /// store share the ENA's vendor id), bridges and accelerators are always refused.
    #[arg(long, env = "ENI_MANAGER_FORCE_NON_ENA", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub force_non_ena: bool,

    /// Let vfio-pci take devices that have no IOMMU group by switching on vfio's
    /// `enable_unsafe_noiommu_mode` (most EC2 instance types expose no IOMMU). Unsafe: no
    /// DMA isolation for the DPDK process, and it taints the kernel. Off: such devices
    /// are refused and the NodeENI's nodeReports say that vfio needs an IOMMU. Chart
    /// value `vfio.enableUnsafeNoIOMMUMode`.
    #[arg(long, env = "ENI_MANAGER_ENABLE_UNSAFE_NOIOMMU_MODE", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub enable_unsafe_noiommu_mode: bool,

    /// Path of the kubelet's PodResources socket, asked which devices running pods hold
    /// before a DPDK device is given back to its kernel driver; while the kubelet does
    /// not answer, devices are not given back. Empty: do not ask (a device is then given
    /// back as soon as it is no longer wanted, even from under a pod).
    #[arg(
        long,
        env = "ENI_MANAGER_POD_RESOURCES_SOCKET",
        default_value = "/var/lib/kubelet/pod-resources/kubelet.sock",
        value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from)
    )]
    pub pod_resources_socket: PathBuf,

    /// Longest time one sysfs driver operation (bind or release of a device) may take
    /// before the daemon stops waiting for it, reports it, and carries on (the kernel
    /// blocks an unbind while a process still holds the device).
    #[arg(long, env = "ENI_MANAGER_SYSFS_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub sysfs_timeout: Duration,

    /// Test/demo only (builds with the `test-util` feature): --sysfs-root is a fake
    /// tree; simulate the kernel's side of unbind and drivers_probe on it.
    #[cfg(feature = "test-util")]
    #[arg(long, env = "ENI_MANAGER_SIMULATE_PCI_KERNEL", hide = true, default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub simulate_pci_kernel: bool,

    /// Serve the kubelet device plugin (deviceplugin/v1beta1) that advertises DPDK-bound
    /// ENIs as extended resources (`dpdkResourceName`, default
    /// `intel.com/intel_sriov_netdevice`). `--device-plugin=false` turns it off.
    #[arg(long, env = "ENI_MANAGER_DEVICE_PLUGIN", default_value_t = true,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub device_plugin: bool,

    /// Directory holding the kubelet's `kubelet.sock` and (in `device-plugin`
    /// registration mode) the plugin sockets.
    #[arg(
        long,
        env = "ENI_MANAGER_DEVICE_PLUGIN_DIR",
        default_value = "/var/lib/kubelet/device-plugins"
    )]
    pub device_plugin_dir: PathBuf,

    /// How the device plugin registers: `device-plugin` (call `Register` on
    /// `kubelet.sock`) or `plugins-registry` (a socket in --plugins-registry-dir that the
    /// kubelet's plugin watcher discovers).
    #[arg(
        long,
        env = "ENI_MANAGER_DEVICE_PLUGIN_REGISTRATION",
        default_value = "device-plugin",
        value_parser = clap::builder::PossibleValuesParser::new(["device-plugin", "plugins-registry"])
            .try_map(|s| s.parse::<RegistrationMode>())
    )]
    pub device_plugin_registration: RegistrationMode,

    /// The kubelet's plugin-watcher directory (used with
    /// `--device-plugin-registration=plugins-registry`).
    #[arg(
        long,
        env = "ENI_MANAGER_PLUGINS_REGISTRY_DIR",
        default_value = "/var/lib/kubelet/plugins_registry"
    )]
    pub plugins_registry_dir: PathBuf,

    /// Where the host's `/dev` is visible to this process (the device plugin checks that
    /// `vfio/vfio` and the vfio group devices exist). Paths handed to the kubelet always
    /// say `/dev/...`.
    #[arg(long, env = "ENI_MANAGER_DEV_ROOT", default_value = "/dev")]
    pub dev_root: PathBuf,

    /// Directory of the Multus device-info files (`<resource>-<pci>-device.json`)
    /// written at Allocate.
    #[arg(
        long,
        env = "ENI_MANAGER_DEVINFO_DIR",
        default_value = "/var/run/k8s.cni.cncf.io/devinfo/dp"
    )]
    pub devinfo_dir: PathBuf,

    /// Resources served through Dynamic Resource Allocation instead of the device plugin
    /// (comma-separated extended resource names, e.g. `intel.com/intel_sriov_netdevice`):
    /// their devices are published in this node's ResourceSlice and are not advertised
    /// by the device plugin (a node serves a resource one way, never both). Empty: no DRA.
    #[arg(long, env = "ENI_MANAGER_DRA_RESOURCES", value_delimiter = ',', num_args = 0..)]
    pub dra_resources: Vec<String>,

    /// Also publish the ENIs left on their kernel driver (netdev ENIs, for `host-device`)
    /// through DRA, under this resource name (e.g. `networking.k8s.aws/eni`): a
    /// DeviceClass selects them by it (`k8s.cni.cncf.io/resourceName`). DRA only: the
    /// device plugin never advertises netdev ENIs. Empty: not published.
    #[arg(long, env = "ENI_MANAGER_DRA_ENA_RESOURCE", default_value = "")]
    pub dra_ena_resource: String,

    /// DRA driver name of the ResourceSlices (and of the DeviceClasses that select them).
    #[arg(long, env = "ENI_MANAGER_DRA_DRIVER_NAME", default_value = eni_dra::DEFAULT_DRIVER_NAME)]
    pub dra_driver_name: String,

    /// The kubelet's plugin directory: the DRA driver serves
    /// `<dir>/<driver>/dra.sock` (registered through --plugins-registry-dir) and keeps
    /// its checkpoint of prepared claims there.
    #[arg(
        long,
        env = "ENI_MANAGER_DRA_PLUGINS_DIR",
        default_value = "/var/lib/kubelet/plugins"
    )]
    pub dra_plugins_dir: PathBuf,

    /// Directory of the CDI spec files the DRA driver writes for prepared claims (the
    /// container runtime's CDI spec directory).
    #[arg(long, env = "ENI_MANAGER_CDI_DIR", default_value = "/var/run/cdi")]
    pub cdi_dir: PathBuf,
}

/// Older environment variable names, read when the current one (first) is unset.
pub const ENV_ALIASES: &[(&str, &str)] = &[("ENI_MANAGER_NODE_NAME", "NODE_NAME")];

impl Config {
    /// Parses the command line; environment variables are read through `env` (the process
    /// environment in `main`). Precedence: command line, the flag's environment variable,
    /// its older name ([`ENV_ALIASES`]), the default.
    pub fn parse_with_env<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        // An environment value becomes the flag's default: below the command line, above
        // the built-in default, and checked by the same value parser.
        let cmd = Self::command().mut_args(|arg| {
            let Some(name) = arg.get_env().and_then(|n| n.to_str()).map(str::to_owned) else {
                return arg;
            };
            let older = ENV_ALIASES.iter().filter(|(new, _)| *new == name);
            let value = std::iter::once(name.as_str())
                .chain(older.map(|(_, old)| *old))
                .find_map(&env);
            match value {
                // A value from the environment satisfies a required flag.
                Some(v) => arg.default_value(v).required(false),
                None => arg,
            }
        });
        Self::from_arg_matches(&cmd.try_get_matches_from(args)?)
    }

    /// Whether `resource` is served through DRA (`--dra-resources`,
    /// `--dra-ena-resource`).
    pub fn serves_through_dra(&self, resource: &str) -> bool {
        self.dra_served().iter().any(|r| r == resource)
    }

    /// The netdev ENIs' resource (`--dra-ena-resource`), when set.
    pub fn netdev_resource(&self) -> Option<&str> {
        Some(self.dra_ena_resource.as_str()).filter(|r| !r.is_empty())
    }

    /// Every resource served through DRA: `--dra-resources` and the netdev resource.
    pub fn dra_served(&self) -> Vec<String> {
        let mut all = self.dra_resources.clone();
        if let Some(r) = self
            .netdev_resource()
            .filter(|r| !all.iter().any(|a| a == r))
        {
            all.push(r.to_owned());
        }
        all
    }

    /// The DRA driver's slice publisher and kubelet plugin settings (`None` when no
    /// resource is served through DRA).
    pub fn dra_config(&self) -> Option<(eni_dra::PublisherConfig, eni_dra::PluginConfig)> {
        if self.dra_served().is_empty() {
            return None;
        }
        let mut publisher = eni_dra::PublisherConfig::new(&self.dra_driver_name, &self.node_name);
        publisher.sysfs_root.clone_from(&self.sysfs_root);
        let mut plugin = eni_dra::PluginConfig::new(&self.dra_driver_name, &self.node_name);
        plugin.plugins_dir.clone_from(&self.dra_plugins_dir);
        plugin.registry_dir.clone_from(&self.plugins_registry_dir);
        plugin.cdi_dir.clone_from(&self.cdi_dir);
        plugin.devinfo_dir.clone_from(&self.devinfo_dir);
        Some((publisher, plugin))
    }

    /// The device plugin's settings (`None` when `--device-plugin=false`).
    pub fn device_plugin_config(&self) -> Option<DevicePluginConfig> {
        self.device_plugin.then(|| DevicePluginConfig {
            device_plugin_dir: self.device_plugin_dir.clone(),
            registration: self.device_plugin_registration,
            plugins_registry_dir: self.plugins_registry_dir.clone(),
            sysfs_root: self.sysfs_root.clone(),
            dev_root: self.dev_root.clone(),
            devinfo_dir: self.devinfo_dir.clone(),
            // Only DPDK-bound ENIs are advertised (docs/multus.md says why there is no
            // resource for ENIs still on ena).
            netdev_resource: None,
            ..DevicePluginConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_every_flag_has_an_env_var() {
        Config::command().debug_assert();
        for arg in Config::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(arg.get_env().is_some(), "--{id} has no env var");
        }
    }

    fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Config, clap::Error> {
        let argv = std::iter::once("eni-manager").chain(args.iter().copied());
        Config::parse_with_env(argv, |name| {
            env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.into())
        })
    }

    #[test]
    fn every_boolean_flag_takes_the_bare_and_the_explicit_forms_and_its_env_var() {
        type BoolFlag = (&'static str, bool, fn(&Config) -> bool);
        let bools: [BoolFlag; 5] = [
            ("stable-names", false, |c| c.stable_names),
            ("force-non-ena", false, |c| c.force_non_ena),
            ("enable-unsafe-noiommu-mode", false, |c| {
                c.enable_unsafe_noiommu_mode
            }),
            ("simulate-pci-kernel", false, |c| c.simulate_pci_kernel),
            ("device-plugin", true, |c| c.device_plugin),
        ];
        let cmd = Config::command();
        let found: Vec<&str> = cmd
            .get_arguments()
            .filter(|a| {
                a.get_value_parser().type_id() == clap::builder::ValueParser::bool().type_id()
            })
            .filter_map(|a| a.get_long())
            .collect();
        let listed: Vec<&str> = bools.iter().map(|(f, _, _)| *f).collect();
        assert_eq!(found, listed, "a boolean flag is missing from this test");
        for (flag, default, get) in bools {
            let env = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .and_then(|a| a.get_env())
                .and_then(|e| e.to_str())
                .expect("env var")
                .to_owned();
            let with = |extra: &[&str], env: &[(&str, &str)]| {
                let mut args = vec!["--node-name=n1"];
                args.extend_from_slice(extra);
                get(&parse_env(&args, env).unwrap_or_else(|e| panic!("{flag} {extra:?}: {e}")))
            };
            assert_eq!(with(&[], &[]), default, "--{flag} default");
            assert!(with(&[&format!("--{flag}")], &[]));
            assert!(with(&[&format!("--{flag}=true")], &[]));
            assert!(!with(&[&format!("--{flag}=false")], &[]));
            // Followed by another flag, the bare form does not swallow it.
            assert!(with(&[&format!("--{flag}"), "--default-mtu=1500"], &[]));
            for (value, want) in [("true", true), ("false", false), ("1", true), ("0", false)] {
                assert_eq!(with(&[], &[(&env, value)]), want, "{env}={value}");
            }
            assert!(!with(&[&format!("--{flag}=false")], &[(&env, "true")]));
            assert!(parse_env(&["--node-name=n1", &format!("--{flag}=ture")], &[]).is_err());
            assert!(parse_env(&["--node-name=n1"], &[(&env, "ture")]).is_err());
        }
    }

    #[test]
    fn one_env_prefix_and_the_older_names_still_work() {
        for arg in Config::command().get_arguments() {
            let Some(env) = arg.get_env().and_then(|e| e.to_str()) else {
                continue;
            };
            assert!(
                env.starts_with("ENI_MANAGER_"),
                "{env} lacks the ENI_MANAGER_ prefix"
            );
        }
        let c = parse_env(&[], &[("NODE_NAME", "old")]).expect("parses");
        assert_eq!(c.node_name, "old");
        let env = [("ENI_MANAGER_NODE_NAME", "new"), ("NODE_NAME", "old")];
        assert_eq!(parse_env(&[], &env).expect("parses").node_name, "new");
        assert!(parse_env(&[], &[]).is_err(), "the node name is required");
    }

    #[test]
    fn defaults_and_parsing() {
        let c = Config::try_parse_from(["eni-manager", "--node-name", "n1"]).expect("parses");
        assert_eq!(c.sysfs_root, PathBuf::from("/sys"));
        assert_eq!(c.state_dir, PathBuf::from("/run/aws-multi-eni"));
        assert_eq!(c.default_mtu, 9001);
        assert_eq!(c.resync_period, Duration::from_secs(300));
        assert!(!c.stable_names && !c.force_non_ena && !c.enable_unsafe_noiommu_mode);
        assert_eq!(
            c.pod_resources_socket,
            PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock")
        );
        assert_eq!(c.sysfs_timeout, Duration::from_secs(10));
        let c = Config::try_parse_from([
            "eni-manager",
            "--node-name",
            "n1",
            "--pod-resources-socket=",
        ])
        .expect("parses");
        assert_eq!(c.pod_resources_socket, PathBuf::new());

        let c = Config::try_parse_from([
            "eni-manager",
            "--node-name",
            "n1",
            "--stable-names",
            "--resync-period",
            "30s",
            "--log-format",
            "json",
            "--default-mtu",
            "1500",
        ])
        .expect("parses");
        assert!(c.stable_names);
        assert_eq!(c.resync_period, Duration::from_secs(30));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.default_mtu, 1500);
        assert!(
            Config::try_parse_from(["eni-manager", "--node-name", "n", "--default-mtu", "100"])
                .is_err()
        );
    }

    #[test]
    fn device_plugin_flags() {
        let c = Config::try_parse_from(["eni-manager", "--node-name", "n1"]).expect("parses");
        assert_eq!(
            c.device_plugin_config(),
            Some(DevicePluginConfig::default()),
            "defaults are the production paths"
        );
        let c = Config::try_parse_from([
            "eni-manager",
            "--node-name",
            "n1",
            "--sysfs-root",
            "/tmp/sys",
            "--device-plugin-dir",
            "/tmp/dp",
            "--device-plugin-registration",
            "plugins-registry",
            "--plugins-registry-dir",
            "/tmp/reg",
            "--dev-root",
            "/tmp/dev",
            "--devinfo-dir",
            "/tmp/devinfo",
        ])
        .expect("parses");
        let dp = c.device_plugin_config().expect("enabled");
        assert_eq!(dp.device_plugin_dir, PathBuf::from("/tmp/dp"));
        assert_eq!(dp.registration, RegistrationMode::PluginsRegistry);
        assert_eq!(dp.plugins_registry_dir, PathBuf::from("/tmp/reg"));
        assert_eq!(dp.sysfs_root, PathBuf::from("/tmp/sys"));
        assert_eq!(dp.dev_root, PathBuf::from("/tmp/dev"));
        assert_eq!(dp.devinfo_dir, PathBuf::from("/tmp/devinfo"));
        assert_eq!(dp.netdev_resource, None);
        for off in [["--device-plugin=false"], ["--device-plugin=0"]] {
            let mut args = vec!["eni-manager", "--node-name", "n1"];
            args.extend(off);
            let c = Config::try_parse_from(args).expect("parses");
            assert_eq!(c.device_plugin_config(), None);
        }
        assert!(
            Config::try_parse_from([
                "eni-manager",
                "--node-name",
                "n1",
                "--device-plugin-registration",
                "kubelet"
            ])
            .is_err()
        );
    }

    #[test]
    fn dra_flags() {
        let c = Config::try_parse_from(["eni-manager", "--node-name", "n1"]).expect("parses");
        assert!(c.dra_resources.is_empty());
        assert_eq!(c.dra_driver_name, "eni.networking.k8s.aws");
        let c = parse_env(
            &["--node-name=n1"],
            &[("ENI_MANAGER_DRA_RESOURCES", "a.com/x,b.com/y")],
        )
        .expect("parses");
        assert_eq!(c.dra_resources, ["a.com/x", "b.com/y"]);
        assert!(c.serves_through_dra("b.com/y") && !c.serves_through_dra("c.com/z"));
        assert_eq!(c.netdev_resource(), None);
        let n = Config::try_parse_from([
            "eni-manager",
            "--node-name=n1",
            "--dra-ena-resource=networking.k8s.aws/eni",
        ])
        .expect("parses");
        assert_eq!(n.netdev_resource(), Some("networking.k8s.aws/eni"));
        assert_eq!(n.dra_served(), ["networking.k8s.aws/eni"]);
        assert!(n.serves_through_dra("networking.k8s.aws/eni"));
        assert!(n.dra_config().is_some(), "netdev ENIs alone turn DRA on");
        let c = Config::try_parse_from([
            "eni-manager",
            "--node-name=n1",
            "--dra-resources=a.com/x",
            "--dra-driver-name=d.example.com",
        ])
        .expect("parses");
        assert_eq!(c.dra_resources, ["a.com/x"]);
        assert_eq!(c.dra_driver_name, "d.example.com");
        let (p, k) = c.dra_config().expect("DRA on");
        assert_eq!(
            (p.driver.as_str(), p.node.as_str()),
            ("d.example.com", "n1")
        );
        assert_eq!(
            k.dra_socket(),
            PathBuf::from("/var/lib/kubelet/plugins/d.example.com/dra.sock")
        );
        assert_eq!(
            k.registration_socket(),
            PathBuf::from("/var/lib/kubelet/plugins_registry/d.example.com-reg.sock")
        );
        assert_eq!(k.cdi_dir, PathBuf::from("/var/run/cdi"));
        assert!(
            Config::try_parse_from(["eni-manager", "--node-name=n1"])
                .expect("parses")
                .dra_config()
                .is_none()
        );
    }

    #[test]
    fn there_is_no_netdev_resource_flag() {
        // It was accepted and did nothing (non-DPDK ENIs were never published to the
        // device plugin); a flag that silently does nothing is worse than none.
        let e = Config::try_parse_from([
            "eni-manager",
            "--node-name",
            "n1",
            "--netdev-resource-name",
            "example.com/eni",
        ])
        .expect_err("removed");
        assert!(e.to_string().contains("--netdev-resource-name"), "{e}");
        assert!(!Config::command().get_arguments().any(|a| {
            a.get_env()
                .is_some_and(|v| v == "ENI_MANAGER_NETDEV_RESOURCE_NAME")
        }));
    }
}
