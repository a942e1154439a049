//! Request counters per EC2 action and outcome.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to moto, which answered 2xx.
    Forwarded,
    /// Forwarded to moto, which answered an error (or could not be reached).
    UpstreamError,
    /// `RequestLimitExceeded` from a token bucket, not forwarded.
    Throttled,
    /// An emulated EC2 validation error (duplicate device index, attachment limit, in-use
    /// delete, idempotency mismatch), not forwarded.
    Rejected,
    /// An injected failure (`error_rate` or a [`super::FailureRule`]).
    Injected,
    /// A `ClientToken` replay of an earlier response, not forwarded.
    Replayed,
}

/// Counters of one action (or of all actions).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ActionStats {
    /// Every request.
    pub requests: u64,
    /// Forwarded, moto answered 2xx.
    pub forwarded: u64,
    /// Forwarded, moto answered an error.
    pub upstream_errors: u64,
    /// Throttled by a token bucket.
    pub throttled: u64,
    /// Rejected by an emulated EC2 check.
    pub rejected: u64,
    /// Failed by injection.
    pub injected: u64,
    /// Answered from the `ClientToken` cache.
    pub replayed: u64,
    /// Error codes returned to the client (ours and moto's), with counts.
    pub errors: BTreeMap<String, u64>,
}

impl ActionStats {
    fn add(&mut self, outcome: Outcome, code: Option<&str>) {
        self.requests += 1;
        match outcome {
            Outcome::Forwarded => self.forwarded += 1,
            Outcome::UpstreamError => self.upstream_errors += 1,
            Outcome::Throttled => self.throttled += 1,
            Outcome::Rejected => self.rejected += 1,
            Outcome::Injected => self.injected += 1,
            Outcome::Replayed => self.replayed += 1,
        }
        if let Some(code) = code {
            *self.errors.entry(code.to_string()).or_default() += 1;
        }
    }
}

/// A snapshot of the counters (`GET /_faults/stats`). Side queries the proxy makes to
/// moto itself are not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Per EC2 action.
    pub actions: BTreeMap<String, ActionStats>,
    /// Sum over all actions.
    pub total: ActionStats,
    /// Sum over mutating actions (everything but `Describe*`/`Get*`/`List*`).
    pub mutating: ActionStats,
    /// Sum over `Describe*`/`Get*`/`List*` actions.
    pub describe: ActionStats,
    /// Mutating requests per ENI they concern (`token:<ClientToken>` for creates that
    /// produced no ENI, `attachment:<id>` for detaches of attachments the proxy did not
    /// see being made).
    pub enis: BTreeMap<String, ActionStats>,
    /// Requests per client (the access key ID of the request's signature).
    pub clients: BTreeMap<String, ClientStats>,
}

/// What one client (access key ID) sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientStats {
    /// Mutating requests (all outcomes).
    pub mutating: u64,
    /// `Describe*`/`Get*`/`List*` requests.
    pub describe: u64,
    /// When the last mutating request arrived (milliseconds since the Unix epoch).
    pub last_mutating_unix_ms: u64,
}

impl Stats {
    /// The counters of `action` (zero if never seen).
    pub fn action(&self, action: &str) -> ActionStats {
        self.actions.get(action).cloned().unwrap_or_default()
    }

    /// Requests of actions that are not `Describe*`/`Get*`/`List*` (all outcomes).
    pub fn mutating_requests(&self) -> u64 {
        self.mutating.requests
    }

    /// Requests of `Describe*`/`Get*`/`List*` actions (all outcomes).
    pub fn describe_requests(&self) -> u64 {
        self.describe.requests
    }

    pub(crate) fn record_client(&mut self, client: &str, action: &str, now_unix_ms: u64) {
        let c = self.clients.entry(client.to_string()).or_default();
        if super::bucket::is_describe(action) {
            c.describe += 1;
        } else {
            c.mutating += 1;
            c.last_mutating_unix_ms = now_unix_ms;
        }
    }

    pub(crate) fn record_eni(&mut self, eni: &str, outcome: Outcome, code: Option<&str>) {
        self.enis
            .entry(eni.to_string())
            .or_default()
            .add(outcome, code);
    }

    pub(crate) fn record(&mut self, action: &str, outcome: Outcome, code: Option<&str>) {
        self.actions
            .entry(action.to_string())
            .or_default()
            .add(outcome, code);
        self.total.add(outcome, code);
        if super::bucket::is_describe(action) {
            self.describe.add(outcome, code);
        } else {
            self.mutating.add(outcome, code);
        }
    }
}
