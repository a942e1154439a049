//! Settings of the fault layer. All serializable: `POST /_faults/config` takes a JSON
//! merge patch of [`FaultConfig`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything the fault layer does. The defaults emulate real EC2 (throttling, validation,
/// idempotency) and inject nothing (no latency, no 5xx, synchronous attach/detach).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Per-action token buckets.
    pub throttle: ThrottleConfig,
    /// Uniform random delay added to every EC2 request.
    pub latency: LatencyConfig,
    /// `InvalidParameterValue` when attaching at an occupied (instance, network card,
    /// device index).
    pub reject_duplicate_device_index: bool,
    /// `AttachmentLimitExceeded` when the instance type's ENI limit (total or per network
    /// card, from `DescribeInstanceTypes`) is reached.
    pub enforce_attachment_limits: bool,
    /// `InvalidNetworkInterface.InUse` when deleting an attached ENI.
    pub reject_in_use_delete: bool,
    /// `ClientToken` idempotency for `CreateNetworkInterface`.
    pub client_token_idempotency: bool,
    /// Remember `Attachment.DeleteOnTermination` of `ModifyNetworkInterfaceAttribute` and
    /// report it in describes.
    pub sticky_delete_on_termination: bool,
    /// Evaluate the `DescribeNetworkInterfaces` filters moto does not implement (it
    /// answers HTTP 500): `attachment.status`, `attachment.device-index`,
    /// `attachment.network-card-index`, `attachment.delete-on-termination`. They are
    /// removed from the forwarded request and applied to moto's answer.
    pub emulate_describe_filters: bool,
    /// Honour `MaxResults` / `NextToken` of `DescribeNetworkInterfaces` (moto returns
    /// everything in one page).
    pub paginate_describes: bool,
    /// `AssignPrivateIpAddresses` / `UnassignPrivateIpAddresses` as real EC2 does them:
    /// prefixes, `Ipv4AddressesPerInterface`, reserved addresses, the answer shape (the
    /// rules are listed in [`super::ipam`]).
    pub emulate_ip_assignment: bool,
    /// Report `attaching` for this long after a successful attach (0: off).
    pub attach_delay_ms: u64,
    /// Report `detaching` (attachment still present, ENI `in-use`) in
    /// `DescribeNetworkInterfaces` for this long after a successful detach (0: off).
    pub detach_delay_ms: u64,
    /// A graceful detach never completes: the attachment stays `detaching` until a
    /// forced detach (`Force=true`) of it, which ends it at once. Real EC2 does this
    /// when the instance's OS does not release the device.
    pub hang_detaches: bool,
    /// Probability in [0, 1] that any EC2 request fails with HTTP 500 `InternalError`
    /// without being forwarded.
    pub error_rate: f64,
    /// Per-action failure rules, checked in order after throttling.
    pub rules: Vec<FailureRule>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            throttle: ThrottleConfig::default(),
            latency: LatencyConfig::default(),
            reject_duplicate_device_index: true,
            enforce_attachment_limits: true,
            reject_in_use_delete: true,
            client_token_idempotency: true,
            sticky_delete_on_termination: true,
            emulate_describe_filters: true,
            paginate_describes: true,
            emulate_ip_assignment: true,
            attach_delay_ms: 0,
            detach_delay_ms: 0,
            hang_detaches: false,
            error_rate: 0.0,
            rules: Vec::new(),
        }
    }
}

impl FaultConfig {
    /// Nothing but forwarding: no throttling, no checks, no rewrites.
    pub fn passthrough() -> Self {
        Self {
            throttle: ThrottleConfig {
                enabled: false,
                ..ThrottleConfig::default()
            },
            reject_duplicate_device_index: false,
            enforce_attachment_limits: false,
            reject_in_use_delete: false,
            client_token_idempotency: false,
            sticky_delete_on_termination: false,
            emulate_describe_filters: false,
            paginate_describes: false,
            emulate_ip_assignment: false,
            ..Self::default()
        }
    }

    /// Clamps probabilities into [0, 1], orders the latency bounds and keeps the scale
    /// positive.
    pub fn normalized(mut self) -> Self {
        self.error_rate = clamp01(self.error_rate);
        for rule in &mut self.rules {
            rule.probability = clamp01(rule.probability);
        }
        if self.latency.min_ms > self.latency.max_ms {
            std::mem::swap(&mut self.latency.min_ms, &mut self.latency.max_ms);
        }
        if !(self.throttle.scale.is_finite() && self.throttle.scale > 0.0) {
            self.throttle.scale = 1.0;
        }
        self
    }
}

fn clamp01(p: f64) -> f64 {
    if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) }
}

/// Token buckets per API action (REFERENCE §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Off: nothing is throttled.
    pub enabled: bool,
    /// Multiplies burst and refill of every bucket (0.1: buckets 10x smaller). A bucket
    /// always holds at least one token.
    pub scale: f64,
    /// Every action that is not a describe (default 50 burst, 5 per second).
    pub mutating: BucketSpec,
    /// `Describe*` (and `Get*`, `List*`) actions (default 100 burst, 20 per second).
    pub describe: BucketSpec,
    /// Per-action overrides. Default: `RunInstances` 1000 / 2 per second and
    /// `TerminateInstances` 1000 / 20 per second (their own EC2 buckets), so test set-up
    /// does not drain the ENI actions' budget.
    pub actions: BTreeMap<String, BucketSpec>,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        let actions = [
            ("RunInstances", BucketSpec::new(1000.0, 2.0)),
            ("TerminateInstances", BucketSpec::new(1000.0, 20.0)),
        ]
        .into_iter()
        .map(|(a, s)| (a.to_string(), s))
        .collect();
        Self {
            enabled: true,
            scale: 1.0,
            mutating: BucketSpec::new(50.0, 5.0),
            describe: BucketSpec::new(100.0, 20.0),
            actions,
        }
    }
}

/// One token bucket's size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketSpec {
    /// Capacity (the burst).
    pub burst: f64,
    /// Tokens added per second.
    pub refill_per_sec: f64,
}

impl BucketSpec {
    /// A bucket of `burst` tokens refilling `refill_per_sec` per second.
    pub fn new(burst: f64, refill_per_sec: f64) -> Self {
        Self {
            burst,
            refill_per_sec,
        }
    }
}

/// Uniform random latency in `[min_ms, max_ms]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatencyConfig {
    /// Lower bound in milliseconds.
    pub min_ms: u64,
    /// Upper bound in milliseconds.
    pub max_ms: u64,
}

/// Fails matching requests with a given EC2 error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailureRule {
    /// The EC2 action (`AttachNetworkInterface`); `*` matches every action.
    pub action: String,
    /// The error code (`InternalError`, `Unavailable`, `InvalidParameterValue`, ...).
    pub code: String,
    /// The error message.
    pub message: String,
    /// HTTP status of the error response.
    pub status: u16,
    /// Probability in [0, 1] that a matching request fails.
    pub probability: f64,
    /// Fail only this many requests, then the rule is spent (`None`: no limit).
    pub times: Option<u64>,
    /// Forward the request first and replace moto's answer with the error (the call
    /// took effect but the client sees a failure), instead of failing without forwarding.
    pub after_forward: bool,
}

impl Default for FailureRule {
    fn default() -> Self {
        Self {
            action: "*".into(),
            code: "InternalError".into(),
            message: "An internal error has occurred (injected by ec2-faults)".into(),
            status: 500,
            probability: 1.0,
            times: None,
            after_forward: false,
        }
    }
}

impl FailureRule {
    /// A rule failing every `action` request with HTTP 500 `InternalError`.
    pub fn internal_error(action: &str) -> Self {
        Self {
            action: action.into(),
            ..Self::default()
        }
    }

    /// Whether the rule applies to `action`.
    pub fn matches(&self, action: &str) -> bool {
        self.action == "*" || self.action == action
    }
}

/// Applies an RFC 7386 JSON merge patch to `target`.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_changes_only_given_fields() -> Result<(), serde_json::Error> {
        let mut v = serde_json::to_value(FaultConfig::default())?;
        merge_patch(
            &mut v,
            &serde_json::json!({"error_rate": 0.5, "throttle": {"scale": 0.1}}),
        );
        let c: FaultConfig = serde_json::from_value(v)?;
        assert_eq!(c.error_rate, 0.5);
        assert_eq!(c.throttle.scale, 0.1);
        assert_eq!(c.throttle.mutating.burst, 50.0);
        assert!(c.reject_in_use_delete);
        Ok(())
    }

    #[test]
    fn partial_json_uses_defaults_and_unknown_fields_fail() {
        let c: FaultConfig =
            serde_json::from_str(r#"{"rules":[{"action":"AttachNetworkInterface","times":1}]}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.rules[0].code, "InternalError");
        assert_eq!(c.rules[0].status, 500);
        assert!(serde_json::from_str::<FaultConfig>(r#"{"nope":1}"#).is_err());
    }

    #[test]
    fn normalized_clamps() {
        let mut c = FaultConfig {
            error_rate: 3.0,
            ..FaultConfig::default()
        };
        c.latency = LatencyConfig {
            min_ms: 200,
            max_ms: 50,
        };
        c.throttle.scale = 0.0;
        let c = c.normalized();
        assert_eq!(c.error_rate, 1.0);
        assert_eq!((c.latency.min_ms, c.latency.max_ms), (50, 200));
        assert_eq!(c.throttle.scale, 1.0);
    }
}
