//! EC2-style token buckets, one per API action.

use std::collections::HashMap;
use std::time::Instant;

use super::config::{BucketSpec, ThrottleConfig};

/// A token bucket: holds at most `capacity` tokens, refills `rate` tokens per second, and
/// each request takes one token.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: f64, rate: f64, now: Instant) -> Self {
        let capacity = capacity.max(1.0);
        Self {
            capacity,
            rate: rate.max(0.0),
            tokens: capacity,
            last: now,
        }
    }

    /// Takes one token if there is one (after refilling up to `now`).
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }
}

/// Which default bucket an action falls into.
pub fn is_describe(action: &str) -> bool {
    action.starts_with("Describe") || action.starts_with("Get") || action.starts_with("List")
}

/// The buckets of all actions seen so far, created lazily from a [`ThrottleConfig`].
#[derive(Debug, Default)]
pub struct Buckets {
    buckets: HashMap<String, TokenBucket>,
}

impl Buckets {
    /// Drops all buckets (they are recreated full, from the current config).
    pub fn clear(&mut self) {
        self.buckets.clear();
    }

    /// Takes a token for `action`; `false` means throttled.
    pub fn try_take(&mut self, config: &ThrottleConfig, action: &str, now: Instant) -> bool {
        if !config.enabled {
            return true;
        }
        let bucket = self.buckets.entry(action.to_string()).or_insert_with(|| {
            let spec = spec_for(config, action);
            TokenBucket::new(
                spec.burst * config.scale,
                spec.refill_per_sec * config.scale,
                now,
            )
        });
        bucket.try_take(now)
    }
}

/// The bucket spec for `action` (before scaling).
pub fn spec_for(config: &ThrottleConfig, action: &str) -> BucketSpec {
    if let Some(spec) = config.actions.get(action) {
        return spec.clone();
    }
    if is_describe(action) {
        config.describe.clone()
    } else {
        config.mutating.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(50.0, 5.0, t0);
        for i in 0..50 {
            assert!(b.try_take(t0), "request {i} within the burst");
        }
        assert!(!b.try_take(t0), "51st request is throttled");
        // 5 tokens per second: one token after 200 ms.
        assert!(!b.try_take(t0 + Duration::from_millis(150)));
        assert!(b.try_take(t0 + Duration::from_millis(210)));
        assert!(!b.try_take(t0 + Duration::from_millis(210)));
        // Refill is capped at the capacity.
        let later = t0 + Duration::from_secs(3600);
        assert!((b.available(later) - 50.0).abs() < 1e-9);
    }

    #[test]
    fn capacity_is_at_least_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0.2, 0.0, t0);
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0 + Duration::from_secs(10)), "no refill");
    }

    #[test]
    fn classes_scale_and_overrides() {
        let mut config = ThrottleConfig::default();
        assert_eq!(spec_for(&config, "DescribeNetworkInterfaces").burst, 100.0);
        assert_eq!(spec_for(&config, "AttachNetworkInterface").burst, 50.0);
        assert_eq!(spec_for(&config, "RunInstances").burst, 1000.0);
        config.scale = 0.1;
        let t0 = Instant::now();
        let mut buckets = Buckets::default();
        let ok = (0..10)
            .filter(|_| buckets.try_take(&config, "CreateNetworkInterface", t0))
            .count();
        assert_eq!(ok, 5, "burst 50 scaled by 0.1");
        // Buckets are per action.
        assert!(buckets.try_take(&config, "DeleteNetworkInterface", t0));
        config.enabled = false;
        assert!(buckets.try_take(&config, "CreateNetworkInterface", t0));
    }
}
