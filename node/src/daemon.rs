//! The reconcile loop: observe -> [`plan::plan`] -> execute, on every NodeENI change,
//! every netlink link event, and every `--resync-period`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eni_api::{InterfaceReport, NodeENI};
use eni_deviceplugin::{BoundDevice, EniDetails};
use futures::{Stream, StreamExt};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::netlink::{LinkEvent, Netlink};
use crate::plan::{self, Action, Desired, EniPlan, Observed, Release};
use crate::podresources::PodResources;
use crate::pool;
use crate::state::{self, EniState, StateFile};
use crate::sysfs::{self, Binder};

/// How often the report writer wakes up on its own (it mostly reacts to changes).
const IDLE_WAKEUP: Duration = Duration::from_secs(3600);

/// How often the allocation file's modification time is checked for pod churn.
const ALLOC_POLL: Duration = Duration::from_secs(1);

/// Delay before retrying a failed report write.
const REPORT_RETRY: Duration = Duration::from_secs(2);

/// Settings of the daemon (from the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name.
    pub node: String,
    /// Directory of `enis.json`.
    pub state_dir: PathBuf,
    /// MTU when the NodeENI sets none.
    pub default_mtu: u32,
    /// Add `eth<N>` alternative names.
    pub stable_names: bool,
    /// Longest wait for one sysfs driver operation (it goes on in the background after).
    pub sysfs_timeout: Duration,
    /// The kubelet's PodResources API, asked before a device is given back; `None`: do
    /// not ask.
    pub pod_resources: Option<PodResources>,
}

/// PCI address -> the blocking sysfs operation running on it, and since when.
type InFlight = Arc<Mutex<BTreeMap<String, (&'static str, Instant)>>>;

/// The node daemon's reconciler.
#[derive(Debug)]
pub struct Daemon {
    settings: Settings,
    netlink: Netlink,
    binder: Binder,
    state_path: PathBuf,
    state: StateFile,
    bound_tx: watch::Sender<Vec<BoundDevice>>,
    metrics: Metrics,
    /// Driver operations still running on a blocking thread (possibly stuck in the kernel).
    in_flight: InFlight,
    /// Devices being given back (advertised Unhealthy until they are gone).
    releasing: BTreeSet<String>,
    /// Per ENI id, what its NodeENI says about it (published with the devices).
    details: BTreeMap<String, EniDetails>,
    /// Resource the netdev ENIs are published under (DRA only); `None`: not published.
    netdev_resource: Option<String>,
}

/// What one reconcile did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Per NodeENI name, the report for this node.
    pub reports: BTreeMap<String, Vec<InterfaceReport>>,
    /// ENIs configured.
    pub configured: usize,
    /// ENIs with a problem.
    pub failed: usize,
}

impl Daemon {
    /// A daemon; reads the state file left by a previous run (an unreadable one is
    /// logged and ignored: the devices it listed are then found again by MAC when they
    /// still have a netdev).
    pub fn new(
        settings: Settings,
        netlink: Netlink,
        binder: Binder,
        bound_tx: watch::Sender<Vec<BoundDevice>>,
        metrics: Metrics,
    ) -> Self {
        let state_path = state::path(&settings.state_dir);
        let state = match state::load(&state_path) {
            Ok(Some(s)) if s.version == state::VERSION => s,
            Ok(Some(s)) => {
                warn!(
                    version = s.version,
                    "state file has an unknown version; starting afresh"
                );
                StateFile::empty(&settings.node)
            }
            Ok(None) => StateFile::empty(&settings.node),
            Err(e) => {
                error!(error = %e, "cannot read the state file; starting afresh");
                StateFile::empty(&settings.node)
            }
        };
        let daemon = Self {
            state_path,
            state,
            settings,
            netlink,
            binder,
            bound_tx,
            metrics,
            in_flight: InFlight::default(),
            releasing: BTreeSet::new(),
            details: BTreeMap::new(),
            netdev_resource: None,
        };
        daemon.publish_bound();
        daemon
    }

    /// The state as last written.
    pub fn state(&self) -> &StateFile {
        &self.state
    }

    /// Sets what the NodeENIs say about this node's ENIs
    /// ([`crate::inventory::details_from_nodeenis`]); published with the next devices.
    pub fn set_details(&mut self, details: BTreeMap<String, EniDetails>) {
        self.details = details;
    }

    /// Also publishes the ENIs still on their kernel driver (netdev ENIs) under
    /// `resource` (`None`: DPDK-bound ENIs only); see
    /// [`crate::inventory::bound_devices`].
    pub fn set_netdev_resource(&mut self, resource: Option<String>) {
        self.netdev_resource = resource;
        self.publish_bound();
    }

    fn publish_bound(&self) {
        let mut devices = crate::inventory::bound_devices(
            &self.state.enis,
            &self.releasing,
            &self.details,
            self.netdev_resource.as_deref(),
        );
        devices.sort();
        self.bound_tx.send_if_modified(|cur| {
            if *cur == devices {
                false
            } else {
                *cur = devices;
                true
            }
        });
    }

    fn save_state(&mut self, mut enis: Vec<EniState>) {
        enis.sort_by(|a, b| {
            (a.device_index, &a.mac_address).cmp(&(b.device_index, &b.mac_address))
        });
        enis.dedup();
        let next = StateFile {
            version: state::VERSION,
            node: self.settings.node.clone(),
            enis,
            pools: self.state.pools.clone(),
        };
        if next == self.state && self.state_path.exists() {
            return;
        }
        match state::save(&self.state_path, &next) {
            Ok(()) => {
                debug!(path = %self.state_path.display(), "state file written");
                self.state = next;
            }
            Err(e) => {
                self.metrics.errors.inc();
                error!(error = %e, "cannot write the state file");
            }
        }
    }

    async fn observe(&self, desired: &[Desired]) -> Result<Observed> {
        let sys = self.binder.sysfs();
        let mut links = self.netlink.links().await?;
        for l in &mut links {
            l.pci_address = sysfs::netdev_pci_address(sys, &l.name);
        }
        let previous = self.state.enis.clone();
        let candidates = Observed::pci_candidates(desired, &links, &previous);
        let binder = self.binder.clone();
        let read = tokio::task::spawn_blocking(move || {
            candidates
                .into_iter()
                .map(|a| {
                    let info = binder.inspect(&a).map_err(|e| e.to_string());
                    (a, info)
                })
                .collect()
        });
        let pci = match tokio::time::timeout(self.settings.sysfs_timeout, read).await {
            Ok(Ok(pci)) => pci,
            Ok(Err(e)) => return Err(Error::SysfsTask(e.to_string())),
            Err(_) => {
                return Err(Error::SysfsTask(format!(
                    "reading PCI devices took longer than {:?}",
                    self.settings.sysfs_timeout
                )));
            }
        };
        let primary = self.netlink.default_route_links().await?;
        Ok(Observed {
            links,
            pci,
            previous,
            primary,
        })
    }

    /// One reconcile for `desired` (this node's attachments).
    pub async fn reconcile(&mut self, desired: &[Desired]) -> Result<Outcome> {
        let started = Instant::now();
        self.metrics.reconciles.inc();
        let observed = self.observe(desired).await?;
        let plan = plan::plan(
            desired,
            &observed,
            plan::Options {
                stable_names: self.settings.stable_names,
            },
        );

        // Devices to give back are advertised Unhealthy at once: the kubelet stops
        // allocating them before anything else happens to them.
        self.releasing = plan
            .releases
            .iter()
            .filter_map(|r| r.entry.pci_address.clone())
            .collect();
        self.publish_bound();

        // Record MAC <-> PCI <-> device index before any unbind: the netdev (and with it
        // the only place the kernel shows the MAC) disappears once the device is bound.
        let binding = plan
            .enis
            .iter()
            .any(|p| p.actions.iter().any(|a| matches!(a, Action::Bind { .. })));
        if binding {
            let mut pre: Vec<EniState> = plan
                .enis
                .iter()
                .filter_map(|p| {
                    let bound_now = p.wants_bound() && p.actions.is_empty();
                    p.entry(bound_now)
                })
                .collect();
            pre.extend(plan.releases.iter().map(|r| r.entry.clone()));
            self.save_state(pre);
        }

        let mut outcome = Outcome::default();
        let mut entries = Vec::new();
        for p in &plan.enis {
            let (report, entry) = self.execute(p).await;
            if report.error.is_none() {
                outcome.configured += 1;
            } else {
                outcome.failed += 1;
            }
            entries.extend(entry);
            outcome
                .reports
                .entry(p.desired.node_eni.clone())
                .or_default()
                .push(report);
        }
        let kept = self.release(&plan, &mut outcome).await;
        entries.extend(kept);
        self.save_state(entries);
        self.publish_bound();
        self.metrics
            .interfaces_configured
            .set(outcome.configured as i64);
        self.metrics.interfaces_failed.set(outcome.failed as i64);
        self.metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(outcome)
    }

    /// Copies the published pod address pools into the state file and computes each
    /// ENI's pool report, under the allocation lock (see [`crate::pool`]). Returns the
    /// reports by ENI id.
    pub async fn sync_pools(
        &mut self,
        wants: &[pool::PoolWant],
    ) -> Result<BTreeMap<String, eni_api::InterfaceIpam>> {
        if wants.is_empty() && self.state.pools.is_empty() {
            return Ok(BTreeMap::new());
        }
        let dir = self.settings.state_dir.clone();
        let path = self.state_path.clone();
        let mut next = self.state.clone();
        next.node.clone_from(&self.settings.node);
        let wants = wants.to_vec();
        let task = tokio::task::spawn_blocking(move || {
            // The lock makes the new pool and the usage one snapshot: once the file is
            // written, cni-helper cannot hand out what the controller wants back.
            let locked = eni_state::alloc::lock(&dir)?;
            let (pools, reports) = pool::plan(&wants, &locked.allocations);
            let changed = next.pools != pools || !path.exists();
            next.pools = pools;
            if changed {
                state::save(&path, &next)?;
            }
            drop(locked);
            Ok::<_, eni_state::Error>((next, reports))
        });
        let (next, reports) = task
            .await
            .map_err(|e| Error::SysfsTask(format!("pool sync task: {e}")))??;
        self.state = next;
        Ok(reports)
    }

    /// Runs a sysfs driver operation on `pci` on a blocking thread and waits for it up to
    /// `--sysfs-timeout`. Refuses to start one while an earlier operation on the same
    /// device has not returned (it may be stuck in the kernel for as long as a process
    /// holds the device).
    async fn blocking<T: Send + 'static>(
        &self,
        pci: &str,
        op: &'static str,
        f: impl FnOnce(&Binder, &str) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        {
            let mut running = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((op, since)) = running.get(pci) {
                return Err(Error::SysfsStuck {
                    pci: pci.to_string(),
                    op,
                    elapsed: since.elapsed(),
                });
            }
            running.insert(pci.to_string(), (op, Instant::now()));
        }
        let (binder, in_flight, key) =
            (self.binder.clone(), self.in_flight.clone(), pci.to_string());
        let task = tokio::task::spawn_blocking(move || {
            let r = f(&binder, &key);
            in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            r
        });
        match tokio::time::timeout(self.settings.sysfs_timeout, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(pci);
                Err(Error::SysfsTask(e.to_string()))
            }
            Err(_) => Err(Error::SysfsStuck {
                pci: pci.to_string(),
                op,
                elapsed: self.settings.sysfs_timeout,
            }),
        }
    }

    /// Gives back the devices the plan releases, unless a pod still holds one (asked of
    /// the kubelet first). They are advertised Unhealthy before anything else happens.
    /// Returns the state entries to keep (deferred or failed releases) and reports why.
    async fn release(&mut self, plan: &plan::Plan, outcome: &mut Outcome) -> Vec<EniState> {
        if plan.releases.is_empty() {
            return Vec::new();
        }
        let holders = match &self.settings.pod_resources {
            Some(pr) => Some(pr.allocated().await.map_err(|e| e.to_string())),
            None => None,
        };
        let mut kept = Vec::new();
        for r in &plan.releases {
            let pci = r.entry.pci_address.clone().unwrap_or_default();
            let span = info_span!("release", pci, eni = %r.entry.eni_id);
            let problem = async {
                let in_use = match &holders {
                    None => None,
                    Some(Err(e)) => Some(format!(
                        "InUse: not giving PCI device {pci} back to its kernel driver: {e}; \
                         retrying (a pod may still hold it)"
                    )),
                    Some(Ok(h)) => h.get(&pci).map(|hs| {
                        let who: Vec<String> = hs.iter().map(ToString::to_string).collect();
                        format!(
                            "InUse: PCI device {pci} is allocated to {}; it is given back to its \
                             kernel driver once no pod holds it",
                            who.join(", ")
                        )
                    }),
                };
                if let Some(p) = in_use {
                    info!(reason = %p, "release deferred");
                    return Some(p);
                }
                let driver = r.dpdk_driver.clone();
                match self
                    .blocking(&pci, "release", move |b, pci| b.release(pci, &driver))
                    .await
                {
                    Ok(o) => {
                        self.metrics.releases.inc();
                        info!(driver = ?o.info.driver, "device given back to its kernel driver");
                        None
                    }
                    Err(e) => {
                        self.metrics.errors.inc();
                        error!(error = %e, "cannot give the device back");
                        Some(e.to_string())
                    }
                }
            }
            .instrument(span)
            .await;
            match problem {
                None => {
                    self.releasing.remove(&pci);
                }
                Some(p) => {
                    kept.push(r.entry.clone());
                    report_release(outcome, r, p);
                }
            }
        }
        kept
    }

    /// Carries out one ENI's plan; returns its report and state entry.
    async fn execute(&self, p: &EniPlan) -> (InterfaceReport, Option<EniState>) {
        let d = &p.desired;
        let span = info_span!("eni", eni = %d.eni_id, mac = %d.mac, index = d.device_index);
        async {
            let mut report = InterfaceReport {
                eni_id: d.eni_id.clone(),
                mac_address: d.mac.clone(),
                device_index: d.device_index,
                interface_name: p.link.as_ref().map(|l| l.name.clone()),
                up: p.link.as_ref().is_some_and(|l| l.up),
                mtu: p.link.as_ref().and_then(|l| i32::try_from(l.mtu).ok()),
                pci_address: p.pci.clone(),
                driver: p.pci_info.as_ref().and_then(|i| i.driver.clone()),
                device_name: p.pci_info.as_ref().map(sysfs::PciInfo::device_name),
                dpdk_bound: false,
                resource_name: d.dpdk.as_ref().map(|w| w.resource_name.clone()),
                error: p.problem.clone(),
                ipam: None,
            };
            let mut bound = p.wants_bound() && p.actions.is_empty();
            let mut refused = false;
            for a in &p.actions {
                let res = match a {
                    Action::SetMtu { index, mtu } => {
                        self.netlink.set_mtu(*index, *mtu).await.map(|()| {
                            report.mtu = i32::try_from(*mtu).ok();
                            info!(mtu, "MTU set");
                        })
                    }
                    Action::SetUp { index } => self.netlink.set_up(*index).await.map(|()| {
                        report.up = true;
                        info!("interface up");
                    }),
                    Action::AddAltName { index, alt } => {
                        self.netlink.add_alt_name(*index, alt).await.map(|()| {
                            info!(alt, "alternative name added");
                        })
                    }
                    Action::Bind { pci, driver } => {
                        let drv = driver.clone();
                        let info = self
                            .blocking(pci, "bind", move |b, pci| b.bind(pci, &drv))
                            .await;
                        info.map(|o| {
                            if o.changed {
                                self.metrics.binds.inc();
                            }
                            info!(
                                pci,
                                driver,
                                device = %o.info.device_name(),
                                vfio_group = ?o.info.vfio_group_device(),
                                "device bound for DPDK"
                            );
                            report.driver = o.info.driver.clone();
                            bound = true;
                        })
                    }
                };
                if let Err(e) = res {
                    refused |= matches!(e, crate::Error::NotEna { .. });
                    self.metrics.errors.inc();
                    error!(action = ?a, error = %e, "action failed");
                    report.error = Some(e.to_string());
                    break;
                }
                if !matches!(a, Action::Bind { .. }) {
                    self.metrics.link_changes.inc();
                }
            }
            if p.problem.is_some() {
                debug!(problem = ?p.problem, "not fully configured");
            }
            let entry = if bound {
                report.dpdk_bound = true;
                report.interface_name = None;
                report.up = false;
                report.mtu = None;
                p.entry(true)
            } else if d.dpdk.is_some() && p.link.is_none() && (refused || p.problem.is_some()) {
                // A device we bound earlier keeps its record (and stays advertised) while
                // the NodeENI asks for something we refuse (a wrong dpdkPCIAddress, a second
                // claimant): the record is the only evidence of which device the MAC has.
                // Otherwise not ours to record: a refused device, or one we could not even
                // inspect. (A device whose bind failed half-way stays recorded: its netdev
                // is gone and the state file is the only place that still maps it to the
                // MAC.)
                let kept = self
                    .state
                    .enis
                    .iter()
                    .find(|e| e.mac_address == d.mac && e.dpdk_bound)
                    .cloned();
                if let Some(e) = &kept {
                    report.dpdk_bound = true;
                    report.pci_address.clone_from(&e.pci_address);
                    report.driver.clone_from(&e.driver);
                }
                kept
            } else {
                let mut e = p.entry(false);
                // A failed bind may leave the device elsewhere: record what sysfs says now.
                if let (Some(e), Some(pci)) = (e.as_mut(), p.pci.as_deref())
                    && d.dpdk.is_some()
                {
                    let now = self.binder.inspect(pci).ok().and_then(|i| i.driver);
                    e.driver.clone_from(&now);
                    report.driver = now;
                }
                e
            };
            (report, entry)
        }
        .instrument(span)
        .await
    }
}

/// Puts a deferred or failed release into the reports: on the ENI's own report when it
/// still has one (DPDK turned off), else as a report of its own (attachment gone).
fn report_release(outcome: &mut Outcome, r: &Release, problem: String) {
    let reports = outcome.reports.entry(r.entry.node_eni.clone()).or_default();
    if let Some(rep) = reports.iter_mut().find(|x| x.eni_id == r.entry.eni_id) {
        rep.error = Some(problem);
        rep.pci_address.clone_from(&r.entry.pci_address);
        rep.driver = Some(r.dpdk_driver.clone());
        return;
    }
    reports.push(InterfaceReport {
        eni_id: r.entry.eni_id.clone(),
        mac_address: r.entry.mac_address.clone(),
        device_index: r.entry.device_index,
        pci_address: r.entry.pci_address.clone(),
        driver: Some(r.dpdk_driver.clone()),
        dpdk_bound: r.entry.dpdk_bound,
        resource_name: r.entry.resource_name.clone(),
        error: Some(problem),
        ..Default::default()
    });
}

/// Puts each ENI's pool report into its interface report (one is added for an ENI the
/// daemon has not located yet, so usage and releases still reach the controller).
fn merge_pool_reports(
    outcome: &mut Outcome,
    wants: &[pool::PoolWant],
    mut pools: BTreeMap<String, eni_api::InterfaceIpam>,
) {
    for w in wants {
        let Some(ipam) = pools.remove(&w.eni_id) else {
            continue;
        };
        let reports = outcome.reports.entry(w.node_eni.clone()).or_default();
        match reports.iter_mut().find(|r| r.eni_id == w.eni_id) {
            Some(r) => r.ipam = Some(ipam),
            None => reports.push(InterfaceReport {
                eni_id: w.eni_id.clone(),
                ipam: Some(ipam),
                ..Default::default()
            }),
        }
    }
}

/// Runs the daemon until `shutdown` completes: watches NodeENIs, reacts to link events,
/// resyncs every `resync`, and keeps this node's `nodeReports` entries current.
///
/// Reports are written by a separate task, so a slow API server never delays configuring
/// a hot-plugged interface: the reconcile loop only publishes the latest reports.
pub async fn run(
    mut daemon: Daemon,
    client: Client,
    link_events: impl Stream<Item = LinkEvent> + Send + 'static,
    resync: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let node = daemon.settings.node.clone();
    let default_mtu = daemon.settings.default_mtu;
    let api: Api<NodeENI> = Api::all(client);
    let (reader, writer) = reflector::store();
    let notify = Arc::new(Notify::new());
    let objects_changed = Arc::new(Notify::new());
    let watch_task = tokio::spawn({
        let (notify, objects_changed) = (notify.clone(), objects_changed.clone());
        let api = api.clone();
        async move {
            watcher(api, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .for_each(|ev| {
                    match ev {
                        Ok(_) => {
                            notify.notify_one();
                            objects_changed.notify_one();
                        }
                        Err(e) => warn!(error = %e, "NodeENI watch error (retrying)"),
                    }
                    futures::future::ready(())
                })
                .await;
        }
    });
    // Link events coalesce into one wake-up, like watch events. The stream ends only
    // when the netlink connection is gone; the daemon then exits (and is restarted, which
    // is safe: a restart re-applies nothing that is already in place).
    let (link_lost_tx, mut link_lost) = tokio::sync::oneshot::channel::<()>();
    let link_task = tokio::spawn({
        let notify = notify.clone();
        async move {
            let mut events = std::pin::pin!(link_events);
            while events.next().await.is_some() {
                notify.notify_one();
            }
            let _ = link_lost_tx.send(());
        }
    });
    let (reports_tx, reports_rx) = watch::channel(None);
    let report_task = tokio::spawn(write_reports(
        api,
        reader.clone(),
        node.clone(),
        reports_rx,
        objects_changed,
        daemon.metrics.clone(),
    ));
    let stop = || {
        watch_task.abort();
        link_task.abort();
        report_task.abort();
    };

    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => { stop(); return Ok(()); }
        r = reader.wait_until_ready() => if r.is_err() { warn!("NodeENI store closed"); },
    }
    info!(node, "NodeENIs listed; reconciling");
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    // Pod churn changes the allocation file, not the NodeENIs: usage is re-read when its
    // modification time changes (a stat a second), without a full reconcile.
    let alloc_path = eni_state::alloc::path(&daemon.settings.state_dir);
    let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut alloc_seen = mtime(&alloc_path);
    let mut alloc_tick = tokio::time::interval(ALLOC_POLL);
    alloc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'outer: loop {
        let objs = reader.state();
        let desired =
            plan::desired_from_nodeenis(objs.iter().map(AsRef::as_ref), &node, default_mtu);
        daemon.set_details(crate::inventory::details_from_nodeenis(
            objs.iter().map(AsRef::as_ref),
            &node,
            default_mtu,
        ));
        let span = info_span!("reconcile", node, enis = desired.len());
        let base = match daemon.reconcile(&desired).instrument(span).await {
            Ok(outcome) => {
                daemon.metrics.set_ready();
                Some(outcome)
            }
            Err(e) => {
                daemon.metrics.errors.inc();
                error!(error = %e, "reconcile failed");
                None
            }
        };
        loop {
            if let Some(base) = &base {
                let mut outcome = base.clone();
                let wants =
                    pool::wants_from_nodeenis(reader.state().iter().map(AsRef::as_ref), &node);
                alloc_seen = mtime(&alloc_path);
                match daemon.sync_pools(&wants).await {
                    Ok(pools) => merge_pool_reports(&mut outcome, &wants, pools),
                    Err(e) => {
                        daemon.metrics.errors.inc();
                        error!(error = %e, "cannot sync the pod address pools");
                    }
                }
                reports_tx.send_if_modified(|cur| {
                    if cur.as_ref() == Some(&outcome.reports) {
                        false
                    } else {
                        *cur = Some(outcome.reports);
                        true
                    }
                });
            }
            loop {
                tokio::select! {
                    _ = &mut shutdown => break 'outer,
                    _ = &mut link_lost => {
                        stop();
                        return Err(crate::Error::NetlinkSocket(std::io::Error::other(
                            "the netlink connection closed",
                        )));
                    }
                    _ = notify.notified() => continue 'outer,
                    _ = tick.tick() => continue 'outer,
                    _ = alloc_tick.tick() => {
                        if mtime(&alloc_path) != alloc_seen {
                            break;
                        }
                    }
                }
            }
        }
    }
    stop();
    info!("shutting down (DPDK devices stay bound; the state file keeps them)");
    Ok(())
}

/// The periodic reconcile of pod address allocations against the pods that still exist
/// (issue 17): every `period`, allocations of pods that the API server no longer lists on
/// this node (deleted while the node was down, or whose DEL never came) are freed. The
/// allocations are read before the pods are listed, so an ADD that lands meanwhile is
/// never judged by an older list; an allocation is freed only when two passes in a row
/// find its pod gone (a static pod's mirror pod may appear late). Allocations that name no
/// pod are left to CNI DEL and GC. Needs `list` on pods (the node chart grants it).
pub async fn reconcile_allocations(
    client: Client,
    node: String,
    state_dir: PathBuf,
    period: Duration,
) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client);
    let params = kube::api::ListParams::default().fields(&format!("spec.nodeName={node}"));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut suspects: Vec<eni_state::alloc::Allocation> = Vec::new();
    loop {
        tick.tick().await;
        let dir = state_dir.clone();
        let snapshot = match tokio::task::spawn_blocking(move || {
            eni_state::alloc::lock(&dir).map(|l| l.allocations.clone())
        })
        .await
        {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                warn!(error = %e, "allocation reconcile: cannot read the allocations");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "allocation reconcile: task failed");
                continue;
            }
        };
        if snapshot.allocations.iter().all(|a| a.pod_name.is_empty()) {
            suspects.clear();
            continue;
        }
        let list = match pods.list(&params).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "allocation reconcile: cannot list this node's pods");
                continue;
            }
        };
        let live: Vec<pool::LivePod> = list
            .items
            .into_iter()
            .map(|p| {
                let m = p.metadata;
                let mut uids: Vec<String> = m.uid.into_iter().collect();
                if let Some(h) = m
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("kubernetes.io/config.mirror"))
                {
                    uids.push(h.clone());
                }
                (
                    m.namespace.unwrap_or_default(),
                    m.name.unwrap_or_default(),
                    uids,
                )
            })
            .collect();
        let orphans = pool::orphaned(&snapshot, &live);
        let confirmed: Vec<_> = orphans
            .iter()
            .filter(|a| suspects.contains(a))
            .cloned()
            .collect();
        suspects = orphans;
        if confirmed.is_empty() {
            continue;
        }
        let dir = state_dir.clone();
        let freed = tokio::task::spawn_blocking(move || {
            let mut l = eni_state::alloc::lock(&dir)?;
            let gone = l.allocations.retain(|a| !confirmed.contains(a));
            if !gone.is_empty() {
                l.save()?;
            }
            Ok::<_, eni_state::Error>(gone)
        })
        .await;
        match freed {
            Ok(Ok(gone)) => {
                for a in &gone {
                    info!(address = %a.address, eni = %a.eni_id, pod = %format!("{}/{}", a.pod_namespace, a.pod_name),
                          container = %a.container_id, "freed the address of a pod that no longer exists");
                }
                suspects.retain(|s| !gone.contains(s));
            }
            Ok(Err(e)) => warn!(error = %e, "allocation reconcile: cannot free"),
            Err(e) => warn!(error = %e, "allocation reconcile: task failed"),
        }
    }
}

/// Keeps this node's report entries equal to the latest reports of the reconcile loop:
/// after each new set of reports and after each NodeENI change (so an entry someone else
/// removed is written again), and retries failed writes.
async fn write_reports(
    api: Api<NodeENI>,
    reader: reflector::Store<NodeENI>,
    node: String,
    mut reports: watch::Receiver<Option<BTreeMap<String, Vec<InterfaceReport>>>>,
    objects_changed: Arc<Notify>,
    metrics: Metrics,
) {
    let mut failed = false;
    loop {
        let retry = tokio::time::sleep(if failed { REPORT_RETRY } else { IDLE_WAKEUP });
        tokio::select! {
            r = reports.changed() => if r.is_err() { return },
            _ = objects_changed.notified() => {}
            _ = retry => {}
        }
        let Some(want) = reports.borrow_and_update().clone() else {
            continue;
        };
        failed = false;
        for ne in reader.state() {
            let Some(name) = ne.metadata.name.as_deref() else {
                continue;
            };
            let want = want.get(name);
            if want == crate::report::current(&ne, &node).as_ref() {
                continue;
            }
            let res = crate::report::apply(&api, name, &node, want.map(Vec::as_slice))
                .instrument(info_span!("report", nodeeni = name))
                .await;
            match res {
                Ok(()) => debug!(nodeeni = name, "node report written"),
                Err(e) => {
                    failed = true;
                    metrics.errors.inc();
                    warn!(nodeeni = name, error = %e, "cannot write the node report; retrying soon");
                }
            }
        }
    }
}
