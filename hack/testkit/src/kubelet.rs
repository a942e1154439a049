//! A real kubelet and containerd for one simulated node.
//!
//! [`NodeRuntime`] is what the `eni-kubelet` binary runs (one per node of the demo and the
//! end-to-end test). It turns the current process into the node's "host":
//!
//! 1. binds the kubelet's port on the host's loopback (127.0.0.1:`port`) and forwards it to
//!    the kubelet, so an API server that resolves the node's name to 127.0.0.1 (its
//!    `--kubelet-preferred-address-types=Hostname`) reaches the kubelet for `kubectl exec`
//!    and `logs` (the Node's InternalIP is the node namespace's primary address, which the
//!    host cannot route to);
//! 2. enters a private mount namespace and the node's network namespace, where the node's
//!    ENIs appear, so containerd runs the CNI plugins (Multus, cni-helper, host-device)
//!    exactly where the node daemon sees the interfaces;
//! 3. lays out the node's filesystem there: `/var/lib`, `/var/log` and `/run` of the node
//!    live under its directory (the kubelet hard-codes `/var/lib/kubelet/device-plugins`
//!    and `/var/log/containers`); `/dev` is a copy of the host's plus the node's fake
//!    `/dev/vfio`; `/sys/bus/pci` is the node's fake PCI tree; the sysctls the kubelet
//!    sets (`vm.overcommit_memory`, `kernel.panic*`) are private files;
//! 4. starts containerd (CRI, runc, cgroupfs) with locally built images imported, and the
//!    kubelet with its own `cgroupRoot`, then forwards the kubelet port into the namespace.
//!
//! SIGHUP restarts the kubelet (containerd and the pods keep running); SIGTERM or SIGINT
//! stops everything and removes what was made: processes (also the runtime shims), the
//! cgroups under `cgroupRoot` in every hierarchy, and with the last process the mount
//! namespace and every mount in it. The host keeps its own `/var/lib`, `/dev`, sysctls
//! and iptables (the kubelet gets no iptables on its `PATH`).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};
use sha2::{Digest as _, Sha256};

use crate::process::Child;

/// The pause image the sandboxes run (containerd's `sandbox_image`).
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// A busybox image for pods that need a shell (`kubectl exec ... env`, `ip addr`).
pub const BUSYBOX_IMAGE: &str = "localhost/eni-demo/busybox:1.0";

/// Sysctls the kubelet writes at start (`setupKernelTunables`), given private files.
const KUBELET_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Busybox applets linked into the image.
const APPLETS: &[&str] = &[
    "sh", "sleep", "env", "ls", "ip", "cat", "ps", "echo", "true", "grep", "readlink",
];

/// Errors of the node runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A namespace or mount call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The cause.
        source: nix::Error,
    },
    /// A helper command failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// The command.
        what: String,
        /// Its stderr or exit status.
        detail: String,
    },
    /// A peer binary is missing or did not start.
    #[error(transparent)]
    Peer(#[from] crate::Error),
    /// containerd did not come up.
    #[error("containerd was not ready after {0:?}; its log: {1}")]
    NotReady(Duration, PathBuf),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Sys { what, source }
}

/// One node's kubelet + containerd.
#[derive(Debug, Clone)]
pub struct NodeRuntimeConfig {
    /// The Node's name (`--hostname-override`).
    pub node_name: String,
    /// The node's network namespace (`/var/run/netns/<name>`).
    pub netns: PathBuf,
    /// The node's directory: its `/var/lib`, `/var/log`, configs and logs live here.
    pub dir: PathBuf,
    /// Kubeconfig the kubelet uses (its server must be reachable from inside the node's
    /// network namespace).
    pub kubeconfig: PathBuf,
    /// The kubelet's port, on 127.0.0.1 both in the node namespace and on the host.
    pub port: u16,
    /// The CNI network config containerd uses (copied into its `conf_dir`).
    pub cni_conf: PathBuf,
    /// The CNI plugin directory.
    pub cni_bin_dir: PathBuf,
    /// The node's fake sysfs root: its `bus/pci` replaces `/sys/bus/pci`.
    pub sysfs: Option<PathBuf>,
    /// The node's fake dev root: its `vfio` directory becomes `/dev/vfio`.
    pub dev: Option<PathBuf>,
    /// Environment for containerd, and so for the CNI plugins it runs.
    pub containerd_env: Vec<(String, String)>,
    /// The Node's `spec.providerID`.
    pub provider_id: Option<String>,
    /// Extra kubelet log verbosity.
    pub verbosity: u8,
}

impl NodeRuntimeConfig {
    /// The node's `/var/lib` (short names: device plugins bind Unix sockets under it,
    /// and a socket path may be at most 107 bytes).
    fn lib(&self) -> PathBuf {
        self.dir.join("lib")
    }

    /// The node's `/var/lib/kubelet/device-plugins`, as seen from the host.
    pub fn device_plugin_dir(&self) -> PathBuf {
        self.lib().join("kubelet/device-plugins")
    }

    /// The kubelet's pod-resources socket, as seen from the host.
    pub fn pod_resources_socket(&self) -> PathBuf {
        self.lib().join("kubelet/pod-resources/kubelet.sock")
    }

    /// The kubelet's `cgroupRoot`: named after the node's network namespace, which is
    /// unique on the host (two demos may both have a `node-1`).
    pub fn cgroup_root(&self) -> String {
        let ns = self.netns.file_name().map_or_else(
            || self.node_name.clone(),
            |n| n.to_string_lossy().into_owned(),
        );
        format!("/eni-kubelet-{ns}")
    }

    fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
}

/// The kubelet's port on the host, bound before the process leaves the host's network
/// namespace.
#[derive(Debug)]
pub struct HostPort(std::net::TcpListener);

/// Binds the host side of the kubelet port, then moves this process into a private mount
/// namespace and the node's network namespace and lays out the node's filesystem.
///
/// Must be called while the process has one thread (before any async runtime starts):
/// namespaces are per thread, and every thread started afterwards inherits the node's.
pub fn enter_node(cfg: &NodeRuntimeConfig) -> Result<HostPort, RuntimeError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", cfg.port))
        .map_err(io(format!("bind 127.0.0.1:{} on the host", cfg.port)))?;
    let netns = fs::File::open(&cfg.netns).map_err(io(format!("open {}", cfg.netns.display())))?;

    unshare(CloneFlags::CLONE_NEWNS).map_err(sys("unshare the mount namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("make / private"))?;
    setns(netns, CloneFlags::CLONE_NEWNET)
        .map_err(sys(format!("enter {}", cfg.netns.display())))?;

    layout(cfg)?;
    Ok(HostPort(listener))
}

fn mkdir(p: &Path) -> Result<(), RuntimeError> {
    fs::create_dir_all(p).map_err(io(format!("create {}", p.display())))
}

fn bind(src: &Path, dst: &Path, recursive: bool) -> Result<(), RuntimeError> {
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(src), dst, None::<&str>, flags, None::<&str>).map_err(sys(format!(
        "bind {} on {}",
        src.display(),
        dst.display()
    )))
}

fn tmpfs(dst: &Path) -> Result<(), RuntimeError> {
    mount(
        Some("tmpfs"),
        dst,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=755"),
    )
    .map_err(sys(format!("mount a tmpfs on {}", dst.display())))
}

/// The node's filesystem, inside the private mount namespace.
fn layout(cfg: &NodeRuntimeConfig) -> Result<(), RuntimeError> {
    let lib = cfg.lib();
    for d in [
        "kubelet/device-plugins",
        "kubelet/pod-resources",
        "containerd",
        "cni",
    ] {
        mkdir(&lib.join(d))?;
    }
    let log = cfg.dir.join("log");
    for d in ["pods", "containers"] {
        mkdir(&log.join(d))?;
    }
    mkdir(&cfg.logs())?;
    bind(&lib, Path::new("/var/lib"), false)?;
    bind(&log, Path::new("/var/log"), false)?;
    // containerd's shims keep their sockets under the hard-coded /run/containerd/s, and
    // the pods' network namespaces are pinned under /run/netns.
    tmpfs(Path::new("/run"))?;

    // /dev: the host's devices (copied as nodes, sub-mounts bound), plus the node's vfio.
    let host_dev = cfg.dir.join("host-dev");
    mkdir(&host_dev)?;
    bind(Path::new("/dev"), &host_dev, true)?;
    tmpfs(Path::new("/dev"))?;
    copy_dev(&host_dev, Path::new("/dev"))?;
    if let Some(dev) = &cfg.dev {
        let vfio = dev.join("vfio");
        mkdir(&vfio)?;
        mkdir(Path::new("/dev/vfio"))?;
        bind(&vfio, Path::new("/dev/vfio"), false)?;
    }
    if let Some(sysfs) = &cfg.sysfs {
        let pci = sysfs.join("bus/pci");
        mkdir(&pci)?;
        bind(&pci, Path::new("/sys/bus/pci"), false)?;
    }

    let sysctl = cfg.dir.join("sysctl");
    for name in KUBELET_SYSCTLS {
        let host = Path::new("/proc/sys").join(name);
        let value = fs::read_to_string(&host).map_err(io(format!("read {}", host.display())))?;
        let private = sysctl.join(name.replace('/', "."));
        mkdir(&sysctl)?;
        fs::write(&private, value).map_err(io(format!("write {}", private.display())))?;
        bind(&private, &host, false)?;
    }
    Ok(())
}

/// Recreates `/dev` from the host's: device nodes with the same numbers, symlinks as they
/// are, directories (pts, shm, mqueue, ...) bound.
fn copy_dev(from: &Path, to: &Path) -> Result<(), RuntimeError> {
    use nix::sys::stat::{Mode, SFlag, mknod};
    for entry in fs::read_dir(from).map_err(io(format!("read {}", from.display())))? {
        let entry = entry.map_err(io("read /dev"))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = fs::symlink_metadata(&src).map_err(io(format!("stat {}", src.display())))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&src).map_err(io(format!("readlink {}", src.display())))?;
            std::os::unix::fs::symlink(target, &dst)
                .map_err(io(format!("symlink {}", dst.display())))?;
        } else if ft.is_dir() {
            mkdir(&dst)?;
            bind(&src, &dst, true)?;
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() {
                SFlag::S_IFCHR
            } else {
                SFlag::S_IFBLK
            };
            mknod(
                &dst,
                kind,
                Mode::from_bits_truncate(meta.mode() & 0o7777),
                meta.rdev(),
            )
            .map_err(sys(format!("mknod {}", dst.display())))?;
        } else {
            fs::File::create(&dst).map_err(io(format!("create {}", dst.display())))?;
            bind(&src, &dst, false)?;
        }
    }
    Ok(())
}

/// containerd's config (CRI plugin v2 schema of containerd 1.6/1.7).
fn containerd_config(cfg: &NodeRuntimeConfig) -> String {
    let conf_dir = cfg.dir.join("cni/net.d");
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: never lower a container's oom_score_adj below ours.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        bin = cfg.cni_bin_dir.display(),
        conf = conf_dir.display(),
    )
}

/// The kubelet's config file.
fn kubelet_config(cfg: &NodeRuntimeConfig) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This host has cgroup v1 and no systemd: cgroupfs, under a root of our own.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {root}
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzPort: 0
# Test-only: the API server's proxied requests (exec, logs) come in anonymously.
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
podLogsDir: /var/log/pods
makeIPTablesUtilChains: false
# Report capacity changes (a device plugin registering) within a second.
nodeStatusUpdateFrequency: 1s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
# Small test disks: no evictions, no image garbage collection (images are local only).
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
"#,
        root = cfg.cgroup_root(),
        port = cfg.port,
    )
}

/// The cgroup hierarchies mounted on this host: the v1 ones (`cgroup`), and with
/// `include_v2` also a cgroup2 mount (hybrid hosts have one at `unified`, where the
/// kubelet's runtime makes cgroups too).
fn cgroup_hierarchies(include_v2: bool) -> Vec<PathBuf> {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup" || (include_v2 && kind == "cgroup2")).then(|| PathBuf::from(path))
        })
        .collect()
}

/// Creates `cgroupRoot` in every v1 hierarchy (cpuset needs its cpus and mems filled in).
fn make_cgroup_root(cfg: &NodeRuntimeConfig) -> Result<(), RuntimeError> {
    let rel = cfg.cgroup_root();
    for h in cgroup_hierarchies(false) {
        let dir = h.join(rel.trim_start_matches('/'));
        mkdir(&dir)?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = fs::read_to_string(h.join(f)) {
                fs::write(dir.join(f), v.trim()).map_err(io(format!("write {f}")))?;
            }
        }
    }
    Ok(())
}

/// Kills every process in `cgroupRoot` and removes its cgroups, deepest first.
fn remove_cgroup_root(cfg: &NodeRuntimeConfig) {
    let rel = cfg.cgroup_root();
    for h in cgroup_hierarchies(true) {
        let top = h.join(rel.trim_start_matches('/'));
        if !top.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        collect_dirs(&top, &mut dirs);
        // Deepest first.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for attempt in 0..50 {
            let mut left = false;
            for d in &dirs {
                for pid in fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|p| p.trim().parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                if d.exists() && fs::remove_dir(d).is_err() {
                    left = true;
                }
            }
            if !left {
                break;
            }
            if attempt == 49 {
                eprintln!(
                    "eni-kubelet: could not remove every cgroup under {}",
                    top.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// A docker-archive image (what `ctr images import` reads) with busybox-static as its
/// only file, made from local files: no registry is needed.
pub fn busybox_image(dir: &Path, tag: &str, cmd: &[&str]) -> Result<PathBuf, RuntimeError> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| RuntimeError::Command {
            what: "find busybox".into(),
            detail:
                "/bin/busybox is missing (Debian: apt-get install busybox-static; make peers does)"
                    .into(),
        })?;
    let work = dir.join(format!("image-{}", tag.replace(['/', ':'], "_")));
    let _ = fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    for d in ["bin", "dev", "proc", "sys", "etc", "tmp", "var/run"] {
        mkdir(&rootfs.join(d))?;
    }
    fs::copy(busybox, rootfs.join("bin/busybox")).map_err(io("copy busybox"))?;
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a))
            .map_err(io(format!("link applet {a}")))?;
    }
    let archive = work.join("archive");
    mkdir(&archive)?;
    let layer = archive.join("layer.tar");
    run(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "--sort=name"])
        .arg("--mtime=2026-01-01 00:00Z")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."))?;
    let layer_digest = sha256_file(&layer)?;
    let layer_dir = archive.join(&layer_digest);
    mkdir(&layer_dir)?;
    fs::rename(&layer, layer_dir.join("layer.tar")).map_err(io("move the layer"))?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    })
    .to_string();
    let config_digest = hex::encode(Sha256::digest(config.as_bytes()));
    let config_name = format!("{config_digest}.json");
    fs::write(archive.join(&config_name), &config).map_err(io("write the image config"))?;
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [tag],
        "Layers": [format!("{layer_digest}/layer.tar")],
    }]);
    fs::write(archive.join("manifest.json"), manifest.to_string())
        .map_err(io("write the manifest"))?;
    let tarball = work.join("image.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&archive)
        .arg("-cf")
        .arg(&tarball)
        .arg("."))?;
    Ok(tarball)
}

fn sha256_file(p: &Path) -> Result<String, RuntimeError> {
    let mut f = fs::File::open(p).map_err(io(format!("open {}", p.display())))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io(format!("read {}", p.display())))?;
    Ok(hex::encode(h.finalize()))
}

fn run(cmd: &mut Command) -> Result<(), RuntimeError> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io(what.clone()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RuntimeError::Command {
            what,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// containerd and the kubelet of one node, started inside the node (after
/// [`enter_node`]).
#[derive(Debug)]
pub struct NodeRuntime {
    cfg: NodeRuntimeConfig,
    containerd: Option<Child>,
    kubelet: Option<Child>,
    kubelet_starts: u32,
}

impl NodeRuntime {
    /// Writes the configs, starts containerd, imports the images and starts the kubelet.
    pub async fn start(cfg: NodeRuntimeConfig) -> Result<Self, RuntimeError> {
        let mut rt = Self {
            cfg,
            containerd: None,
            kubelet: None,
            kubelet_starts: 0,
        };
        let cfg = &rt.cfg;
        let conf_dir = cfg.dir.join("cni/net.d");
        mkdir(&conf_dir)?;
        let conf_name = match cfg.cni_conf.extension().and_then(|e| e.to_str()) {
            Some("conflist") => "10-node.conflist",
            _ => "10-node.conf",
        };
        fs::copy(&cfg.cni_conf, conf_dir.join(conf_name))
            .map_err(io(format!("copy {}", cfg.cni_conf.display())))?;
        fs::write(cfg.dir.join("containerd.toml"), containerd_config(cfg))
            .map_err(io("write containerd.toml"))?;
        fs::write(cfg.dir.join("kubelet.yaml"), kubelet_config(cfg))
            .map_err(io("write kubelet.yaml"))?;
        make_cgroup_root(cfg)?;

        // containerd: PATH with runc; the CNI plugins inherit its environment.
        let mut args = vec![
            "--config".to_string(),
            cfg.dir.join("containerd.toml").display().to_string(),
        ];
        let mut env_args =
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
        env_args.extend(cfg.containerd_env.iter().map(|(k, v)| format!("{k}={v}")));
        env_args.push(which("containerd")?.display().to_string());
        env_args.append(&mut args);
        let log = cfg.logs().join("containerd.log");
        rt.containerd = Some(Child::spawn(
            "containerd",
            Path::new("/usr/bin/env"),
            &env_args,
            &log,
        )?);
        let sock = Path::new("/run/containerd/containerd.sock");
        let ready = crate::eventually(Duration::from_secs(30), || async {
            sock.exists().then_some(())
        })
        .await;
        if ready.is_none() {
            return Err(RuntimeError::NotReady(Duration::from_secs(30), log));
        }
        for (tag, cmd) in [
            (SANDBOX_IMAGE, &["/bin/sleep", "2147483647"][..]),
            (BUSYBOX_IMAGE, &["/bin/sh"][..]),
        ] {
            let tarball = busybox_image(&rt.cfg.dir, tag, cmd)?;
            run(Command::new(which("ctr")?)
                .args([
                    "--address",
                    "/run/containerd/containerd.sock",
                    "-n",
                    "k8s.io",
                ])
                .args(["images", "import"])
                .arg(&tarball))?;
        }
        rt.start_kubelet()?;
        Ok(rt)
    }

    fn start_kubelet(&mut self) -> Result<(), RuntimeError> {
        let cfg = &self.cfg;
        self.kubelet_starts += 1;
        let mut args = vec![
            // No iptables on the kubelet's PATH: it leaves the host's rules alone.
            "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
            crate::peer("kubelet")?.display().to_string(),
            format!("--config={}", cfg.dir.join("kubelet.yaml").display()),
            format!("--kubeconfig={}", cfg.kubeconfig.display()),
            format!("--hostname-override={}", cfg.node_name),
            format!("--v={}", cfg.verbosity),
        ];
        if let Some(id) = &cfg.provider_id {
            args.push(format!("--provider-id={id}"));
        }
        let log = cfg
            .logs()
            .join(format!("kubelet-{}.log", self.kubelet_starts));
        self.kubelet = Some(Child::spawn(
            "kubelet",
            Path::new("/usr/bin/env"),
            &args,
            &log,
        )?);
        let _ = fs::write(
            cfg.dir.join("kubelet.log.current"),
            log.display().to_string(),
        );
        Ok(())
    }

    /// Stops the kubelet (SIGTERM, then SIGKILL) and starts it again, as a node's service
    /// manager would; containerd and the pods keep running.
    pub async fn restart_kubelet(&mut self) -> Result<(), RuntimeError> {
        if let Some(k) = self.kubelet.take() {
            terminate(k).await;
        }
        self.start_kubelet()
    }

    /// Stops the kubelet, every pod and shim, containerd, and removes the cgroups.
    pub async fn stop(mut self) {
        if let Some(k) = self.kubelet.take() {
            terminate(k).await;
        }
        // Containers first (their cgroups), then containerd, then whatever is left in
        // this mount namespace (the runtime shims, reparented away from containerd).
        remove_cgroup_root(&self.cfg);
        if let Some(c) = self.containerd.take() {
            terminate(c).await;
        }
        kill_mount_namespace_peers();
        remove_cgroup_root(&self.cfg);
    }

    /// The configuration.
    pub fn config(&self) -> &NodeRuntimeConfig {
        &self.cfg
    }

    /// Whether the kubelet and containerd are running.
    pub fn running(&mut self) -> bool {
        self.kubelet.as_mut().is_some_and(Child::running)
            && self.containerd.as_mut().is_some_and(Child::running)
    }
}

/// SIGTERM, up to 5 s, then SIGKILL.
async fn terminate(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.pid()).unwrap_or(i32::MAX));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = crate::eventually(Duration::from_secs(5), || {
        let running = child.running();
        async move { (!running).then_some(()) }
    })
    .await;
    child.kill();
}

/// SIGKILL to every other process in this process's mount namespace.
fn kill_mount_namespace_peers() {
    let me = std::process::id();
    let Ok(ours) = fs::read_link("/proc/self/ns/mnt") else {
        return;
    };
    let Ok(rd) = fs::read_dir("/proc") else {
        return;
    };
    let mut pids = BTreeSet::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if fs::read_link(e.path().join("ns/mnt")).is_ok_and(|ns| ns == ours) {
            pids.insert(pid);
        }
    }
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn which(name: &str) -> Result<PathBuf, RuntimeError> {
    ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"]
        .into_iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| RuntimeError::Command {
            what: format!("find {name}"),
            detail: format!("{name} is not installed (make peers installs it from Debian)"),
        })
}

/// Forwards connections from the host side of the kubelet port into the node namespace.
pub async fn forward_kubelet_port(host: HostPort, port: u16) -> Result<(), RuntimeError> {
    host.0
        .set_nonblocking(true)
        .map_err(io("make the host listener non-blocking"))?;
    let listener =
        tokio::net::TcpListener::from_std(host.0).map_err(io("adopt the host listener"))?;
    loop {
        let (mut inbound, _) = listener.accept().await.map_err(io("accept"))?;
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// Writes `line` to `path` atomically (a marker other processes poll for).
pub fn write_marker(path: &Path, line: &str) -> Result<(), RuntimeError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    writeln!(f, "{line}").map_err(io(format!("write {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io(format!("rename {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> NodeRuntimeConfig {
        NodeRuntimeConfig {
            node_name: "node-1".into(),
            netns: "/var/run/netns/x".into(),
            dir: dir.to_path_buf(),
            kubeconfig: "/k".into(),
            port: 12345,
            cni_conf: "/c.conf".into(),
            cni_bin_dir: "/cni/bin".into(),
            sysfs: None,
            dev: None,
            containerd_env: Vec::new(),
            provider_id: None,
            verbosity: 1,
        }
    }

    #[test]
    fn configs_name_the_node_its_port_and_cgroup_root() {
        let c = cfg(Path::new("/n"));
        let k = kubelet_config(&c);
        assert!(k.contains("port: 12345"), "{k}");
        assert!(k.contains("cgroupRoot: /eni-kubelet-x"), "{k}");
        assert!(k.contains("failCgroupV1: false"), "{k}");
        let d = containerd_config(&c);
        assert!(d.contains(r#"bin_dir = "/cni/bin""#), "{d}");
        assert!(d.contains(r#"conf_dir = "/n/cni/net.d""#), "{d}");
        assert!(d.contains("restrict_oom_score_adj = true"), "{d}");
        assert!(
            d.contains(&format!(r#"sandbox_image = "{SANDBOX_IMAGE}""#)),
            "{d}"
        );
        // Device plugin sockets (47 bytes for ours) must fit in 107 bytes under it.
        assert_eq!(
            c.device_plugin_dir(),
            Path::new("/n/lib/kubelet/device-plugins")
        );
    }

    #[test]
    fn busybox_image_is_a_consistent_docker_archive() {
        if !Path::new("/bin/busybox").is_file() {
            eprintln!("skipped: /bin/busybox missing (make peers installs busybox-static)");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let tarball = busybox_image(dir.path(), "localhost/t:1", &["/bin/sh"]).expect("image");
        let out = dir.path().join("x");
        fs::create_dir(&out).expect("mkdir");
        run(Command::new("tar")
            .arg("-C")
            .arg(&out)
            .arg("-xf")
            .arg(&tarball))
        .expect("untar");
        let manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("manifest.json")).expect("manifest"))
                .expect("json");
        let m = &manifest[0];
        assert_eq!(m["RepoTags"][0], "localhost/t:1");
        let config_name = m["Config"].as_str().expect("config");
        let config = fs::read(out.join(config_name)).expect("config file");
        assert_eq!(
            format!("{}.json", hex::encode(Sha256::digest(&config))),
            config_name,
            "config named by its digest"
        );
        let config: serde_json::Value = serde_json::from_slice(&config).expect("config json");
        let layer = m["Layers"][0].as_str().expect("layer");
        let digest = sha256_file(&out.join(layer)).expect("layer digest");
        assert_eq!(config["rootfs"]["diff_ids"][0], format!("sha256:{digest}"));
        assert_eq!(config["config"]["Cmd"][0], "/bin/sh");
        let listing = Command::new("tar")
            .arg("-tf")
            .arg(out.join(layer))
            .output()
            .expect("tar -t");
        let listing = String::from_utf8_lossy(&listing.stdout);
        for f in ["./bin/busybox", "./bin/sh", "./bin/ip", "./bin/sleep"] {
            assert!(
                listing.lines().any(|l| l == f),
                "{f} not in the layer: {listing}"
            );
        }
    }
}
