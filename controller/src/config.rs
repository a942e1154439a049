//! Command line and environment.

use std::net::SocketAddr;
use std::time::Duration;

use std::ffi::OsString;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// eni-controller: creates, attaches, detaches and deletes AWS ENIs for NodeENI resources.
///
/// Watches NodeENIs and Nodes; for every Node matching a NodeENI's nodeSelector it creates
/// one ENI per subnet in the Node's VPC and zone, attaches it at the requested device
/// index and keeps status, events and metrics true.
///
/// Every flag can also be set through the environment variable shown with it; the names
/// the older releases used (the same without the `ENI_CONTROLLER_` prefix, `POD_NAMESPACE`
/// for the Lease namespace) are still read when the new one is unset. Boolean flags take
/// `--flag`, `--flag=true` or `--flag=false` (also yes/no, on/off, 1/0).
#[derive(Debug, Parser)]
#[command(name = "eni-controller", version, about, long_about)]
pub struct Cli {
    /// What to run (default: the controller).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Controller settings.
    #[command(flatten)]
    pub controller: ControllerArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (the default).
    Run,
    /// Print the NodeENI CustomResourceDefinition as YAML.
    Crd,
}

/// Controller settings.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// Name of this cluster. Every ENI the controller creates is tagged with it, and only
    /// ENIs carrying it are ever adopted or deleted: give each cluster in an account its
    /// own name.
    #[arg(long, env = "ENI_CONTROLLER_CLUSTER_NAME", default_value = "")]
    pub cluster_name: String,

    /// Identity of this cluster, tagged on every ENI beside the name so two clusters
    /// with the same --cluster-name in one account never touch each other's ENIs.
    /// Default: the UID of the kube-system namespace (needs `get` on it).
    #[arg(long, env = "ENI_CONTROLLER_CLUSTER_ID")]
    pub cluster_id: Option<String>,

    /// AWS Region (else the SDK's default chain: AWS_REGION, profile, IMDS).
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,

    /// EC2 endpoint override, e.g. a VPC endpoint or a local emulator.
    #[arg(long, env = "AWS_ENDPOINT_URL_EC2")]
    pub ec2_endpoint: Option<String>,

    /// NodeENIs reconciled at once.
    #[arg(
        long,
        env = "ENI_CONTROLLER_MAX_CONCURRENT_RECONCILES",
        default_value_t = 5
    )]
    pub max_concurrent_reconciles: u16,

    /// Watch events of one NodeENI (its status written by node daemons, Node changes)
    /// are coalesced into one reconcile once they pause for this long...
    #[arg(long, env = "ENI_CONTROLLER_COALESCE_QUIET", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub coalesce_quiet: Duration,

    /// ...or at the latest this long after the first of them, so a NodeENI whose status
    /// is written without pause is still reconciled.
    #[arg(long, env = "ENI_CONTROLLER_COALESCE_MAX_DELAY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub coalesce_max_delay: Duration,

    /// ENI removal chains (detach -> wait -> delete) run at once within one NodeENI. As
    /// for provisioning, the rate limiter paces the EC2 calls; a chain waiting for its
    /// detach to finish holds a place, so a small value slows bulk removal well below
    /// EC2's rate (the older controller's default, 3, made deleting 1000 ENIs take twice
    /// the token-bucket bound).
    #[arg(
        long,
        env = "ENI_CONTROLLER_MAX_CONCURRENT_ENI_CLEANUP",
        default_value_t = 2048
    )]
    pub max_concurrent_eni_cleanup: usize,

    /// ENI provisioning chains (create, attach, modify) run at once within one NodeENI.
    /// EC2 calls are paced by the rate limiter, which queues them in order, so this only
    /// bounds memory; it should exceed the ENIs one NodeENI provisions at once, or the
    /// buckets idle while chains wait for a slot.
    #[arg(
        long,
        env = "ENI_CONTROLLER_MAX_CONCURRENT_ENI_OPERATIONS",
        default_value_t = 2048
    )]
    pub max_concurrent_eni_operations: usize,

    /// How often converged NodeENIs are checked again and all managed ENIs are
    /// re-described (one paginated call) to notice changes made behind the controller's
    /// back.
    #[arg(long, env = "ENI_CONTROLLER_RESYNC_PERIOD", default_value = "5m", value_parser = humantime::parse_duration)]
    pub resync_period: Duration,

    /// How long a detach may take before it is retried with force.
    #[arg(long, env = "ENI_CONTROLLER_DETACHMENT_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub detachment_timeout: Duration,

    /// How often ENIs with an attach or detach in flight are polled (one batched call).
    #[arg(long, env = "ENI_CONTROLLER_IN_FLIGHT_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub in_flight_poll_interval: Duration,

    /// How long subnet and security-group names stay cached.
    #[arg(long, env = "ENI_CONTROLLER_NAME_CACHE_TTL", default_value = "30m", value_parser = humantime::parse_duration)]
    pub name_cache_ttl: Duration,

    /// Client-side rate limit for each mutating EC2 action (requests per second).
    #[arg(long, env = "ENI_CONTROLLER_EC2_MUTATING_RATE", default_value_t = 5.0)]
    pub ec2_mutating_rate: f64,
    /// Burst for each mutating EC2 action. EC2's bucket holds 50; keeping 10 in reserve
    /// absorbs network jitter (requests paced at the refill rate do not arrive evenly),
    /// so the controller's own requests are never throttled.
    #[arg(
        long,
        env = "ENI_CONTROLLER_EC2_MUTATING_BURST",
        default_value_t = 40.0
    )]
    pub ec2_mutating_burst: f64,
    /// Client-side rate limit for each Describe action (requests per second).
    #[arg(long, env = "ENI_CONTROLLER_EC2_DESCRIBE_RATE", default_value_t = 20.0)]
    pub ec2_describe_rate: f64,
    /// Burst for each Describe action (EC2: 100, 10 kept in reserve).
    #[arg(
        long,
        env = "ENI_CONTROLLER_EC2_DESCRIBE_BURST",
        default_value_t = 90.0
    )]
    pub ec2_describe_burst: f64,

    /// Delete `available` ENIs tagged with this cluster whose NodeENI or Node no longer
    /// exists, after this grace period (0 disables the sweeper).
    #[arg(long, env = "ENI_CONTROLLER_ORPHAN_GRACE_PERIOD", default_value = "10m", value_parser = humantime::parse_duration)]
    pub orphan_grace_period: Duration,

    /// Only report orphaned ENIs (log, event, metric); never delete them.
    #[arg(long, env = "ENI_CONTROLLER_ORPHAN_DRY_RUN", default_value_t = false,
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub orphan_dry_run: bool,

    /// Address of the /healthz, /readyz and /metrics server.
    #[arg(
        long,
        env = "ENI_CONTROLLER_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub metrics_addr: SocketAddr,

    /// Elect a leader through a coordination.k8s.io Lease (required with replicas > 1).
    #[arg(long, env = "ENI_CONTROLLER_LEADER_ELECT", default_value_t = true,
          action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = BoolishValueParser::new(),
          alias = "enable-leader-election")]
    pub leader_elect: bool,

    /// Namespace of the leader-election Lease.
    #[arg(
        long,
        env = "ENI_CONTROLLER_LEADER_ELECTION_NAMESPACE",
        default_value = "eni-controller-system"
    )]
    pub leader_election_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "ENI_CONTROLLER_LEADER_ELECTION_ID",
        default_value = "aws-multi-eni-controller"
    )]
    pub leader_election_id: String,

    /// How long a standby waits, after it last saw the leader renew, before taking the
    /// Lease over.
    #[arg(long, env = "ENI_CONTROLLER_LEADER_ELECTION_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub leader_election_lease_duration: Duration,

    /// How long after sending its last successful renewal the leader may still start
    /// EC2 writes; must be shorter than the lease duration.
    #[arg(long, env = "ENI_CONTROLLER_LEADER_ELECTION_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub leader_election_renew_deadline: Duration,

    /// How often the leader renews the Lease and a standby looks at it.
    #[arg(long, env = "ENI_CONTROLLER_LEADER_ELECTION_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub leader_election_retry_period: Duration,

    /// Identity of this replica (Lease holder and event reporter).
    #[arg(long, env = "ENI_CONTROLLER_POD_NAME")]
    pub pod_name: Option<String>,

    /// Log format.
    #[arg(long, env = "ENI_CONTROLLER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. `info,eni_controller=debug`).
    #[arg(long, env = "ENI_CONTROLLER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Older environment variable names, read when the current one (first) is unset. The first
/// four are the older Go controller's; the rest are this controller's names before the
/// `ENI_CONTROLLER_` prefix.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    (
        "ENI_CONTROLLER_MAX_CONCURRENT_RECONCILES",
        "MAX_CONCURRENT_RECONCILES",
    ),
    (
        "ENI_CONTROLLER_MAX_CONCURRENT_ENI_CLEANUP",
        "MAX_CONCURRENT_ENI_CLEANUP",
    ),
    ("ENI_CONTROLLER_RESYNC_PERIOD", "RECONCILE_PERIOD"),
    ("ENI_CONTROLLER_DETACHMENT_TIMEOUT", "DETACHMENT_TIMEOUT"),
    ("ENI_CONTROLLER_CLUSTER_NAME", "CLUSTER_NAME"),
    (
        "ENI_CONTROLLER_MAX_CONCURRENT_ENI_OPERATIONS",
        "MAX_CONCURRENT_ENI_OPERATIONS",
    ),
    (
        "ENI_CONTROLLER_IN_FLIGHT_POLL_INTERVAL",
        "IN_FLIGHT_POLL_INTERVAL",
    ),
    ("ENI_CONTROLLER_NAME_CACHE_TTL", "NAME_CACHE_TTL"),
    ("ENI_CONTROLLER_EC2_MUTATING_RATE", "EC2_MUTATING_RATE"),
    ("ENI_CONTROLLER_EC2_MUTATING_BURST", "EC2_MUTATING_BURST"),
    ("ENI_CONTROLLER_EC2_DESCRIBE_RATE", "EC2_DESCRIBE_RATE"),
    ("ENI_CONTROLLER_EC2_DESCRIBE_BURST", "EC2_DESCRIBE_BURST"),
    ("ENI_CONTROLLER_ORPHAN_GRACE_PERIOD", "ORPHAN_GRACE_PERIOD"),
    ("ENI_CONTROLLER_ORPHAN_DRY_RUN", "ORPHAN_DRY_RUN"),
    ("ENI_CONTROLLER_METRICS_ADDR", "METRICS_ADDR"),
    ("ENI_CONTROLLER_LEADER_ELECT", "LEADER_ELECT"),
    ("ENI_CONTROLLER_LEADER_ELECTION_NAMESPACE", "POD_NAMESPACE"),
    ("ENI_CONTROLLER_LEADER_ELECTION_ID", "LEADER_ELECTION_ID"),
    ("ENI_CONTROLLER_POD_NAME", "POD_NAME"),
    ("ENI_CONTROLLER_LOG_FORMAT", "LOG_FORMAT"),
    ("ENI_CONTROLLER_LOG_LEVEL", "LOG_LEVEL"),
    ("ENI_CONTROLLER_CLUSTER_ID", "CLUSTER_ID"),
    (
        "ENI_CONTROLLER_LEADER_ELECTION_LEASE_DURATION",
        "LEADER_ELECTION_LEASE_DURATION",
    ),
    (
        "ENI_CONTROLLER_LEADER_ELECTION_RENEW_DEADLINE",
        "LEADER_ELECTION_RENEW_DEADLINE",
    ),
    (
        "ENI_CONTROLLER_LEADER_ELECTION_RETRY_PERIOD",
        "LEADER_ELECTION_RETRY_PERIOD",
    ),
];

impl Cli {
    /// Parses the command line; environment variables are read through `env` (the process
    /// environment in `main`). Precedence: command line, the flag's environment variable,
    /// its older name ([`ENV_ALIASES`]), the default.
    pub fn parse_with_env<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
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
}

impl ControllerArgs {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster_name.trim().is_empty() {
            return Err(
                "--cluster-name (ENI_CONTROLLER_CLUSTER_NAME) is required: it scopes which ENIs this controller owns"
                    .into(),
            );
        }
        if self.cluster_name.len() > 128 {
            return Err("--cluster-name must be at most 128 characters (EC2 tag limit)".into());
        }
        for (name, v) in [
            ("--ec2-mutating-rate", self.ec2_mutating_rate),
            ("--ec2-mutating-burst", self.ec2_mutating_burst),
            ("--ec2-describe-rate", self.ec2_describe_rate),
            ("--ec2-describe-burst", self.ec2_describe_burst),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{name} must be a positive number, got {v}"));
            }
        }
        if self.coalesce_max_delay < self.coalesce_quiet {
            return Err(format!(
                "--coalesce-max-delay ({:?}) must not be shorter than --coalesce-quiet ({:?})",
                self.coalesce_max_delay, self.coalesce_quiet
            ));
        }
        if self.max_concurrent_reconciles == 0 {
            return Err("--max-concurrent-reconciles must be at least 1".into());
        }
        if self.leader_election_renew_deadline >= self.leader_election_lease_duration
            || self.leader_election_retry_period >= self.leader_election_renew_deadline
        {
            return Err(
                "leader election needs retry period < renew deadline < lease duration".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_older_controller() {
        let cli = Cli::try_parse_from(["eni-controller", "--cluster-name", "c"]).expect("parses");
        let a = cli.controller;
        assert_eq!(a.max_concurrent_reconciles, 5);
        // The one knob that differs on purpose: removal chains are paced by the rate
        // limiter, and 3 at once halved the bulk removal rate.
        assert_eq!(a.max_concurrent_eni_cleanup, 2048);
        assert_eq!(a.resync_period, Duration::from_secs(300));
        assert_eq!(a.detachment_timeout, Duration::from_secs(15));
        assert!(a.leader_elect);
        assert!(a.validate().is_ok());
    }

    #[test]
    fn cluster_name_is_required() {
        let cli = Cli::try_parse_from(["eni-controller"]).expect("parses");
        assert!(cli.controller.validate().is_err());
    }

    use clap::builder::ValueParser;

    /// Parses with only the given environment variables set.
    fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<ControllerArgs, clap::Error> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let argv = std::iter::once("eni-controller").chain(args.iter().copied());
        Cli::parse_with_env(argv, |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.into())
        })
        .map(|cli| cli.controller)
    }

    /// A boolean flag: its name, its default, and how to read it back.
    type BoolFlag = (&'static str, bool, fn(&ControllerArgs) -> bool);

    /// Every boolean flag, read back from the parsed settings, with its default.
    fn bool_flags() -> Vec<BoolFlag> {
        vec![
            ("orphan-dry-run", false, |a| a.orphan_dry_run),
            ("leader-elect", true, |a| a.leader_elect),
        ]
    }

    #[test]
    fn every_boolean_flag_takes_the_bare_and_the_explicit_forms_and_its_env_var() {
        let cmd = Cli::command();
        let bools: Vec<String> = cmd
            .get_arguments()
            .filter(|a| a.get_value_parser().type_id() == ValueParser::bool().type_id())
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect();
        let listed: Vec<&str> = bool_flags().iter().map(|(f, _, _)| *f).collect();
        assert_eq!(bools, listed, "a boolean flag is missing from bool_flags()");
        for (flag, default, get) in bool_flags() {
            let env = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .and_then(|a| a.get_env())
                .and_then(|e| e.to_str())
                .expect("env var")
                .to_owned();
            let base = ["--cluster-name=c"];
            let with = |extra: &[&str], env: &[(&str, &str)]| {
                let mut args = base.to_vec();
                args.extend_from_slice(extra);
                get(&parse_env(&args, env).unwrap_or_else(|e| panic!("{flag} {extra:?}: {e}")))
            };
            assert_eq!(with(&[], &[]), default, "--{flag} default");
            let bare = format!("--{flag}");
            let yes = format!("--{flag}=true");
            let no = format!("--{flag}=false");
            assert!(with(&[&bare], &[]), "{bare}");
            assert!(with(&[&yes], &[]), "{yes}");
            assert!(!with(&[&no], &[]), "{no}");
            // After the flag, a subcommand is not taken for its value.
            let cli = Cli::parse_with_env(["eni-controller", bare.as_str(), "run"], |_| None)
                .unwrap_or_else(|e| panic!("{bare} run: {e}"));
            assert!(matches!(cli.command, Some(Command::Run)));
            for (value, want) in [("true", true), ("false", false), ("1", true), ("0", false)] {
                assert_eq!(with(&[], &[(&env, value)]), want, "{env}={value}");
            }
            // The command line wins over the environment.
            assert!(!with(&[&no], &[(&env, "true")]), "{no} with {env}=true");
            assert!(with(&[&yes], &[(&env, "false")]), "{yes} with {env}=false");
            // A typo is an error, not silently true or false.
            assert!(parse_env(&["--cluster-name=c", &format!("--{flag}=ture")], &[]).is_err());
            assert!(parse_env(&["--cluster-name=c"], &[(&env, "ture")]).is_err());
        }
        // The chart's documented example.
        let a = parse_env(&["--cluster-name=c", "--orphan-dry-run=true"], &[]).expect("parses");
        assert!(a.orphan_dry_run);
        // The older Go controller's flag.
        let a = parse_env(&["--cluster-name=c", "--enable-leader-election=false"], &[])
            .expect("parses");
        assert!(!a.leader_elect);
    }

    #[test]
    fn one_env_prefix_and_the_older_names_still_work() {
        let sdk_names = ["AWS_REGION", "AWS_ENDPOINT_URL_EC2"];
        for arg in Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg
                .get_env()
                .and_then(|e| e.to_str())
                .unwrap_or_else(|| panic!("--{id} has no env var"));
            assert!(
                env.starts_with("ENI_CONTROLLER_") || sdk_names.contains(&env),
                "--{id}: {env} lacks the ENI_CONTROLLER_ prefix"
            );
        }
        for (new, _) in ENV_ALIASES {
            assert!(
                Cli::command()
                    .get_arguments()
                    .any(|a| a.get_env().and_then(|e| e.to_str()) == Some(new)),
                "alias for unknown variable {new}"
            );
        }
        // The older names, alone.
        let a = parse_env(
            &[],
            &[
                ("CLUSTER_NAME", "old"),
                ("MAX_CONCURRENT_RECONCILES", "7"),
                ("MAX_CONCURRENT_ENI_CLEANUP", "2"),
                ("RECONCILE_PERIOD", "1m"),
                ("DETACHMENT_TIMEOUT", "20s"),
                ("ORPHAN_DRY_RUN", "true"),
                ("LEADER_ELECT", "false"),
                ("POD_NAMESPACE", "ns"),
            ],
        )
        .expect("parses");
        assert_eq!(a.cluster_name, "old");
        assert_eq!(a.max_concurrent_reconciles, 7);
        assert_eq!(a.max_concurrent_eni_cleanup, 2);
        assert_eq!(a.resync_period, Duration::from_secs(60));
        assert_eq!(a.detachment_timeout, Duration::from_secs(20));
        assert!(a.orphan_dry_run && !a.leader_elect);
        assert_eq!(a.leader_election_namespace, "ns");
        // The new name wins over the older one; the command line over both.
        let env = [
            ("ENI_CONTROLLER_CLUSTER_NAME", "new"),
            ("CLUSTER_NAME", "old"),
        ];
        assert_eq!(parse_env(&[], &env).expect("parses").cluster_name, "new");
        assert_eq!(
            parse_env(&["--cluster-name=flag"], &env)
                .expect("parses")
                .cluster_name,
            "flag"
        );
        // A bad environment value is reported, not ignored.
        assert!(parse_env(&[], &[("MAX_CONCURRENT_RECONCILES", "many")]).is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
