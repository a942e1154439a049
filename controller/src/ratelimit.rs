//! Client-side EC2 rate limiting: one token bucket per EC2 action, shared by every
//! worker, mirroring how EC2 meters an account.
//!
//! EC2 throttles each action with a bucket per account and Region (mutating actions:
//! 50 burst, 5 per second; describes: 100 burst, 20 per second). Spending more than that
//! only earns `RequestLimitExceeded` and steals budget from every other tool in the
//! account, so the controller queues its own requests instead. When EC2 still throttles
//! (someone else is using the budget), the bucket of that action is emptied, so every
//! worker backs off together rather than each finding out on its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::ec2::ErrorKind;
use crate::metrics::{Metrics, OperationLabels};

/// Bucket parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    /// Tokens the bucket holds when full.
    pub burst: f64,
    /// Tokens added per second.
    pub per_second: f64,
}

/// Rate limits for mutating and non-mutating actions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Create/Attach/Detach/Delete/Modify.
    pub mutating: Bucket,
    /// Describe*.
    pub describe: Bucket,
}

impl Default for Limits {
    /// EC2's default per-account buckets.
    fn default() -> Self {
        Self {
            mutating: Bucket {
                burst: 50.0,
                per_second: 5.0,
            },
            describe: Bucket {
                burst: 100.0,
                per_second: 20.0,
            },
        }
    }
}

#[derive(Debug)]
struct State {
    tokens: f64,
    at: Instant,
    params: Bucket,
}

/// Token buckets by EC2 action. Cheap to clone; clones share the buckets.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    limits: Option<Limits>,
    buckets: Arc<Mutex<HashMap<&'static str, State>>>,
}

impl RateLimiter {
    /// A limiter with these limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: Some(limits),
            buckets: Arc::default(),
        }
    }

    /// A limiter that never waits (tests against mocks).
    pub fn unlimited() -> Self {
        Self {
            limits: None,
            buckets: Arc::default(),
        }
    }

    fn params(limits: &Limits, operation: &str) -> Bucket {
        if operation.starts_with("Describe") {
            limits.describe
        } else {
            limits.mutating
        }
    }

    /// Takes a token for `operation`, waiting for one if the bucket is empty. Waiters are
    /// served in arrival order: each reserves the next token and sleeps until it exists.
    pub async fn acquire(&self, operation: &'static str, metrics: &Metrics) {
        let Some(wait) = self.reserve(operation, Instant::now()) else {
            return;
        };
        metrics
            .ec2_rate_limit_wait
            .get_or_create(&OperationLabels {
                operation: operation.to_string(),
            })
            .inc_by(wait.as_secs_f64());
        tokio::time::sleep(wait).await;
    }

    /// Reserves a token at `now`; returns how long to wait for it (None: no wait).
    fn reserve(&self, operation: &'static str, now: Instant) -> Option<Duration> {
        let limits = self.limits.as_ref()?;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let params = Self::params(limits, operation);
        let state = buckets.entry(operation).or_insert(State {
            tokens: params.burst,
            at: now,
            params,
        });
        let elapsed = now.saturating_duration_since(state.at).as_secs_f64();
        state.tokens = (state.tokens + elapsed * state.params.per_second).min(state.params.burst);
        state.at = now;
        state.tokens -= 1.0;
        if state.tokens >= 0.0 {
            None
        } else {
            Some(Duration::from_secs_f64(
                -state.tokens / state.params.per_second,
            ))
        }
    }

    /// Reacts to a failed request: on throttling, empty the action's bucket so all
    /// workers pause until it refills.
    pub fn on_error(&self, operation: &'static str, kind: ErrorKind) {
        if kind != ErrorKind::Throttled {
            return;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = buckets.get_mut(operation) {
            state.tokens = state.tokens.min(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(burst: f64, per_second: f64) -> RateLimiter {
        let b = Bucket { burst, per_second };
        RateLimiter::new(Limits {
            mutating: b,
            describe: b,
        })
    }

    #[test]
    fn burst_then_refill_rate() {
        let l = limiter(3.0, 2.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.reserve("CreateNetworkInterface", t0), None);
        }
        // The 4th and 5th wait half a second each, in order.
        assert_eq!(
            l.reserve("CreateNetworkInterface", t0),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            l.reserve("CreateNetworkInterface", t0),
            Some(Duration::from_millis(1000))
        );
        // Actions have separate buckets.
        assert_eq!(l.reserve("AttachNetworkInterface", t0), None);
    }

    #[test]
    fn refills_up_to_burst_only() {
        let l = limiter(2.0, 10.0);
        let t0 = Instant::now();
        assert_eq!(l.reserve("DeleteNetworkInterface", t0), None);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(l.reserve("DeleteNetworkInterface", later), None);
        assert_eq!(l.reserve("DeleteNetworkInterface", later), None);
        assert!(l.reserve("DeleteNetworkInterface", later).is_some());
    }

    #[test]
    fn throttling_empties_the_bucket() {
        let l = limiter(10.0, 5.0);
        let t0 = Instant::now();
        assert_eq!(l.reserve("AttachNetworkInterface", t0), None);
        l.on_error("AttachNetworkInterface", ErrorKind::Throttled);
        assert_eq!(
            l.reserve("AttachNetworkInterface", t0),
            Some(Duration::from_millis(200))
        );
    }

    #[test]
    fn unlimited_never_waits() {
        let l = RateLimiter::unlimited();
        for _ in 0..1000 {
            assert_eq!(l.reserve("CreateNetworkInterface", Instant::now()), None);
        }
    }
}
