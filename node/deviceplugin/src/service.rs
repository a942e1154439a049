//! gRPC services: the device plugin itself and, in plugins-registry mode, the plugin
//! watcher's registration service.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use eni_proto::deviceplugin::v1beta1 as api;
use eni_proto::pluginregistration::v1 as reg;
use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::alloc;
use crate::snapshot::Snapshot;

/// The `DevicePlugin` service of one resource.
#[derive(Clone, Debug)]
pub struct PluginService {
    resource: Arc<str>,
    state: watch::Receiver<Arc<Snapshot>>,
    devinfo_dir: Arc<PathBuf>,
    stop: CancellationToken,
    allocations: crate::Allocations,
}

impl PluginService {
    /// Serves `resource` from `state`; `ListAndWatch` streams end when `stop` fires.
    pub fn new(
        resource: &str,
        state: watch::Receiver<Arc<Snapshot>>,
        devinfo_dir: PathBuf,
        stop: CancellationToken,
        allocations: crate::Allocations,
    ) -> Self {
        Self {
            resource: resource.into(),
            state,
            devinfo_dir: Arc::new(devinfo_dir),
            stop,
            allocations,
        }
    }

    /// The plugin's options (preferred allocation on, no pre-start hook).
    pub fn options() -> api::DevicePluginOptions {
        api::DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: true,
        }
    }
}

/// Writes the Multus device-info files atomically (temp file + rename), skipping files
/// that already hold the right content. Blocking: run it off the async threads.
fn write_devinfo(dir: &Path, resource: &str, pcis: &[String]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    for pci in pcis {
        let name = alloc::devinfo_file_name(resource, pci);
        let path = dir.join(&name);
        let content = alloc::devinfo_json(pci);
        if std::fs::read(&path).is_ok_and(|c| c == content.as_bytes()) {
            continue;
        }
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, &content)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("write Multus device-info {}: {e}", path.display()))?;
    }
    Ok(())
}

type ListStream = Pin<Box<dyn Stream<Item = Result<api::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl api::device_plugin_server::DevicePlugin for PluginService {
    async fn get_device_plugin_options(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<api::DevicePluginOptions>, Status> {
        Ok(Response::new(Self::options()))
    }

    type ListAndWatchStream = ListStream;

    async fn list_and_watch(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let resource = self.resource.clone();
        tracing::info!(%resource, "kubelet opened ListAndWatch");
        // WatchStream yields the current value first, then every change: each message is
        // the full list.
        let stream = WatchStream::new(self.state.clone())
            .map(move |s| {
                let resp = s.list_response();
                tracing::debug!(%resource, devices = resp.devices.len(), "ListAndWatch update");
                Ok(resp)
            })
            .take_until(self.stop.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<api::PreferredAllocationRequest>,
    ) -> Result<Response<api::PreferredAllocationResponse>, Status> {
        let snapshot = self.state.borrow().clone();
        let numa_of = |id: &str| snapshot.devices.get(id).and_then(|e| e.facts.numa_node);
        let container_responses = request
            .into_inner()
            .container_requests
            .iter()
            .map(|c| {
                let size = usize::try_from(c.allocation_size).unwrap_or(0);
                api::ContainerPreferredAllocationResponse {
                    device_i_ds: alloc::preferred_allocation(
                        &c.available_device_i_ds,
                        &c.must_include_device_i_ds,
                        size,
                        numa_of,
                    ),
                }
            })
            .collect();
        Ok(Response::new(api::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<api::AllocateRequest>,
    ) -> Result<Response<api::AllocateResponse>, Status> {
        let snapshot = self.state.borrow().clone();
        let mut container_responses = Vec::new();
        for c in &request.get_ref().container_requests {
            let entries =
                alloc::resolve(&snapshot, &self.resource, &c.devices_ids).map_err(|e| {
                    tracing::warn!(resource = %self.resource, error = %e, "Allocate refused");
                    Status::from(e)
                })?;
            let pcis: Vec<String> = entries
                .iter()
                .map(|e| e.device.pci_address.clone())
                .collect();
            let (dir, resource) = (self.devinfo_dir.clone(), self.resource.clone());
            tokio::task::spawn_blocking(move || write_devinfo(&dir, &resource, &pcis))
                .await
                .map_err(|e| Status::internal(format!("device-info task: {e}")))?
                .map_err(Status::internal)?;
            tracing::info!(resource = %self.resource, devices = ?c.devices_ids, "allocated");
            self.allocations.record(&self.resource, entries.len());
            container_responses.push(alloc::container_response(&self.resource, &entries));
        }
        Ok(Response::new(api::AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _: Request<api::PreStartContainerRequest>,
    ) -> Result<Response<api::PreStartContainerResponse>, Status> {
        Ok(Response::new(api::PreStartContainerResponse {}))
    }
}

/// `pluginregistration.Registration` for the plugin watcher (plugins-registry mode).
#[derive(Clone, Debug)]
pub struct RegistryService {
    resource: Arc<str>,
    endpoint: Arc<str>,
    status: watch::Sender<Option<Result<(), String>>>,
}

impl RegistryService {
    /// Answers `GetInfo` for `resource` served at the absolute socket path `endpoint`;
    /// registration results are published on `status`.
    pub fn new(
        resource: &str,
        endpoint: &Path,
        status: watch::Sender<Option<Result<(), String>>>,
    ) -> Self {
        Self {
            resource: resource.into(),
            endpoint: endpoint.to_string_lossy().into(),
            status,
        }
    }
}

#[tonic::async_trait]
impl reg::registration_server::Registration for RegistryService {
    async fn get_info(
        &self,
        _: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        Ok(Response::new(reg::PluginInfo {
            r#type: reg::DEVICE_PLUGIN.to_owned(),
            name: self.resource.to_string(),
            endpoint: self.endpoint.to_string(),
            supported_versions: vec![api::VERSION.to_owned()],
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let r = request.into_inner();
        if r.plugin_registered {
            tracing::info!(resource = %self.resource, "registered through plugins_registry");
            self.status.send_replace(Some(Ok(())));
        } else {
            tracing::warn!(resource = %self.resource, error = %r.error, "kubelet refused registration");
            self.status.send_replace(Some(Err(r.error)));
        }
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}
