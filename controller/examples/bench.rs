//! Controller benchmark (not a test): N simulated nodes, one NodeENI, EC2 through the
//! fault layer with EC2's default token buckets and 50-200 ms latency. Run it through
//! `hack/bench-controller`, which builds the release controller and passes its path.
//!
//! Prints: time to all attachments Ready, the token-bucket lower bound and the ratio,
//! mutating and describe calls per ENI, EC2 calls while idle, throttling errors, peak
//! controller RSS; the same for deleting the NodeENI; RSS with many Node objects.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{InstanceType, ResourceType, Tag, TagSpecification};
use clap::Parser;
use eni_api::NodeENI;
use eni_testkit::faults::{FaultConfig, FaultProxy, LatencyConfig};
use eni_testkit::{ApiServer, Child, Moto, free_port};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

/// Benchmark settings.
#[derive(Debug, Parser)]
struct Args {
    /// Simulated nodes (one ENI each).
    #[arg(long, env = "BENCH_NODES", default_value_t = 100)]
    nodes: usize,
    /// Idle period measured after convergence.
    #[arg(long, env = "BENCH_IDLE", default_value = "5m", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// Node objects present for the extra RSS measurement (0: skip).
    #[arg(long, env = "BENCH_RSS_NODES", default_value_t = 5000)]
    rss_nodes: usize,
    /// The eni-controller binary to run (release build).
    #[arg(long, env = "BENCH_CONTROLLER")]
    controller: PathBuf,
}

const CLUSTER: &str = "bench";

fn ec2_client(endpoint: &str) -> aws_sdk_ec2::Client {
    eni_testkit::ec2_client(endpoint)
}

/// (current, peak) RSS of a process in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn node_objects(kube: &kube::Client, names: Vec<(String, String)>, labelled: bool) {
    let api: Api<Node> = Api::all(kube.clone());
    futures::stream::iter(names.into_iter().map(|(name, instance)| {
        let api = api.clone();
        async move {
            let labels = if labelled {
                serde_json::json!({"ng": "multi-eni"})
            } else {
                serde_json::json!({"ng": "other"})
            };
            let node: Node = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels},
                "spec": {"providerID": format!("aws:///us-east-1a/{instance}")},
            }))
            .expect("node object");
            api.create(&PostParams::default(), &node)
                .await
                .expect("create node");
        }
    }))
    .buffer_unordered(32)
    .collect::<Vec<()>>()
    .await;
}

#[tokio::main]
async fn main() {
    eni_testkit::install_crypto_provider();
    let args = Args::parse();
    let n = args.nodes;
    println!(
        "== controller benchmark: {n} nodes, one NodeENI, EC2 default buckets, 50-200 ms latency"
    );
    let (api, moto) = tokio::join!(ApiServer::start(), Moto::start());
    let api = api.expect("kube-apiserver");
    let moto = moto.expect("moto");
    let kube = api.client().await.expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(kube.clone());
    crds.patch(
        "nodeenis.networking.k8s.aws",
        &PatchParams::apply("bench").force(),
        &Patch::Apply(eni_api::crd()),
    )
    .await
    .expect("CRD");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // EC2 world, set up directly against moto.
    let ec2 = ec2_client(&moto.endpoint);
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .expect("vpc")
        .vpc()
        .and_then(|v| v.vpc_id().map(String::from))
        .expect("vpc id");
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("10.0.0.0/17")
        .availability_zone("us-east-1a")
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Subnet)
                .tags(Tag::builder().key("Name").value("bench").build())
                .build(),
        )
        .send()
        .await
        .expect("subnet")
        .subnet()
        .and_then(|s| s.subnet_id().map(String::from))
        .expect("subnet id");
    let sg = ec2
        .create_security_group()
        .vpc_id(&vpc)
        .group_name("bench")
        .description("bench")
        .send()
        .await
        .expect("sg")
        .group_id()
        .expect("sg id")
        .to_string();
    let image = ec2
        .describe_images()
        .send()
        .await
        .expect("images")
        .images()
        .first()
        .and_then(|i| i.image_id().map(String::from))
        .expect("ami");
    let setup = Instant::now();
    let mut instances = Vec::with_capacity(n);
    while instances.len() < n {
        let batch = (n - instances.len()).min(100) as i32;
        let out = ec2
            .run_instances()
            .image_id(&image)
            .instance_type(InstanceType::M5Large)
            .subnet_id(&subnet)
            .min_count(batch)
            .max_count(batch)
            .send()
            .await
            .expect("run instances");
        instances.extend(
            out.instances()
                .iter()
                .filter_map(|i| i.instance_id().map(String::from)),
        );
    }
    let names: Vec<(String, String)> = instances
        .iter()
        .enumerate()
        .map(|(i, id)| (format!("node-{i:05}"), id.clone()))
        .collect();
    node_objects(&kube, names, true).await;
    println!(
        "set-up: {n} instances in moto and {n} Node objects in {:.1}s",
        setup.elapsed().as_secs_f64()
    );

    let faults = FaultProxy::start(
        &moto.endpoint,
        FaultConfig {
            latency: LatencyConfig {
                min_ms: 50,
                max_ms: 200,
            },
            ..FaultConfig::default()
        },
    )
    .await
    .expect("fault proxy");

    let metrics_port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut argv: Vec<String> = [
        "AWS_ACCESS_KEY_ID=testing",
        "AWS_SECRET_ACCESS_KEY=testing",
        "AWS_REGION=us-east-1",
        "AWS_EC2_METADATA_DISABLED=true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push(format!("KUBECONFIG={}", api.kubeconfig.display()));
    argv.push(args.controller.display().to_string());
    argv.extend(
        [
            "--cluster-name",
            CLUSTER,
            "--leader-elect=false",
            "--orphan-grace-period=0s",
            "--log-level=warn",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    argv.push(format!("--metrics-addr=127.0.0.1:{metrics_port}"));
    argv.push(format!("--ec2-endpoint={}", faults.endpoint));
    let log = dir.path().join("controller.log");
    let controller = Child::spawn(
        "eni-controller",
        std::path::Path::new("/usr/bin/env"),
        &argv,
        &log,
    )
    .expect("controller");
    // `setpriv` and `env` exec into the controller: the pid is the controller's.
    let pid = controller.pid();
    let ready = eni_testkit::eventually(Duration::from_secs(60), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    assert!(
        ready.is_some(),
        "controller did not start; log: {}",
        log.display()
    );
    // Start-up (the adoption describe) is not part of the measurement. Stats are
    // cumulative; each phase reports the difference (a reset would also make the fault
    // layer forget DeleteOnTermination, which real EC2 keeps).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut base = faults.stats();

    let nodeenis: Api<NodeENI> = Api::all(kube.clone());
    let obj: NodeENI = serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
        "metadata": {"name": "bench"},
        "spec": {"nodeSelector": {"ng": "multi-eni"}, "subnetID": subnet,
                  "securityGroupIDs": [sg], "deviceIndex": 1},
    }))
    .expect("NodeENI");
    let t0 = Instant::now();
    nodeenis
        .create(&PostParams::default(), &obj)
        .await
        .expect("create NodeENI");
    let mut peak = 0.0f64;
    loop {
        peak = peak.max(rss_mib(pid).1);
        let o = nodeenis.get("bench").await.expect("get");
        let s = o.status.clone().unwrap_or_default();
        let is_ready = s
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if s.ready_attachments as usize == n && is_ready {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3600),
            "no convergence after an hour; log: {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converge = t0.elapsed().as_secs_f64();
    let stats = since(&base, &faults.stats());
    let mutating = stats.mutating_requests() as f64;
    let describes = stats.describe_requests() as f64;
    // Each ENI needs one token from each of three buckets (create, attach, modify); the
    // buckets drain in parallel, so the bound is the time one bucket needs for N tokens
    // plus one ENI's chain of three calls at the minimum latency.
    let bound = ((n as f64 - 50.0).max(0.0) / 5.0) + 3.0 * 0.05;
    println!("-- create {n} ENIs");
    println!("time to all attachments Ready:  {converge:.1} s");
    println!("token-bucket lower bound:       {bound:.1} s");
    println!("ratio:                          {:.3}", converge / bound);
    println!("mutating calls per ENI:         {:.2}", mutating / n as f64);
    println!(
        "describe calls per ENI:         {:.3}",
        describes / n as f64
    );
    println!("throttling errors seen:         {}", stats.total.throttled);
    for (action, a) in &stats.actions {
        println!(
            "  {action:<34} requests {:>6}  throttled {:>4}  rejected {:>4}",
            a.requests, a.throttled, a.rejected
        );
    }

    base = faults.stats();
    println!("-- idle for {}", humantime::format_duration(args.idle));
    let idle_end = Instant::now() + args.idle;
    while Instant::now() < idle_end {
        peak = peak.max(rss_mib(pid).1);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let idle = since(&base, &faults.stats());
    println!("EC2 calls while idle:           {}", idle.total_requests());
    for (action, a) in &idle.actions {
        println!("  {action:<34} requests {:>6}", a.requests);
    }
    let (rss, hwm) = rss_mib(pid);
    peak = peak.max(hwm);
    println!("controller RSS now / peak:      {rss:.1} MiB / {peak:.1} MiB");

    base = faults.stats();
    let t1 = Instant::now();
    nodeenis
        .delete("bench", &DeleteParams::default())
        .await
        .expect("delete NodeENI");
    loop {
        peak = peak.max(rss_mib(pid).1);
        if nodeenis.get_opt("bench").await.expect("get").is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let delete = t1.elapsed().as_secs_f64();
    let stats = since(&base, &faults.stats());
    let dbound = ((n as f64 - 50.0).max(0.0) / 5.0) + 2.0 * 0.05;
    println!("-- delete the NodeENI ({n} ENIs)");
    println!("time to NodeENI gone:           {delete:.1} s");
    println!("token-bucket lower bound:       {dbound:.1} s");
    println!("ratio:                          {:.3}", delete / dbound);
    println!(
        "mutating calls per ENI:         {:.2}",
        stats.mutating_requests() as f64 / n as f64
    );
    println!(
        "describe calls per ENI:         {:.3}",
        stats.describe_requests() as f64 / n as f64
    );
    println!("throttling errors seen:         {}", stats.total.throttled);
    let left = ec2
        .describe_network_interfaces()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name(format!("tag:{}", eni_api::tags::CLUSTER))
                .values(CLUSTER)
                .build(),
        )
        .send()
        .await
        .expect("describe")
        .network_interfaces()
        .len();
    println!("ENIs left in EC2:               {left}");
    println!("controller peak RSS:            {peak:.1} MiB");

    if args.rss_nodes > n {
        let extra = args.rss_nodes - n;
        let names: Vec<(String, String)> = (0..extra)
            .map(|i| (format!("idle-{i:05}"), format!("i-{:017x}", i + 1)))
            .collect();
        node_objects(&kube, names, false).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (rss, hwm) = rss_mib(pid);
        println!(
            "-- RSS with {} Node objects:     {rss:.1} MiB (peak {hwm:.1} MiB)",
            args.rss_nodes
        );
    }
    drop(controller);
}

/// Requests per action between two cumulative snapshots.
struct Delta {
    actions: std::collections::BTreeMap<String, eni_testkit::faults::ActionStats>,
    total: eni_testkit::faults::ActionStats,
    mutating: u64,
    describe: u64,
}

impl Delta {
    fn total_requests(&self) -> u64 {
        self.total.requests
    }
    fn mutating_requests(&self) -> u64 {
        self.mutating
    }
    fn describe_requests(&self) -> u64 {
        self.describe
    }
}

fn since(before: &eni_testkit::faults::Stats, after: &eni_testkit::faults::Stats) -> Delta {
    use eni_testkit::faults::ActionStats;
    let sub = |a: &ActionStats, b: &ActionStats| ActionStats {
        requests: a.requests - b.requests,
        forwarded: a.forwarded - b.forwarded,
        upstream_errors: a.upstream_errors - b.upstream_errors,
        throttled: a.throttled - b.throttled,
        rejected: a.rejected - b.rejected,
        injected: a.injected - b.injected,
        replayed: a.replayed - b.replayed,
        errors: Default::default(),
    };
    let actions = after
        .actions
        .iter()
        .map(|(k, v)| (k.clone(), sub(v, &before.action(k))))
        .filter(|(_, v)| v.requests > 0)
        .collect();
    Delta {
        actions,
        total: sub(&after.total, &before.total),
        mutating: after.mutating_requests() - before.mutating_requests(),
        describe: after.describe_requests() - before.describe_requests(),
    }
}
