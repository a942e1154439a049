//! The upgrade from the older Go project's Helm chart (1.3.8), with the real chart and the
//! real peers from `hack/peers.sh`:
//!
//! 1. `helm install` the unmodified old chart (a copy of `../shared/legacy/go-chart-1.3.8`,
//!    or `$ENI_LEGACY_CHART`) into a private kube-apiserver, as its README says;
//! 2. create NodeENIs with the older status shape and the older finalizer;
//! 3. run the command block of docs/upgrading.md marked `upgrade-commands`, exactly as
//!    written (bash, from a copy of `charts/`), so the test fails when the doc drifts;
//! 4. check that the NodeENIs, their status and their finalizers survived, the new CRD is
//!    in place, the old release's objects are gone and the new charts' objects are there.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use eni_api::NodeENI;
use eni_testkit::{ApiServer, bin_dir, peer};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

const NAMESPACE: &str = "eni-controller-system";
/// The release name the older chart's README installs with, and the doc's example.
const OLD_RELEASE: &str = "my-release";
const FINALIZER: &str = "nodeeni.networking.k8s.aws/finalizer";
const ROLE_ARN: &str = "arn:aws:iam::111122223333:role/eni-controller";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn legacy_chart() -> PathBuf {
    let path = std::env::var_os("ENI_LEGACY_CHART")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/legacy/go-chart-1.3.8"));
    assert!(
        path.join("Chart.yaml").is_file(),
        "the older chart is missing at {} (set ENI_LEGACY_CHART)",
        path.display()
    );
    path
}

/// The fenced block after the `upgrade-commands` marker in docs/upgrading.md.
fn doc_commands() -> String {
    let doc = std::fs::read_to_string(repo_root().join("docs/upgrading.md")).expect("read doc");
    let marker = doc
        .find("<!-- upgrade-commands")
        .expect("docs/upgrading.md has no upgrade-commands marker");
    let rest = &doc[marker..];
    let open = rest
        .find("```sh\n")
        .expect("a ```sh block after the marker")
        + "```sh\n".len();
    let close = rest[open..].find("\n```").expect("the block is closed");
    rest[open..open + close + 1].to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

struct World {
    api: ApiServer,
    dir: tempfile::TempDir,
}

impl World {
    /// A command with the cached peers first on PATH, the apiserver's kubeconfig, and
    /// Helm's and kubectl's caches in the scratch directory.
    fn command(&self, program: &str) -> Command {
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let scratch = self.dir.path().join("home");
        let mut cmd = Command::new(program);
        cmd.current_dir(self.dir.path().join("checkout"))
            .env("PATH", path)
            .env("KUBECONFIG", &self.api.kubeconfig)
            .env("HOME", &scratch)
            .env("HELM_CACHE_HOME", scratch.join("helm-cache"))
            .env("HELM_CONFIG_HOME", scratch.join("helm-config"))
            .env("HELM_DATA_HOME", scratch.join("helm-data"))
            .env("KUBECACHEDIR", scratch.join("kube-cache"))
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, what: &str, program: &str, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{what}: cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kubectl_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.run("kubectl get", "kubectl", &all)).expect("JSON")
    }

    fn exists(&self, args: &[&str]) -> bool {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        self.command("kubectl")
            .args(&all)
            .output()
            .expect("run kubectl")
            .status
            .success()
    }

    fn apply(&self, what: &str, manifest: &Value) {
        let file = self.dir.path().join("manifest.json");
        std::fs::write(&file, manifest.to_string()).expect("write manifest");
        let file = file.to_string_lossy().into_owned();
        self.run(what, "kubectl", &["apply", "-f", &file]);
    }
}

/// One attachment in the older controller's status shape (REFERENCE §1).
fn old_attachment(node: &str, instance: &str, eni: &str, index: u32, dpdk: bool) -> Value {
    let mut a = json!({
        "nodeID": node,
        "instanceID": instance,
        "eniID": eni,
        "attachmentID": format!("eni-attach-{}", &eni[4..]),
        "subnetID": "subnet-0a1b2c3d4e5f60718",
        "subnetCIDR": "10.0.64.0/20",
        "mtu": 9001,
        "deviceIndex": index,
        "status": "attached",
        "lastUpdated": "2025-03-14T09:26:53Z",
    });
    if dpdk {
        a["dpdkBound"] = json!(true);
        a["dpdkDriver"] = json!("vfio-pci");
        a["dpdkResourceName"] = json!("intel.com/intel_sriov_netdevice");
        a["dpdkPCIAddress"] = json!("0000:00:07.0");
    }
    a
}

/// The NodeENIs of an older cluster: their spec as users wrote it, their status as the
/// older controller wrote it.
fn old_nodeenis() -> Vec<(Value, Value)> {
    let spec = |index: u32, dpdk: bool| {
        let mut s = json!({
            "nodeSelector": {"ng": "multi-eni"},
            "subnetID": "subnet-0a1b2c3d4e5f60718",
            "securityGroupIDs": ["sg-0123456789abcdef0"],
            "deviceIndex": index,
            "mtu": 9001,
            "description": "Multus ENI",
        });
        if dpdk {
            s["enableDPDK"] = json!(true);
            s["dpdkDriver"] = json!("vfio-pci");
            s["dpdkResourceName"] = json!("intel.com/intel_sriov_netdevice");
        }
        s
    };
    vec![
        (
            json!({"apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
                   "metadata": {"name": "multus-eni", "finalizers": [FINALIZER]},
                   "spec": spec(2, false)}),
            json!({"attachments": [
                old_attachment("ip-10-0-1-10.ec2.internal", "i-0aaaaaaaaaaaaaaa1", "eni-0aaaaaaaaaaaaaa01", 2, false),
                old_attachment("ip-10-0-1-11.ec2.internal", "i-0aaaaaaaaaaaaaaa2", "eni-0aaaaaaaaaaaaaa02", 2, false),
            ]}),
        ),
        (
            json!({"apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
                   "metadata": {"name": "dpdk-eni", "finalizers": [FINALIZER]},
                   "spec": spec(3, true)}),
            json!({"attachments": [
                old_attachment("ip-10-0-1-10.ec2.internal", "i-0aaaaaaaaaaaaaaa1", "eni-0aaaaaaaaaaaaaa03", 3, true),
            ]}),
        ),
    ]
}

#[tokio::test]
#[ignore = "integration: needs kube-apiserver, etcd, helm, kubectl from hack/peers.sh and the old chart"]
async fn upgrade_from_the_go_chart_by_the_documented_commands() {
    let commands = doc_commands();
    assert!(
        commands.contains(&format!("OLD_RELEASE={OLD_RELEASE} ")),
        "the doc's example release name changed; update OLD_RELEASE here:\n{commands}"
    );
    for tool in ["helm", "kubectl"] {
        peer(tool).expect("peer binary (make peers)");
    }
    let api = ApiServer::start().await.expect("kube-apiserver starts");
    let dir = tempfile::tempdir().expect("tempdir");
    // A checkout-like directory: the doc's paths are relative to the repository.
    copy_dir(
        &repo_root().join("charts"),
        &dir.path().join("checkout/charts"),
    );
    copy_dir(&legacy_chart(), &dir.path().join("go-chart-1.3.8"));
    let w = World { api, dir };
    let old_chart = w.dir.path().join("go-chart-1.3.8");
    let old_chart = old_chart.to_string_lossy();

    // 1. The old chart, installed as its README says, with the values users turned on
    //    (metrics Service, an IRSA role; DPDK is on by default).
    w.run(
        "helm install the 1.3.8 chart",
        "helm",
        &[
            "install",
            OLD_RELEASE,
            &old_chart,
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--set",
            "metrics.enabled=true",
            "--set-string",
            &format!("serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn={ROLE_ARN}"),
        ],
    );
    w.run(
        "wait for the old CRD",
        "kubectl",
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/nodeenis.networking.k8s.aws",
        ],
    );
    // The old release does not own the namespace (so neither an uninstall nor the upgrade
    // deletes it); it owns the ServiceAccount and the Deployment eni-controller.
    let manifest = w.run(
        "helm get manifest",
        "helm",
        &["get", "manifest", OLD_RELEASE, "-n", NAMESPACE],
    );
    assert!(!manifest.contains("kind: Namespace"), "{manifest}");
    assert!(
        !manifest.contains("kind: CustomResourceDefinition"),
        "the CRD is templated"
    );
    for kind in [
        "kind: ServiceAccount",
        "kind: Deployment",
        "kind: DaemonSet",
    ] {
        assert!(manifest.contains(kind), "{kind} not in the old release");
    }
    let old_ds = w.kubectl_json(&["-n", NAMESPACE, "daemonset", "eni-manager"]);
    assert_eq!(
        old_ds["metadata"]["annotations"]["meta.helm.sh/release-name"],
        OLD_RELEASE
    );
    for (what, args) in [
        (
            "ConfigMap dpdk-tools",
            vec!["-n", NAMESPACE, "configmap", "dpdk-tools"],
        ),
        (
            "ClusterRole eni-controller-role",
            vec!["clusterrole", "eni-controller-role"],
        ),
        (
            "Deployment eni-controller",
            vec!["-n", NAMESPACE, "deployment", "eni-controller"],
        ),
    ] {
        assert!(w.exists(&args), "the old chart did not create {what}");
    }

    // 2. NodeENIs as the older controller left them.
    let mut uids = Vec::new();
    for (object, status) in old_nodeenis() {
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        w.apply(&format!("create NodeENI {name}"), &object);
        let patch = json!({ "status": status }).to_string();
        w.run(
            &format!("write the old status of {name}"),
            "kubectl",
            &[
                "patch",
                "nodeeni",
                &name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch,
            ],
        );
        let live = w.kubectl_json(&["nodeeni", &name]);
        assert_eq!(
            live["status"], status,
            "the old CRD kept the old status of {name}"
        );
        uids.push((name, live["metadata"]["uid"].clone(), status));
    }

    // 3. The doc's commands, verbatim.
    let out = w
        .command("bash")
        .args(["-euo", "pipefail", "-c", &commands])
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "the documented upgrade failed\n--- commands\n{commands}\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // 4a. The NodeENIs: the same objects, the older status and finalizer untouched.
    for (name, uid, status) in &uids {
        let live = w.kubectl_json(&["nodeeni", name]);
        assert_eq!(&live["metadata"]["uid"], uid, "{name} was recreated");
        assert_eq!(
            live["metadata"]["finalizers"],
            json!([FINALIZER]),
            "finalizer of {name}"
        );
        // Every field the older controller wrote, unchanged (the new CRD may add defaults
        // such as desiredAttachments).
        assert_eq!(
            live["status"]["attachments"], status["attachments"],
            "status of {name} changed"
        );
    }
    // The new types read them.
    let client = w.api.client().await.expect("client");
    let list = Api::<NodeENI>::all(client)
        .list(&ListParams::default())
        .await
        .expect("the new NodeENI type reads the old objects");
    assert_eq!(list.items.len(), uids.len());
    let multus = list
        .items
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some("multus-eni"))
        .expect("multus-eni");
    let attachments = &multus.status.as_ref().expect("status").attachments;
    assert_eq!(attachments.len(), 2);
    assert_eq!(attachments[0].eni_id, "eni-0aaaaaaaaaaaaaa01");
    assert_eq!(attachments[0].device_index, 2);

    // 4b. The CRD is the new one, and kept.
    let crd = w.kubectl_json(&["crd", "nodeenis.networking.k8s.aws"]);
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let columns: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        columns.contains(&"Ready") && !columns.contains(&"Nodes"),
        "the old CRD is still in place: columns {columns:?}"
    );

    // 4c. The new charts' objects, owned by the right releases; the old ones gone.
    let deploy = w.kubectl_json(&["-n", NAMESPACE, "deployment", "eni-controller"]);
    assert_eq!(
        deploy["metadata"]["annotations"]["meta.helm.sh/release-name"],
        OLD_RELEASE
    );
    assert_eq!(
        deploy["spec"]["selector"]["matchLabels"],
        json!({"app.kubernetes.io/name": "eni-controller", "app.kubernetes.io/instance": OLD_RELEASE})
    );
    let ds = w.kubectl_json(&["-n", NAMESPACE, "daemonset", "eni-manager"]);
    assert_eq!(
        ds["metadata"]["annotations"]["meta.helm.sh/release-name"],
        "aws-multi-eni-node"
    );
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "eni-manager"
    );
    let sa = w.kubectl_json(&["-n", NAMESPACE, "serviceaccount", "eni-controller"]);
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"], ROLE_ARN,
        "the IRSA role was lost"
    );
    assert_eq!(
        sa["metadata"]["labels"]["app.kubernetes.io/part-of"],
        "aws-multi-eni"
    );
    for args in [
        vec!["-n", NAMESPACE, "serviceaccount", "eni-manager"],
        vec!["clusterrole", "aws-multi-eni:eni-controller"],
        vec!["-n", NAMESPACE, "service", "eni-controller-metrics"],
        vec!["namespace", NAMESPACE],
    ] {
        assert!(w.exists(&args), "missing after the upgrade: {args:?}");
    }
    for args in [
        vec!["-n", NAMESPACE, "configmap", "dpdk-tools"],
        vec!["clusterrole", "eni-controller-role"],
        vec!["clusterrole", "eni-controller-sriov-manager"],
    ] {
        assert!(!w.exists(&args), "left over from the old release: {args:?}");
    }
    let svc = w.kubectl_json(&["-n", NAMESPACE, "service", "eni-controller-metrics"]);
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/name"],
        "eni-controller"
    );
    // Both releases deployed; the old one upgraded in place (revision 2).
    let releases: Value = serde_json::from_str(&w.run(
        "helm list",
        "helm",
        &["list", "-n", NAMESPACE, "-o", "json"],
    ))
    .expect("helm list JSON");
    let find = |name: &str| {
        releases
            .as_array()
            .expect("list")
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("release {name} missing: {releases}"))
            .clone()
    };
    let old = find(OLD_RELEASE);
    assert_eq!(old["status"], "deployed");
    assert_eq!(old["revision"], "2");
    assert!(
        old["chart"]
            .as_str()
            .is_some_and(|c| c.starts_with("aws-multi-eni-controller-0.")),
        "{old}"
    );
    assert_eq!(find("aws-multi-eni-node")["status"], "deployed");
    // The backup the doc made holds both NodeENIs with their status.
    let backup = std::fs::read_to_string(w.dir.path().join("checkout/nodeenis-backup.yaml"))
        .expect("backup written");
    assert!(backup.contains("eni-0aaaaaaaaaaaaaa03") && backup.contains(FINALIZER));
}
