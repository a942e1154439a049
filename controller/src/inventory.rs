//! What the controller knows of EC2, kept in memory so reconciles cost no describes.
//!
//! * [`Inventory`]: every ENI tagged with this cluster's name. Loaded with one paginated
//!   `DescribeNetworkInterfaces` at start (which is also how a restarted controller adopts
//!   the ENIs it created before a crash), kept current from the answers of the
//!   controller's own calls, re-read in one call per resync period, and polled by ID
//!   only while an attach or detach is in flight.
//! * [`Instances`]: instances of selected Nodes (VPC, zone, type, attached ENIs) and the
//!   ENI limits of their types, described in batches once and then kept current.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::ec2::{AttachedEni, AttachmentState, Ec2, Ec2Error, Eni, Instance, InstanceLimits};
use eni_api::tags;

/// ENIs owned by this cluster.
#[derive(Debug, Default)]
pub struct Inventory {
    enis: HashMap<String, Eni>,
    /// When each ENI was first seen `detaching`, whoever sent the detach (this process,
    /// a replica that lost the lease, a person): the detachment timeout runs from there,
    /// so a restarted controller forces a hung detach too.
    detaching_since: HashMap<String, Instant>,
    /// When the controller last changed each ENI itself; a full listing that started
    /// earlier does not know of that change and must not undo it.
    touched: HashMap<String, Instant>,
}

/// Shared handle to the [`Inventory`].
pub type SharedInventory = Arc<Mutex<Inventory>>;

/// Locks a mutex, recovering the data if a panicking thread poisoned it (every update
/// here is a single map operation, so the data is never half-written).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inventory {
    /// Replaces everything with a full listing requested at `since`; entries the
    /// controller changed after `since` are kept as they are. Returns the NodeENIs whose
    /// ENIs changed.
    pub fn replace_all(&mut self, enis: Vec<Eni>, since: Instant) -> BTreeSet<String> {
        let mut fresh: HashMap<String, Eni> = enis.into_iter().map(|e| (e.id.clone(), e)).collect();
        self.touched.retain(|_, at| *at >= since);
        for id in self.touched.keys() {
            match self.enis.get(id) {
                Some(mine) => {
                    fresh.insert(id.clone(), mine.clone());
                }
                None => {
                    fresh.remove(id);
                }
            }
        }
        let mut changed = BTreeSet::new();
        for (id, old) in &self.enis {
            if fresh.get(id) != Some(old) {
                changed.extend(owner(old));
            }
        }
        for (id, new) in &fresh {
            if !self.enis.contains_key(id) {
                changed.extend(owner(new));
            }
        }
        std::mem::swap(&mut self.enis, &mut fresh);
        let ids: Vec<String> = self.enis.keys().cloned().collect();
        self.detaching_since
            .retain(|id, _| self.enis.contains_key(id));
        for id in ids {
            self.track_detaching(&id);
        }
        changed
    }

    /// Applies fresh descriptions of some ENIs requested at `since` (`ids` asked, `found`
    /// answered: asked but not answered means deleted); entries the controller changed
    /// after `since` are newer than the answer and kept. Returns the NodeENIs whose ENIs
    /// changed.
    pub fn refresh(&mut self, ids: &[String], found: Vec<Eni>, since: Instant) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        let mut found: HashMap<String, Eni> =
            found.into_iter().map(|e| (e.id.clone(), e)).collect();
        for id in ids {
            if self.touched.get(id).is_some_and(|at| *at >= since) {
                continue;
            }
            match found.remove(id) {
                Some(new) => {
                    if self.enis.get(id) != Some(&new) {
                        changed.extend(owner(&new));
                        self.upsert(new);
                    }
                }
                None => {
                    if let Some(old) = self.remove(id) {
                        changed.extend(owner(&old));
                    }
                }
            }
        }
        changed
    }

    /// Records an ENI as the controller now knows it.
    pub fn upsert(&mut self, eni: Eni) {
        let id = eni.id.clone();
        self.touched.insert(id.clone(), Instant::now());
        self.enis.insert(id.clone(), eni);
        self.track_detaching(&id);
    }

    /// When a forced detach of `id` becomes due, if it is detaching.
    pub fn detach_due(&self, id: &str, timeout: Duration) -> Option<Instant> {
        self.detaching_since.get(id).map(|since| *since + timeout)
    }

    /// Restarts an ENI's detachment timer (after a forced detach: force again only if
    /// that one also outlasts the timeout).
    pub fn restart_detach_timer(&mut self, id: &str) {
        if let Some(since) = self.detaching_since.get_mut(id) {
            *since = Instant::now();
        }
    }

    /// Starts the detachment timer of an ENI seen `detaching` (if not running yet) and
    /// stops it for an ENI that is not.
    fn track_detaching(&mut self, id: &str) {
        let detaching = self
            .enis
            .get(id)
            .and_then(|e| e.attachment.as_ref())
            .is_some_and(|a| a.state == AttachmentState::Detaching);
        if detaching {
            self.detaching_since
                .entry(id.to_string())
                .or_insert_with(Instant::now);
        } else {
            self.detaching_since.remove(id);
        }
    }

    /// Forgets a deleted ENI.
    pub fn remove(&mut self, id: &str) -> Option<Eni> {
        self.touched.insert(id.to_string(), Instant::now());
        self.detaching_since.remove(id);
        self.enis.remove(id)
    }

    /// An ENI by ID.
    pub fn get(&self, id: &str) -> Option<&Eni> {
        self.enis.get(id)
    }

    /// Mutable access for in-place updates after a successful call.
    pub fn update(&mut self, id: &str, f: impl FnOnce(&mut Eni)) {
        if let Some(eni) = self.enis.get_mut(id) {
            f(eni);
            self.touched.insert(id.to_string(), Instant::now());
            self.track_detaching(id);
        }
    }

    /// ENIs created for a NodeENI, sorted by ID.
    pub fn owned_by(&self, nodeeni: &str) -> Vec<Eni> {
        let mut out: Vec<Eni> = self
            .enis
            .values()
            .filter(|e| e.tags.get(tags::NODE_ENI).map(String::as_str) == Some(nodeeni))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Every managed ENI.
    pub fn all(&self) -> impl Iterator<Item = &Eni> {
        self.enis.values()
    }

    /// Managed ENIs attached (or attaching) to an instance.
    pub fn attached_to(&self, instance_id: &str) -> Vec<AttachedEni> {
        self.enis
            .values()
            .filter_map(|e| {
                let a = e.attachment.as_ref()?;
                (a.instance_id == instance_id).then(|| AttachedEni {
                    eni_id: e.id.clone(),
                    device_index: a.device_index,
                    network_card_index: a.network_card_index,
                    description: e.description.clone(),
                    nodeeni: owner(e),
                })
            })
            .collect()
    }

    /// ENIs in flight (attaching or detaching), to poll.
    pub fn in_flight(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .enis
            .values()
            .filter(|e| {
                e.attachment.as_ref().is_some_and(|a| {
                    matches!(
                        a.state,
                        AttachmentState::Attaching | AttachmentState::Detaching
                    )
                })
            })
            .map(|e| e.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// ENIs whose detach has been pending longer than `timeout`.
    pub fn stuck_detaching(&self, timeout: Duration) -> BTreeSet<String> {
        let now = Instant::now();
        self.detaching_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= timeout)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Number of managed ENIs.
    pub fn len(&self) -> usize {
        self.enis.len()
    }

    /// Whether no ENI is managed.
    pub fn is_empty(&self) -> bool {
        self.enis.is_empty()
    }
}

/// The NodeENI an ENI was created for.
pub fn owner(eni: &Eni) -> Option<String> {
    eni.tags.get(tags::NODE_ENI).cloned()
}

/// Instances and instance-type limits, described once and kept current.
#[derive(Debug, Default)]
pub struct Instances {
    instances: Mutex<HashMap<String, Instance>>,
    /// Instances whose view is known to be out of date (a slot on them is blocked by
    /// someone else's ENI, or an attach failed): described again by the next
    /// [`ensure`](Self::ensure), while the old view still answers until then.
    stale: Mutex<BTreeSet<String>>,
    limits: Mutex<HashMap<String, InstanceLimits>>,
    /// Serializes fetches so concurrent reconciles share one batched describe.
    fetching: tokio::sync::Mutex<()>,
}

impl Instances {
    /// Makes sure every instance in `ids` (and its type's limits) is known, describing
    /// the unknown ones in one batch. Instances EC2 does not know are left out.
    pub async fn ensure<E: Ec2>(&self, ec2: &E, ids: &[String]) -> Result<(), Ec2Error> {
        let _guard = self.fetching.lock().await;
        let missing: Vec<String> = {
            let known = lock(&self.instances);
            let stale = lock(&self.stale);
            let mut m: Vec<String> = ids
                .iter()
                .filter(|id| !known.contains_key(*id) || stale.contains(*id))
                .cloned()
                .collect();
            m.sort();
            m.dedup();
            m
        };
        if !missing.is_empty() {
            let found = ec2.describe_instances(missing.clone()).await?;
            let mut known = lock(&self.instances);
            for id in &missing {
                // Gone from EC2 (terminated long ago): forget it.
                known.remove(id);
            }
            for i in found {
                known.insert(i.id.clone(), i);
            }
            let mut stale = lock(&self.stale);
            for id in &missing {
                stale.remove(id);
            }
        }
        let types: Vec<String> = {
            let known = lock(&self.instances);
            let limits = lock(&self.limits);
            let mut t: Vec<String> = ids
                .iter()
                .filter_map(|id| known.get(id))
                .map(|i| i.instance_type.clone())
                .filter(|t| !t.is_empty() && !limits.contains_key(t))
                .collect();
            t.sort();
            t.dedup();
            t
        };
        if !types.is_empty() {
            let found = ec2.describe_instance_types(types.clone()).await?;
            let mut limits = lock(&self.limits);
            for t in types {
                // Unknown types (emulators) get no limit rather than another lookup.
                let l = found.get(&t).cloned().unwrap_or(InstanceLimits {
                    max_enis: 0,
                    cards: Vec::new(),
                    ipv4_per_interface: None,
                    nitro: None,
                });
                limits.insert(t, l);
            }
        }
        Ok(())
    }

    /// A known instance.
    pub fn get(&self, id: &str) -> Option<Instance> {
        lock(&self.instances).get(id).cloned()
    }

    /// Most ENIs an instance takes on a network card, if known.
    pub fn max_enis(&self, instance_type: &str, network_card_index: i32) -> Option<i32> {
        let limits = lock(&self.limits);
        let l = limits.get(instance_type)?;
        if l.max_enis <= 0 {
            return None;
        }
        let per_card = l
            .cards
            .iter()
            .find(|(card, _)| *card == network_card_index)
            .map(|(_, max)| *max);
        Some(per_card.unwrap_or(l.max_enis))
    }

    /// `(Ipv4AddressesPerInterface, Nitro)` of an instance type, as far as known.
    pub fn ip_limits(&self, instance_type: &str) -> (Option<i32>, Option<bool>) {
        let limits = lock(&self.limits);
        match limits.get(instance_type) {
            Some(l) => (l.ipv4_per_interface.filter(|n| *n > 0), l.nitro),
            None => (None, None),
        }
    }

    /// Marks an instance's view out of date, so the next [`ensure`](Self::ensure)
    /// describes it again (EC2 reported a conflict the view did not know of, or a slot
    /// on it is blocked by someone else's ENI and must be re-checked).
    pub fn invalidate(&self, id: &str) {
        lock(&self.stale).insert(id.to_string());
    }

    /// Drops a deleted ENI from the cached instance views, so it is not taken for
    /// someone else's ENI at its old index until the instance is described again.
    pub fn forget_eni(&self, eni_id: &str) {
        for inst in lock(&self.instances).values_mut() {
            inst.enis.retain(|a| a.eni_id != eni_id);
        }
    }

    /// Forgets every instance not in `keep` (the instances of the Nodes that exist), so
    /// the map does not grow with every instance ever seen.
    pub fn retain(&self, keep: &BTreeSet<String>) {
        lock(&self.instances).retain(|id, _| keep.contains(id));
        lock(&self.stale).retain(|id| keep.contains(id));
    }

    /// How many instances are known (for tests and metrics).
    pub fn len(&self) -> usize {
        lock(&self.instances).len()
    }

    /// Whether no instance is known.
    pub fn is_empty(&self) -> bool {
        lock(&self.instances).is_empty()
    }
}

pub fn merged_attachments(instance: &Instance, inventory: &Inventory) -> Vec<AttachedEni> {
    let ours = inventory.attached_to(&instance.id);
    let mut by_id: BTreeMap<String, AttachedEni> = instance
        .enis
        .iter()
        // ENIs we manage are represented by the inventory, which is newer.
        .filter(|a| inventory.get(&a.eni_id).is_none())
        .map(|a| (a.eni_id.clone(), a.clone()))
        .collect();
    for a in ours {
        by_id.insert(a.eni_id.clone(), a);
    }
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec2::Attachment;

    fn eni(id: &str, state: Option<AttachmentState>) -> Eni {
        Eni {
            id: id.into(),
            subnet_id: "subnet-a".into(),
            mac_address: None,
            private_ip: None,
            status: "in-use".into(),
            security_groups: Vec::new(),
            description: String::new(),
            tags: BTreeMap::from([(tags::NODE_ENI.to_string(), "ne".to_string())]),
            attachment: state.map(|state| Attachment {
                id: format!("attach-{id}"),
                instance_id: "i-1".into(),
                device_index: 2,
                network_card_index: 0,
                state,
                delete_on_termination: true,
            }),
            secondary_ips: Vec::new(),
            ipv4_prefixes: Vec::new(),
        }
    }

    /// A detach sent by someone else (another replica, before a restart) is timed from
    /// when this process first sees it, so it is forced after the timeout.
    #[tokio::test(start_paused = true)]
    async fn detach_seen_in_a_listing_is_timed_and_forced() {
        let timeout = Duration::from_secs(15);
        let mut inv = Inventory::default();
        let asked = Instant::now();
        inv.replace_all(vec![eni("eni-1", Some(AttachmentState::Detaching))], asked);
        assert!(inv.stuck_detaching(timeout).is_empty());
        tokio::time::advance(timeout).await;
        // A later listing that still says detaching does not restart the timer.
        inv.replace_all(
            vec![eni("eni-1", Some(AttachmentState::Detaching))],
            Instant::now(),
        );
        assert_eq!(
            inv.stuck_detaching(timeout),
            BTreeSet::from(["eni-1".to_string()])
        );
        // Detached at last: the timer stops.
        inv.replace_all(vec![eni("eni-1", None)], Instant::now());
        assert!(inv.stuck_detaching(timeout).is_empty());
    }

    /// The in-flight poller's answer starts the timer too.
    #[tokio::test(start_paused = true)]
    async fn detach_seen_by_the_poller_is_timed() {
        let timeout = Duration::from_secs(15);
        let mut inv = Inventory::default();
        inv.replace_all(
            vec![eni("eni-1", Some(AttachmentState::Attached))],
            Instant::now(),
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let ids = vec!["eni-1".to_string()];
        inv.refresh(
            &ids,
            vec![eni("eni-1", Some(AttachmentState::Detaching))],
            Instant::now(),
        );
        tokio::time::advance(timeout).await;
        assert_eq!(inv.stuck_detaching(timeout).len(), 1);
    }
}
