//! The kubelet DRA plugin over its real Unix sockets, with claims in the real
//! kube-apiserver: registration info, prepare (CDI spec, env, device-info, claim
//! `status.devices` network data written with the least RBAC the server demands, as a
//! node-bound service-account token), refusals, idempotence across a daemon restart
//! (checkpoint), unprepare, and the sockets coming back after someone removes them.
//!
//! Integration tier (`make test-integration`): needs the peers from `hack/peers.sh`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use eni_deviceplugin::device::DeviceFacts;
use eni_deviceplugin::{BoundDevice, CancellationToken, DeviceProbe, EniDetails, connect_unix};
use eni_dra::{DEFAULT_DRIVER_NAME, Driver, KubeClaims, PluginConfig};
use eni_proto::dra::v1 as api;
use eni_proto::dra::v1beta1 as beta;
use eni_proto::pluginregistration::v1 as reg;
use eni_testkit::{ApiServer, eventually};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(30);
const NODE: &str = "dra-plugin-n1";
const NS: &str = "default";
const SA: &str = "dra-plugin-test";

#[derive(Debug)]
struct Healthy;

impl DeviceProbe for Healthy {
    fn probe(&self, pci: &str) -> DeviceFacts {
        DeviceFacts {
            present: true,
            driver: Some("vfio-pci".into()),
            iommu_group: Some(
                pci[pci.len() - 4..pci.len() - 2]
                    .trim_start_matches('0')
                    .into(),
            ),
            noiommu: true,
            numa_node: Some(0),
            group_device_present: true,
            vfio_container_present: true,
        }
    }
}

fn device(pci: &str, eni: &str, index: i32) -> BoundDevice {
    BoundDevice {
        pci_address: pci.into(),
        resource_name: "intel.com/intel_sriov_netdevice".into(),
        driver: "vfio-pci".into(),
        eni_id: eni.into(),
        mac_address: format!("02:00:00:00:00:{index:02x}"),
        device_index: index,
        releasing: false,
        details: EniDetails {
            node_eni: "dpdk".into(),
            subnet_id: Some("subnet-1".into()),
            vpc_id: None,
            mtu: Some(9001),
            ips: vec![format!("10.0.1.{index}/24")],
        },
    }
}

async fn create<K>(api: &Api<K>, obj: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).expect("object");
    match api.create(&PostParams::default(), &obj).await {
        Ok(o) => o,
        Err(kube::Error::Api(s)) if s.code == 409 => api
            .get(obj.meta().name.as_deref().expect("name"))
            .await
            .expect("get existing"),
        Err(e) => panic!("create: {e}"),
    }
}

/// A client with the rules the node chart gives eni-manager for DRA, authenticated by a
/// token bound to a pod on `NODE` (as the daemon's own would be).
async fn driver_client(server: &ApiServer, admin: &Client) -> Client {
    let rules = serde_json::json!([
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims/status"], "verbs": ["patch"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims/driver"],
         "resourceNames": [DEFAULT_DRIVER_NAME], "verbs": ["associated-node:patch"]},
    ]);
    sa_client(server, admin, SA, NODE, rules).await
}

/// A client for service account `sa` (in `NS`) with `rules`, authenticated by a token
/// bound to a pod on `node`.
async fn sa_client(
    server: &ApiServer,
    admin: &Client,
    sa: &str,
    node: &str,
    rules: serde_json::Value,
) -> Client {
    create(
        &Api::<ClusterRole>::all(admin.clone()),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": sa}, "rules": rules}),
    )
    .await;
    create(
        &Api::<ClusterRoleBinding>::all(admin.clone()),
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": sa},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": sa},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": NS}]}),
    )
    .await;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), NS);
    create(
        &sas,
        serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}}),
    )
    .await;
    let pod: Pod = create(
        &Api::namespaced(admin.clone(), NS),
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": sa},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                     "containers": [{"name": "c", "image": "eni-manager:test"}]}}),
    )
    .await;
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(sa.into()),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = sas
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .expect("TokenRequest")
        .status
        .expect("status")
        .token
        .expect("token");
    server.with_token(&token).await.expect("token client")
}

/// A claim allocated (as the scheduler would) to `results` (driver, pool, device).
async fn allocated_claim(admin: &Client, name: &str, results: &[(&str, &str)]) -> ResourceClaim {
    let api: Api<ResourceClaim> = Api::namespaced(admin.clone(), NS);
    let mut c: ResourceClaim = create(
        &api,
        serde_json::json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name},
            "spec": {"devices": {"requests": [{"name": "eni", "exactly": {
                "deviceClassName": "eni-dpdk", "count": results.len()}}]}}}),
    )
    .await;
    let results: Vec<_> = results
        .iter()
        .map(|(pool, device)| {
            serde_json::json!({"request": "eni", "driver": DEFAULT_DRIVER_NAME, "pool": pool, "device": device})
        })
        .collect();
    c.status = Some(
        serde_json::from_value(
            serde_json::json!({"allocation": {"devices": {"results": results},
            "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": [NODE]}]}]}}}),
        )
        .expect("status"),
    );
    api.replace_status(name, &PostParams::default(), &c)
        .await
        .expect("allocate the claim")
}

fn claim_ref(c: &ResourceClaim) -> api::Claim {
    api::Claim {
        namespace: NS.into(),
        uid: c.metadata.uid.clone().expect("uid"),
        name: c.metadata.name.clone().expect("name"),
    }
}

async fn dra_client(
    path: &Path,
) -> api::dra_plugin_client::DraPluginClient<tonic::transport::Channel> {
    let ch = eventually(DEADLINE, || async { connect_unix(path).await.ok() })
        .await
        .expect("connect to dra.sock");
    api::dra_plugin_client::DraPluginClient::new(ch)
}

async fn prepare(path: &Path, c: &api::Claim) -> api::NodePrepareResourceResponse {
    let mut client = dra_client(path).await;
    let r = client
        .node_prepare_resources(api::NodePrepareResourcesRequest {
            claims: vec![c.clone()],
        })
        .await
        .expect("NodePrepareResources")
        .into_inner();
    r.claims
        .get(&c.uid)
        .cloned()
        .expect("an answer for the claim")
}

async fn unprepare(path: &Path, c: &api::Claim) -> String {
    let mut client = dra_client(path).await;
    let r = client
        .node_unprepare_resources(api::NodeUnprepareResourcesRequest {
            claims: vec![c.clone()],
        })
        .await
        .expect("NodeUnprepareResources")
        .into_inner();
    r.claims.get(&c.uid).expect("an answer").error.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver (make test-integration)"]
async fn prepare_unprepare_restart_and_claim_status() {
    let server = ApiServer::shared().await.expect("start kube-apiserver");
    let admin = server.client().await.expect("client");
    create(
        &Api::<Node>::all(admin.clone()),
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}),
    )
    .await;
    let driver_client = driver_client(server, &admin).await;

    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg = PluginConfig::new(DEFAULT_DRIVER_NAME, NODE);
    cfg.plugins_dir = tmp.path().join("plugins");
    cfg.registry_dir = tmp.path().join("plugins_registry");
    cfg.cdi_dir = tmp.path().join("cdi");
    cfg.devinfo_dir = tmp.path().join("devinfo");
    cfg.socket_check_interval = Duration::from_millis(100);
    let (_tx, rx) = watch::channel(vec![
        device("0000:00:07.0", "eni-0aaaaaaaaaaaaaaa1", 2),
        device("0000:00:08.0", "eni-0aaaaaaaaaaaaaaa2", 3),
    ]);
    let start = |cfg: PluginConfig| {
        let claims = Arc::new(KubeClaims::new(driver_client.clone(), DEFAULT_DRIVER_NAME));
        let driver =
            Arc::new(Driver::new(cfg, claims, Arc::new(Healthy), rx.clone()).expect("driver"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(eni_dra::plugin::serve(driver, stop.clone()));
        (stop, task)
    };
    let (stop, task) = start(cfg.clone());
    let dra_sock = cfg.dra_socket();

    // Registration as the kubelet's plugin watcher sees it.
    let reg_ch = eventually(DEADLINE, || async {
        connect_unix(&cfg.registration_socket()).await.ok()
    })
    .await
    .expect("connect to the registration socket");
    let info = reg::registration_client::RegistrationClient::new(reg_ch)
        .get_info(reg::InfoRequest {})
        .await
        .expect("GetInfo")
        .into_inner();
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, DEFAULT_DRIVER_NAME);
    assert_eq!(info.endpoint, dra_sock.to_string_lossy());
    assert_eq!(
        info.supported_versions,
        ["v1.DRAPlugin", "v1beta1.DRAPlugin"],
        "v1 first: the kubelet takes the first it knows"
    );

    // Prepare: CDI IDs, the spec file, device-info, and the claim's network data.
    let c1 = allocated_claim(&admin, "dra-plugin-c1", &[(NODE, "eni-0aaaaaaaaaaaaaaa2")]).await;
    let r1 = claim_ref(&c1);
    let got = prepare(&dra_sock, &r1).await;
    assert_eq!(got.error, "");
    assert_eq!(got.devices.len(), 1);
    let d = &got.devices[0];
    assert_eq!(
        (d.pool_name.as_str(), d.device_name.as_str()),
        (NODE, "eni-0aaaaaaaaaaaaaaa2")
    );
    assert_eq!(d.request_names, ["eni"]);
    assert_eq!(
        d.cdi_device_ids,
        ["eni.networking.k8s.aws/eni=0000:00:08.0"]
    );
    let spec_path = cfg
        .cdi_dir
        .join(format!("{DEFAULT_DRIVER_NAME}-{}.json", r1.uid));
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec_path).expect("CDI spec")).expect("json");
    assert_eq!(spec["kind"], "eni.networking.k8s.aws/eni");
    assert_eq!(spec["devices"][0]["name"], "0000:00:08.0");
    assert_eq!(
        spec["devices"][0]["containerEdits"]["deviceNodes"][0],
        serde_json::json!({"path": "/dev/vfio/8", "hostPath": "/dev/vfio/noiommu-8", "permissions": "rw"})
    );
    let env: Vec<&str> = spec["containerEdits"]["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        env[0],
        "PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE=0000:00:08.0"
    );
    assert!(
        env[1].starts_with("PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE_INFO={\"0000:00:08.0\""),
        "{env:?}"
    );
    let devinfo = cfg
        .devinfo_dir
        .join("intel.com-intel_sriov_netdevice-0000:00:08.0-device.json");
    let di: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&devinfo).expect("device-info")).expect("json");
    assert_eq!(di["pci"]["pci-address"], "0000:00:08.0");
    let claims: Api<ResourceClaim> = Api::namespaced(admin.clone(), NS);
    let status = eventually(DEADLINE, || async {
        let c = claims.get("dra-plugin-c1").await.ok()?;
        c.status?.devices.filter(|d| !d.is_empty())
    })
    .await
    .expect("status.devices written");
    assert_eq!(status[0].driver, DEFAULT_DRIVER_NAME);
    assert_eq!(status[0].device, "eni-0aaaaaaaaaaaaaaa2");
    let nd = status[0].network_data.as_ref().expect("networkData");
    assert_eq!(nd.interface_name.as_deref(), Some("0000:00:08.0"));
    assert_eq!(nd.hardware_address.as_deref(), Some("02:00:00:00:00:03"));
    assert_eq!(nd.ips.as_deref(), Some(&["10.0.1.3/24".to_owned()][..]));

    // Idempotent: the same answer again.
    assert_eq!(prepare(&dra_sock, &r1).await, got);

    // The same service as v1beta1.DRAPlugin (kubelets before 1.34): the same answer.
    let ch = eventually(DEADLINE, || async { connect_unix(&dra_sock).await.ok() })
        .await
        .expect("connect to dra.sock");
    let mut beta = beta::dra_plugin_client::DraPluginClient::new(ch);
    let claim_beta = |c: &api::Claim| beta::Claim {
        namespace: c.namespace.clone(),
        uid: c.uid.clone(),
        name: c.name.clone(),
    };
    let b = beta
        .node_prepare_resources(beta::NodePrepareResourcesRequest {
            claims: vec![claim_beta(&r1)],
        })
        .await
        .expect("v1beta1 NodePrepareResources")
        .into_inner();
    let b = &b.claims[&r1.uid];
    assert_eq!(b.error, "");
    let bd: Vec<(&str, &str, &[String], &[String])> = b
        .devices
        .iter()
        .map(|d| {
            (
                d.pool_name.as_str(),
                d.device_name.as_str(),
                &d.request_names[..],
                &d.cdi_device_ids[..],
            )
        })
        .collect();
    assert_eq!(
        bd,
        [(
            NODE,
            "eni-0aaaaaaaaaaaaaaa2",
            &["eni".to_owned()][..],
            &["eni.networking.k8s.aws/eni=0000:00:08.0".to_owned()][..]
        )]
    );

    // Refusals: a device of another node's pool, a device this node does not have.
    let c2 = allocated_claim(
        &admin,
        "dra-plugin-c2",
        &[("other-node", "eni-0aaaaaaaaaaaaaaa1")],
    )
    .await;
    let e = prepare(&dra_sock, &claim_ref(&c2)).await;
    assert!(
        e.devices.is_empty() && e.error.contains("not on this node"),
        "{e:?}"
    );
    let c3 = allocated_claim(&admin, "dra-plugin-c3", &[(NODE, "eni-0ffffffffffffffff")]).await;
    let e = prepare(&dra_sock, &claim_ref(&c3)).await;
    assert!(e.error.contains("not one of this node's devices"), "{e:?}");
    let mut stale = r1.clone();
    stale.uid = "00000000-0000-0000-0000-000000000000".into();
    stale.name = "dra-plugin-c2".into();
    let e = prepare(&dra_sock, &stale).await;
    assert!(e.error.contains("UID"), "{e:?}");

    // Sockets removed (as by a kubelet clean-up): served again.
    std::fs::remove_file(cfg.registration_socket()).expect("remove reg socket");
    std::fs::remove_file(&dra_sock).expect("remove dra socket");
    eventually(DEADLINE, || async {
        (cfg.registration_socket().exists() && dra_sock.exists()).then_some(())
    })
    .await
    .expect("sockets back");
    assert_eq!(prepare(&dra_sock, &r1).await, got);

    // A daemon restart: the checkpoint answers, even with the CDI spec gone.
    stop.cancel();
    task.await.expect("task").expect("serve");
    assert!(!dra_sock.exists(), "sockets removed on shutdown");
    std::fs::remove_file(&spec_path).expect("remove spec");
    let (stop, task) = start(cfg.clone());
    assert_eq!(prepare(&dra_sock, &r1).await, got);
    assert!(spec_path.exists(), "the spec is written again");

    // Unprepare: files and status gone; again is fine.
    assert_eq!(unprepare(&dra_sock, &r1).await, "");
    assert!(!spec_path.exists() && !devinfo.exists());
    eventually(DEADLINE, || async {
        let c = claims.get("dra-plugin-c1").await.ok()?;
        c.status?
            .devices
            .unwrap_or_default()
            .is_empty()
            .then_some(())
    })
    .await
    .expect("status.devices cleared");
    assert_eq!(unprepare(&dra_sock, &r1).await, "");
    // And through v1beta1.
    let ch = eventually(DEADLINE, || async { connect_unix(&dra_sock).await.ok() })
        .await
        .expect("connect to dra.sock");
    let b = beta::dra_plugin_client::DraPluginClient::new(ch)
        .node_unprepare_resources(beta::NodeUnprepareResourcesRequest {
            claims: vec![beta::Claim {
                namespace: r1.namespace.clone(),
                uid: r1.uid.clone(),
                name: r1.name.clone(),
            }],
        })
        .await
        .expect("v1beta1 NodeUnprepareResources")
        .into_inner();
    assert_eq!(b.claims[&r1.uid].error, "");

    // Prepare latency of the driver alone (gRPC on dra.sock; reads the claim, writes CDI
    // spec, device-info, checkpoint and the claim status), over prepare/unprepare cycles.
    let n: usize = std::env::var("ENI_DRA_BENCH_PREPARES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut client = dra_client(&dra_sock).await;
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        let r = client
            .node_prepare_resources(api::NodePrepareResourcesRequest {
                claims: vec![r1.clone()],
            })
            .await
            .expect("prepare")
            .into_inner();
        lat.push(t.elapsed());
        assert_eq!(r.claims[&r1.uid].error, "");
        client
            .node_unprepare_resources(api::NodeUnprepareResourcesRequest {
                claims: vec![r1.clone()],
            })
            .await
            .expect("unprepare");
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0;
    eprintln!(
        "DRA prepare latency of the driver (gRPC) over {n} prepares: p50 {:.2} ms, p99 {:.2} ms",
        pct(0.50),
        pct(0.99)
    );
    stop.cancel();
    task.await.expect("task").expect("serve");
}

/// The node chart's `aws-multi-eni-dra-slices` policy, rendered by helm for a service
/// account of this test: a node's daemon writes its own node's slice and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "integration: needs kube-apiserver, kubectl and helm (make test-integration)"]
async fn slices_policy_keeps_each_node_to_its_own_slices() {
    let server = ApiServer::shared().await.expect("start kube-apiserver");
    let admin = server.client().await.expect("client");
    let (sa, node, other) = ("dra-policy-test", "dra-policy-n1", "dra-policy-n2");
    for n in [node, other] {
        create(
            &Api::<Node>::all(admin.clone()),
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}),
        )
        .await;
    }
    let chart = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../charts/aws-multi-eni-node"
    );
    let helm = eni_testkit::peer("helm").expect("helm");
    let out = std::process::Command::new(helm)
        .args([
            "template",
            "x",
            chart,
            "--namespace",
            NS,
            "--kube-version",
            "1.37.2",
        ])
        .args([
            "--set",
            "dra.enabled=true",
            "--set",
            &format!("serviceAccount.name={sa}"),
        ])
        .args(["--show-only", "templates/dra-slices-policy.yaml"])
        .output()
        .expect("helm template");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut kubectl = std::process::Command::new(eni_testkit::peer("kubectl").expect("kubectl"))
        .arg(format!("--kubeconfig={}", server.kubeconfig.display()))
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("kubectl");
    std::io::Write::write_all(&mut kubectl.stdin.take().expect("stdin"), &out.stdout)
        .expect("write");
    assert!(
        kubectl.wait().expect("kubectl").success(),
        "kubectl apply the policy"
    );

    let rules = serde_json::json!([
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"],
         "verbs": ["list", "watch", "create", "update", "delete"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
    ]);
    let client = sa_client(server, &admin, sa, node, rules).await;
    let foreign = eni_dra::SlicePublisher::new(client.clone(), DEFAULT_DRIVER_NAME, other);
    // The policy is loaded asynchronously: wait until it refuses another node's slice.
    let refused = eventually(DEADLINE, || async {
        match foreign.sync(None, &[]).await {
            Err(e) if e.to_string().contains("may write only ResourceSlices") => {
                Some(e.to_string())
            }
            Ok(true) => {
                // Written before the policy was active: take it away again (as admin).
                eni_dra::SlicePublisher::new(admin.clone(), DEFAULT_DRIVER_NAME, other)
                    .remove_all()
                    .await
                    .expect("admin clean-up");
                None
            }
            _ => None,
        }
    })
    .await
    .expect("another node's slice refused");
    assert!(refused.contains(node), "{refused}");
    // Its own node's slice: created, updated, deleted.
    let own = eni_dra::SlicePublisher::new(client, DEFAULT_DRIVER_NAME, node);
    let owner = own.owner().await;
    assert!(owner.is_some(), "get nodes allowed");
    assert!(
        own.sync(owner.as_ref(), &[])
            .await
            .expect("create own slice")
    );
    let dev = k8s_openapi::api::resource::v1::Device {
        name: "eni-0ddddddddddddddd1".into(),
        ..Default::default()
    };
    assert!(
        own.sync(owner.as_ref(), &[dev])
            .await
            .expect("update own slice")
    );
    own.remove_all().await.expect("delete own slice");
}
