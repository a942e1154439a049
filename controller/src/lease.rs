//! Leader election on a `coordination.k8s.io/v1` Lease, and the [`Fence`] that keeps a
//! replica that may have lost it from writing to EC2.
//!
//! The leader renews the Lease every retry period. A renewal that succeeds extends the
//! fence to `renew_deadline` after the moment the request was *sent*; while the fence is
//! closed, no mutating EC2 call starts ([`crate::ec2::aws::AwsEc2`] asks it before every
//! attempt). A standby takes the Lease over only after it has seen the record unchanged
//! for `lease_duration` (> `renew_deadline`) on its own clock, so by then the old
//! leader's fence has closed, whatever the clocks say. When renewals keep failing past
//! the deadline, or someone else holds the Lease, leadership is lost and the process
//! exits so a fresh replica can stand by.
//!
//! Written here rather than taken from a crate because the fence needs the outcome and
//! the send time of every renewal, which the lease crates keep to themselves.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Timings of the election.
#[derive(Clone, Debug)]
pub struct LeaseTimings {
    /// How long a standby waits after the last change it saw before taking over.
    pub lease_duration: Duration,
    /// How long after a renewal was sent the leader may still write to EC2.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby looks.
    pub retry_period: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Whether this replica may write to EC2 now.
#[derive(Clone, Debug, Default)]
pub struct Fence {
    /// `None`: no election (always open). Otherwise the end of the current term.
    until: Option<Arc<Mutex<Option<Instant>>>>,
}

impl Fence {
    /// A fence that is always open (leader election off, tests).
    pub fn open() -> Self {
        Self { until: None }
    }

    /// A closed fence, opened by [`elect`].
    pub fn closed() -> Self {
        Self {
            until: Some(Arc::new(Mutex::new(None))),
        }
    }

    /// Whether a mutating call may start now.
    pub fn allows(&self) -> bool {
        match &self.until {
            None => true,
            Some(u) => lock(u).is_some_and(|until| Instant::now() < until),
        }
    }

    fn extend(&self, until: Instant) {
        if let Some(u) = &self.until {
            let mut cur = lock(u);
            if cur.is_none_or(|c| c < until) {
                *cur = Some(until);
            }
        }
    }

    fn close(&self) {
        if let Some(u) = &self.until {
            *lock(u) = None;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors of the election.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server refused or failed a Lease request that leaves no way forward.
    #[error("lease {name}: {source}")]
    Api {
        /// The Lease.
        name: String,
        /// The cause.
        source: kube::Error,
    },
    /// Renewals failed for longer than the renew deadline, or another replica took the
    /// Lease.
    #[error("lost the leader lease {0}")]
    Lost(String),
}

/// What a replica should do with the Lease as it is now (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, it is ours, or its holder stopped renewing: take or renew it.
    Take,
    /// Someone else holds it and renewed within the lease duration: wait.
    Wait,
}

/// Decides from the Lease's holder, whether its record changed since the last look and
/// how long ago that look saw it change (`quiet`).
pub fn decide(
    holder: Option<&str>,
    me: &str,
    quiet: Duration,
    lease_duration: Duration,
) -> Decision {
    match holder {
        None | Some("") => Decision::Take,
        Some(h) if h == me => Decision::Take,
        Some(_) if quiet >= lease_duration => Decision::Take,
        Some(_) => Decision::Wait,
    }
}

/// The record fields whose change shows the holder is alive.
fn record(lease: &Lease) -> (Option<String>, Option<String>) {
    let spec = lease.spec.as_ref();
    (
        spec.and_then(|s| s.holder_identity.clone()),
        spec.and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0.to_string()),
    )
}

/// Leader election for one replica.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: LeaseTimings,
    fence: Fence,
}

impl Elector {
    /// An elector for Lease `namespace/name` as `identity`, opening `fence` while leader.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: LeaseTimings,
        fence: Fence,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timings,
            fence,
        }
    }

    /// Waits until this replica holds the Lease (the fence is open on return).
    pub async fn acquire(&self) -> Result<(), LeaseError> {
        let mut seen: Option<(Option<String>, Option<String>)> = None;
        let mut seen_at = Instant::now();
        loop {
            let sent = Instant::now();
            match self.api.get_opt(&self.name).await {
                Ok(None) => {
                    if self.create(sent).await? {
                        return Ok(());
                    }
                }
                Ok(Some(lease)) => {
                    let now_record = record(&lease);
                    if seen.as_ref() != Some(&now_record) {
                        seen = Some(now_record.clone());
                        seen_at = Instant::now();
                    }
                    let decision = decide(
                        now_record.0.as_deref(),
                        &self.identity,
                        seen_at.elapsed(),
                        self.timings.lease_duration,
                    );
                    if decision == Decision::Take && self.write(lease, sent, true).await {
                        return Ok(());
                    }
                }
                Err(e) => debug!(error = %e, "reading the leader lease"),
            }
            tokio::time::sleep(self.timings.retry_period).await;
        }
    }

    /// Renews the Lease until leadership is lost; returns why.
    pub async fn hold(&self) -> LeaseError {
        loop {
            tokio::time::sleep(self.timings.retry_period).await;
            let sent = Instant::now();
            // A renewal that hangs (a half-open connection) must not keep this loop from
            // noticing the deadline: each attempt gets at most the renew deadline.
            let attempt = tokio::time::timeout(self.timings.renew_deadline, async {
                match self.api.get(&self.name).await {
                    Ok(lease) => {
                        let holder = record(&lease).0;
                        if holder.as_deref() != Some(self.identity.as_str()) {
                            return Err(holder.unwrap_or_default());
                        }
                        Ok(self.write(lease, sent, false).await)
                    }
                    Err(e) => {
                        warn!(error = %e, "renewing the leader lease");
                        Ok(false)
                    }
                }
            })
            .await;
            let renewed = match attempt {
                Ok(Ok(renewed)) => renewed,
                Ok(Err(holder)) => {
                    self.fence.close();
                    return LeaseError::Lost(format!("{}: now held by {holder}", self.name));
                }
                Err(_) => {
                    warn!(
                        timeout = ?self.timings.renew_deadline,
                        "renewing the leader lease timed out"
                    );
                    false
                }
            };
            if !renewed && !self.fence.allows() {
                self.fence.close();
                return LeaseError::Lost(format!(
                    "{}: not renewed within {:?}",
                    self.name, self.timings.renew_deadline
                ));
            }
        }
    }

    async fn create(&self, sent: Instant) -> Result<bool, LeaseError> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(self.spec(None, 0)),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => {
                self.fence.extend(sent + self.timings.renew_deadline);
                info!(lease = %self.name, identity = %self.identity, "acquired the leader lease");
                Ok(true)
            }
            // Someone created it first: look again.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(kube::Error::Api(s)) if s.code == 403 => Err(LeaseError::Api {
                name: self.name.clone(),
                source: kube::Error::Api(s),
            }),
            Err(e) => {
                debug!(error = %e, "creating the leader lease");
                Ok(false)
            }
        }
    }

    /// Replaces the Lease (optimistic concurrency through its resourceVersion) with this
    /// replica as holder and a fresh renew time; opens the fence on success.
    async fn write(&self, mut lease: Lease, sent: Instant, acquiring: bool) -> bool {
        let old = lease.spec.clone().unwrap_or_default();
        let transitions = old.lease_transitions.unwrap_or(0)
            + i32::from(old.holder_identity.as_deref() != Some(self.identity.as_str()));
        let acquire_time = if acquiring && old.holder_identity.as_deref() != Some(&self.identity) {
            None
        } else {
            old.acquire_time.clone()
        };
        lease.spec = Some(self.spec(acquire_time, transitions));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.fence.extend(sent + self.timings.renew_deadline);
                if acquiring {
                    info!(lease = %self.name, identity = %self.identity, "acquired the leader lease");
                }
                true
            }
            Err(e) => {
                debug!(lease = %lease.name_any(), error = %e, "writing the leader lease");
                false
            }
        }
    }

    fn spec(&self, acquire_time: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timings.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire_time.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_holder_is_waited_for_and_a_silent_one_replaced() {
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "a", Duration::ZERO, d), Decision::Take);
        assert_eq!(decide(Some(""), "a", Duration::ZERO, d), Decision::Take);
        assert_eq!(decide(Some("a"), "a", Duration::ZERO, d), Decision::Take);
        assert_eq!(
            decide(Some("b"), "a", Duration::from_secs(14), d),
            Decision::Wait
        );
        assert_eq!(
            decide(Some("b"), "a", Duration::from_secs(15), d),
            Decision::Take
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_fence_closes_at_the_deadline_of_the_last_renewal() {
        assert!(Fence::open().allows());
        let f = Fence::closed();
        assert!(!f.allows());
        let sent = Instant::now();
        f.extend(sent + Duration::from_secs(10));
        assert!(f.allows());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(f.allows());
        // An older renewal answering late does not shorten the term.
        f.extend(sent + Duration::from_secs(5));
        assert!(f.allows());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!f.allows());
        f.extend(Instant::now() + Duration::from_secs(10));
        f.close();
        assert!(!f.allows());
    }
}
