//! The generated CRD against the real kube-apiserver: it installs, old manifests apply
//! unchanged, and the validation rules reject bad NodeENIs with a message naming the field.
//!
//! Integration tier: `make test-integration` (needs the peers from `hack/peers.sh`).

use eni_api::{NodeENI, crd};
use eni_testkit::ApiServer;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

async fn client_with_crd() -> Client {
    let server = ApiServer::shared().await.expect("start kube-apiserver");
    server.install_crd(&crd()).await.expect("install the CRD")
}

/// Creates `yaml` as a NodeENI (through the dynamic JSON path, as kubectl would).
async fn create(client: &Client, yaml: &str) -> Result<NodeENI, kube::Error> {
    let api: Api<NodeENI> = Api::all(client.clone());
    let value: serde_json::Value = serde_yaml_ng::from_str(yaml).expect("test yaml");
    let obj: NodeENI = serde_json::from_value(value).expect("test object");
    api.create(&PostParams::default(), &obj).await
}

#[tokio::test]
#[ignore = "integration: needs kube-apiserver (make test-integration)"]
async fn crd_installs_and_objects_round_trip() {
    let server = ApiServer::shared().await.expect("start kube-apiserver");
    println!("running against kube-apiserver {}", server.version);
    assert!(server.version.starts_with("v1.37"), "{}", server.version);
    let client = client_with_crd().await;
    let created = create(
        &client,
        r#"
apiVersion: networking.k8s.aws/v1alpha1
kind: NodeENI
metadata: {name: round-trip}
spec:
  nodeSelector: {ng: multi-eni}
  subnetID: subnet-0f59b4f14737be9ad
  securityGroupIDs: [sg-05da196f3314d4af8]
"#,
    )
    .await
    .expect("create");
    let api: Api<NodeENI> = Api::all(client);
    let read = api.get("round-trip").await.expect("read back");
    assert_eq!(read.uid(), created.uid());
    // Defaults are applied by the API server.
    assert_eq!(read.spec.device_index, 1);
    assert!(read.spec.delete_on_termination);
    api.delete("round-trip", &DeleteParams::default())
        .await
        .expect("delete");
}

/// Manifests written for the older Go controller apply unchanged, including both DPDK
/// spellings, with strict field validation (what `kubectl apply` does by default).
#[tokio::test]
#[ignore = "integration: needs kube-apiserver (make test-integration)"]
async fn older_controller_manifests_apply_unchanged() {
    let client = client_with_crd().await;
    let manifests = [
        (
            "old-basic",
            "nodeSelector: {ng: multi-eni}\n  subnetID: subnet-0f59b4f14737be9ad\n  securityGroupIDs: [sg-05da196f3314d4af8]\n  deviceIndex: 2\n  deleteOnTermination: true\n  description: Multus ENI",
        ),
        (
            "old-names",
            "nodeSelector: {ng: multi-eni}\n  subnetName: multus-test-subnet-1\n  securityGroupNames: [multus-security-group]\n  deviceIndex: 2\n  mtu: 9001",
        ),
        (
            "old-multi",
            "nodeSelector: {ng: multi-eni}\n  subnetIDs: [subnet-0f59b4f14737be9ad, subnet-0a1b2c3d4e5f60718]\n  subnetNames: [other]\n  securityGroupIDs: [sg-05da196f3314d4af8]\n  securityGroupNames: [multus-security-group]",
        ),
        (
            "old-dpdk-readme",
            "nodeSelector: {ng: multi-eni}\n  subnetID: subnet-0f59b4f14737be9ad\n  securityGroupIDs: [sg-05da196f3314d4af8]\n  dpdkEnabled: true\n  dpdkDriver: vfio-pci\n  dpdkResourceName: intel.com/intel_sriov_netdevice",
        ),
        (
            "old-dpdk-code",
            "nodeSelector: {ng: multi-eni}\n  subnetID: subnet-0f59b4f14737be9ad\n  securityGroupIDs: [sg-05da196f3314d4af8]\n  enableDPDK: true\n  dpdkDriver: vfio-pci\n  dpdkResourceName: intel.com/sriov_kernel\n  dpdkPCIAddress: \"0000:00:07.0\"",
        ),
    ];
    let api: Api<NodeENI> = Api::all(client.clone());
    for (name, spec) in manifests {
        let yaml = format!(
            "apiVersion: networking.k8s.aws/v1alpha1\nkind: NodeENI\nmetadata: {{name: {name}}}\nspec:\n  {spec}\n"
        );
        let value: serde_json::Value = serde_yaml_ng::from_str(&yaml).expect("yaml");
        let dynamic: kube::core::DynamicObject = serde_json::from_value(value).expect("object");
        let ar = kube::core::ApiResource::erase::<NodeENI>(&());
        let dyn_api: Api<kube::core::DynamicObject> = Api::all_with(client.clone(), &ar);
        let pp = PatchParams::apply("kubectl").validation_strict();
        dyn_api
            .patch(name, &pp, &Patch::Apply(&dynamic))
            .await
            .unwrap_or_else(|e| panic!("{name} did not apply: {e}"));
        let read = api.get(name).await.expect("read back");
        if name.starts_with("old-dpdk") {
            assert!(read.spec.dpdk(), "{name}: DPDK flag lost");
        }
        api.delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
}

/// The device-index rule accepts exactly up to index 63 for the last subnet.
#[tokio::test]
#[ignore = "integration: needs kube-apiserver (make test-integration)"]
async fn device_index_rule_accepts_the_boundary() {
    let client = client_with_crd().await;
    let sg = "securityGroupIDs: [sg-05da196f3314d4af8]";
    let cases = [
        format!("{sg}\n  deviceIndex: 63\n  subnetID: subnet-0f59b4f14737be9ad"),
        format!(
            "{sg}\n  deviceIndex: 62\n  subnetID: subnet-0f59b4f14737be9ad\n  subnetIDs: [subnet-0a1b2c3d4e5f60718]"
        ),
        format!("{sg}\n  deviceIndex: 62\n  subnetName: a\n  subnetNames: [b]"),
        format!(
            "{sg}\n  deviceIndex: 61\n  subnetIDs: [subnet-0f59b4f14737be9ad]\n  subnetNames: [a, b]"
        ),
    ];
    for (i, spec) in cases.iter().enumerate() {
        let yaml = format!(
            "apiVersion: networking.k8s.aws/v1alpha1\nkind: NodeENI\nmetadata: {{name: boundary-{i}}}\nspec:\n  nodeSelector: {{ng: multi-eni}}\n  {spec}\n"
        );
        if let Err(e) = create(&client, &yaml).await {
            panic!("boundary case {i} rejected: {e}\n{spec}");
        }
    }
}

#[tokio::test]
#[ignore = "integration: needs kube-apiserver (make test-integration)"]
async fn invalid_manifests_are_rejected_naming_the_field() {
    let client = client_with_crd().await;
    let ok_net = "subnetID: subnet-0f59b4f14737be9ad\n  securityGroupIDs: [sg-05da196f3314d4af8]";
    let cases = [
        ("no subnet", "securityGroupIDs: [sg-05da196f3314d4af8]".to_string(), "spec.subnetID"),
        ("no security group", "subnetID: subnet-0f59b4f14737be9ad".to_string(), "spec.securityGroupIDs"),
        ("device index 0", format!("{ok_net}\n  deviceIndex: 0"), "spec.deviceIndex"),
        ("device index too high", format!("{ok_net}\n  deviceIndex: 64"), "spec.deviceIndex"),
        ("subnets past the last index", "securityGroupIDs: [sg-05da196f3314d4af8]\n  deviceIndex: 63\n  subnetIDs: [subnet-0f59b4f14737be9ad, subnet-0a1b2c3d4e5f60718, subnet-00000000]".to_string(), "spec.deviceIndex"),
        // The last index is deviceIndex + subnets - 1, and subnetID / subnetName count.
        ("two subnets from index 63", "securityGroupIDs: [sg-05da196f3314d4af8]\n  deviceIndex: 63\n  subnetIDs: [subnet-0f59b4f14737be9ad, subnet-0a1b2c3d4e5f60718]".to_string(), "spec.deviceIndex"),
        ("subnetID and subnetIDs from index 63", "securityGroupIDs: [sg-05da196f3314d4af8]\n  deviceIndex: 63\n  subnetID: subnet-0f59b4f14737be9ad\n  subnetIDs: [subnet-0a1b2c3d4e5f60718]".to_string(), "spec.deviceIndex"),
        ("subnetName and subnetNames from index 63", "securityGroupIDs: [sg-05da196f3314d4af8]\n  deviceIndex: 63\n  subnetName: a\n  subnetNames: [b]".to_string(), "spec.deviceIndex"),
        ("mtu too small", format!("{ok_net}\n  mtu: 500"), "spec.mtu"),
        ("mtu too large", format!("{ok_net}\n  mtu: 9002"), "spec.mtu"),
        ("malformed subnet id", "subnetID: subnet-xyz\n  securityGroupIDs: [sg-05da196f3314d4af8]".to_string(), "spec.subnetID"),
        ("malformed subnet ids", "subnetIDs: [subnet-0f59b4f14737be9ad, sn-1]\n  securityGroupIDs: [sg-05da196f3314d4af8]".to_string(), "spec.subnetIDs[1]"),
        ("malformed security group", "subnetID: subnet-0f59b4f14737be9ad\n  securityGroupIDs: [sg-nope]".to_string(), "spec.securityGroupIDs[0]"),
        ("unknown DPDK driver", format!("{ok_net}\n  dpdkEnabled: true\n  dpdkDriver: e1000"), "spec.dpdkDriver"),
        ("malformed resource name", format!("{ok_net}\n  dpdkEnabled: true\n  dpdkResourceName: \"not a resource\""), "spec.dpdkResourceName"),
        ("malformed PCI address", format!("{ok_net}\n  enableDPDK: true\n  dpdkPCIAddress: \"00:06.0\""), "spec.dpdkPCIAddress"),
        ("DPDK spellings disagree", format!("{ok_net}\n  enableDPDK: true\n  dpdkEnabled: false"), "spec.enableDPDK"),
    ];
    for (i, (what, spec, field)) in cases.iter().enumerate() {
        let yaml = format!(
            "apiVersion: networking.k8s.aws/v1alpha1\nkind: NodeENI\nmetadata: {{name: invalid-{i}}}\nspec:\n  nodeSelector: {{ng: multi-eni}}\n  {spec}\n"
        );
        match create(&client, &yaml).await {
            Ok(_) => panic!("{what}: accepted, should be rejected"),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{what}: {status:?}");
                assert!(
                    status.message.contains(field),
                    "{what}: message does not name {field}: {}",
                    status.message
                );
            }
            Err(e) => panic!("{what}: unexpected error {e}"),
        }
    }
}
