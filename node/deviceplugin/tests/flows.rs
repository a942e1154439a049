//! Device-plugin flows against a fake kubelet written in Rust (no Go, no root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use eni_deviceplugin::config::socket_name;
use eni_deviceplugin::{BoundDevice, CancellationToken, Config, RegistrationMode};
use eni_proto::deviceplugin::v1beta1 as api;
use eni_proto::pluginregistration::v1 as reg;
use tokio::sync::watch;

const A: &str = "0000:00:07.0";
const B: &str = "0000:00:08.0";

struct Running {
    tx: watch::Sender<Vec<BoundDevice>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), eni_deviceplugin::Error>>,
}

fn start(config: Config, devices: Vec<BoundDevice>) -> Running {
    let (tx, rx) = watch::channel(devices);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(eni_deviceplugin::run(config, rx, shutdown.clone()));
    Running { tx, shutdown, task }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        within(10, "plugin shutdown", self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn registers_lists_and_allocates() {
    let host = Host::new();
    host.add_device(A, "vfio-pci", 0, true, 0);
    let mut kubelet = FakeKubelet::start(&host.path("device-plugins"));
    let config = host.config();
    let allocations = config.allocations.clone();
    let plugin = start(config, vec![bound(A, RES, "vfio-pci")]);

    let r = kubelet.next_registration(5).await;
    assert_eq!(r.version, "v1beta1");
    assert_eq!(r.resource_name, RES);
    assert_eq!(r.endpoint, socket_name(RES));
    assert_eq!(
        r.options,
        Some(api::DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: true
        })
    );
    let mut client = plugin_client(&host.path("device-plugins").join(&r.endpoint)).await;
    let opts = client
        .get_device_plugin_options(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert!(opts.get_preferred_allocation_available);

    let mut stream = client
        .list_and_watch(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    let first = wait_list(&mut stream, 5, "first list", |_| true).await;
    assert_eq!(
        first.devices,
        vec![api::Device {
            id: A.into(),
            health: "Healthy".into(),
            topology: Some(api::TopologyInfo {
                nodes: vec![api::NumaNode { id: 0 }]
            }),
        }]
    );

    let resp = client
        .allocate(api::AllocateRequest {
            container_requests: vec![api::ContainerAllocateRequest {
                devices_ids: vec![A.into()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let c = &resp.container_responses[0];
    let paths: Vec<(&str, &str)> = c
        .devices
        .iter()
        .map(|d| (d.host_path.as_str(), d.container_path.as_str()))
        .collect();
    assert_eq!(
        paths,
        vec![
            ("/dev/vfio/vfio", "/dev/vfio/vfio"),
            ("/dev/vfio/noiommu-0", "/dev/vfio/0")
        ]
    );
    assert_eq!(c.envs["PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE"], A);
    let info: serde_json::Value =
        serde_json::from_str(&c.envs["PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE_INFO"]).unwrap();
    assert_eq!(info[A]["vfio"]["dev-mount"], "/dev/vfio/0");
    let devinfo = std::fs::read_to_string(
        host.path("devinfo")
            .join(format!("intel.com-intel_sriov_netdevice-{A}-device.json")),
    )
    .unwrap();
    let devinfo: serde_json::Value = serde_json::from_str(&devinfo).unwrap();
    assert_eq!(devinfo["pci"]["pci-address"], A);
    assert_eq!(devinfo["type"], "pci");
    assert_eq!(allocations.get(RES), 1, "the allocation is counted");

    // Unknown ID: refused with a clear error.
    let err = client
        .allocate(api::AllocateRequest {
            container_requests: vec![api::ContainerAllocateRequest {
                devices_ids: vec![A.into(), "0000:00:99.0".into()],
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("unknown device ID \"0000:00:99.0\""),
        "{}",
        err.message()
    );
    assert_eq!(
        allocations.get(RES),
        1,
        "a refused allocation is not counted"
    );

    drop(stream);
    plugin.stop().await;
    assert!(
        !host.path("device-plugins").join(socket_name(RES)).exists(),
        "socket removed on shutdown"
    );
}

#[tokio::test]
async fn list_follows_devices_and_health() {
    let host = Host::new();
    host.add_device(A, "vfio-pci", 0, true, 0);
    host.add_device(B, "vfio-pci", 1, true, 1);
    let mut kubelet = FakeKubelet::start(&host.path("device-plugins"));
    let plugin = start(host.config(), vec![bound(A, RES, "vfio-pci")]);
    let r = kubelet.next_registration(5).await;
    let mut client = plugin_client(&host.path("device-plugins").join(&r.endpoint)).await;
    let mut stream = client
        .list_and_watch(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    wait_list(&mut stream, 5, "one device", |l| l.devices.len() == 1).await;

    // The node daemon binds a second device.
    let t = Instant::now();
    plugin
        .tx
        .send_replace(vec![bound(A, RES, "vfio-pci"), bound(B, RES, "vfio-pci")]);
    let l = wait_list(&mut stream, 5, "two devices", |l| l.devices.len() == 2).await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "update took {:?}",
        t.elapsed()
    );
    assert_eq!(
        l.devices[1].topology,
        Some(api::TopologyInfo {
            nodes: vec![api::NumaNode { id: 1 }]
        })
    );

    // Both allocatable together: one /dev/vfio/vfio, two groups.
    let resp = client
        .allocate(api::AllocateRequest {
            container_requests: vec![api::ContainerAllocateRequest {
                devices_ids: vec![B.into(), A.into()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.container_responses[0].devices.len(), 3);
    assert_eq!(
        resp.container_responses[0].envs["PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE"],
        format!("{B},{A}")
    );

    // Rebound to its kernel driver behind our back -> Unhealthy within a second.
    let t = Instant::now();
    host.set_driver(B, "ena");
    wait_list(&mut stream, 5, "B unhealthy", |l| {
        health_of(l, B) == Some("Unhealthy")
    })
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "health update took {:?}",
        t.elapsed()
    );
    let err = client
        .allocate(api::AllocateRequest {
            container_requests: vec![api::ContainerAllocateRequest {
                devices_ids: vec![B.into()],
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("Unhealthy") && err.message().contains("bound to ena"),
        "{}",
        err.message()
    );

    // Back to vfio-pci -> Healthy; then the group device vanishes -> Unhealthy.
    host.set_driver(B, "vfio-pci");
    wait_list(&mut stream, 5, "B healthy", |l| {
        health_of(l, B) == Some("Healthy")
    })
    .await;
    host.remove_group_device("noiommu-1");
    wait_list(&mut stream, 5, "B unhealthy (no group dev)", |l| {
        health_of(l, B) == Some("Unhealthy")
    })
    .await;
    // The PCI device vanishes entirely.
    host.remove_device(A);
    wait_list(&mut stream, 5, "A unhealthy (vanished)", |l| {
        health_of(l, A) == Some("Unhealthy")
    })
    .await;

    // Unbound by the node daemon -> removed from the list (and its Multus device-info
    // file with it); all gone -> empty list.
    let devinfo_a = host
        .path("devinfo")
        .join(format!("intel.com-intel_sriov_netdevice-{A}-device.json"));
    assert!(devinfo_a.exists());
    plugin.tx.send_replace(vec![bound(B, RES, "vfio-pci")]);
    wait_list(&mut stream, 5, "A removed", |l| l.devices.len() == 1).await;
    assert!(!devinfo_a.exists());
    plugin.tx.send_replace(vec![]);
    wait_list(&mut stream, 5, "empty list", |l| l.devices.is_empty()).await;
    plugin.stop().await;
    // The stream ends when the plugin stops.
    within(5, "stream end", async {
        while let Ok(Some(_)) = stream.message().await {}
    })
    .await;
}

#[tokio::test]
async fn reregisters_after_kubelet_restart() {
    let host = Host::new();
    host.add_device(A, "vfio-pci", 0, true, 0);
    let dir = host.path("device-plugins");
    // The plugin starts before the kubelet: it registers once kubelet.sock appears.
    let plugin = start(host.config(), vec![bound(A, RES, "vfio-pci")]);
    let sock = dir.join(socket_name(RES));
    within(5, "plugin socket", async {
        while !sock.exists() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let mut kubelet = FakeKubelet::start(&dir);
    kubelet.next_registration(5).await;

    for round in 0..3 {
        let t = Instant::now();
        kubelet.restart();
        assert!(!sock.exists());
        let r = kubelet.next_registration(5).await;
        let took = t.elapsed();
        println!("re-registration round {round}: {took:?}");
        assert!(
            took < Duration::from_secs(2),
            "re-registration took {took:?}"
        );
        assert!(sock.exists());
        let mut client = plugin_client(&dir.join(&r.endpoint)).await;
        let mut stream = client
            .list_and_watch(api::Empty {})
            .await
            .unwrap()
            .into_inner();
        wait_list(&mut stream, 5, "list after restart", |l| {
            l.devices.len() == 1
        })
        .await;
    }

    // Only our socket is removed (e.g. by hand): served and registered again.
    std::fs::remove_file(&sock).unwrap();
    kubelet.next_registration(5).await;
    assert!(sock.exists());
    plugin.stop().await;
}

#[tokio::test]
async fn one_endpoint_per_resource_and_netdev_policy() {
    let host = Host::new();
    host.add_device(A, "vfio-pci", 0, false, 0);
    host.add_device(B, "ena", 1, false, 0);
    let mut kubelet = FakeKubelet::start(&host.path("device-plugins"));
    let mut config = host.config();
    config.netdev_resource = Some("aws.amazon.com/eni".into());
    let plugin = start(
        config,
        vec![
            bound(A, "aws.amazon.com/dpdk", "vfio-pci"),
            bound(B, "aws.amazon.com/eni", "ena"),
            // Kernel-bound but not under the netdev resource: ignored.
            bound("0000:00:09.0", "aws.amazon.com/other", "ena"),
        ],
    );
    let mut names = vec![
        kubelet.next_registration(5).await.resource_name,
        kubelet.next_registration(5).await.resource_name,
    ];
    names.sort();
    assert_eq!(names, vec!["aws.amazon.com/dpdk", "aws.amazon.com/eni"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), kubelet.registrations.recv())
            .await
            .is_err()
    );

    let mut client = plugin_client(
        &host
            .path("device-plugins")
            .join(socket_name("aws.amazon.com/eni")),
    )
    .await;
    let resp = client
        .allocate(api::AllocateRequest {
            container_requests: vec![api::ContainerAllocateRequest {
                devices_ids: vec![B.into()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.container_responses[0].devices.is_empty());
    assert_eq!(
        resp.container_responses[0].envs["PCIDEVICE_AWS_AMAZON_COM_ENI"],
        B
    );
    // With an IOMMU the group device keeps its number on the host.
    let mut client = plugin_client(
        &host
            .path("device-plugins")
            .join(socket_name("aws.amazon.com/dpdk")),
    )
    .await;
    let resp = client
        .allocate(api::AllocateRequest {
            container_requests: vec![api::ContainerAllocateRequest {
                devices_ids: vec![A.into()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.container_responses[0].devices[1].host_path,
        "/dev/vfio/0"
    );
    plugin.stop().await;
}

#[tokio::test]
async fn preferred_allocation_is_numa_aware() {
    let host = Host::new();
    let ids = [
        "0000:00:01.0",
        "0000:00:02.0",
        "0000:00:03.0",
        "0000:00:04.0",
        "0000:00:05.0",
    ];
    let numa = [0, 1, 0, 1, 1];
    for (i, (id, n)) in ids.iter().zip(numa).enumerate() {
        host.add_device(id, "vfio-pci", i as u32, true, n);
    }
    let mut kubelet = FakeKubelet::start(&host.path("device-plugins"));
    let plugin = start(
        host.config(),
        ids.iter().map(|id| bound(id, RES, "vfio-pci")).collect(),
    );
    let r = kubelet.next_registration(5).await;
    let mut client = plugin_client(&host.path("device-plugins").join(&r.endpoint)).await;
    let ask = |must: Vec<&str>, size| api::PreferredAllocationRequest {
        container_requests: vec![api::ContainerPreferredAllocationRequest {
            available_device_i_ds: ids.iter().map(|s| s.to_string()).collect(),
            must_include_device_i_ds: must.into_iter().map(String::from).collect(),
            allocation_size: size,
        }],
    };
    let got = client
        .get_preferred_allocation(ask(vec![], 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.container_responses[0].device_i_ds,
        vec![ids[1], ids[3], ids[4]]
    );
    let got = client
        .get_preferred_allocation(ask(vec![ids[0]], 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.container_responses[0].device_i_ds, vec![ids[0], ids[2]]);
    plugin.stop().await;
}

#[tokio::test]
async fn plugins_registry_mode() {
    let host = Host::new();
    host.add_device(A, "vfio-pci", 0, true, 0);
    let mut config = host.config();
    config.registration = RegistrationMode::PluginsRegistry;
    let plugin = start(config, vec![bound(A, RES, "vfio-pci")]);
    let sock = host.path("plugins_registry").join(socket_name(RES));
    within(5, "registry socket", async {
        while !sock.exists() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let ch = eni_deviceplugin::connect_unix(&sock).await.unwrap();
    let mut registry = reg::registration_client::RegistrationClient::new(ch.clone());
    let info = registry
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, "DevicePlugin");
    assert_eq!(info.name, RES);
    assert_eq!(info.endpoint, sock.to_string_lossy());
    assert_eq!(info.supported_versions, vec!["v1beta1"]);
    registry
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    // The device-plugin API is on the same socket.
    let mut client = api::device_plugin_client::DevicePluginClient::new(ch);
    let mut stream = client
        .list_and_watch(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    wait_list(&mut stream, 5, "list", |l| l.devices.len() == 1).await;
    // Nothing in the device-plugin directory.
    assert!(!host.path("device-plugins").join(socket_name(RES)).exists());
    drop(stream);
    plugin.stop().await;
}

#[tokio::test]
async fn survives_the_plugin_directory_being_recreated() {
    let host = Host::new();
    host.add_device(A, "vfio-pci", 0, true, 0);
    let dir = host.path("device-plugins");
    let mut kubelet = FakeKubelet::start(&dir);
    let plugin = start(host.config(), vec![bound(A, RES, "vfio-pci")]);
    kubelet.next_registration(5).await;
    drop(kubelet);
    // The whole directory goes away and comes back with a new kubelet.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let mut kubelet = FakeKubelet::start(&dir);
    let t = Instant::now();
    let r = kubelet.next_registration(5).await;
    println!(
        "re-registered {:?} after the directory was recreated",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    let mut client = plugin_client(&dir.join(&r.endpoint)).await;
    let mut stream = client
        .list_and_watch(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    wait_list(&mut stream, 5, "list", |l| l.devices.len() == 1).await;
    drop(stream);
    plugin.stop().await;
}

#[tokio::test]
async fn missing_vfio_container_device_is_unhealthy() {
    let host = Host::new();
    host.add_device(A, "vfio-pci", 0, false, 0);
    let mut kubelet = FakeKubelet::start(&host.path("device-plugins"));
    let plugin = start(host.config(), vec![bound(A, RES, "vfio-pci")]);
    let r = kubelet.next_registration(5).await;
    let mut client = plugin_client(&host.path("device-plugins").join(&r.endpoint)).await;
    let mut stream = client
        .list_and_watch(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    wait_list(&mut stream, 5, "healthy", |l| {
        health_of(l, A) == Some("Healthy")
    })
    .await;
    host.remove_group_device("vfio");
    wait_list(&mut stream, 5, "unhealthy", |l| {
        health_of(l, A) == Some("Unhealthy")
    })
    .await;
    drop(stream);
    plugin.stop().await;
}

/// The longest valid resource name (a 253-character domain, `/`, a 63-character name)
/// used to give a socket path over the 108-byte `sun_path` limit, so `serve` failed
/// every second forever. It is served, registered and listed like any other.
#[tokio::test]
async fn longest_valid_resource_name_is_served() {
    let label = "a".repeat(63);
    let long = format!(
        "{label}.{label}.{label}.{}/{}",
        "b".repeat(61),
        "n".repeat(63)
    );
    assert_eq!(long.len(), 317);
    let host = Host::new();
    host.add_device(A, "vfio-pci", 0, true, 0);
    let mut kubelet = FakeKubelet::start(&host.path("device-plugins"));
    let plugin = start(host.config(), vec![bound(A, &long, "vfio-pci")]);
    let r = kubelet.next_registration(5).await;
    assert_eq!(r.resource_name, long);
    assert_eq!(r.endpoint, socket_name(&long));
    let sock = host.path("device-plugins").join(&r.endpoint);
    assert!(sock.as_os_str().len() < 108, "{}", sock.display());
    let mut client = plugin_client(&sock).await;
    let mut stream = client
        .list_and_watch(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    let first = wait_list(&mut stream, 5, "first list", |_| true).await;
    assert_eq!(first.devices.len(), 1);
    assert_eq!(first.devices[0].id, A);
    plugin.stop().await;
}

/// A device the node daemon is giving back is Unhealthy on the next list (no new pod gets
/// it) and refused by Allocate, while sysfs still shows it bound to vfio-pci.
#[tokio::test]
async fn a_device_being_given_back_is_unhealthy_at_once() {
    let host = Host::new();
    host.add_device(A, "vfio-pci", 0, true, 0);
    let mut kubelet = FakeKubelet::start(&host.path("device-plugins"));
    let plugin = start(host.config(), vec![bound(A, RES, "vfio-pci")]);
    let r = kubelet.next_registration(5).await;
    let mut client = plugin_client(&host.path("device-plugins").join(&r.endpoint)).await;
    let mut stream = client
        .list_and_watch(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    wait_list(&mut stream, 5, "healthy", |l| {
        health_of(l, A) == Some("Healthy")
    })
    .await;
    let t = Instant::now();
    let mut releasing = bound(A, RES, "vfio-pci");
    releasing.releasing = true;
    plugin.tx.send_replace(vec![releasing]);
    wait_list(&mut stream, 5, "unhealthy", |l| {
        health_of(l, A) == Some("Unhealthy")
    })
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    let refused = client
        .allocate(api::AllocateRequest {
            container_requests: vec![api::ContainerAllocateRequest {
                devices_ids: vec![A.into()],
            }],
        })
        .await
        .expect_err("refused");
    assert!(refused.message().contains("given back"), "{refused}");
    plugin.stop().await;
}
