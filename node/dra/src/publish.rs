//! Keeps this node's ResourceSlice equal to the device inventory: on every inventory
//! change, every health re-check that changes what is published, and every change to the
//! driver's slices on this node (the kubelet deletes a node's slices when it starts).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use eni_deviceplugin::snapshot::{DeviceEntry, Snapshot};
use eni_deviceplugin::{BoundDevice, CancellationToken, DeviceProbe};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{Device, ResourceSlice};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::Error;
use crate::slice::{self, NodeOwner};

/// Settings of the slice publisher.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// DRA driver name (a DNS subdomain), e.g. `eni.networking.k8s.aws`.
    pub driver: String,
    /// This node's name.
    pub node: String,
    /// Where sysfs is mounted (for `resource.kubernetes.io/pcieRoot`).
    pub sysfs_root: PathBuf,
    /// Period of the health re-check (a write happens only when the published set
    /// changes).
    pub health_interval: Duration,
    /// Delay before retrying a failed write.
    pub retry: Duration,
}

impl PublisherConfig {
    /// Production timings for `driver` on `node`.
    pub fn new(driver: impl Into<String>, node: impl Into<String>) -> Self {
        Self {
            driver: driver.into(),
            node: node.into(),
            sysfs_root: PathBuf::from("/sys"),
            health_interval: Duration::from_secs(1),
            retry: Duration::from_secs(2),
        }
    }
}

/// The PCIe root complex of a device, from its sysfs path
/// (`devices/pci0000:00/0000:00:07.0`); `None` when sysfs does not say (a fake tree).
pub fn pcie_root(sysfs_root: &Path, pci_address: &str) -> Option<String> {
    if pci_address.contains('/') || pci_address.starts_with('.') {
        return None;
    }
    let target = std::fs::read_link(sysfs_root.join("bus/pci/devices").join(pci_address)).ok()?;
    target
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .find(|c| c.starts_with("pci") && c.contains(':'))
        .map(str::to_owned)
}

/// The inventory entries (with health) for `devices`, probed now.
pub fn entries(devices: &[BoundDevice], probe: &dyn DeviceProbe) -> Vec<DeviceEntry> {
    Snapshot::probe(devices, probe)
        .devices
        .into_values()
        .collect()
}

/// Writes this node's slice for one driver.
#[derive(Clone, Debug)]
pub struct SlicePublisher {
    api: Api<ResourceSlice>,
    nodes: Api<Node>,
    driver: String,
    node: String,
}

impl SlicePublisher {
    /// A publisher for `driver` on `node`.
    pub fn new(client: Client, driver: &str, node: &str) -> Self {
        Self {
            api: Api::all(client.clone()),
            nodes: Api::all(client),
            driver: driver.to_owned(),
            node: node.to_owned(),
        }
    }

    fn selector(&self) -> String {
        format!("spec.nodeName={},spec.driver={}", self.node, self.driver)
    }

    /// The driver's slices on this node.
    ///
    /// # Errors
    /// API errors.
    pub async fn list(&self) -> Result<Vec<ResourceSlice>, Error> {
        let lp = ListParams::default().fields(&self.selector());
        Ok(self
            .api
            .list(&lp)
            .await
            .map_err(|e| Error::kube("list ResourceSlices", e))?
            .items)
    }

    /// The Node as the slice's owner; `None` (and a warning) when it cannot be read.
    pub async fn owner(&self) -> Option<NodeOwner> {
        match self.nodes.get_opt(&self.node).await {
            Ok(Some(n)) => Some(NodeOwner {
                name: self.node.clone(),
                uid: n.metadata.uid?,
            }),
            Ok(None) => {
                warn!(
                    node = self.node,
                    "Node not found; slices published without an owner"
                );
                None
            }
            Err(e) => {
                warn!(node = self.node, error = %e, "cannot read the Node; slices published without an owner");
                None
            }
        }
    }

    /// Makes the API server hold exactly one slice of this driver on this node, with
    /// `devices`. Returns whether anything was written.
    ///
    /// # Errors
    /// API errors (a conflict included: the caller retries with a fresh list).
    pub async fn sync(&self, owner: Option<&NodeOwner>, devices: &[Device]) -> Result<bool, Error> {
        let existing = self.list().await?;
        let plan = slice::plan(&existing, &self.driver, &self.node, owner, devices);
        if plan.is_empty() {
            return Ok(false);
        }
        let pp = PostParams::default();
        if let Some(s) = &plan.create {
            self.api
                .create(&pp, s)
                .await
                .map_err(|e| Error::kube("create the ResourceSlice", e))?;
            info!(
                generation = s.spec.pool.generation,
                devices = devices.len(),
                "ResourceSlice created"
            );
        }
        if let Some(s) = &plan.replace {
            let name = s.metadata.name.clone().unwrap_or_default();
            self.api
                .replace(&name, &pp, s)
                .await
                .map_err(|e| Error::kube("update the ResourceSlice", e))?;
            info!(
                generation = s.spec.pool.generation,
                devices = devices.len(),
                "ResourceSlice updated"
            );
        }
        for name in &plan.delete {
            self.delete(name).await?;
        }
        Ok(true)
    }

    async fn delete(&self, name: &str) -> Result<(), Error> {
        match self.api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                info!(slice = name, "ResourceSlice deleted");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Error::kube("delete a ResourceSlice", e)),
        }
    }

    /// Deletes every slice of the driver on this node.
    ///
    /// # Errors
    /// API errors.
    pub async fn remove_all(&self) -> Result<(), Error> {
        for s in self.list().await? {
            if let Some(name) = s.metadata.name.as_deref() {
                self.delete(name).await?;
            }
        }
        Ok(())
    }
}

/// Publishes `devices` (the inventory entries the DRA driver serves) as this node's
/// ResourceSlice until `shutdown`, then deletes the node's slices of the driver (the
/// devices are gone with the driver: an uninstalled daemon leaves no slices behind).
///
/// # Errors
/// None at run time (API errors are logged and retried); the result is for the
/// final clean-up.
pub async fn run(
    config: PublisherConfig,
    client: Client,
    probe: Arc<dyn DeviceProbe>,
    mut devices: watch::Receiver<Vec<BoundDevice>>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let publisher = SlicePublisher::new(client.clone(), &config.driver, &config.node);
    let (changed_tx, mut changed) = watch::channel(0u64);
    let watch_task = tokio::spawn({
        let api: Api<ResourceSlice> = Api::all(client);
        let wc = watcher::Config::default().fields(&publisher.selector());
        async move {
            let mut events = std::pin::pin!(watcher(api, wc));
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(_) => changed_tx.send_modify(|n| *n = n.wrapping_add(1)),
                    Err(e) => {
                        warn!(error = %e, "ResourceSlice watch error (retrying)");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    });
    info!(
        driver = config.driver,
        node = config.node,
        "publishing ResourceSlices"
    );
    let mut owner = None;
    let mut published: Option<Vec<Device>> = None;
    let mut health = tokio::time::interval(config.health_interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut devices_open = true;
    let mut slices_open = true;
    let mut failed = false;
    let mut slices_changed = true;
    loop {
        let current = devices.borrow_and_update().clone();
        let (probe2, sysfs) = (probe.clone(), config.sysfs_root.clone());
        let want = tokio::task::spawn_blocking(move || {
            let es = entries(&current, probe2.as_ref());
            slice::devices(&es, |pci| pcie_root(&sysfs, pci))
        })
        .await
        .unwrap_or_default();
        if failed || slices_changed || published.as_ref() != Some(&want) {
            if owner.is_none() {
                owner = publisher.owner().await;
            }
            match publisher.sync(owner.as_ref(), &want).await {
                Ok(wrote) => {
                    if wrote {
                        debug!(devices = want.len(), "slice written");
                    }
                    published = Some(want);
                    failed = false;
                }
                Err(e) => {
                    warn!(error = %e, "cannot publish the ResourceSlice; retrying");
                    failed = true;
                }
            }
        }
        slices_changed = false;
        let retry = tokio::time::sleep(if failed {
            config.retry
        } else {
            Duration::from_secs(3600)
        });
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = devices.changed(), if devices_open => if r.is_err() { devices_open = false; },
            r = changed.changed(), if slices_open => match r {
                Ok(()) => slices_changed = true,
                Err(_) => slices_open = false,
            },
            _ = health.tick() => {}
            _ = retry => {}
        }
    }
    watch_task.abort();
    info!("removing this node's ResourceSlices");
    publisher.remove_all().await
}
