//! The Helm charts under `charts/`, checked with the real peers from `hack/peers.sh`:
//!
//! * `helm lint --strict` of both charts, with their default values and their `ci/` values;
//! * the controller chart refuses to render without `clusterName` (a clear `required`);
//! * `helm template --kube-version 1.37.2` output of both charts, with the default values
//!   and every values file under `ci/`, accepted by the real kube-apiserver with
//!   `kubectl apply --dry-run=server` (CRD installed first);
//! * the node chart's init containers stay unprivileged with `privileged: true`, and the
//!   rendered vfio module loader lets the pod start when modprobe fails;
//! * the READMEs' values tables are what helm-docs generates from the values comments;
//! * RBAC: the rendered objects really applied, then the charts' ServiceAccounts
//!   impersonated: the controller can do what it calls and cannot exec into or delete pods;
//!   the node daemon can write NodeENI status but cannot change, or delete, a NodeENI, and
//!   may list pods (its allocation reconcile) but not get, watch or change them.
//!
//! That the chart's CRD equals the one generated from the Rust types is checked by the
//! unit test `crd::tests::committed_crd_matches_the_types` in this crate.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use eni_api::{NodeENI, NodeENISpec};
use eni_testkit::{ApiServer, eventually, peer};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec, ServiceAccount};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::OnceCell;

const NAMESPACE: &str = "eni-controller-system";
const KUBE_VERSION: &str = "1.37.2";
const CONTROLLER_SA: &str = "system:serviceaccount:eni-controller-system:eni-controller";
const NODE_SA: &str = "system:serviceaccount:eni-controller-system:eni-manager";
const SA_GROUPS: [&str; 2] = [
    "system:serviceaccounts",
    "system:serviceaccounts:eni-controller-system",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart(name: &str) -> String {
    repo_root()
        .join("charts")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Every values file under `charts/<name>/ci/`, sorted.
fn ci_files(name: &str) -> Vec<PathBuf> {
    let dir = Path::new(&chart(name)).join("ci");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no values files in {}", dir.display());
    files
}

/// One chart with one set of values.
struct Variant {
    what: String,
    chart: &'static str,
    release: &'static str,
    args: Vec<String>,
}

/// The value sets every test covers: defaults (plus the one required value where a test
/// renders) and every values file under `ci/` of both charts.
fn variants() -> Vec<Variant> {
    let c = "aws-multi-eni-controller";
    let n = "aws-multi-eni-node";
    let mut all = vec![
        Variant {
            what: "controller, default values + clusterName".into(),
            chart: c,
            release: "aws-multi-eni",
            args: vec!["--set".into(), "clusterName=test-cluster".into()],
        },
        Variant {
            what: "node, default values".into(),
            chart: n,
            release: "aws-multi-eni-node",
            args: vec![],
        },
    ];
    for (chart, release) in [(c, "aws-multi-eni"), (n, "aws-multi-eni-node")] {
        for file in ci_files(chart) {
            all.push(Variant {
                what: format!(
                    "{chart}, {}",
                    file.file_name().expect("name").to_string_lossy()
                ),
                chart,
                release,
                args: vec!["-f".into(), file.to_string_lossy().into_owned()],
            });
        }
    }
    all
}

/// The variant described as `what`.
fn variant(what: &str) -> Variant {
    variants()
        .into_iter()
        .find(|v| v.what == what)
        .unwrap_or_else(|| panic!("no variant {what}"))
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(program: &Path, args: &[String], stdin: Option<&str>) -> Output {
    // Helm and kubectl keep caches in $HOME; keep them out of it.
    let scratch = std::env::temp_dir().join("aws-multi-eni-chart-tests");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("HELM_CACHE_HOME", scratch.join("helm-cache"))
        .env("HELM_CONFIG_HOME", scratch.join("helm-config"))
        .env("HELM_DATA_HOME", scratch.join("helm-data"))
        .env("KUBECACHEDIR", scratch.join("kube-cache"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait for the child");
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn helm(args: &[String]) -> Output {
    run(&peer("helm").expect("helm peer"), args, None)
}

fn kubectl(api: &ApiServer, args: &[&str], stdin: Option<&str>) -> Output {
    let mut all = vec![format!("--kubeconfig={}", api.kubeconfig.display())];
    all.extend(args.iter().map(|s| s.to_string()));
    run(&peer("kubectl").expect("kubectl peer"), &all, stdin)
}

fn must(what: &str, out: Output) -> String {
    assert!(
        out.ok,
        "{what} failed\n--- stdout\n{}\n--- stderr\n{}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// `helm template` with the Kubernetes version of the test apiserver.
fn render(v: &Variant) -> String {
    let mut args: Vec<String> = vec![
        "template".into(),
        v.release.into(),
        chart(v.chart),
        "--namespace".into(),
        NAMESPACE.into(),
        "--kube-version".into(),
        KUBE_VERSION.into(),
    ];
    args.extend(v.args.iter().cloned());
    must(&format!("helm template ({})", v.what), helm(&args))
}

/// The rendered documents, parsed.
fn documents(rendered: &str) -> Vec<serde_json::Value> {
    serde_yaml_ng::Deserializer::from_str(rendered)
        .filter_map(|doc| {
            let v: serde_json::Value =
                serde::Deserialize::deserialize(doc).expect("rendered YAML parses");
            (!v.is_null()).then_some(v)
        })
        .collect()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// A stand-in for prometheus-operator's ServiceMonitor CRD, so the ci values (which turn
/// the ServiceMonitor on) can be dry-run.
const SERVICE_MONITOR_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

/// The same for prometheus-operator's PodMonitor (the node chart's ci values turn it on).
const POD_MONITOR_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: podmonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: PodMonitor, listKind: PodMonitorList, plural: podmonitors, singular: podmonitor}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

/// The shared apiserver with the NodeENI CRD, the namespace, the ServiceMonitor stand-in,
/// and both charts (default values) really applied.
async fn cluster() -> &'static ApiServer {
    static READY: OnceCell<&'static ApiServer> = OnceCell::const_new();
    *READY
        .get_or_init(|| async {
            let api = ApiServer::shared().await.expect("kube-apiserver starts");
            let crd = format!(
                "{}/crds/nodeenis.networking.k8s.aws.yaml",
                chart("aws-multi-eni-controller")
            );
            must(
                "apply the NodeENI CRD",
                kubectl(api, &["apply", "--server-side", "-f", &crd], None),
            );
            for stand_in in [SERVICE_MONITOR_CRD, POD_MONITOR_CRD] {
                must(
                    "apply a prometheus-operator stand-in CRD",
                    kubectl(api, &["apply", "-f", "-"], Some(stand_in)),
                );
            }
            for name in [
                "nodeenis.networking.k8s.aws",
                "servicemonitors.monitoring.coreos.com",
                "podmonitors.monitoring.coreos.com",
            ] {
                must(
                    "wait for the CRDs",
                    kubectl(
                        api,
                        &[
                            "wait",
                            "--for=condition=Established",
                            "--timeout=60s",
                            &format!("crd/{name}"),
                        ],
                        None,
                    ),
                );
            }
            let ns = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n");
            must(
                "create the namespace",
                kubectl(api, &["apply", "-f", "-"], Some(&ns)),
            );
            for v in variants()
                .iter()
                .filter(|v| v.what.contains("default values"))
            {
                let rendered = render(v);
                must(
                    &format!("kubectl apply ({})", v.what),
                    kubectl(api, &["apply", "-f", "-"], Some(&rendered)),
                );
            }
            api
        })
        .await
}

#[test]
#[ignore = "integration: needs helm from hack/peers.sh"]
fn helm_lint_is_clean_with_default_and_ci_values() {
    let mut linted = 0;
    let mut sets = vec![("aws-multi-eni-controller", vec![])];
    sets.extend(variants().into_iter().map(|v| (v.chart, v.args)));
    for (name, extra) in sets {
        let mut args = vec![
            "lint".to_string(),
            "--strict".to_string(),
            "--namespace".to_string(),
            NAMESPACE.to_string(),
            chart(name),
        ];
        args.extend(extra.iter().cloned());
        let out = must(&format!("helm lint {name} {extra:?}"), helm(&args));
        assert!(out.contains("0 chart(s) failed"), "helm lint {name}: {out}");
        for bad in ["[WARNING]", "[ERROR]"] {
            assert!(!out.contains(bad), "helm lint {name} {extra:?}: {out}");
        }
        linted += 1;
    }
    assert!(linted >= 5, "only {linted} value sets");
}

#[test]
#[ignore = "integration: needs helm from hack/peers.sh"]
fn node_chart_has_no_netdev_resource_value() {
    // devicePlugin.netdevResourceName was accepted and did nothing; it is gone, and a
    // values file that still sets it fails loudly instead of being ignored.
    let args: Vec<String> = [
        "template",
        "x",
        &chart("aws-multi-eni-node"),
        "--set",
        "devicePlugin.netdevResourceName=aws.amazon.com/eni",
        "--kube-version",
        KUBE_VERSION,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = helm(&args);
    assert!(!out.ok, "rendered with netdevResourceName");
    assert!(
        out.stderr.contains("netdevResourceName"),
        "unclear error: {}",
        out.stderr
    );
    for v in variants().iter().filter(|v| v.chart.contains("node")) {
        let rendered = render(v);
        assert!(
            !rendered.contains("NETDEV_RESOURCE"),
            "{}: still sets a netdev resource",
            v.what
        );
    }
}

#[test]
#[ignore = "integration: needs helm from hack/peers.sh"]
fn controller_chart_refuses_to_render_without_what_it_needs() {
    let base = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "template",
            "x",
            &chart("aws-multi-eni-controller"),
            "--kube-version",
            KUBE_VERSION,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        helm(&args)
    };
    let out = base(&[]);
    assert!(!out.ok, "rendered without clusterName");
    assert!(
        out.stderr.contains("clusterName is required"),
        "unclear error: {}",
        out.stderr
    );
    let out = base(&[
        "--set",
        "clusterName=c",
        "--set",
        "leaderElection.enabled=false",
    ]);
    assert!(!out.ok, "2 replicas without leader election rendered");
    assert!(out.stderr.contains("leaderElection"), "{}", out.stderr);
    assert!(
        base(&[
            "--set",
            "clusterName=c",
            "--set",
            "leaderElection.enabled=false",
            "--set",
            "replicaCount=1"
        ])
        .ok
    );
    let out = base(&["--set", "clusterName=c", "--set", "logFormat=xml"]);
    assert!(!out.ok, "the schema let logFormat=xml through");
    let out = base(&["--set", "clusterName=c", "--set", "controllr.x=1"]);
    assert!(!out.ok, "the schema let a misspelt key through");
}

#[test]
#[ignore = "integration: needs helm from hack/peers.sh"]
fn rendered_objects_have_the_documented_names_and_privileges() {
    // Controller: fixed names, non-root, read-only, no capabilities, downward API.
    let docs = documents(&render(&variant(
        "controller, default values + clusterName",
    )));
    let deploy = find(&docs, "Deployment", "eni-controller");
    assert_eq!(deploy["metadata"]["namespace"], NAMESPACE);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let env: BTreeMap<String, serde_json::Value> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().expect("name").to_string(), e.clone()))
        .collect();
    assert_eq!(env["ENI_CONTROLLER_CLUSTER_NAME"]["value"], "test-cluster");
    assert_eq!(env["ENI_CONTROLLER_LEADER_ELECT"]["value"], "true");
    assert_eq!(
        env["ENI_CONTROLLER_LEADER_ELECTION_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env["ENI_CONTROLLER_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    // No wildcard anywhere in the controller's RBAC.
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        let text = d["rules"].to_string();
        assert!(
            !text.contains('*'),
            "wildcard in {}: {text}",
            d["metadata"]["name"]
        );
        assert!(
            !text.contains("pods"),
            "pods in {}: {text}",
            d["metadata"]["name"]
        );
        assert!(
            !text.contains("secrets"),
            "secrets in {}",
            d["metadata"]["name"]
        );
    }

    // Node daemon: host network, NET_ADMIN only, not privileged by default.
    let docs = documents(&render(&variant("node, default values")));
    let ds = find(&docs, "DaemonSet", "eni-manager");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["nodeSelector"], json!({"ng": "multi-eni"}));
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN"])
    );
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    let inits = pod["initContainers"].as_array().expect("init containers");
    assert_eq!(inits.len(), 1, "only the cni-helper installer by default");
    assert_eq!(inits[0]["name"], "install-cni-helper");
    // cni-helper's node-local config (never in a NAD) points at the daemon's state dir.
    let node_config: serde_json::Value = serde_json::from_str(
        inits[0]["env"][0]["value"]
            .as_str()
            .expect("NODE_CONFIG value"),
    )
    .expect("NODE_CONFIG is JSON");
    assert_eq!(inits[0]["env"][0]["name"], "NODE_CONFIG");
    assert_eq!(node_config, json!({"stateDir": "/run/aws-multi-eni"}));
    assert!(pod["volumes"].to_string().contains("/etc/aws-multi-eni"));
    assert!(pod["volumes"].to_string().contains("/opt/cni/bin"));
    for d in docs.iter().filter(|d| d["kind"] == "ClusterRole") {
        let text = d["rules"].to_string();
        assert!(!text.contains('*'), "wildcard in {text}");
    }

    // ci values: the module loader is the only container with SYS_MODULE.
    let docs = documents(&render(&variant("aws-multi-eni-node, ci-values.yaml")));
    let pod = &find(&docs, "DaemonSet", "eni-manager")["spec"]["template"]["spec"];
    let loader = &pod["initContainers"][0];
    assert_eq!(loader["name"], "load-vfio-modules");
    assert_eq!(
        loader["securityContext"]["capabilities"]["add"],
        json!(["SYS_MODULE"])
    );
    assert!(pod["volumes"].to_string().contains("plugins_registry"));
}

/// Environment variable names a binary declares (`env = "..."` in its clap config).
fn declared_env(config_rs: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join(config_rs))
        .unwrap_or_else(|e| panic!("read {config_rs}: {e}"));
    text.split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect()
}

/// Every environment variable the charts set is one the binary reads (flags renamed in
/// the code would otherwise be dropped silently).
#[test]
#[ignore = "integration: needs helm from hack/peers.sh"]
fn chart_environment_matches_the_binaries_flags() {
    // Read by something other than clap: the logger, the Rust runtime.
    let extra = ["RUST_LOG", "RUST_BACKTRACE"];
    for v in variants() {
        let config = if v.chart == "aws-multi-eni-controller" {
            "controller/src/config.rs"
        } else {
            "node/src/config.rs"
        };
        let known = declared_env(config);
        assert!(known.len() > 10, "{config}: found only {known:?}");
        let docs = documents(&render(&v));
        let workload = docs
            .iter()
            .find(|d| d["kind"] == "Deployment" || d["kind"] == "DaemonSet")
            .expect("a workload");
        let container = &workload["spec"]["template"]["spec"]["containers"][0];
        let names: Vec<&str> = container["env"]
            .as_array()
            .expect("env")
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert!(names.len() > 5, "{}: {names:?}", v.what);
        for name in names {
            assert!(
                known.iter().any(|k| k == name) || extra.contains(&name),
                "{}: the chart sets {name}, which {config} does not declare",
                v.what
            );
        }
    }
}

#[tokio::test]
#[ignore = "integration: needs helm, kubectl, etcd and kube-apiserver from hack/peers.sh"]
async fn rendered_charts_pass_server_side_dry_run() {
    let api = cluster().await;
    let mut checked = 0;
    for v in variants() {
        let rendered = render(&v);
        let out = must(
            &format!("kubectl apply --dry-run=server ({})", v.what),
            kubectl(
                api,
                &["apply", "--dry-run=server", "-f", "-"],
                Some(&rendered),
            ),
        );
        assert!(out.contains("(server dry run)"), "{out}");
        eprintln!("{}:\n{out}", v.what);
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} value sets");
}

async fn allowed(client: &Client, attrs: ResourceAttributes) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(attrs),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    answer.status.map(|s| s.allowed).unwrap_or(false)
}

fn attrs(
    verb: &str,
    group: &str,
    resource: &str,
    subresource: Option<&str>,
    namespace: Option<&str>,
    name: Option<&str>,
) -> ResourceAttributes {
    ResourceAttributes {
        verb: Some(verb.into()),
        group: Some(group.into()),
        resource: Some(resource.into()),
        subresource: subresource.map(Into::into),
        namespace: namespace.map(Into::into),
        name: name.map(Into::into),
        ..Default::default()
    }
}

/// (verb, group, resource, subresource, namespace, name, expected)
type Check = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    bool,
);

async fn check_all(client: &Client, who: &str, checks: &[Check]) {
    let mut wrong = Vec::new();
    for &(verb, group, resource, sub, ns, name, want) in checks {
        let got = allowed(client, attrs(verb, group, resource, sub, ns, name)).await;
        if got != want {
            wrong.push(format!(
                "{verb} {group}/{resource}{} ns={ns:?} name={name:?}: allowed={got}, want {want}",
                sub.map(|s| format!("/{s}")).unwrap_or_default()
            ));
        }
    }
    assert!(wrong.is_empty(), "{who}:\n{}", wrong.join("\n"));
}

fn test_nodeeni(name: &str) -> NodeENI {
    NodeENI::new(
        name,
        NodeENISpec {
            node_selector: BTreeMap::from([("ng".into(), "multi-eni".into())]),
            subnet_id: Some("subnet-0123456789abcdef0".into()),
            security_group_ids: vec!["sg-0123456789abcdef0".into()],
            device_index: 2,
            delete_on_termination: true,
            ..Default::default()
        },
    )
}

#[tokio::test]
#[ignore = "integration: needs helm, kubectl, etcd and kube-apiserver from hack/peers.sh"]
async fn controller_service_account_has_exactly_what_it_calls() {
    let api = cluster().await;
    let sa = api
        .impersonating(CONTROLLER_SA, &SA_GROUPS)
        .await
        .expect("impersonating client");
    let g = "networking.k8s.aws";
    let ns = Some(NAMESPACE);
    let lease = Some("aws-multi-eni-controller");
    check_all(
        &sa,
        "eni-controller",
        &[
            ("list", g, "nodeenis", None, None, None, true),
            ("watch", g, "nodeenis", None, None, None, true),
            ("patch", g, "nodeenis", None, None, Some("x"), true),
            (
                "patch",
                g,
                "nodeenis",
                Some("status"),
                None,
                Some("x"),
                true,
            ),
            (
                "update",
                g,
                "nodeenis",
                Some("finalizers"),
                None,
                Some("x"),
                true,
            ),
            ("create", g, "nodeenis", None, None, None, false),
            ("delete", g, "nodeenis", None, None, Some("x"), false),
            ("get", "", "nodes", None, None, Some("n"), true),
            ("list", "", "nodes", None, None, None, true),
            ("watch", "", "nodes", None, None, None, true),
            ("patch", "", "nodes", None, None, Some("n"), false),
            ("delete", "", "nodes", None, None, Some("n"), false),
            (
                "create",
                "events.k8s.io",
                "events",
                None,
                Some("default"),
                None,
                true,
            ),
            (
                "patch",
                "events.k8s.io",
                "events",
                None,
                Some("default"),
                Some("e"),
                true,
            ),
            (
                "create",
                "coordination.k8s.io",
                "leases",
                None,
                ns,
                None,
                true,
            ),
            (
                "get",
                "coordination.k8s.io",
                "leases",
                None,
                ns,
                lease,
                true,
            ),
            (
                "update",
                "coordination.k8s.io",
                "leases",
                None,
                ns,
                lease,
                true,
            ),
            (
                "patch",
                "coordination.k8s.io",
                "leases",
                None,
                ns,
                lease,
                true,
            ),
            (
                "patch",
                "coordination.k8s.io",
                "leases",
                None,
                ns,
                Some("other"),
                false,
            ),
            (
                "create",
                "coordination.k8s.io",
                "leases",
                None,
                Some("kube-system"),
                None,
                false,
            ),
            ("create", "", "pods", Some("exec"), ns, Some("p"), false),
            (
                "create",
                "",
                "pods",
                Some("exec"),
                Some("kube-system"),
                Some("p"),
                false,
            ),
            ("get", "", "pods", Some("exec"), ns, Some("p"), false),
            ("delete", "", "pods", None, ns, Some("p"), false),
            (
                "delete",
                "",
                "pods",
                None,
                Some("kube-system"),
                Some("p"),
                false,
            ),
            ("deletecollection", "", "pods", None, ns, None, false),
            ("list", "", "pods", None, None, None, false),
            ("get", "", "secrets", None, ns, Some("s"), false),
            ("list", "", "secrets", None, None, None, false),
        ],
    )
    .await;

    // Real calls: what leader election and the Node watch do.
    let nodes: Api<Node> = Api::all(sa.clone());
    nodes
        .list(&ListParams::default().limit(1))
        .await
        .expect("the controller lists Nodes");
    let leases: Api<Lease> = Api::namespaced(sa.clone(), NAMESPACE);
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some("aws-multi-eni-controller".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("eni-controller-test".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    match leases.create(&PostParams::default(), &lease).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("the controller cannot create its Lease: {e}"),
    }
    leases
        .patch(
            "aws-multi-eni-controller",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "eni-controller-test-2"}})),
        )
        .await
        .expect("the controller patches its Lease");
    let denied = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(sa.clone(), NAMESPACE)
        .delete("anything", &Default::default())
        .await;
    assert!(
        matches!(denied, Err(kube::Error::Api(ref s)) if s.code == 403),
        "pod deletion was not forbidden: {denied:?}"
    );
}

#[tokio::test]
#[ignore = "integration: needs helm, kubectl, etcd and kube-apiserver from hack/peers.sh"]
async fn node_service_account_writes_status_but_cannot_change_nodeenis() {
    let api = cluster().await;
    let admin = api.client().await.expect("admin client");
    let name = "chart-rbac-node";
    let admin_api: Api<NodeENI> = Api::all(admin);
    match admin_api
        .create(&PostParams::default(), &test_nodeeni(name))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("cannot create the test NodeENI: {e}"),
    }

    let sa = api
        .impersonating(NODE_SA, &SA_GROUPS)
        .await
        .expect("impersonating client");
    let g = "networking.k8s.aws";
    check_all(
        &sa,
        "eni-manager",
        &[
            ("get", g, "nodeenis", None, None, Some(name), true),
            ("list", g, "nodeenis", None, None, None, true),
            ("watch", g, "nodeenis", None, None, None, true),
            (
                "patch",
                g,
                "nodeenis",
                Some("status"),
                None,
                Some(name),
                true,
            ),
            ("update", g, "nodeenis", None, None, Some(name), false),
            ("patch", g, "nodeenis", None, None, Some(name), false),
            ("create", g, "nodeenis", None, None, None, false),
            ("delete", g, "nodeenis", None, None, Some(name), false),
            ("deletecollection", g, "nodeenis", None, None, None, false),
            (
                "update",
                g,
                "nodeenis",
                Some("finalizers"),
                None,
                Some(name),
                false,
            ),
            ("patch", "", "nodes", None, None, Some("n"), false),
            // The allocation reconcile lists its node's pods; nothing more on pods.
            ("list", "", "pods", None, None, None, true),
            ("get", "", "pods", None, Some(NAMESPACE), Some("p"), false),
            ("watch", "", "pods", None, None, None, false),
            (
                "delete",
                "",
                "pods",
                None,
                Some(NAMESPACE),
                Some("p"),
                false,
            ),
            (
                "create",
                "",
                "pods",
                Some("exec"),
                Some(NAMESPACE),
                Some("p"),
                false,
            ),
            (
                "get",
                "",
                "secrets",
                None,
                Some(NAMESPACE),
                Some("s"),
                false,
            ),
            (
                "create",
                "events.k8s.io",
                "events",
                None,
                Some("default"),
                None,
                false,
            ),
        ],
    )
    .await;

    // Real calls, as the daemon makes them: server-side apply of its own report entry, with
    // the token of a pod on node-a (the chart's admission policy needs the node name in it).
    let node_a = node_daemon_client(api, "node-a").await;
    let nodeenis: Api<NodeENI> = Api::all(node_a);
    let report = json!({
        "apiVersion": "networking.k8s.aws/v1alpha1",
        "kind": "NodeENI",
        "metadata": {"name": name},
        "status": {"nodeReports": [{
            "nodeName": "node-a",
            "interfaces": [{"eniID": "eni-0123456789abcdef0", "macAddress": "02:00:00:00:00:01",
                            "deviceIndex": 2, "interfaceName": "ens7", "up": true, "mtu": 9001}]
        }]}
    });
    let after = nodeenis
        .patch_status(
            name,
            &PatchParams::apply("eni-manager-node-a").force(),
            &Patch::Apply(&report),
        )
        .await
        .expect("the node daemon applies its status report");
    let reports = after.status.expect("status").node_reports;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].node_name, "node-a");

    // ... but not the spec, the finalizers, or the object's existence.
    let nodeenis: Api<NodeENI> = Api::all(sa.clone());
    for (what, patch) in [
        ("spec", json!({"spec": {"deviceIndex": 5}})),
        ("finalizers", json!({"metadata": {"finalizers": []}})),
    ] {
        let denied = nodeenis
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        assert!(
            matches!(denied, Err(kube::Error::Api(ref s)) if s.code == 403),
            "the node daemon could patch the {what}: {denied:?}"
        );
    }
    let denied = nodeenis.delete(name, &Default::default()).await;
    assert!(
        matches!(denied, Err(kube::Error::Api(ref s)) if s.code == 403),
        "the node daemon could delete a NodeENI: {denied:?}"
    );
    let spec = admin_api.get(name).await.expect("get").spec;
    assert_eq!(spec.device_index, 2, "the spec changed");
}

#[test]
#[ignore = "integration: needs helm from hack/peers.sh"]
fn privileged_node_daemon_keeps_init_containers_unprivileged() {
    let docs = documents(&render(&variant(
        "aws-multi-eni-node, privileged-values.yaml",
    )));
    let pod = &find(&docs, "DaemonSet", "eni-manager")["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["securityContext"]["privileged"], true);
    let inits = pod["initContainers"].as_array().expect("init containers");
    assert_eq!(inits.len(), 2, "{inits:?}");
    for init in inits {
        let sc = &init["securityContext"];
        assert_eq!(sc["privileged"], false, "{} is privileged", init["name"]);
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", init["name"]);
        assert_eq!(
            sc["capabilities"]["drop"],
            json!(["ALL"]),
            "{}",
            init["name"]
        );
    }
}

/// The rendered module loader, run by /bin/sh with a `modprobe` that fails (or succeeds):
/// a failure is reported and the init container still exits 0, so the daemon starts and
/// configures the non-DPDK ENIs.
#[test]
#[ignore = "integration: needs helm from hack/peers.sh"]
fn a_failing_vfio_module_load_does_not_hold_the_node_daemon_in_init() {
    let docs = documents(&render(&variant(
        "aws-multi-eni-node, privileged-values.yaml",
    )));
    let pod = &find(&docs, "DaemonSet", "eni-manager")["spec"]["template"]["spec"];
    let loader = pod["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .find(|c| c["name"] == "load-vfio-modules")
        .expect("the module loader");
    let command: Vec<String> = loader["command"]
        .as_array()
        .expect("command")
        .iter()
        .chain(loader["args"].as_array().expect("args"))
        .map(|v| v.as_str().expect("string").to_string())
        .collect();
    let env: Vec<(String, String)> = loader["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().expect("name").to_string(),
                e["value"].as_str().expect("value").to_string(),
            )
        })
        .collect();
    for (modprobe_rc, want_warning) in [(1, true), (0, false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let modprobe = dir.path().join("modprobe");
        std::fs::write(
            &modprobe,
            format!(
                "#!/bin/sh\necho \"modprobe $*\" >> {}/calls\nexit {modprobe_rc}\n",
                dir.path().display()
            ),
        )
        .expect("write fake modprobe");
        std::fs::set_permissions(
            &modprobe,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let out = Command::new(&command[0])
            .args(&command[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
            .output()
            .expect("run the loader script");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "modprobe rc {modprobe_rc}: the init container fails: {stderr}"
        );
        assert_eq!(
            stderr.contains("WARNING"),
            want_warning,
            "modprobe rc {modprobe_rc}: {stderr}"
        );
        let calls = std::fs::read_to_string(dir.path().join("calls")).expect("modprobe was called");
        assert!(
            calls.contains("vfio enable_unsafe_noiommu_mode=1"),
            "{calls}"
        );
        assert!(calls.contains("modprobe vfio-pci"), "{calls}");
    }
}

/// The READMEs' values tables are helm-docs' output for the current values comments.
#[test]
#[ignore = "integration: needs helm-docs from hack/peers.sh"]
fn chart_readmes_are_generated_from_the_values_comments() {
    let helm_docs = peer("helm-docs").expect("helm-docs peer (make peers)");
    for name in ["aws-multi-eni-controller", "aws-multi-eni-node"] {
        let args: Vec<String> = [
            "--chart-search-root",
            "charts",
            "--sort-values-order",
            "file",
            "--log-level",
            "warning",
            "--dry-run",
            "--chart-to-generate",
            &format!("charts/{name}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = Command::new(&helm_docs)
            .args(&args)
            .current_dir(repo_root())
            .output()
            .expect("run helm-docs");
        assert!(
            out.status.success(),
            "helm-docs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let generated = String::from_utf8_lossy(&out.stdout);
        let committed =
            std::fs::read_to_string(format!("{}/README.md", chart(name))).expect("README");
        assert!(
            generated.trim_end() == committed.trim_end(),
            "charts/{name}/README.md is out of date: run `make chart-docs`"
        );
        assert!(committed.contains("| Key | Type | Default | Description |"));
    }
}

#[test]
#[ignore = "integration: needs helm from hack/peers.sh"]
fn charts_state_their_kubernetes_floor_and_defaults() {
    for (name, set) in [
        ("aws-multi-eni-controller", "clusterName=c"),
        ("aws-multi-eni-node", "eniManager.logLevel=info"),
    ] {
        let out = helm(&[
            "template".into(),
            "x".into(),
            chart(name),
            "--set".into(),
            set.into(),
            "--kube-version".into(),
            "1.28.0".into(),
        ]);
        assert!(!out.ok, "{name} rendered for Kubernetes 1.28");
        assert!(out.stderr.contains("kubeVersion"), "{name}: {}", out.stderr);
    }
    // Between the charts' floor and 1.32 the node chart needs its node-reports policy off.
    let node_on = |kube: &str, extra: &[&str]| {
        let mut args: Vec<String> = [
            "template",
            "x",
            &chart("aws-multi-eni-node"),
            "--kube-version",
            kube,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        helm(&args)
    };
    let out = node_on("1.31.0", &[]);
    assert!(!out.ok, "node chart rendered its policy for 1.31");
    assert!(
        out.stderr.contains("rbac.nodeReportsPolicy=false"),
        "{}",
        out.stderr
    );
    assert!(node_on("1.31.0", &["--set", "rbac.nodeReportsPolicy=false"]).ok);
    assert!(node_on("1.32.0", &[]).ok);
    let docs = documents(&render(&variant(
        "controller, default values + clusterName",
    )));
    let pod = &find(&docs, "Deployment", "eni-controller")["spec"]["template"]["spec"];
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    // Events about the cluster-scoped NodeENI land in "default"; the value that suggested
    // otherwise is gone and refused.
    for d in docs.iter().filter(|d| {
        d["kind"] == "Role"
            && d["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-events"))
    }) {
        assert_eq!(d["metadata"]["namespace"], "default");
    }
    let out = helm(&[
        "template".into(),
        "x".into(),
        chart("aws-multi-eni-controller"),
        "--set".into(),
        "clusterName=c".into(),
        "--set".into(),
        "rbac.eventsNamespace=kube-system".into(),
        "--kube-version".into(),
        KUBE_VERSION.into(),
    ]);
    assert!(!out.ok, "rbac.eventsNamespace was accepted");
    assert!(out.stderr.contains("eventsNamespace"), "{}", out.stderr);
    // The documented extraArgs example renders as a single argument.
    let out = helm(&[
        "template".into(),
        "x".into(),
        chart("aws-multi-eni-controller"),
        "--set".into(),
        "clusterName=c".into(),
        "--set".into(),
        "extraArgs={--orphan-dry-run=true}".into(),
        "--kube-version".into(),
        KUBE_VERSION.into(),
    ]);
    let docs = documents(&must("render extraArgs", out));
    let c =
        &find(&docs, "Deployment", "eni-controller")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["args"], json!(["--orphan-dry-run=true"]));
}

/// docs/iam-policy.json builds every ARN from the partition placeholder, and the sed
/// command of docs/iam.md turns it into a valid policy for each partition.
#[test]
fn iam_policy_builds_arns_from_the_partition() {
    let template =
        std::fs::read_to_string(repo_root().join("docs/iam-policy.json")).expect("read policy");
    let doc = std::fs::read_to_string(repo_root().join("docs/iam.md")).expect("read iam.md");
    let parsed: serde_json::Value = serde_json::from_str(&template).expect("policy is JSON");
    assert!(
        doc.contains(template.trim_end()),
        "docs/iam.md shows another policy than docs/iam-policy.json"
    );
    for partition in ["aws", "aws-cn", "aws-us-gov"] {
        let policy = template
            .replace("CLUSTER_NAME", "my-cluster")
            .replace("PARTITION", partition);
        let policy: serde_json::Value = serde_json::from_str(&policy).expect("JSON");
        let mut arns = 0;
        for statement in policy["Statement"].as_array().expect("statements") {
            let resources = match &statement["Resource"] {
                serde_json::Value::String(r) => vec![r.clone()],
                serde_json::Value::Array(rs) => rs
                    .iter()
                    .map(|r| r.as_str().expect("ARN").to_string())
                    .collect(),
                other => panic!("Resource {other}"),
            };
            for r in resources.iter().filter(|r| *r != "*") {
                assert!(
                    r.starts_with(&format!("arn:{partition}:ec2:")),
                    "{partition}: {r} in {}",
                    statement["Sid"]
                );
                arns += 1;
            }
        }
        assert!(arns >= 8, "{partition}: only {arns} ARNs");
        let text = policy.to_string();
        assert!(!text.contains("PARTITION") && !text.contains("CLUSTER_NAME"));
    }
    assert!(
        !template.contains("arn:aws:"),
        "a hard-coded partition is left"
    );
    // Tags added to existing ENIs are limited by conditions (this cluster's ENIs, the older
    // controller's); none is unconditional.
    for statement in parsed["Statement"].as_array().expect("statements") {
        if statement["Action"] == "ec2:CreateTags" {
            assert!(
                !statement["Condition"].is_null(),
                "unconditional CreateTags in {}",
                statement["Sid"]
            );
        }
    }
}

/// Metric names the binaries register (`Registry::with_prefix` + `register("name", ..)`).
fn registered_metrics() -> Vec<String> {
    let mut names = Vec::new();
    for (file, prefix) in [
        ("controller/src/metrics.rs", "eni_controller"),
        ("node/src/metrics.rs", "eni_manager"),
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).expect("read metrics");
        assert!(
            text.contains(&format!("with_prefix(\"{prefix}\")")),
            "{file}"
        );
        for rest in text.split("register(").skip(1) {
            let name = rest
                .trim_start()
                .trim_start_matches('"')
                .split('"')
                .next()
                .expect("name");
            names.push(format!("{prefix}_{name}"));
        }
    }
    names
}

/// Every series the Grafana dashboard queries is one the binaries export (counters with
/// `_total`, histograms with `_bucket`).
#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let path = format!(
        "{}/dashboards/aws-multi-eni.json",
        chart("aws-multi-eni-controller")
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read dashboard"))
            .expect("dashboard is JSON");
    let known = registered_metrics();
    assert!(known.len() >= 12, "{known:?}");
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("eni_controller_") || word.starts_with("eni_manager_") {
                    let base = ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| word.strip_suffix(s))
                        .unwrap_or(word);
                    assert!(
                        known.iter().any(|k| k == base),
                        "panel {:?} queries {word}, which nothing exports",
                        panel["title"]
                    );
                    queried.insert(base.to_string());
                }
            }
        }
    }
    for wanted in [
        "eni_controller_managed_enis",
        "eni_controller_ec2_calls",
        "eni_controller_reconciles",
        "eni_manager_interfaces_failed",
    ] {
        assert!(
            queried.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
}

/// A client for the node daemon on `node`: a Node, an eni-manager Pod bound to it (no
/// scheduler here: `nodeName` set directly), and a service account token requested for that
/// Pod, as the kubelet would project it. The apiserver then puts the node name into the
/// token's user info (`authentication.kubernetes.io/node-name`).
async fn node_daemon_client(api: &ApiServer, node: &str) -> Client {
    let admin = api.client().await.expect("admin client");
    let nodes: Api<Node> = Api::all(admin.clone());
    let mut n = Node::default();
    n.metadata.name = Some(node.into());
    match nodes.create(&PostParams::default(), &n).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("cannot create Node {node}: {e}"),
    }
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
    let pod_name = format!("eni-manager-{node}");
    let pod = Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(pod_name.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some("eni-manager".into()),
            containers: vec![Container {
                name: "eni-manager".into(),
                image: Some("eni-manager:test".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = match pods.create(&PostParams::default(), &pod).await {
        Ok(p) => p,
        Err(kube::Error::Api(s)) if s.code == 409 => pods.get(&pod_name).await.expect("get pod"),
        Err(e) => panic!("cannot create Pod {pod_name}: {e}"),
    };
    let sas: Api<ServiceAccount> = Api::namespaced(admin, NAMESPACE);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod_name.clone()),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = sas
        .create_token_request("eni-manager", &PostParams::default(), &req)
        .await
        .expect("TokenRequest for the eni-manager service account")
        .status
        .expect("token status")
        .token
        .expect("token");
    api.with_token(&token).await.expect("token client")
}

fn report_for(name: &str, node: &str, eni: &str) -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.aws/v1alpha1",
        "kind": "NodeENI",
        "metadata": {"name": name},
        "status": {"nodeReports": [{
            "nodeName": node,
            "interfaces": [{"eniID": eni, "macAddress": "02:00:00:00:00:01", "deviceIndex": 2}]
        }]}
    })
}

fn forbidden_by_policy(res: &Result<NodeENI, kube::Error>) -> bool {
    matches!(res, Err(kube::Error::Api(s))
        if s.code == 403 && s.message.contains("aws-multi-eni-node-reports"))
}

#[tokio::test]
#[ignore = "integration: needs helm, kubectl, etcd and kube-apiserver from hack/peers.sh"]
async fn node_daemons_change_only_their_own_node_report() {
    let api = cluster().await;
    let admin: Api<NodeENI> = Api::all(api.client().await.expect("admin client"));
    let name = "chart-own-report";
    match admin
        .create(&PostParams::default(), &test_nodeeni(name))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("cannot create the test NodeENI: {e}"),
    }
    let a: Api<NodeENI> = Api::all(node_daemon_client(api, "own-node-a").await);
    let b: Api<NodeENI> = Api::all(node_daemon_client(api, "own-node-b").await);
    let apply = |who: &'static str| PatchParams::apply(who).force();

    // The apiserver picks a new policy up asynchronously: wait until a forged write (dry
    // run, so nothing changes) is refused.
    let effective = eventually(std::time::Duration::from_secs(30), || {
        let a = a.clone();
        async move {
            let mut pp = apply("eni-manager-a");
            pp.dry_run = true;
            let res = a
                .patch_status(
                    name,
                    &pp,
                    &Patch::Apply(report_for(name, "own-node-b", "eni-probe")),
                )
                .await;
            forbidden_by_policy(&res).then_some(())
        }
    })
    .await;
    assert!(
        effective.is_some(),
        "the node reports policy never took effect"
    );

    // Each daemon writes its own entry, as eni-manager does (server-side apply).
    a.patch_status(
        name,
        &apply("eni-manager-a"),
        &Patch::Apply(report_for(name, "own-node-a", "eni-a1")),
    )
    .await
    .expect("node a writes its own report");
    b.patch_status(
        name,
        &apply("eni-manager-b"),
        &Patch::Apply(report_for(name, "own-node-b", "eni-b1")),
    )
    .await
    .expect("node b writes its own report");
    a.patch_status(
        name,
        &apply("eni-manager-a"),
        &Patch::Apply(report_for(name, "own-node-a", "eni-a2")),
    )
    .await
    .expect("node a updates its own report");

    // Node a cannot write, replace or remove node b's entry, nor touch the rest of the status.
    let res = a
        .patch_status(
            name,
            &apply("eni-manager-a"),
            &Patch::Apply(report_for(name, "own-node-b", "eni-forged")),
        )
        .await;
    assert!(forbidden_by_policy(&res), "node a wrote b's entry: {res:?}");
    let res = a
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"nodeReports": [
                {"nodeName": "own-node-a", "interfaces": []}]}})),
        )
        .await;
    assert!(
        forbidden_by_policy(&res),
        "node a dropped b's entry: {res:?}"
    );
    let res = a
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"desiredAttachments": 7, "attachments": [{
                "nodeID": "own-node-b", "instanceID": "i-0", "eniID": "eni-x",
                "attachmentID": "eni-attach-x", "subnetID": "subnet-x", "deviceIndex": 2,
                "status": "Attached", "dpdkEnabled": true}]}})),
        )
        .await;
    assert!(
        forbidden_by_policy(&res),
        "node a changed the controller's status: {res:?}"
    );

    // The service account without a pod-bound token (so no node name) writes nothing.
    let unbound = {
        let sas: Api<ServiceAccount> =
            Api::namespaced(api.client().await.expect("admin client"), NAMESPACE);
        let token = sas
            .create_token_request(
                "eni-manager",
                &PostParams::default(),
                &TokenRequest::default(),
            )
            .await
            .expect("unbound TokenRequest")
            .status
            .expect("token status")
            .token
            .expect("token");
        Api::<NodeENI>::all(api.with_token(&token).await.expect("token client"))
    };
    let res = unbound
        .patch_status(
            name,
            &apply("eni-manager-a"),
            &Patch::Apply(report_for(name, "own-node-a", "eni-a3")),
        )
        .await;
    assert!(
        forbidden_by_policy(&res),
        "an unbound token wrote a report: {res:?}"
    );

    let reports = admin
        .get(name)
        .await
        .expect("get")
        .status
        .expect("status")
        .node_reports;
    let by_node: BTreeMap<_, _> = reports
        .iter()
        .map(|r| (r.node_name.as_str(), r.interfaces[0].eni_id.as_str()))
        .collect();
    assert_eq!(
        by_node,
        BTreeMap::from([("own-node-a", "eni-a2"), ("own-node-b", "eni-b1")])
    );
}

#[test]
#[ignore = "integration: needs helm from hack/peers.sh"]
fn node_reports_policy_guards_every_other_status_field() {
    // A status field added to the CRD later must be added to the policy too.
    let crd: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(format!(
            "{}/crds/nodeenis.networking.k8s.aws.yaml",
            chart("aws-multi-eni-controller")
        ))
        .expect("read the CRD"),
    )
    .expect("CRD YAML");
    let fields = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        ["properties"]
        .as_object()
        .expect("status properties")
        .keys()
        .filter(|k| *k != "nodeReports")
        .cloned()
        .collect::<Vec<_>>();
    assert!(fields.len() >= 7, "{fields:?}");
    let docs = documents(&render(&variant("node, default values")));
    let policy = find(
        &docs,
        "ValidatingAdmissionPolicy",
        "aws-multi-eni-node-reports",
    );
    let text = policy["spec"]["validations"].to_string();
    for f in fields {
        assert!(
            text.contains(&format!("oldObject.?status.?{f}.")),
            "status.{f} is not guarded by the node reports policy: {text}"
        );
    }
}
