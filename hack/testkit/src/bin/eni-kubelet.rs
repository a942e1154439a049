//! `eni-kubelet`: a real kubelet and containerd for one simulated node (see
//! `eni_testkit::kubelet`). Runs until SIGTERM or SIGINT, then removes what it made;
//! SIGHUP restarts the kubelet. Writes `<dir>/ready` once containerd is up, the images
//! are imported and the kubelet runs, and `<dir>/kubelet-started` (start count and UNIX
//! time in milliseconds) at every kubelet start.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use eni_testkit::kubelet::{self, NodeRuntime, NodeRuntimeConfig};
use tokio::signal::unix::{SignalKind, signal};

/// A real kubelet + containerd for one simulated node, inside its network namespace.
#[derive(Debug, Parser)]
#[command(name = "eni-kubelet", version)]
struct Args {
    /// The Node's name.
    #[arg(long, env = "ENI_KUBELET_NODE_NAME")]
    node_name: String,
    /// The node's network namespace (a path such as /var/run/netns/NAME).
    #[arg(long, env = "ENI_KUBELET_NETNS")]
    netns: PathBuf,
    /// The node's directory (its /var/lib, /var/log, configs and logs).
    #[arg(long, env = "ENI_KUBELET_DIR")]
    dir: PathBuf,
    /// Kubeconfig for the kubelet; its server must be reachable from the node namespace.
    #[arg(long, env = "ENI_KUBELET_KUBECONFIG")]
    kubeconfig: PathBuf,
    /// The kubelet's port, on 127.0.0.1 in the node namespace and on the host.
    #[arg(long, env = "ENI_KUBELET_PORT")]
    port: u16,
    /// The CNI network config for containerd (.conf or .conflist).
    #[arg(long, env = "ENI_KUBELET_CNI_CONF")]
    cni_conf: PathBuf,
    /// The CNI plugin directory.
    #[arg(long, env = "ENI_KUBELET_CNI_BIN_DIR")]
    cni_bin_dir: PathBuf,
    /// The node's fake sysfs root (its bus/pci replaces /sys/bus/pci for the node).
    #[arg(long, env = "ENI_KUBELET_SYSFS")]
    sysfs: Option<PathBuf>,
    /// The node's fake dev root (its vfio directory becomes the node's /dev/vfio).
    #[arg(long, env = "ENI_KUBELET_DEV")]
    dev: Option<PathBuf>,
    /// KEY=VALUE for containerd's environment, which the CNI plugins inherit (repeatable).
    #[arg(
        long = "containerd-env",
        env = "ENI_KUBELET_CONTAINERD_ENV",
        value_delimiter = ','
    )]
    containerd_env: Vec<String>,
    /// The Node's spec.providerID.
    #[arg(long, env = "ENI_KUBELET_PROVIDER_ID")]
    provider_id: Option<String>,
    /// kubelet log verbosity.
    #[arg(long, env = "ENI_KUBELET_V", default_value_t = 1)]
    v: u8,
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let containerd_env = args
        .containerd_env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--containerd-env {kv}: expected KEY=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let cfg = NodeRuntimeConfig {
        node_name: args.node_name,
        netns: args.netns,
        dir: dir.clone(),
        kubeconfig: args.kubeconfig,
        port: args.port,
        cni_conf: args.cni_conf,
        cni_bin_dir: args.cni_bin_dir,
        sysfs: args.sysfs,
        dev: args.dev,
        containerd_env,
        provider_id: args.provider_id,
        verbosity: args.v,
    };
    // Namespaces are per thread: enter the node before the runtime starts its threads.
    let host_port = kubelet::enter_node(&cfg).context("enter the node")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let port = cfg.port;
        let mut node = NodeRuntime::start(cfg).await.context("start the node runtime")?;
        let mut starts = 1u32;
        kubelet::write_marker(&dir.join("kubelet-started"), &format!("{starts} {}", now_ms()))?;
        kubelet::write_marker(&dir.join("ready"), "ready")?;
        let forward = tokio::spawn(kubelet::forward_kubelet_port(host_port, port));
        eprintln!("eni-kubelet: node {} running", node.config().node_name);
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    eprintln!("eni-kubelet: restarting the kubelet");
                    node.restart_kubelet().await?;
                    starts += 1;
                    kubelet::write_marker(&dir.join("kubelet-started"), &format!("{starts} {}", now_ms()))?;
                }
            }
        }
        eprintln!("eni-kubelet: stopping");
        forward.abort();
        node.stop().await;
        let _ = std::fs::remove_file(dir.join("ready"));
        anyhow::Ok(())
    })
}
