//! Client-side EC2 rate limiting: one token bucket per EC2 action, shared by every
//! worker, mirroring how EC2 meters an account.
//!
//! EC2 throttles each action with a bucket per account and Region (mutating actions:
//! 50 burst, 5 per second; describes: 100 burst, 20 per second). Spending more than that
//! only earns `RequestLimitExceeded` and steals budget from every other tool in the
//! account, so the controller queues its own requests instead. When EC2 still throttles
//! (someone else is using the budget), every caller of that action slows down together:
//! the refill rate halves (multiplicative decrease, down to 1/16 of the configured rate),
//! reservations already queued are cancelled and taken again at the new rate, and the
//! rate then grows back linearly over about 20 s of calm (additive increase).

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
    /// Current refill rate: `params.per_second` until EC2 throttles, then lower.
    rate: f64,
    /// Bumped by every throttle: a reservation taken in an older epoch is void.
    epoch: u64,
}

/// Lowest refill rate, as a fraction of the configured one.
const MIN_RATE_FRACTION: f64 = 1.0 / 16.0;
/// Rate regained per second of calm, as a fraction of the configured rate.
const RECOVERY_PER_SECOND: f64 = 0.05;

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
        loop {
            let Some((wait, epoch)) = self.reserve(operation, Instant::now()) else {
                return;
            };
            if wait.is_zero() {
                return;
            }
            metrics
                .ec2_rate_limit_wait
                .get_or_create(&OperationLabels {
                    operation: operation.to_string(),
                })
                .inc_by(wait.as_secs_f64());
            tokio::time::sleep(wait).await;
            // EC2 throttled this action while we waited: the reservation was taken at
            // the old rate and is void; queue again at the new one.
            if self.epoch(operation) == Some(epoch) {
                return;
            }
        }
    }

    /// Takes a token at `now`: how long to wait for it (zero: go now) and the epoch it
    /// was taken in. `None` when unlimited.
    fn reserve(&self, operation: &'static str, now: Instant) -> Option<(Duration, u64)> {
        let limits = self.limits.as_ref()?;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let params = Self::params(limits, operation);
        let state = buckets.entry(operation).or_insert(State {
            tokens: params.burst,
            at: now,
            params,
            rate: params.per_second,
            epoch: 0,
        });
        let elapsed = now.saturating_duration_since(state.at).as_secs_f64();
        state.tokens = (state.tokens + elapsed * state.rate).min(state.params.burst);
        state.rate = (state.rate + elapsed * state.params.per_second * RECOVERY_PER_SECOND)
            .min(state.params.per_second);
        state.at = now;
        state.tokens -= 1.0;
        let wait = if state.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-state.tokens / state.rate)
        };
        Some((wait, state.epoch))
    }

    fn epoch(&self, operation: &'static str) -> Option<u64> {
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.get(operation).map(|s| s.epoch)
    }

    /// The current refill rate of an action (for tests and metrics).
    pub fn rate(&self, operation: &'static str) -> Option<f64> {
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.get(operation).map(|s| s.rate)
    }

    /// Reacts to a failed request: on throttling, halve the action's refill rate, empty
    /// its bucket and void the reservations queued at the old rate, so every caller of
    /// the action slows down at once.
    pub fn on_error(&self, operation: &'static str, kind: ErrorKind) {
        if kind != ErrorKind::Throttled {
            return;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = buckets.get_mut(operation) {
            state.rate = (state.rate / 2.0).max(state.params.per_second * MIN_RATE_FRACTION);
            state.tokens = 0.0;
            state.epoch += 1;
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
            assert_eq!(wait(&l, "CreateNetworkInterface", t0), Duration::ZERO);
        }
        // The 4th and 5th wait half a second each, in order.
        assert_eq!(
            wait(&l, "CreateNetworkInterface", t0),
            Duration::from_millis(500)
        );
        assert_eq!(
            wait(&l, "CreateNetworkInterface", t0),
            Duration::from_millis(1000)
        );
        // Actions have separate buckets.
        assert_eq!(wait(&l, "AttachNetworkInterface", t0), Duration::ZERO);
    }

    #[test]
    fn refills_up_to_burst_only() {
        let l = limiter(2.0, 10.0);
        let t0 = Instant::now();
        assert_eq!(wait(&l, "DeleteNetworkInterface", t0), Duration::ZERO);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(wait(&l, "DeleteNetworkInterface", later), Duration::ZERO);
        assert_eq!(wait(&l, "DeleteNetworkInterface", later), Duration::ZERO);
        assert!(wait(&l, "DeleteNetworkInterface", later) > Duration::ZERO);
    }

    fn wait(l: &RateLimiter, op: &'static str, now: Instant) -> Duration {
        l.reserve(op, now).map(|(w, _)| w).unwrap_or_default()
    }

    #[test]
    fn throttling_empties_the_bucket_and_halves_the_rate() {
        let l = limiter(10.0, 5.0);
        let t0 = Instant::now();
        assert_eq!(wait(&l, "AttachNetworkInterface", t0), Duration::ZERO);
        l.on_error("AttachNetworkInterface", ErrorKind::Throttled);
        // Half the rate: 400 ms per token instead of 200 ms.
        assert_eq!(
            wait(&l, "AttachNetworkInterface", t0),
            Duration::from_millis(400)
        );
        // Repeated throttles bottom out at 1/16 of the rate.
        for _ in 0..10 {
            l.on_error("AttachNetworkInterface", ErrorKind::Throttled);
        }
        assert_eq!(l.rate("AttachNetworkInterface"), Some(5.0 / 16.0));
        // Other errors change nothing.
        l.on_error("AttachNetworkInterface", ErrorKind::NotFound);
        assert_eq!(l.rate("AttachNetworkInterface"), Some(5.0 / 16.0));
    }

    #[test]
    fn rate_recovers_after_calm() {
        let l = limiter(10.0, 4.0);
        let t0 = Instant::now();
        wait(&l, "CreateNetworkInterface", t0);
        l.on_error("CreateNetworkInterface", ErrorKind::Throttled);
        assert_eq!(l.rate("CreateNetworkInterface"), Some(2.0));
        // 5% of the configured rate per second: back to 4/s within 10 s of calm.
        wait(&l, "CreateNetworkInterface", t0 + Duration::from_secs(5));
        let r = l.rate("CreateNetworkInterface").unwrap_or_default();
        assert!((r - 3.0).abs() < 1e-9, "rate after 5 s: {r}");
        wait(&l, "CreateNetworkInterface", t0 + Duration::from_secs(60));
        assert_eq!(l.rate("CreateNetworkInterface"), Some(4.0));
    }

    /// Callers queued before a throttle slow down too: their reservations are void and
    /// taken again at the halved rate, so a storm is not answered at full rate.
    #[tokio::test(start_paused = true)]
    async fn queued_callers_slow_down_after_a_throttle() {
        let l = limiter(1.0, 10.0);
        let metrics = Metrics::new();
        let start = Instant::now();
        // 1 at once, then 10 queued at 100 ms intervals: 1 s for all at full rate.
        let mut tasks = Vec::new();
        for _ in 0..11 {
            let l = l.clone();
            let m = metrics.clone();
            tasks.push(tokio::spawn(async move {
                l.acquire("AttachNetworkInterface", &m).await;
                Instant::now()
            }));
        }
        tokio::task::yield_now().await;
        l.on_error("AttachNetworkInterface", ErrorKind::Throttled);
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.unwrap_or(start));
        }
        let last = done.iter().max().copied().unwrap_or(start) - start;
        // At 5/s the 10 queued need about 2 s (plus the recovery), not 1 s.
        assert!(
            last > Duration::from_millis(1500),
            "all done after {last:?}"
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
