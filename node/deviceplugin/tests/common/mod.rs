//! Test support shared by the flow tests, the kubelet-harness tests and the benchmark:
//! a fake sysfs + /dev tree, a fake kubelet written in Rust, and small waiting helpers.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use eni_deviceplugin::{BoundDevice, Config, RegistrationMode};
use eni_proto::deviceplugin::v1beta1 as api;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

/// Logs of the plugin on the test's output (`RUST_LOG` overrides the default filter).
pub fn init_tracing() {
    init_tracing_with("eni_deviceplugin=info");
}

pub fn init_tracing_with(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

pub const RES: &str = "intel.com/intel_sriov_netdevice";

/// Temp tree: `sys/`, `dev/`, `device-plugins/`, `plugins_registry/`, `devinfo/`.
pub struct Host {
    pub tmp: tempfile::TempDir,
}

impl Host {
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new().prefix("dp").tempdir().unwrap();
        for d in [
            "sys/bus/pci/devices",
            "dev/vfio",
            "device-plugins",
            "plugins_registry",
        ] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        std::fs::write(tmp.path().join("dev/vfio/vfio"), "").unwrap();
        Self { tmp }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    pub fn config(&self) -> Config {
        Config {
            device_plugin_dir: self.path("device-plugins"),
            registration: RegistrationMode::DevicePlugin,
            plugins_registry_dir: self.path("plugins_registry"),
            sysfs_root: self.path("sys"),
            dev_root: self.path("dev"),
            devinfo_dir: self.path("devinfo"),
            netdev_resource: None,
            health_interval: Duration::from_millis(100),
            socket_check_interval: Duration::from_millis(500),
            register_timeout: Duration::from_secs(5),
            allocations: eni_deviceplugin::Allocations::default(),
        }
    }

    fn dev_dir(&self, pci: &str) -> PathBuf {
        self.path("sys/bus/pci/devices").join(pci)
    }

    /// A PCI device bound to `driver`, in IOMMU group `group` (no-IOMMU mode when
    /// `noiommu`), on NUMA node `numa`, with its group device under dev/vfio.
    pub fn add_device(&self, pci: &str, driver: &str, group: u32, noiommu: bool, numa: i64) {
        let d = self.dev_dir(pci);
        std::fs::create_dir_all(&d).unwrap();
        let g = self.path(&format!("sys/kernel/iommu_groups/{group}"));
        std::fs::create_dir_all(&g).unwrap();
        if noiommu {
            std::fs::write(g.join("name"), "vfio-noiommu\n").unwrap();
        }
        let _ = std::fs::remove_file(d.join("iommu_group"));
        std::os::unix::fs::symlink(&g, d.join("iommu_group")).unwrap();
        std::fs::write(d.join("numa_node"), format!("{numa}\n")).unwrap();
        self.set_driver(pci, driver);
        let name = if noiommu {
            format!("noiommu-{group}")
        } else {
            group.to_string()
        };
        std::fs::write(self.path("dev/vfio").join(name), "").unwrap();
    }

    pub fn set_driver(&self, pci: &str, driver: &str) {
        let link = self.dev_dir(pci).join("driver");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("../../../bus/pci/drivers/{driver}"), link).unwrap();
    }

    pub fn remove_device(&self, pci: &str) {
        std::fs::remove_dir_all(self.dev_dir(pci)).unwrap();
    }

    pub fn remove_group_device(&self, name: &str) {
        std::fs::remove_file(self.path("dev/vfio").join(name)).unwrap();
    }
}

pub fn bound(pci: &str, resource: &str, driver: &str) -> BoundDevice {
    BoundDevice {
        pci_address: pci.into(),
        resource_name: resource.into(),
        driver: driver.into(),
        eni_id: format!("eni-{}", pci.replace([':', '.'], "")),
        mac_address: "02:00:00:00:00:01".into(),
        device_index: 1,
        releasing: false,
        details: Default::default(),
    }
}

/// Waits for `fut` up to `secs` seconds, panicking with `what` otherwise.
pub async fn within<T>(secs: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {secs}s waiting for {what}"))
}

/// A kubelet `Registration` server written in Rust: records every `Register` call.
pub struct FakeKubelet {
    pub dir: PathBuf,
    pub registrations: mpsc::UnboundedReceiver<api::RegisterRequest>,
    tx: mpsc::UnboundedSender<api::RegisterRequest>,
    stop: CancellationToken,
}

struct Reg(mpsc::UnboundedSender<api::RegisterRequest>);

#[tonic::async_trait]
impl api::registration_server::Registration for Reg {
    async fn register(
        &self,
        request: tonic::Request<api::RegisterRequest>,
    ) -> Result<tonic::Response<api::Empty>, tonic::Status> {
        let r = request.into_inner();
        if r.version != api::VERSION {
            return Err(tonic::Status::invalid_argument("bad version"));
        }
        let _ = self.0.send(r);
        Ok(tonic::Response::new(api::Empty {}))
    }
}

impl FakeKubelet {
    pub fn start(dir: &Path) -> Self {
        let (tx, registrations) = mpsc::unbounded_channel();
        let mut k = Self {
            dir: dir.to_owned(),
            registrations,
            tx,
            stop: CancellationToken::new(),
        };
        k.serve();
        k
    }

    fn serve(&mut self) {
        self.stop = CancellationToken::new();
        let path = self.dir.join(api::KUBELET_SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let stop = self.stop.clone();
        let svc = api::registration_server::RegistrationServer::new(Reg(self.tx.clone()));
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await;
        });
    }

    /// What a kubelet restart does: its socket goes away, every socket in the directory
    /// is wiped, a new `kubelet.sock` is served.
    pub fn restart(&mut self) {
        self.stop.cancel();
        for e in std::fs::read_dir(&self.dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_socket() {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        self.serve();
    }

    pub async fn next_registration(&mut self, secs: u64) -> api::RegisterRequest {
        within(secs, "a Register call", self.registrations.recv())
            .await
            .expect("fake kubelet channel closed")
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

use std::os::unix::fs::FileTypeExt;

/// Connects to a plugin socket like the kubelet does.
pub async fn plugin_client(
    path: &Path,
) -> api::device_plugin_client::DevicePluginClient<tonic::transport::Channel> {
    let ch = eni_deviceplugin::connect_unix(path).await.unwrap();
    api::device_plugin_client::DevicePluginClient::new(ch)
}

/// Reads ListAndWatch messages until one satisfies `pred`.
pub async fn wait_list(
    stream: &mut tonic::Streaming<api::ListAndWatchResponse>,
    secs: u64,
    what: &str,
    pred: impl Fn(&api::ListAndWatchResponse) -> bool,
) -> api::ListAndWatchResponse {
    within(secs, what, async {
        loop {
            let msg = stream.message().await.unwrap().expect("ListAndWatch ended");
            if pred(&msg) {
                return msg;
            }
        }
    })
    .await
}

pub fn health_of<'a>(l: &'a api::ListAndWatchResponse, id: &str) -> Option<&'a str> {
    l.devices
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.health.as_str())
}

pub mod kubelet_dp;
