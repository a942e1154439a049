//! Command line and environment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

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
/// index and keeps status, events and metrics true. Every flag can also be set through
/// the environment variable shown with it.
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
    #[arg(long, env = "CLUSTER_NAME", default_value = "")]
    pub cluster_name: String,

    /// Identity of this cluster, tagged on every ENI beside the name so two clusters
    /// with the same --cluster-name in one account never touch each other's ENIs.
    /// Default: the UID of the kube-system namespace (needs `get` on it).
    #[arg(long, env = "CLUSTER_ID")]
    pub cluster_id: Option<String>,

    /// AWS Region (else the SDK's default chain: AWS_REGION, profile, IMDS).
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,

    /// EC2 endpoint override, e.g. a VPC endpoint or a local emulator.
    #[arg(long, env = "AWS_ENDPOINT_URL_EC2")]
    pub ec2_endpoint: Option<String>,

    /// NodeENIs reconciled at once.
    #[arg(long, env = "MAX_CONCURRENT_RECONCILES", default_value_t = 5)]
    pub max_concurrent_reconciles: u16,

    /// ENI removal chains (detach -> wait -> delete) run at once within one NodeENI. As
    /// for provisioning, the rate limiter paces the EC2 calls; a chain waiting for its
    /// detach to finish holds a place, so a small value slows bulk removal well below
    /// EC2's rate (the older controller's default, 3, made deleting 1000 ENIs take twice
    /// the token-bucket bound).
    #[arg(long, env = "MAX_CONCURRENT_ENI_CLEANUP", default_value_t = 2048)]
    pub max_concurrent_eni_cleanup: usize,

    /// ENI provisioning chains (create, attach, modify) run at once within one NodeENI.
    /// EC2 calls are paced by the rate limiter, which queues them in order, so this only
    /// bounds memory; it should exceed the ENIs one NodeENI provisions at once, or the
    /// buckets idle while chains wait for a slot.
    #[arg(long, env = "MAX_CONCURRENT_ENI_OPERATIONS", default_value_t = 2048)]
    pub max_concurrent_eni_operations: usize,

    /// How often converged NodeENIs are checked again and all managed ENIs are
    /// re-described (one paginated call) to notice changes made behind the controller's
    /// back.
    #[arg(long, env = "RECONCILE_PERIOD", default_value = "5m", value_parser = humantime::parse_duration)]
    pub resync_period: Duration,

    /// How long a detach may take before it is retried with force.
    #[arg(long, env = "DETACHMENT_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub detachment_timeout: Duration,

    /// How often ENIs with an attach or detach in flight are polled (one batched call).
    #[arg(long, env = "IN_FLIGHT_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub in_flight_poll_interval: Duration,

    /// How long subnet and security-group names stay cached.
    #[arg(long, env = "NAME_CACHE_TTL", default_value = "30m", value_parser = humantime::parse_duration)]
    pub name_cache_ttl: Duration,

    /// Client-side rate limit for each mutating EC2 action (requests per second).
    #[arg(long, env = "EC2_MUTATING_RATE", default_value_t = 5.0)]
    pub ec2_mutating_rate: f64,
    /// Burst for each mutating EC2 action. EC2's bucket holds 50; keeping 10 in reserve
    /// absorbs network jitter (requests paced at the refill rate do not arrive evenly),
    /// so the controller's own requests are never throttled.
    #[arg(long, env = "EC2_MUTATING_BURST", default_value_t = 40.0)]
    pub ec2_mutating_burst: f64,
    /// Client-side rate limit for each Describe action (requests per second).
    #[arg(long, env = "EC2_DESCRIBE_RATE", default_value_t = 20.0)]
    pub ec2_describe_rate: f64,
    /// Burst for each Describe action (EC2: 100, 10 kept in reserve).
    #[arg(long, env = "EC2_DESCRIBE_BURST", default_value_t = 90.0)]
    pub ec2_describe_burst: f64,

    /// Delete `available` ENIs tagged with this cluster whose NodeENI or Node no longer
    /// exists, after this grace period (0 disables the sweeper).
    #[arg(long, env = "ORPHAN_GRACE_PERIOD", default_value = "10m", value_parser = humantime::parse_duration)]
    pub orphan_grace_period: Duration,

    /// Only report orphaned ENIs (log, event, metric); never delete them.
    #[arg(long, env = "ORPHAN_DRY_RUN", default_value_t = false)]
    pub orphan_dry_run: bool,

    /// Address of the /healthz, /readyz and /metrics server.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Elect a leader through a coordination.k8s.io Lease (required with replicas > 1).
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "eni-controller-system")]
    pub leader_election_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "LEADER_ELECTION_ID",
        default_value = "aws-multi-eni-controller"
    )]
    pub leader_election_id: String,

    /// How long a standby waits, after it last saw the leader renew, before taking the
    /// Lease over.
    #[arg(long, env = "LEADER_ELECTION_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub leader_election_lease_duration: Duration,

    /// How long after sending its last successful renewal the leader may still start
    /// EC2 writes; must be shorter than the lease duration.
    #[arg(long, env = "LEADER_ELECTION_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub leader_election_renew_deadline: Duration,

    /// How often the leader renews the Lease and a standby looks at it.
    #[arg(long, env = "LEADER_ELECTION_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub leader_election_retry_period: Duration,

    /// Identity of this replica (Lease holder and event reporter).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. `info,eni_controller=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl ControllerArgs {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster_name.trim().is_empty() {
            return Err(
                "--cluster-name (CLUSTER_NAME) is required: it scopes which ENIs this controller owns"
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

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
