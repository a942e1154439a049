//! Prometheus metrics of the controller (`/metrics`).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of EC2 call metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Ec2Labels {
    /// EC2 action, e.g. `CreateNetworkInterface`.
    pub operation: String,
    /// `ok` or an error kind (`throttled`, `not_found`, ...).
    pub result: String,
}

/// Labels of reconcile metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of ENI state gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// Attachment status (`Attached`, `Attaching`, ...).
    pub state: String,
}

/// Labels of EC2 mutation events.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// EC2 action.
    pub operation: String,
}

/// All controller metrics, cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Reconciles by result.
    pub reconciles: Family<ResultLabels, Counter>,
    /// Reconcile duration.
    pub reconcile_duration: Histogram,
    /// EC2 calls by action and result (one per HTTP request, retries included).
    pub ec2_calls: Family<Ec2Labels, Counter>,
    /// EC2 call latency by action.
    pub ec2_latency: Family<OperationLabels, Histogram>,
    /// Time spent waiting for the client-side EC2 rate limiter, by action.
    pub ec2_rate_limit_wait: Family<OperationLabels, Counter<f64>>,
    /// Managed ENIs by attachment status.
    pub managed_enis: Family<StateLabels, Gauge>,
    /// ENIs owned by this cluster with no NodeENI or Node, deleted by the sweeper.
    pub orphans_deleted: Counter,
    /// Orphans found (deleted or, in dry-run mode, only reported).
    pub orphans_found: Counter,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// ENIs each NodeENI wants (one per selected Node and subnet in its zone).
    pub desired_enis: Family<NodeEniLabels, Gauge>,
    /// ENIs of each NodeENI attached where wanted.
    pub ready_enis: Family<NodeEniLabels, Gauge>,
    registry: Arc<Registry>,
}

/// Label of per-NodeENI metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeEniLabels {
    /// The NodeENI.
    pub nodeeni: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("eni_controller");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciles",
            "NodeENI reconciles by result",
            reconciles.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one NodeENI reconcile pass",
            reconcile_duration.clone(),
        );
        let ec2_calls = Family::<Ec2Labels, Counter>::default();
        registry.register(
            "ec2_calls",
            "EC2 API requests by action and result",
            ec2_calls.clone(),
        );
        let ec2_latency = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 12))
        });
        registry.register(
            "ec2_call_duration_seconds",
            "EC2 API request latency by action",
            ec2_latency.clone(),
        );
        let ec2_rate_limit_wait = Family::<OperationLabels, Counter<f64>>::default();
        registry.register(
            "ec2_rate_limit_wait_seconds",
            "Time spent waiting for the client-side EC2 rate limiter",
            ec2_rate_limit_wait.clone(),
        );
        let managed_enis = Family::<StateLabels, Gauge>::default();
        registry.register(
            "managed_enis",
            "ENIs managed by this controller by attachment status",
            managed_enis.clone(),
        );
        let orphans_deleted = Counter::default();
        registry.register(
            "orphan_enis_deleted",
            "Orphaned ENIs deleted by the sweeper",
            orphans_deleted.clone(),
        );
        let orphans_found = Counter::default();
        registry.register(
            "orphan_enis_found",
            "Orphaned ENIs found by the sweeper (deleted or, in dry-run, reported)",
            orphans_found.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica is the leader",
            leader.clone(),
        );
        let desired_enis = Family::<NodeEniLabels, Gauge>::default();
        registry.register(
            "desired_enis",
            "ENIs a NodeENI wants (one per selected Node and subnet in its zone)",
            desired_enis.clone(),
        );
        let ready_enis = Family::<NodeEniLabels, Gauge>::default();
        registry.register(
            "ready_enis",
            "ENIs of a NodeENI attached where wanted",
            ready_enis.clone(),
        );
        Self {
            reconciles,
            reconcile_duration,
            ec2_calls,
            ec2_latency,
            ec2_rate_limit_wait,
            managed_enis,
            orphans_deleted,
            orphans_found,
            leader,
            desired_enis,
            ready_enis,
            registry: Arc::new(registry),
        }
    }

    /// Records one EC2 request.
    pub fn ec2_call(&self, operation: &str, result: &str, took: Duration) {
        self.ec2_calls
            .get_or_create(&Ec2Labels {
                operation: operation.to_string(),
                result: result.to_string(),
            })
            .inc();
        self.ec2_latency
            .get_or_create(&OperationLabels {
                operation: operation.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records one reconcile.
    pub fn reconcile(&self, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// Total EC2 requests so far for `operation` (all results), for benchmarks and tests.
    pub fn ec2_call_count(&self, operation: &str) -> u64 {
        ["ok"]
            .into_iter()
            .chain(ERROR_RESULTS)
            .map(|result| {
                self.ec2_calls
                    .get(&Ec2Labels {
                        operation: operation.to_string(),
                        result: result.to_string(),
                    })
                    .map(|c| c.get())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

const ERROR_RESULTS: [&str; 12] = [
    "not_found",
    "in_use",
    "device_index_in_use",
    "attachment_limit",
    "subnet_full",
    "throttled",
    "unauthorized",
    "invalid_parameter",
    "token_mismatch",
    "not_leader",
    "transient",
    "other",
];
