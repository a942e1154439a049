//! Kubelet device plugin (deviceplugin/v1beta1) for DPDK-bound ENIs.
//!
//! The node daemon publishes the full set of bound devices through a
//! `tokio::sync::watch` channel; [`run`] serves one plugin endpoint per resource name
//! (socket `aws-multi-eni-<resource>.sock`), registers it with the kubelet, streams the
//! device list (with health and NUMA topology) through `ListAndWatch` on every change,
//! and answers `Allocate` / `GetPreferredAllocation` in the SR-IOV network device
//! plugin's conventions, so DPDK applications and Multus work unchanged.
//!
//! ```no_run
//! # async fn example() -> Result<(), eni_deviceplugin::Error> {
//! use eni_deviceplugin::{BoundDevice, CancellationToken, Config};
//! let (tx, rx) = tokio::sync::watch::channel(Vec::<BoundDevice>::new());
//! let shutdown = CancellationToken::new();
//! let plugin = tokio::spawn(eni_deviceplugin::run(Config::default(), rx, shutdown.clone()));
//! // ... tx.send_replace(devices) whenever the bound set changes ...
//! shutdown.cancel();
//! # drop(tx); let _ = plugin.await;
//! # Ok(()) }
//! ```
//!
//! Module layout: pure logic in [`alloc`] (Allocate, preferred allocation) and
//! [`device`] (health evaluation); host I/O behind [`device::DeviceProbe`] (sysfs and
//! `/dev` under injectable roots); gRPC in `service` and the socket lifecycle in
//! `endpoint`.

pub mod alloc;
pub mod authority;
pub mod config;
pub mod device;
mod endpoint;
mod error;
pub mod metrics;
mod service;
pub mod snapshot;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{Config, RegistrationMode};
pub use device::{DeviceProbe, SysfsProbe};
pub use endpoint::{accept_with_authority_fix, connect_unix};
pub use error::Error;
pub use metrics::Allocations;
pub use service::{PluginService, RegistryService};
pub use snapshot::Snapshot;
pub use tokio_util::sync::CancellationToken;

/// A device the node daemon has bound to a userspace-I/O driver, to be advertised to the
/// kubelet under `resource_name`. The node daemon publishes the full current set through a
/// `tokio::sync::watch` channel whenever it changes.
///
/// Devices whose `driver` is `vfio-pci` are DPDK devices. Devices bound to a kernel
/// driver (e.g. `ena`) are advertised only when [`Config::netdev_resource`] names their
/// resource (non-DPDK ENIs for `host-device` users).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BoundDevice {
    /// PCI address, e.g. `0000:00:07.0`; the device ID the kubelet sees.
    pub pci_address: String,
    /// Extended resource name, e.g. `intel.com/intel_sriov_netdevice`.
    pub resource_name: String,
    /// Driver the device is bound to (`vfio-pci`, ...).
    pub driver: String,
    /// The ENI.
    pub eni_id: String,
    /// The ENI's MAC address.
    pub mac_address: String,
    /// The ENI's device index.
    pub device_index: i32,
    /// The node daemon is giving the device back to its kernel driver (its ENI no longer
    /// wants DPDK, or is gone): advertised Unhealthy at once, so the kubelet allocates it
    /// to no new pod while a pod that still holds it finishes.
    pub releasing: bool,
    /// What else the node daemon knows about the ENI (from its NodeENI): not used by the
    /// device plugin; the DRA driver publishes it as device attributes and claim network
    /// data, so both read one inventory.
    pub details: EniDetails,
}

/// Facts about a device's ENI beyond what the device plugin needs, from the NodeENI that
/// attached it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EniDetails {
    /// Name of the NodeENI the ENI belongs to.
    pub node_eni: String,
    /// Subnet of the ENI.
    pub subnet_id: Option<String>,
    /// VPC of the ENI, when known.
    pub vpc_id: Option<String>,
    /// MTU the node daemon applies to the ENI.
    pub mtu: Option<u32>,
    /// The ENI's IP addresses in CIDR form (`10.0.1.5/24`).
    pub ips: Vec<String>,
}

/// Runs the device plugin until `shutdown` is cancelled, reading devices from sysfs and
/// `/dev` under the roots in `config`.
///
/// One endpoint is started per resource name seen in `devices`; it stays up (with an
/// empty list when its devices are gone, so the node's capacity drops to 0 at once)
/// until shutdown. If the sender of `devices` is dropped, the last set is kept.
///
/// # Errors
/// Only setup errors (directories, inotify); runtime problems are logged and retried.
pub async fn run(
    config: Config,
    devices: watch::Receiver<Vec<BoundDevice>>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let probe = Arc::new(SysfsProbe::new(&config.sysfs_root, &config.dev_root));
    run_with_probe(config, probe, devices, shutdown).await
}

/// [`run`] with an injected [`DeviceProbe`].
///
/// # Errors
/// As [`run`].
pub async fn run_with_probe(
    config: Config,
    probe: Arc<dyn DeviceProbe>,
    mut devices: watch::Receiver<Vec<BoundDevice>>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let config = Arc::new(config);
    let mut dirs = vec![config.device_plugin_dir.clone()];
    if config.registration == RegistrationMode::PluginsRegistry {
        dirs.push(config.plugins_registry_dir.clone());
    }
    // Open inotify now, so setup errors are reported to the caller.
    let first = open_inotify(&dirs)?;
    let (events_tx, events_rx) = watch::channel(0u64);
    let watcher = tokio::spawn(watch_dirs(dirs, first, events_tx, shutdown.clone()));
    tracing::info!(
        dir = %config.device_plugin_dir.display(),
        mode = %config.registration,
        "device plugin started"
    );

    let mut endpoints: BTreeMap<String, (watch::Sender<Arc<Snapshot>>, JoinHandle<()>)> =
        BTreeMap::new();
    let mut health = tokio::time::interval(config.health_interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut devices_open = true;
    let mut set_changed = true;
    loop {
        let current = devices.borrow_and_update().clone();
        let netdev = config.netdev_resource.clone();
        let probe2 = probe.clone();
        let computed = tokio::task::spawn_blocking(move || {
            let (groups, dropped) = snapshot::group_by_resource(&current, netdev.as_deref());
            let snaps: BTreeMap<String, Snapshot> = groups
                .into_iter()
                .map(|(r, devs)| (r.to_owned(), Snapshot::probe(devs, probe2.as_ref())))
                .collect();
            let dropped: Vec<String> = dropped
                .iter()
                .map(|d| format!("{} ({}, {})", d.pci_address, d.resource_name, d.driver))
                .collect();
            (snaps, dropped)
        })
        .await;
        match computed {
            Ok((mut snaps, dropped)) => {
                if set_changed && !dropped.is_empty() {
                    tracing::warn!(
                        ?dropped,
                        "devices not advertised (kernel driver without a matching netdev resource, or empty name)"
                    );
                }
                for (resource, (tx, _)) in &endpoints {
                    let snap = snaps.remove(resource).unwrap_or_default();
                    for id in publish(tx, resource, snap) {
                        remove_devinfo(&config.devinfo_dir, resource, &id);
                    }
                }
                for (resource, snap) in snaps {
                    let (tx, rx) = watch::channel(Arc::new(snap));
                    let ep = endpoint::Endpoint {
                        resource: resource.clone(),
                        config: config.clone(),
                        state: rx,
                        dir_events: events_rx.clone(),
                        cancel: shutdown.child_token(),
                    };
                    tracing::info!(%resource, "new resource, starting its plugin endpoint");
                    endpoints.insert(resource, (tx, tokio::spawn(ep.run())));
                }
            }
            Err(e) => tracing::error!(error = %e, "device probe task failed"),
        }
        set_changed = false;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = devices.changed(), if devices_open => {
                if r.is_err() {
                    tracing::info!("device set publisher gone, keeping the last set");
                    devices_open = false;
                }
                set_changed = true;
            }
            _ = health.tick() => {}
        }
    }
    for (resource, (_, task)) in endpoints {
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            tracing::warn!(%resource, "endpoint did not stop in time");
        }
    }
    let _ = watcher.await;
    Ok(())
}

/// Removes the Multus device-info file of a device that is no longer advertised.
fn remove_devinfo(dir: &std::path::Path, resource: &str, id: &str) {
    let path = dir.join(alloc::devinfo_file_name(resource, id));
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed device-info file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not remove device-info file")
        }
    }
}

/// Replaces the resource's snapshot if it changed (which wakes every ListAndWatch).
/// Returns the IDs that were removed.
fn publish(tx: &watch::Sender<Arc<Snapshot>>, resource: &str, snap: Snapshot) -> Vec<String> {
    let mut removed = Vec::new();
    tx.send_if_modified(|old| {
        if **old == snap {
            return false;
        }
        for (id, e) in &snap.devices {
            let before = old.devices.get(id).map(|o| &o.health);
            if before != Some(&e.health) {
                tracing::info!(%resource, device = %id, health = ?e.health, "device health");
            }
        }
        for id in old
            .devices
            .keys()
            .filter(|id| !snap.devices.contains_key(*id))
        {
            tracing::info!(%resource, device = %id, "device removed");
            removed.push(id.clone());
        }
        *old = Arc::new(snap);
        true
    });
    removed
}

type DirEvents = inotify::EventStream<[u8; 4096]>;

fn open_inotify(dirs: &[PathBuf]) -> Result<DirEvents, Error> {
    let ino = Inotify::init().map_err(Error::Inotify)?;
    for d in dirs {
        std::fs::create_dir_all(d).map_err(|e| Error::io("create directory", d, e))?;
        ino.watches()
            .add(
                d,
                WatchMask::CREATE
                    | WatchMask::DELETE
                    | WatchMask::MOVED_FROM
                    | WatchMask::MOVED_TO
                    | WatchMask::DELETE_SELF
                    | WatchMask::MOVE_SELF,
            )
            .map_err(|e| Error::io("inotify watch", d, e))?;
    }
    ino.into_event_stream([0u8; 4096]).map_err(Error::Inotify)
}

/// Bumps `tx` on every change in the socket directories; re-arms itself when a
/// directory is removed or recreated.
async fn watch_dirs(
    dirs: Vec<PathBuf>,
    first: DirEvents,
    tx: watch::Sender<u64>,
    cancel: CancellationToken,
) {
    let mut stream = Some(first);
    loop {
        if let Some(mut s) = stream.take() {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    ev = s.next() => match ev {
                        Some(Ok(ev)) => {
                            tx.send_modify(|n| *n = n.wrapping_add(1));
                            if ev.mask.intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
                                tracing::info!("socket directory removed or moved, watching again");
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "inotify read failed");
                            break;
                        }
                        None => break,
                    }
                }
            }
        }
        tx.send_modify(|n| *n = n.wrapping_add(1));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        match open_inotify(&dirs) {
            Ok(s) => stream = Some(s),
            Err(e) => tracing::warn!(error = %e, "inotify setup failed, retrying"),
        }
    }
}
