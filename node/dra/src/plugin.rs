//! The kubelet DRA plugin: gRPC `v1.DRAPlugin` (and `v1beta1.DRAPlugin`, for kubelets
//! before 1.34) on `<kubelet>/plugins/<driver>/dra.sock`, registered through the
//! kubelet's plugin watcher (`<driver>-reg.sock` in `plugins_registry`, type `DRAPlugin`).
//!
//! NodePrepareResources reads each claim, refuses devices that are not this node's (or
//! are unhealthy), writes one CDI spec file per claim and the Multus device-info files,
//! records the claim in the checkpoint, writes the claim's `status.devices` network data,
//! and returns the CDI device IDs. A claim already in the checkpoint is answered from it
//! (idempotent across daemon restarts). NodeUnprepareResources undoes all of that; an
//! unknown claim is already unprepared.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use eni_deviceplugin::snapshot::{DeviceEntry, Snapshot};
use eni_deviceplugin::{BoundDevice, CancellationToken, DeviceProbe, alloc};
use eni_proto::dra::v1 as api;
use eni_proto::dra::v1beta1 as api_beta;
use eni_proto::pluginregistration::v1 as reg;
use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, ResourceClaim};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::net::UnixListener;
use tokio::sync::{Mutex, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::checkpoint::{self, Checkpoint, PreparedClaim, PreparedDevice};
use crate::{Error, cdi, prepare, slice};

/// Settings of the kubelet plugin.
#[derive(Clone, Debug)]
pub struct PluginConfig {
    /// DRA driver name.
    pub driver: String,
    /// This node's name (the pool of its devices).
    pub node: String,
    /// The kubelet's plugin directory (`/var/lib/kubelet/plugins`); the driver serves
    /// `<dir>/<driver>/dra.sock` and keeps its checkpoint there.
    pub plugins_dir: PathBuf,
    /// The kubelet's plugin-watcher directory (`/var/lib/kubelet/plugins_registry`).
    pub registry_dir: PathBuf,
    /// Where CDI spec files go (`/var/run/cdi`).
    pub cdi_dir: PathBuf,
    /// Multus device-info directory (`/var/run/k8s.cni.cncf.io/devinfo/dp`).
    pub devinfo_dir: PathBuf,
    /// Period of the check that both sockets still exist (they are served again when
    /// someone removed them).
    pub socket_check_interval: Duration,
    /// The gRPC services advertised to the kubelet (`PluginInfo.supported_versions`),
    /// preferred first: the kubelet uses the first it knows. Both are always served.
    pub services: Vec<String>,
}

impl PluginConfig {
    /// Production paths for `driver` on `node`.
    pub fn new(driver: impl Into<String>, node: impl Into<String>) -> Self {
        Self {
            driver: driver.into(),
            node: node.into(),
            plugins_dir: PathBuf::from(eni_proto::dra::v1::PLUGINS_PATH),
            registry_dir: PathBuf::from(reg::PLUGINS_REGISTRY_PATH),
            cdi_dir: PathBuf::from(cdi::DEFAULT_CDI_DIR),
            devinfo_dir: PathBuf::from("/var/run/k8s.cni.cncf.io/devinfo/dp"),
            socket_check_interval: Duration::from_secs(1),
            services: vec![api::SERVICE.to_owned(), api_beta::SERVICE.to_owned()],
        }
    }

    /// `<plugins_dir>/<driver>`.
    pub fn driver_dir(&self) -> PathBuf {
        self.plugins_dir.join(&self.driver)
    }

    /// The DRA service socket.
    pub fn dra_socket(&self) -> PathBuf {
        self.driver_dir().join("dra.sock")
    }

    /// The registration socket the kubelet's plugin watcher finds.
    pub fn registration_socket(&self) -> PathBuf {
        self.registry_dir.join(format!("{}-reg.sock", self.driver))
    }

    /// The checkpoint file.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.driver_dir().join(checkpoint::FILE_NAME)
    }
}

/// Reads claims and writes their device status: the API server in production.
#[tonic::async_trait]
pub trait Claims: Send + Sync + std::fmt::Debug + 'static {
    /// The claim, `None` when it does not exist.
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<ResourceClaim>, Error>;
    /// Makes `devices` the driver's entries in the claim's `status.devices`.
    async fn set_device_status(
        &self,
        namespace: &str,
        name: &str,
        devices: Vec<AllocatedDeviceStatus>,
    ) -> Result<(), Error>;
}

/// [`Claims`] through the API server; status written with server-side apply under the
/// driver's name as field manager (so only the driver's own entries change).
#[derive(Clone)]
pub struct KubeClaims {
    client: Client,
    field_manager: String,
}

impl std::fmt::Debug for KubeClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClaims")
            .field("field_manager", &self.field_manager)
            .finish_non_exhaustive()
    }
}

impl KubeClaims {
    /// Claims through `client`, status written as `driver`.
    pub fn new(client: Client, driver: &str) -> Self {
        Self {
            client,
            field_manager: driver.to_owned(),
        }
    }
}

#[tonic::async_trait]
impl Claims for KubeClaims {
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<ResourceClaim>, Error> {
        let api: Api<ResourceClaim> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map_err(|e| Error::kube("get the ResourceClaim", e))
    }

    async fn set_device_status(
        &self,
        namespace: &str,
        name: &str,
        devices: Vec<AllocatedDeviceStatus>,
    ) -> Result<(), Error> {
        let api: Api<ResourceClaim> = Api::namespaced(self.client.clone(), namespace);
        let body = serde_json::json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace},
            "status": {"devices": devices},
        });
        match api
            .patch_status(
                name,
                &PatchParams::apply(&self.field_manager).force(),
                &Patch::Apply(body),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Error::kube("write the ResourceClaim's status.devices", e)),
        }
    }
}

/// The driver's state behind the gRPC service.
#[derive(Debug)]
pub struct Driver {
    cfg: Arc<PluginConfig>,
    claims: Arc<dyn Claims>,
    probe: Arc<dyn DeviceProbe>,
    devices: watch::Receiver<Vec<BoundDevice>>,
    checkpoint: Mutex<Checkpoint>,
}

impl Driver {
    /// A driver serving the devices on `devices`, with the checkpoint left by a previous
    /// run.
    ///
    /// # Errors
    /// An unreadable checkpoint (never ignored: its claims still hold devices).
    pub fn new(
        cfg: PluginConfig,
        claims: Arc<dyn Claims>,
        probe: Arc<dyn DeviceProbe>,
        devices: watch::Receiver<Vec<BoundDevice>>,
    ) -> Result<Self, Error> {
        let checkpoint = checkpoint::load(&cfg.checkpoint_path())?;
        if !checkpoint.claims.is_empty() {
            info!(
                claims = checkpoint.claims.len(),
                "prepared claims from the checkpoint"
            );
        }
        Ok(Self {
            cfg: Arc::new(cfg),
            claims,
            probe,
            devices,
            checkpoint: Mutex::new(checkpoint),
        })
    }

    /// The driver's settings.
    pub fn config(&self) -> &PluginConfig {
        &self.cfg
    }

    /// UIDs of the prepared claims.
    pub async fn prepared(&self) -> Vec<String> {
        self.checkpoint
            .lock()
            .await
            .claims
            .keys()
            .cloned()
            .collect()
    }

    /// This node's devices by slice device name, probed now.
    fn inventory(&self) -> BTreeMap<String, DeviceEntry> {
        let devs = self.devices.borrow().clone();
        Snapshot::probe(&devs, self.probe.as_ref())
            .devices
            .into_values()
            .map(|e| {
                (
                    slice::device_name(&e.device.eni_id, &e.device.pci_address),
                    e,
                )
            })
            .collect()
    }

    fn devinfo(&self, d: &PreparedDevice) -> PathBuf {
        self.cfg
            .devinfo_dir
            .join(alloc::devinfo_file_name(&d.resource_name, &d.pci_address))
    }

    fn write_files(&self, uid: &str, c: &PreparedClaim) -> Result<(), String> {
        let name = cdi::spec_file_name(&self.cfg.driver, uid);
        cdi::write(&self.cfg.cdi_dir, &name, &c.cdi_spec).map_err(|e| {
            format!(
                "write CDI spec {}: {e}",
                self.cfg.cdi_dir.join(&name).display()
            )
        })?;
        for d in &c.devices {
            let path = self.devinfo(d);
            write_file(&path, alloc::devinfo_json(&d.pci_address).as_bytes())
                .map_err(|e| format!("write device-info {}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Prepares one claim; returns its devices for the kubelet.
    ///
    /// # Errors
    /// A message for the kubelet (the claim is not prepared).
    pub async fn prepare(&self, claim: &api::Claim) -> Result<Vec<api::Device>, String> {
        let mut cp = self.checkpoint.lock().await;
        if let Some(done) = cp.claims.get(&claim.uid) {
            // Idempotent: answered from the checkpoint; files written again in case they
            // went (a reboot empties /var/run).
            self.write_files(&claim.uid, done)?;
            return Ok(response_devices(done));
        }
        let rc = self
            .claims
            .get(&claim.namespace, &claim.name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("claim {}/{} not found", claim.namespace, claim.name))?;
        let inventory = self.inventory();
        let allocated = prepare::resolve(
            &rc,
            &claim.uid,
            &self.cfg.driver,
            &self.cfg.node,
            &inventory,
        )
        .map_err(|e| e.to_string())?;
        let entries: Vec<&DeviceEntry> = allocated.iter().map(|a| a.entry).collect();
        let prepared = PreparedClaim {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            devices: allocated
                .iter()
                .map(|a| PreparedDevice {
                    request_names: a.request_names.clone(),
                    pool: self.cfg.node.clone(),
                    device: a.device.clone(),
                    pci_address: a.entry.device.pci_address.clone(),
                    resource_name: a.entry.device.resource_name.clone(),
                    cdi_device_ids: vec![cdi::device_id(
                        &self.cfg.driver,
                        &a.entry.device.pci_address,
                    )],
                })
                .collect(),
            cdi_spec: cdi::spec(&self.cfg.driver, &entries),
        };
        self.write_files(&claim.uid, &prepared)?;
        cp.claims.insert(claim.uid.clone(), prepared.clone());
        if let Err(e) = checkpoint::save(&self.cfg.checkpoint_path(), &cp) {
            cp.claims.remove(&claim.uid);
            return Err(e.to_string());
        }
        let statuses = prepare::device_statuses(&self.cfg.driver, &self.cfg.node, &allocated);
        if let Err(e) = self
            .claims
            .set_device_status(&claim.namespace, &claim.name, statuses)
            .await
        {
            // The devices are usable without it; the status is information for users
            // and network tooling.
            warn!(claim = %format!("{}/{}", claim.namespace, claim.name), error = %e, "cannot write the claim's device status");
        }
        info!(claim = %format!("{}/{}", claim.namespace, claim.name), devices = ?prepared.devices.iter().map(|d| &d.device).collect::<Vec<_>>(), "claim prepared");
        Ok(response_devices(&prepared))
    }

    /// Unprepares one claim (nothing to do for one that is not prepared).
    ///
    /// # Errors
    /// A message for the kubelet (it retries).
    pub async fn unprepare(&self, claim: &api::Claim) -> Result<(), String> {
        let mut cp = self.checkpoint.lock().await;
        let Some(done) = cp.claims.get(&claim.uid).cloned() else {
            return Ok(());
        };
        cdi::remove(
            &self.cfg.cdi_dir,
            &cdi::spec_file_name(&self.cfg.driver, &claim.uid),
        )
        .map_err(|e| format!("remove the CDI spec: {e}"))?;
        for d in &done.devices {
            let path = self.devinfo(d);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("remove device-info {}: {e}", path.display()));
                }
                _ => {}
            }
        }
        if let Err(e) = self
            .claims
            .set_device_status(&done.namespace, &done.name, Vec::new())
            .await
        {
            warn!(claim = %format!("{}/{}", done.namespace, done.name), error = %e, "cannot clear the claim's device status");
        }
        cp.claims.remove(&claim.uid);
        checkpoint::save(&self.cfg.checkpoint_path(), &cp).map_err(|e| e.to_string())?;
        info!(claim = %format!("{}/{}", done.namespace, done.name), "claim unprepared");
        Ok(())
    }
}

fn write_file(path: &Path, body: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, body)
}

fn response_devices(c: &PreparedClaim) -> Vec<api::Device> {
    c.devices
        .iter()
        .map(|d| api::Device {
            request_names: d.request_names.clone(),
            pool_name: d.pool.clone(),
            device_name: d.device.clone(),
            cdi_device_ids: d.cdi_device_ids.clone(),
            share_id: None,
        })
        .collect()
}

/// The `DRAPlugin` gRPC service.
#[derive(Clone, Debug)]
pub struct DraService(pub Arc<Driver>);

#[tonic::async_trait]
impl api::dra_plugin_server::DraPlugin for DraService {
    async fn node_prepare_resources(
        &self,
        request: Request<api::NodePrepareResourcesRequest>,
    ) -> Result<Response<api::NodePrepareResourcesResponse>, Status> {
        let mut out = api::NodePrepareResourcesResponse::default();
        for c in request.into_inner().claims {
            let r = match self.0.prepare(&c).await {
                Ok(devices) => api::NodePrepareResourceResponse {
                    devices,
                    error: String::new(),
                },
                Err(error) => {
                    warn!(claim = %format!("{}/{}", c.namespace, c.name), %error, "prepare refused");
                    api::NodePrepareResourceResponse {
                        devices: Vec::new(),
                        error,
                    }
                }
            };
            out.claims.insert(c.uid, r);
        }
        Ok(Response::new(out))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<api::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<api::NodeUnprepareResourcesResponse>, Status> {
        let mut out = api::NodeUnprepareResourcesResponse::default();
        for c in request.into_inner().claims {
            let error = self.0.unprepare(&c).await.err().unwrap_or_default();
            out.claims
                .insert(c.uid, api::NodeUnprepareResourceResponse { error });
        }
        Ok(Response::new(out))
    }
}

/// `v1beta1` and `v1` messages have the same fields and numbers (`v1` adds
/// `Device.share_id`, which we never set), so one is the other re-read.
fn transcode<A: prost::Message, B: prost::Message + Default>(a: &A) -> Result<B, Status> {
    B::decode(a.encode_to_vec().as_slice())
        .map_err(|e| Status::internal(format!("DRA v1beta1 <-> v1 message: {e}")))
}

/// The `v1beta1.DRAPlugin` gRPC service: [`DraService`] for kubelets before 1.34.
#[derive(Clone, Debug)]
pub struct DraServiceV1beta1(pub DraService);

#[tonic::async_trait]
impl api_beta::dra_plugin_server::DraPlugin for DraServiceV1beta1 {
    async fn node_prepare_resources(
        &self,
        request: Request<api_beta::NodePrepareResourcesRequest>,
    ) -> Result<Response<api_beta::NodePrepareResourcesResponse>, Status> {
        let req: api::NodePrepareResourcesRequest = transcode(request.get_ref())?;
        let resp =
            api::dra_plugin_server::DraPlugin::node_prepare_resources(&self.0, Request::new(req))
                .await?;
        Ok(Response::new(transcode(resp.get_ref())?))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<api_beta::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<api_beta::NodeUnprepareResourcesResponse>, Status> {
        let req: api::NodeUnprepareResourcesRequest = transcode(request.get_ref())?;
        let resp =
            api::dra_plugin_server::DraPlugin::node_unprepare_resources(&self.0, Request::new(req))
                .await?;
        Ok(Response::new(transcode(resp.get_ref())?))
    }
}

/// The plugin-watcher `Registration` service of the driver.
#[derive(Clone, Debug)]
pub struct DraRegistration {
    driver: String,
    endpoint: String,
    services: Vec<String>,
}

#[tonic::async_trait]
impl reg::registration_server::Registration for DraRegistration {
    async fn get_info(
        &self,
        _: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        Ok(Response::new(reg::PluginInfo {
            r#type: reg::DRA_PLUGIN.to_owned(),
            name: self.driver.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: self.services.clone(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let r = request.into_inner();
        if r.plugin_registered {
            info!(
                driver = self.driver,
                "DRA driver registered with the kubelet"
            );
        } else {
            warn!(driver = self.driver, error = %r.error, "the kubelet refused the DRA driver's registration");
        }
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}

type FileId = (u64, u64, i64, i64);

fn file_id(path: &Path) -> Option<FileId> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

struct Serving {
    ids: [FileId; 2],
    stop: CancellationToken,
}

fn bind(path: &Path) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("remove stale socket", path, e));
        }
        _ => {}
    }
    UnixListener::bind(path).map_err(|e| Error::io("bind", path, e))
}

fn serve_once(driver: &Arc<Driver>, cancel: &CancellationToken) -> Result<Serving, Error> {
    let cfg = driver.config();
    let (dra_path, reg_path) = (cfg.dra_socket(), cfg.registration_socket());
    // The DRA socket first: the kubelet dials it as soon as it sees the registration.
    let dra = bind(&dra_path)?;
    let registration = bind(&reg_path)?;
    let stop = cancel.child_token();
    let ids = [
        file_id(&dra_path)
            .ok_or_else(|| Error::io("stat", &dra_path, std::io::ErrorKind::NotFound.into()))?,
        file_id(&reg_path)
            .ok_or_else(|| Error::io("stat", &reg_path, std::io::ErrorKind::NotFound.into()))?,
    ];
    let dra_router = Server::builder()
        .add_service(api::dra_plugin_server::DraPluginServer::new(DraService(
            driver.clone(),
        )))
        .add_service(api_beta::dra_plugin_server::DraPluginServer::new(
            DraServiceV1beta1(DraService(driver.clone())),
        ));
    let reg_router = Server::builder().add_service(
        reg::registration_server::RegistrationServer::new(DraRegistration {
            driver: cfg.driver.clone(),
            endpoint: dra_path.to_string_lossy().into_owned(),
            services: cfg.services.clone(),
        }),
    );
    // Both are dialled by grpc-go with the socket path as :authority: through the shim.
    for (listener, router, what) in [
        (dra, dra_router, "DRA"),
        (registration, reg_router, "registration"),
    ] {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(eni_deviceplugin::accept_with_authority_fix(
            listener,
            tx,
            stop.clone(),
        ));
        let shutdown = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown.cancelled_owned())
                .await
            {
                warn!(error = %e, "{what} gRPC server ended");
            }
        });
    }
    info!(dra = %dra_path.display(), registration = %reg_path.display(), "serving the kubelet DRA plugin");
    Ok(Serving { ids, stop })
}

/// Binds both sockets now (setup errors are returned here) and serves them in the
/// background like [`serve`]. Needs a Tokio runtime.
///
/// # Errors
/// Setup errors of the first bind.
pub fn start(
    driver: Arc<Driver>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<Result<(), Error>>, Error> {
    let serving = serve_once(&driver, &shutdown)?;
    Ok(tokio::spawn(keep_serving(driver, serving, shutdown)))
}

/// Serves the DRA plugin and its registration until `shutdown`, serving both sockets
/// again whenever one of them disappears (the kubelet's plugin watcher then registers
/// the driver again). On shutdown the sockets are removed, so the kubelet deregisters
/// the driver.
///
/// # Errors
/// Setup errors of the first bind.
pub async fn serve(driver: Arc<Driver>, shutdown: CancellationToken) -> Result<(), Error> {
    let serving = serve_once(&driver, &shutdown)?;
    keep_serving(driver, serving, shutdown).await
}

async fn keep_serving(
    driver: Arc<Driver>,
    mut serving: Serving,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let cfg = driver.config().clone();
    let paths = [cfg.dra_socket(), cfg.registration_socket()];
    let mut tick = tokio::time::interval(cfg.socket_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = [file_id(&paths[0]), file_id(&paths[1])];
        if now[0] == Some(serving.ids[0]) && now[1] == Some(serving.ids[1]) {
            continue;
        }
        info!("a DRA plugin socket was removed or replaced; serving again");
        serving.stop.cancel();
        match serve_once(&driver, &shutdown) {
            Ok(s) => serving = s,
            Err(e) => {
                warn!(error = %e, "cannot serve the DRA plugin again; retrying");
                serving.ids = [(0, 0, 0, 0); 2];
            }
        }
    }
    serving.stop.cancel();
    for (p, id) in paths.iter().zip(serving.ids) {
        if file_id(p) == Some(id) {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(())
}
