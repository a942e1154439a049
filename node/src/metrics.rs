//! Prometheus metrics and the `/healthz`, `/readyz`, `/metrics` endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The daemon's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// ENIs whose interface is up with the right MTU (or DPDK-bound).
    pub interfaces_configured: Gauge,
    /// ENIs of this node the daemon could not configure (last reconcile).
    pub interfaces_failed: Gauge,
    /// Reconciles run.
    pub reconciles: Counter,
    /// Errors (failed actions, failed report writes).
    pub errors: Counter,
    /// Devices bound to a userspace-I/O driver.
    pub binds: Counter,
    /// Devices given back to their kernel driver.
    pub releases: Counter,
    /// Link changes made (up, MTU, altname).
    pub link_changes: Counter,
    /// Duration of a reconcile.
    pub reconcile_seconds: Histogram,
    /// Devices the device plugin allocated to containers, by resource.
    pub allocations: eni_deviceplugin::Allocations,
    ready: Arc<AtomicBool>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers everything under the `eni_manager` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("eni_manager");
        let m = Self {
            interfaces_configured: Gauge::default(),
            interfaces_failed: Gauge::default(),
            reconciles: Counter::default(),
            errors: Counter::default(),
            binds: Counter::default(),
            releases: Counter::default(),
            link_changes: Counter::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            allocations: eni_deviceplugin::Allocations::default(),
            ready: Arc::default(),
            registry: Arc::new(Registry::default()),
        };
        registry.register(
            "interfaces_configured",
            "ENIs of this node that are configured (up with their MTU, or DPDK-bound)",
            m.interfaces_configured.clone(),
        );
        registry.register(
            "interfaces_failed",
            "ENIs of this node that could not be configured in the last reconcile",
            m.interfaces_failed.clone(),
        );
        registry.register("reconciles", "Reconciles run", m.reconciles.clone());
        registry.register(
            "errors",
            "Failed actions and status writes",
            m.errors.clone(),
        );
        registry.register(
            "dpdk_binds",
            "Devices bound to a userspace-I/O driver",
            m.binds.clone(),
        );
        registry.register(
            "dpdk_releases",
            "Devices given back to their kernel driver",
            m.releases.clone(),
        );
        registry.register(
            "link_changes",
            "Link changes made (up, MTU, altname)",
            m.link_changes.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile takes",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "device_allocations",
            "Devices the kubelet device plugin allocated to containers, by resource",
            m.allocations.family(),
        );
        Self {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// Marks the daemon ready (first reconcile done).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }

    /// Serves the routes on `addr` until the future is dropped.
    pub async fn serve(self, addr: SocketAddr) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(listener, self.router()).await
    }
}

async fn readyz(State(m): State<Metrics>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(m): State<Metrics>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_prefix() {
        let m = Metrics::new();
        m.binds.inc();
        m.interfaces_configured.set(2);
        let text = m.encode();
        assert!(text.contains("eni_manager_dpdk_binds_total 1"), "{text}");
        assert!(
            text.contains("eni_manager_interfaces_configured 2"),
            "{text}"
        );
    }
}
