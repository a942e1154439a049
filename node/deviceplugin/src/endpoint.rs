//! One plugin endpoint (one resource): serve the socket, register with the kubelet, and
//! serve + register again whenever the kubelet restarts or the socket disappears.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use eni_proto::deviceplugin::v1beta1 as api;
use eni_proto::pluginregistration::v1 as reg;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Server, Uri};

use crate::config::{Config, RegistrationMode, socket_name};
use crate::error::Error;
use crate::service::{PluginService, RegistryService};
use crate::snapshot::Snapshot;

/// Opens a gRPC channel over the Unix socket at `path` (the authority is a placeholder).
pub async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    TonicEndpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

/// Identity of the file at `path` (device, inode, change time), if any: a socket that
/// was deleted and created again differs even when the inode number is reused.
type FileId = (u64, u64, i64, i64);

fn inode(path: &Path) -> Option<FileId> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Waits for the next directory event; never returns once the watcher is gone.
async fn next_event(rx: &mut watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

struct Serving {
    inode: FileId,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Everything one endpoint task needs.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) resource: String,
    pub(crate) config: Arc<Config>,
    pub(crate) state: watch::Receiver<Arc<Snapshot>>,
    pub(crate) dir_events: watch::Receiver<u64>,
    pub(crate) cancel: CancellationToken,
}

impl Endpoint {
    fn socket_path(&self) -> PathBuf {
        self.config.socket_dir().join(socket_name(&self.resource))
    }

    fn kubelet_socket(&self) -> PathBuf {
        self.config.device_plugin_dir.join(api::KUBELET_SOCKET)
    }

    /// Binds the socket (replacing a stale file) and starts serving on it.
    fn serve(&self) -> Result<Serving, Error> {
        let path = self.socket_path();
        let len = path.as_os_str().len();
        if len > crate::config::MAX_SOCKET_PATH {
            return Err(Error::io(
                "bind",
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "the socket path is {len} bytes, longer than a Unix socket path may be \
                         ({}); use a shorter socket directory",
                        crate::config::MAX_SOCKET_PATH
                    ),
                ),
            ));
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove stale socket", path, e)),
        }
        let listener = UnixListener::bind(&path).map_err(|e| Error::io("bind", &path, e))?;
        let inode = inode(&path).ok_or_else(|| {
            Error::io(
                "stat",
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "socket vanished after bind"),
            )
        })?;
        let stop = self.cancel.child_token();
        let plugin = PluginService::new(
            &self.resource,
            self.state.clone(),
            self.config.devinfo_dir.clone(),
            stop.clone(),
            self.config.allocations.clone(),
        );
        let registry = (self.config.registration == RegistrationMode::PluginsRegistry).then(|| {
            let (status, _) = watch::channel(None);
            reg::registration_server::RegistrationServer::new(RegistryService::new(
                &self.resource,
                &path,
                status,
            ))
        });
        let registry_mode = registry.is_some();
        let router = Server::builder()
            .add_service(api::device_plugin_server::DevicePluginServer::new(plugin))
            .add_optional_service(registry);
        let resource = self.resource.clone();
        let shutdown = stop.clone();
        let task = if registry_mode {
            // The kubelet's plugin watcher sends the socket path as :authority, which
            // h2 refuses: connections go through the authority shim.
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            tokio::spawn(accept_with_authority_fix(listener, tx, stop.clone()));
            tokio::spawn(async move {
                if let Err(e) = router
                    .serve_with_incoming_shutdown(
                        ReceiverStream::new(rx),
                        shutdown.cancelled_owned(),
                    )
                    .await
                {
                    tracing::warn!(%resource, error = %e, "plugin gRPC server ended");
                }
            })
        } else {
            tokio::spawn(async move {
                if let Err(e) = router
                    .serve_with_incoming_shutdown(
                        UnixListenerStream::new(listener),
                        shutdown.cancelled_owned(),
                    )
                    .await
                {
                    tracing::warn!(%resource, error = %e, "plugin gRPC server ended");
                }
            })
        };
        tracing::info!(resource = %self.resource, socket = %path.display(), "serving device plugin");
        Ok(Serving { inode, stop, task })
    }

    fn stop_serving(&self, serving: Serving, remove: bool) {
        serving.stop.cancel();
        let path = self.socket_path();
        if remove
            && inode(&path) == Some(serving.inode)
            && let Err(e) = std::fs::remove_file(&path)
        {
            tracing::warn!(socket = %path.display(), error = %e, "could not remove socket");
        }
        // The server drains on its own; do not wait for it.
        drop(serving.task);
    }

    /// Runs until cancelled.
    pub(crate) async fn run(mut self) {
        let path = self.socket_path();
        let kubelet = self.kubelet_socket();
        let mut serving: Option<Serving> = None;
        // Identity of the kubelet.sock we registered with: a new one means a new kubelet.
        let mut registered_with: Option<FileId> = None;
        // After a failed Register (e.g. kubelet.sock bound but not listening yet), retry soon
        // (20 ms, doubling up to the check period)
        // instead of waiting for the next directory event.
        let mut retry: Option<std::time::Duration> = None;
        let mut ticker = tokio::time::interval(self.config.socket_check_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            // 1. Our socket must exist and be the one we bound.
            let ours = serving.as_ref().map(|s| s.inode);
            if ours.is_none() || inode(&path) != ours {
                if let Some(old) = serving.take() {
                    tracing::info!(resource = %self.resource, "plugin socket gone, serving again");
                    self.stop_serving(old, false);
                }
                match self.serve() {
                    Ok(s) => {
                        serving = Some(s);
                        registered_with = None;
                    }
                    Err(e) => tracing::warn!(resource = %self.resource, error = %e, "cannot serve"),
                }
            }
            // 2. Device-plugin mode: register with the current kubelet.sock.
            if self.config.registration == RegistrationMode::DevicePlugin
                && let (Some(s), Some(k)) = (serving.as_ref().map(|s| s.inode), inode(&kubelet))
                && registered_with != Some(k)
            {
                let started = tokio::time::Instant::now();
                let register = register(
                    kubelet.clone(),
                    self.resource.clone(),
                    socket_name(&self.resource),
                    self.config.register_timeout,
                );
                tokio::pin!(register);
                // Abort the call when our socket disappears meanwhile: the kubelet
                // would keep dialing a path that no longer serves.
                let outcome = loop {
                    tokio::select! {
                        r = &mut register => break Some(r),
                        _ = self.cancel.cancelled() => break None,
                        _ = next_event(&mut self.dir_events) => {
                            if inode(&path) != Some(s) { break None; }
                        }
                    }
                };
                match outcome {
                    Some(Ok(())) => {
                        registered_with = Some(k);
                        retry = None;
                        tracing::info!(
                            resource = %self.resource,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "registered with the kubelet"
                        );
                    }
                    Some(Err(e)) => {
                        let next = retry
                            .map_or(std::time::Duration::from_millis(20), |d| d * 2)
                            .min(self.config.socket_check_interval);
                        retry = Some(next);
                        if next >= std::time::Duration::from_millis(160) {
                            tracing::warn!(resource = %self.resource, error = %e, retry_in = ?next, "registration failed");
                        } else {
                            tracing::debug!(resource = %self.resource, error = %e, retry_in = ?next, "registration failed");
                        }
                    }
                    None => continue,
                }
            }
            let retry_sleep = async {
                match retry {
                    Some(d) if registered_with.is_none() => tokio::time::sleep(d).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = next_event(&mut self.dir_events) => {}
                _ = ticker.tick() => {}
                _ = retry_sleep => {}
            }
        }
        if let Some(s) = serving.take() {
            self.stop_serving(s, true);
        }
        tracing::info!(resource = %self.resource, "plugin endpoint stopped");
    }
}

/// Accepts Unix connections and hands tonic in-memory pipes whose client-to-server half
/// goes through [`crate::authority::pump`] (for any socket grpc-go clients of the kubelet
/// dial by path: plugin watcher registration, DRA plugins).
pub async fn accept_with_authority_fix(
    listener: UnixListener,
    tx: tokio::sync::mpsc::Sender<std::io::Result<DuplexStream>>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((unix, _)) => {
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                let (unix_read, mut unix_write) = unix.into_split();
                let (mut our_read, our_write) = tokio::io::split(ours);
                tokio::spawn(async move {
                    if let Err(e) = crate::authority::pump(unix_read, our_write).await {
                        tracing::debug!(error = %e, "client connection ended");
                    }
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut our_read, &mut unix_write).await;
                    let _ = unix_write.shutdown().await;
                });
                if tx.send(Ok(theirs)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

/// Calls `Registration.Register` on the kubelet socket.
async fn register(
    kubelet: PathBuf,
    resource: String,
    endpoint: String,
    timeout: std::time::Duration,
) -> Result<(), Error> {
    let call = async {
        let channel = connect_unix(&kubelet)
            .await
            .map_err(|source| Error::Connect {
                path: kubelet.clone(),
                source,
            })?;
        let mut client = api::registration_client::RegistrationClient::new(channel);
        client
            .register(api::RegisterRequest {
                version: api::VERSION.to_owned(),
                endpoint,
                resource_name: resource.clone(),
                options: Some(PluginService::options()),
            })
            .await
            .map_err(|status| Error::Register {
                resource: resource.clone(),
                status: Box::new(status),
            })?;
        Ok(())
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| Error::Timeout("Register"))?
}
