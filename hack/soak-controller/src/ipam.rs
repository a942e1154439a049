//! Randomized, seeded soak of pod address pools (issue 17): kill -9 safety of the whole
//! chain.
//!
//! The real `eni-controller` (against kube-apiserver and moto behind the EC2 fault layer,
//! which models what EC2 does with assigned addresses), the real `eni-manager` node
//! daemon in its own network namespace (the ENI the controller attaches appears there as
//! an interface with the ENI's MAC, as on a real node), and the real `cni-helper` run as
//! the IPAM plugin the way a delegate runs it, one process per call, all under a seeded
//! list of operations ([`generate`]): pod ADDs and DELs, ADDs killed with SIGKILL at a
//! random point, pods that vanish without a DEL (their node was down), CNI GC, pool size
//! changes (refill and shrink), kill -9 of the node daemon in the middle of a refill, and
//! kill -9 of the controller. Every few operations a quiet period lets the runtime's GC
//! run and then polls, with a deadline, until pool accounting holds against EC2 ([`check`]):
//!
//! * no address is held by two allocations, and no ADD ever handed out one that a live pod
//!   held (checked at every ADD too);
//! * every address in the allocation file is assigned to that ENI in EC2;
//! * the allocation file holds exactly the live pods' addresses: those of killed ADDs and
//!   of pods that went without a DEL are back;
//! * nothing assigned in EC2 is lost track of: the ENI's secondary addresses in EC2 are
//!   exactly the controller's pool plus what it is releasing, the node's pool is the
//!   controller's, and only addresses pods still use wait in `releasing`;
//! * the pool is within its bounds (`minimum` ≤ free ≤ `warmTarget`).
//!
//! A failure names the seed and the operation; [`soak`] then searches for the shortest
//! failing prefix with fresh worlds. Entry points: the `soak-ipam` binary and the short
//! run in `hack/soak-controller/tests/ipam.rs` (part of `make test`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use eni_api::NodeENI;
use eni_testkit::Child;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::Error;
use crate::ops;
use crate::world::{ControllerTiming, World};

/// Pod slots: at most this many pods at once.
pub const SLOTS: u8 = 8;
/// The NodeENI's device index.
pub const DEVICE_INDEX: i32 = 1;
/// The network name cni-helper records (GC frees only its own).
pub const NETWORK: &str = "vpc";
const NODEENI: &str = "ipam-0";
const IFNAME: &str = "net1";

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A pod in slot N starts: cni-helper ADD (error 11 is fine: the runtime then sends DEL).
    Add(u8),
    /// A pod in slot N starts and its ADD is killed with SIGKILL after `us` microseconds;
    /// with `del` the runtime then sends DEL (as the kubelet does for a failed sandbox),
    /// else the pod is gone and only GC returns what the ADD may have taken.
    AddKilled { slot: u8, us: u16, del: bool },
    /// The pod in slot N is deleted: cni-helper DEL.
    Del(u8),
    /// The pod in slot N goes without a DEL (deleted while its node was down).
    Vanish(u8),
    /// The runtime's CNI GC with the live pods as valid attachments.
    Gc,
    /// `spec.ipam` changes: the controller refills or shrinks.
    Pool { warm: u8, min: u8 },
    /// The pool grows, and the node daemon is killed with SIGKILL `ms` milliseconds later
    /// (in the middle of the refill) and started again.
    KillNode { warm: u8, ms: u16 },
    /// kill -9 of the controller, started again.
    KillController,
    /// Faults off, the runtime's GC, then every invariant must hold within the deadline.
    Quiet,
}

/// The seeded operation list: a quiet period every 6 to 12 operations and at the end.
pub fn generate(seed: u64, count: usize) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(count);
    let mut since_quiet = 0;
    let mut next_quiet = rng.random_range(6..=12);
    while out.len() + 1 < count {
        if since_quiet >= next_quiet {
            out.push(Op::Quiet);
            since_quiet = 0;
            next_quiet = rng.random_range(6..=12);
            continue;
        }
        let slot = rng.random_range(0..SLOTS);
        let op = match rng.random_range(0..100) {
            0..35 => Op::Add(slot),
            // An IPAM ADD takes 2 to 20 ms here: kills land before, in (the lock held,
            // the file written) or after the allocation.
            35..53 => Op::AddKilled {
                slot,
                us: rng.random_range(0..8000),
                del: rng.random_bool(0.5),
            },
            53..72 => Op::Del(slot),
            72..76 => Op::Vanish(slot),
            76..78 => Op::Gc,
            78..88 => {
                let warm = rng.random_range(1..=6);
                Op::Pool {
                    warm,
                    min: rng.random_range(0..=warm),
                }
            }
            88..95 => Op::KillNode {
                warm: rng.random_range(2..=8),
                ms: rng.random_range(0..1500),
            },
            _ => Op::KillController,
        };
        out.push(op);
        since_quiet += 1;
    }
    out.push(Op::Quiet);
    out
}

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Seed (for messages).
    pub seed: u64,
    /// `eni-controller`, `eni-manager` and `cni-helper`.
    pub controller: PathBuf,
    /// The node daemon.
    pub manager: PathBuf,
    /// cni-helper.
    pub cni_helper: PathBuf,
    /// How long a quiet period may take to converge.
    pub converge_deadline: Duration,
    /// Where logs go (a sub-directory per run).
    pub log_dir: PathBuf,
    /// Stop applying operations after this long (then one last quiet period).
    pub duration: Option<Duration>,
}

/// Why a run failed.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Index of the failing operation.
    pub at: usize,
    /// What did not hold.
    pub what: String,
}

/// Figures of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Operations applied (quiet periods included).
    pub ops_run: usize,
    /// Quiet periods passed.
    pub quiet_passed: usize,
    /// Invariant checks passed.
    pub checks: u64,
    /// ADDs that returned an address / error 11 / were killed.
    pub adds_ok: u64,
    /// ADDs answered with error 11 (pool empty).
    pub adds_try_again: u64,
    /// ADDs killed with SIGKILL.
    pub adds_killed: u64,
    /// Killed ADDs that had already allocated (their address came back by DEL or GC).
    pub killed_with_allocation: u64,
    /// Node daemon / controller kills.
    pub node_kills: u64,
    /// Controller kills.
    pub controller_kills: u64,
    /// Latency of the successful ADDs (the cni-helper process, start to exit).
    pub add_latency: Vec<Duration>,
    /// AssignPrivateIpAddresses / UnassignPrivateIpAddresses calls that reached EC2.
    pub assigns: u64,
    /// See `assigns`.
    pub unassigns: u64,
    /// Time to converge per quiet period.
    pub converge: Vec<Duration>,
    /// Wall time.
    pub wall: Duration,
    /// The failure, if any.
    pub failure: Option<Failure>,
}

/// A pod slot in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pod {
    /// Its ADD returned this address.
    Live { container: String, address: String },
}

/// The running world of one run.
struct IpamWorld {
    base: World,
    cfg: RunConfig,
    dir: PathBuf,
    netns: String,
    manager: Option<Child>,
    manager_starts: usize,
    eni: Option<(String, String)>,
    /// Slot -> live pod.
    pods: BTreeMap<u8, Pod>,
    /// Containers whose ADD was killed or that vanished: they must end up holding nothing.
    dead: BTreeSet<String>,
    generation: u64,
    warm: u8,
    min: u8,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(io("run ip"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Io {
            what: format!("ip {args:?}"),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
        })
    }
}

/// The result of one cni-helper call.
struct CniOut {
    code: Option<i32>,
    stdout: String,
    killed: bool,
    took: Duration,
}

impl IpamWorld {
    async fn start(cfg: &RunConfig, label: &str) -> Result<Self, Error> {
        let dir = cfg.log_dir.join(label);
        let timing = ControllerTiming {
            resync: Duration::from_secs(10),
            detach_timeout: Duration::from_secs(3),
            orphan_grace: Duration::from_secs(5),
        };
        let mut base = World::start(&cfg.controller, timing, dir.clone()).await?;
        base.start_replica(0).await?;
        let netns = format!("soak-ipam-{}-{label}", std::process::id());
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let (warm, min) = (3, 1);
        let mut w = IpamWorld {
            base,
            cfg: cfg.clone(),
            dir,
            netns,
            manager: None,
            manager_starts: 0,
            eni: None,
            pods: BTreeMap::new(),
            dead: BTreeSet::new(),
            generation: 0,
            warm,
            min,
        };
        w.base.create_node(0, &[0]).await?;
        let obj: NodeENI = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.aws/v1alpha1", "kind": "NodeENI",
            "metadata": {"name": NODEENI},
            "spec": {
                "nodeSelector": {ops::label_key(0): "on"},
                "subnetIDs": [w.base.subnets[0].1],
                "securityGroupIDs": [w.base.groups[0].1],
                "deviceIndex": DEVICE_INDEX,
                "ipam": {"mode": "secondaryIPs", "warmTarget": warm, "minimum": min},
            },
        }))?;
        w.nodeenis().create(&PostParams::default(), &obj).await?;
        w.start_manager()?;
        // The ENI attached, its interface on the node, its pool in the node's state file.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            w.plug().await?;
            if w.eni.is_some() && !w.node_pool().is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Ec2(format!(
                    "the ENI and its pool did not reach the node in 90 s (logs: {})",
                    w.dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        w.write_cni_config()?;
        Ok(w)
    }

    fn nodeenis(&self) -> Api<NodeENI> {
        self.base.nodeenis()
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("node-state")
    }

    fn start_manager(&mut self) -> Result<(), Error> {
        self.manager_starts += 1;
        let log = self
            .dir
            .join(format!("eni-manager-{}.log", self.manager_starts));
        let args: Vec<String> = vec![
            format!("KUBECONFIG={}", self.base.api.kubeconfig.display()),
            format!("NODE_NAME={}", ops::node_name(0)),
            "RUST_LOG=info,eni_node=debug".into(),
            self.cfg.manager.display().to_string(),
            "--netns".into(),
            format!("/var/run/netns/{}", self.netns),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
            "--sysfs-root".into(),
            self.dir.join("sys").display().to_string(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--device-plugin=false".into(),
            // The soak's pods are not API objects: the reconcile against the pods the API
            // server lists would free every allocation (node/tests/pool.rs tests it).
            "--ipam-reconcile-period=0s".into(),
        ];
        let child = Child::spawn("eni-manager", Path::new("/usr/bin/env"), &args, &log)?;
        info!(pid = child.pid(), log = %log.display(), "node daemon started");
        self.manager = Some(child);
        Ok(())
    }

    /// What sim-nitro does on a real-looking node: the attached ENI appears in the node's
    /// namespace with its MAC.
    async fn plug(&mut self) -> Result<(), Error> {
        if self.eni.is_some() {
            return Ok(());
        }
        let Some(o) = self.nodeenis().get_opt(NODEENI).await? else {
            return Ok(());
        };
        let Some(a) = o
            .status
            .as_ref()
            .and_then(|s| s.attachments.first())
            .filter(|a| !a.eni_id.is_empty())
        else {
            return Ok(());
        };
        let Some(mac) = a.mac_address.clone().filter(|m| !m.is_empty()) else {
            return Ok(());
        };
        // A dummy interface, or one end of a veth pair where the kernel has no dummy
        // driver (gVisor).
        let (ns, mac) = (self.netns.as_str(), mac.as_str());
        if ip(&[
            "-n", ns, "link", "add", "ens6", "address", mac, "type", "dummy",
        ])
        .is_err()
        {
            ip(&[
                "-n", ns, "link", "add", "ens6", "address", mac, "type", "veth", "peer", "name",
                "ens6p",
            ])?;
        }
        info!(eni = %a.eni_id, mac, "ENI plugged into the node");
        self.eni = Some((a.eni_id.clone(), mac.to_string()));
        Ok(())
    }

    fn cni_config_path(&self) -> PathBuf {
        self.dir.join("cni-helper.json")
    }

    fn write_cni_config(&self) -> Result<(), Error> {
        std::fs::write(
            self.cni_config_path(),
            json!({"stateDir": self.state_dir(), "imdsEndpoint": "http://127.0.0.1:9"}).to_string(),
        )
        .map_err(io("write the cni-helper config"))
    }

    /// One cni-helper call as a delegate makes it (its network config on stdin, ipam
    /// section with the device index), killed with SIGKILL after `kill_after` if given.
    async fn cni(
        &self,
        command: &str,
        container: &str,
        valid: &[String],
        kill_after: Option<Duration>,
    ) -> Result<CniOut, Error> {
        let mut conf = json!({"cniVersion": "1.1.0", "name": NETWORK, "type": "ipvlan",
                              "master": "ens6",
                              "ipam": {"type": "cni-helper", "deviceIndex": DEVICE_INDEX}});
        if command == "GC" {
            conf["cni.dev/valid-attachments"] = valid
                .iter()
                .map(|c| json!({"containerID": c, "ifname": IFNAME}))
                .collect();
        }
        let started = Instant::now();
        let mut child = Command::new(&self.cfg.cni_helper)
            .env_remove("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("CNI_HELPER_CONFIG", self.cni_config_path())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", "/proc/self/ns/net")
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_PATH", "/nonexistent")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={container}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("spawn cni-helper"))?;
        let out = tokio::task::spawn_blocking(move || {
            if let Some(mut stdin) = child.stdin.take() {
                // A child killed early may have closed its stdin: not an error of the harness.
                let _ = stdin.write_all(conf.to_string().as_bytes());
            }
            if let Some(after) = kill_after {
                // The fault injection itself: SIGKILL at a random point of the call (a
                // thread sleep: microseconds matter here).
                std::thread::sleep(after);
                let _ = child.kill();
            }
            child.wait_with_output()
        })
        .await
        .map_err(|e| Error::Ec2(format!("join: {e}")))?
        .map_err(io("wait for cni-helper"))?;
        use std::os::unix::process::ExitStatusExt;
        Ok(CniOut {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            killed: out.status.signal() == Some(9),
            took: started.elapsed(),
        })
    }

    fn new_container(&mut self, slot: u8) -> String {
        self.generation += 1;
        format!("pod{slot}-{}", self.generation)
    }

    fn live_containers(&self) -> Vec<String> {
        self.pods
            .values()
            .map(|Pod::Live { container, .. }| container.clone())
            .collect()
    }

    /// (address, container) of every allocation in `ipam.json`.
    fn allocations(&self) -> Vec<(String, String, String)> {
        let Ok(bytes) = std::fs::read(self.state_dir().join("ipam.json")) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        v["allocations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| {
                Some((
                    a["address"].as_str()?.to_string(),
                    a["containerID"].as_str()?.to_string(),
                    a["eniID"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    fn node_pool(&self) -> BTreeSet<String> {
        let Some((eni, _)) = &self.eni else {
            return BTreeSet::new();
        };
        let Ok(bytes) = std::fs::read(self.state_dir().join("enis.json")) else {
            return BTreeSet::new();
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        v["pools"][eni]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(String::from))
            .collect()
    }

    async fn ec2_addresses(&self) -> Result<BTreeSet<String>, Error> {
        let Some((eni, _)) = &self.eni else {
            return Ok(BTreeSet::new());
        };
        let out = self
            .base
            .ec2_faulty
            .describe_network_interfaces()
            .network_interface_ids(eni)
            .send()
            .await
            .map_err(|e| Error::Ec2(format!("describe {eni}: {e}")))?;
        Ok(out
            .network_interfaces()
            .first()
            .map(|n| {
                n.private_ip_addresses()
                    .iter()
                    .filter(|a| a.primary() != Some(true))
                    .filter_map(|a| a.private_ip_address().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// (addresses, releasing) of the controller's pool in the status.
    async fn status_pool(&self) -> Result<(BTreeSet<String>, BTreeSet<String>), Error> {
        let o = self.nodeenis().get(NODEENI).await?;
        let p = o
            .status
            .as_ref()
            .and_then(|s| s.attachments.first())
            .and_then(|a| a.ipam.clone());
        Ok(p.map(|p| {
            (
                p.addresses.into_iter().collect(),
                p.releasing.into_iter().collect(),
            )
        })
        .unwrap_or_default())
    }

    async fn set_pool(&mut self, warm: u8, min: u8) -> Result<(), Error> {
        let patch = json!({"spec": {"ipam": {"warmTarget": warm, "minimum": min}}});
        self.nodeenis()
            .patch(NODEENI, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        self.warm = warm;
        self.min = min;
        Ok(())
    }

    /// Applies one operation; `Err(what)` is an invariant violation seen on the way.
    async fn apply(&mut self, op: &Op, report: &mut Report) -> Result<Result<(), String>, Error> {
        match op {
            Op::Add(slot) => {
                if self.pods.contains_key(slot) {
                    return Ok(Ok(()));
                }
                let c = self.new_container(*slot);
                let out = self.cni("ADD", &c, &[], None).await?;
                return Ok(self.after_add(*slot, &c, out, true, report).await);
            }
            Op::AddKilled { slot, us, del } => {
                if self.pods.contains_key(slot) {
                    return Ok(Ok(()));
                }
                let c = self.new_container(*slot);
                let out = self
                    .cni("ADD", &c, &[], Some(Duration::from_micros(u64::from(*us))))
                    .await?;
                if !out.killed {
                    return Ok(self.after_add(*slot, &c, out, *del, report).await);
                }
                report.adds_killed += 1;
                if self.allocations().iter().any(|(_, holder, _)| *holder == c) {
                    report.killed_with_allocation += 1;
                }
                if *del {
                    let d = self.cni("DEL", &c, &[], None).await?;
                    if d.code != Some(0) {
                        return Ok(Err(format!("DEL after a killed ADD of {c}: {}", d.stdout)));
                    }
                }
                self.dead.insert(c);
            }
            Op::Del(slot) => {
                if let Some(Pod::Live { container, .. }) = self.pods.remove(slot) {
                    let d = self.cni("DEL", &container, &[], None).await?;
                    if d.code != Some(0) {
                        return Ok(Err(format!("DEL of {container}: {}", d.stdout)));
                    }
                    self.dead.insert(container);
                }
            }
            Op::Vanish(slot) => {
                if let Some(Pod::Live { container, .. }) = self.pods.remove(slot) {
                    self.dead.insert(container);
                }
            }
            Op::Gc => return self.gc().await,
            Op::Pool { warm, min } => self.set_pool(*warm, *min).await?,
            Op::KillNode { warm, ms } => {
                let min = self.min.min(*warm);
                self.set_pool(*warm, min).await?;
                // The fault injection itself: SIGKILL at a random point of the refill.
                tokio::time::sleep(Duration::from_millis(u64::from(*ms))).await;
                if let Some(mut m) = self.manager.take() {
                    info!(pid = m.pid(), "kill -9 the node daemon");
                    m.kill();
                }
                report.node_kills += 1;
                self.start_manager()?;
            }
            Op::KillController => {
                self.base.kill_replica(0);
                report.controller_kills += 1;
                self.base.start_replica(0).await?;
            }
            Op::Quiet => {}
        }
        Ok(Ok(()))
    }

    async fn after_add(
        &mut self,
        slot: u8,
        c: &str,
        out: CniOut,
        del_on_failure: bool,
        report: &mut Report,
    ) -> Result<(), String> {
        if out.code == Some(0) {
            let v: Value = serde_json::from_str(&out.stdout)
                .map_err(|e| format!("ADD {c}: not JSON ({e}): {}", out.stdout))?;
            let address = v["ips"][0]["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .ok_or_else(|| format!("ADD {c}: no address in {v}"))?
                .to_string();
            if let Some((s, Pod::Live { container, .. })) = self
                .pods
                .iter()
                .find(|(_, Pod::Live { address: a, .. })| *a == address)
            {
                return Err(format!(
                    "ADD {c} got {address}, which {container} (slot {s}) still holds"
                ));
            }
            report.adds_ok += 1;
            report.add_latency.push(out.took);
            self.pods.insert(
                slot,
                Pod::Live {
                    container: c.to_string(),
                    address,
                },
            );
            return Ok(());
        }
        let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        if v["code"] != 11 {
            return Err(format!(
                "ADD {c} failed with {:?}, not error 11: {}",
                out.code, out.stdout
            ));
        }
        report.adds_try_again += 1;
        if del_on_failure {
            // The runtime's DEL for the failed ADD.
            let _ = self.cni("DEL", c, &[], None).await;
        }
        self.dead.insert(c.to_string());
        Ok(())
    }

    async fn gc(&mut self) -> Result<Result<(), String>, Error> {
        let valid = self.live_containers();
        let out = self.cni("GC", "", &valid, None).await?;
        if out.code != Some(0) {
            return Ok(Err(format!("GC failed: {}", out.stdout)));
        }
        Ok(Ok(()))
    }

    /// Every invariant once; `Err` lists what does not hold (yet).
    async fn check(&self, checks: &mut u64) -> Result<Result<(), Vec<String>>, Error> {
        let mut bad = Vec::new();
        let Some((eni, _)) = self.eni.clone() else {
            return Ok(Err(vec!["no ENI".into()]));
        };
        let allocs = self.allocations();
        let ec2 = self.ec2_addresses().await?;
        let (status, releasing) = self.status_pool().await?;
        let node = self.node_pool();
        // 1. No address held twice.
        let mut seen = BTreeSet::new();
        for (a, c, _) in &allocs {
            if !seen.insert(a.clone()) {
                bad.push(format!("{a} is allocated twice (one holder: {c})"));
            }
        }
        *checks += 1;
        // 2. Every allocated address is assigned to that ENI in EC2.
        for (a, c, e) in &allocs {
            if *e != eni || !ec2.contains(a) {
                bad.push(format!(
                    "{c} holds {a} on {e}, which EC2 does not list on {eni}"
                ));
            }
        }
        *checks += 1;
        // 3. Exactly the live pods hold addresses.
        let want: BTreeMap<String, String> = self
            .pods
            .values()
            .map(|Pod::Live { container, address }| (container.clone(), address.clone()))
            .collect();
        let have: BTreeMap<String, String> = allocs
            .iter()
            .map(|(a, c, _)| (c.clone(), a.clone()))
            .collect();
        if want != have {
            let leaked: Vec<_> = have
                .iter()
                .filter(|(c, _)| self.dead.contains(*c) || !want.contains_key(*c))
                .collect();
            bad.push(format!(
                "allocations {have:?} are not the live pods' {want:?} (held by dead containers: {leaked:?})"
            ));
        }
        *checks += 1;
        // 4. Nothing assigned in EC2 is lost track of.
        let tracked: BTreeSet<String> = status.union(&releasing).cloned().collect();
        if ec2 != tracked {
            bad.push(format!(
                "EC2 lists {ec2:?} on {eni}; the controller tracks {status:?} + releasing {releasing:?}"
            ));
        }
        if node != status {
            bad.push(format!(
                "the node's pool {node:?} is not the controller's {status:?}"
            ));
        }
        let in_use: BTreeSet<String> = want.values().cloned().collect();
        let stuck: Vec<_> = releasing.difference(&in_use).collect();
        if !stuck.is_empty() {
            bad.push(format!(
                "{stuck:?} wait in releasing though no pod uses them"
            ));
        }
        *checks += 3;
        // 5. The pool within its bounds.
        let free = node.difference(&in_use).count();
        if free < usize::from(self.min) || free > usize::from(self.warm) {
            bad.push(format!(
                "{free} free (pool {node:?}, in use {in_use:?}), not within minimum {} .. warmTarget {}",
                self.min, self.warm
            ));
        }
        *checks += 1;
        Ok(if bad.is_empty() { Ok(()) } else { Err(bad) })
    }

    async fn quiet(&mut self, report: &mut Report) -> Result<Result<(), String>, Error> {
        self.base.ensure_replicas().await?;
        if self.manager.as_mut().is_none_or(|m| !m.running()) {
            warn!("the node daemon was not running: starting it");
            self.start_manager()?;
        }
        // The runtime's GC (the stand-in for a periodic reconcile against live pods).
        if let Err(e) = self.gc().await? {
            return Ok(Err(e));
        }
        let started = Instant::now();
        let mut last = Vec::new();
        while started.elapsed() < self.cfg.converge_deadline {
            let mut checks = 0;
            match self.check(&mut checks).await? {
                Ok(()) => {
                    report.checks += checks;
                    report.converge.push(started.elapsed());
                    return Ok(Ok(()));
                }
                Err(b) => last = b,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(Err(format!(
            "not converged in {:?}: {}",
            self.cfg.converge_deadline,
            last.join("; ")
        )))
    }
}

impl Drop for IpamWorld {
    fn drop(&mut self) {
        if let Some(mut m) = self.manager.take() {
            m.kill();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Runs `ops` from a fresh world.
pub async fn run(cfg: &RunConfig, ops: &[Op], label: &str) -> Result<Report, Error> {
    let started = Instant::now();
    let mut w = IpamWorld::start(cfg, label).await?;
    let mut report = Report::default();
    for (i, op) in ops.iter().enumerate() {
        let out_of_time = cfg.duration.is_some_and(|d| started.elapsed() > d);
        let op = if out_of_time { &Op::Quiet } else { op };
        info!(seed = cfg.seed, at = i, ?op, "op");
        let r = if *op == Op::Quiet {
            let r = w.quiet(&mut report).await?;
            if r.is_ok() {
                report.quiet_passed += 1;
            }
            r
        } else {
            w.apply(op, &mut report).await?
        };
        report.ops_run = i + 1;
        if let Err(what) = r {
            report.failure = Some(Failure { at: i, what });
            break;
        }
        if out_of_time {
            break;
        }
    }
    let stats = w.base.faults.stats();
    let forwarded = |a: &str| stats.actions.get(a).map_or(0, |s| s.forwarded);
    report.assigns = forwarded("AssignPrivateIpAddresses");
    report.unassigns = forwarded("UnassignPrivateIpAddresses");
    report.wall = started.elapsed();
    Ok(report)
}

/// The outcome of a soak with shrinking.
#[derive(Debug)]
pub struct Soak {
    /// The full run.
    pub report: Report,
    /// The shortest failing prefix found (ending in a quiet period), and its failure.
    pub shrunk: Option<(Vec<Op>, Failure)>,
    /// Fresh-world runs made while shrinking.
    pub shrink_runs: usize,
}

/// Runs `ops`; on a failure, binary-searches the shortest failing prefix (each candidate
/// prefix with a quiet period appended, from a fresh world) within `max_shrink_runs`.
pub async fn soak(cfg: &RunConfig, ops: &[Op], max_shrink_runs: usize) -> Result<Soak, Error> {
    let report = run(cfg, ops, "main").await?;
    let Some(f) = report.failure.clone() else {
        return Ok(Soak {
            report,
            shrunk: None,
            shrink_runs: 0,
        });
    };
    eprintln!(
        "soak-ipam FAILED at op {} (seed {}): {}; shrinking (at most {max_shrink_runs} runs)...",
        f.at, cfg.seed, f.what
    );
    let mut best: Vec<Op> = ops[..=f.at].to_vec();
    if best.last() != Some(&Op::Quiet) {
        best.push(Op::Quiet);
    }
    let mut best_failure = f.clone();
    let (mut lo, mut hi, mut runs) = (0usize, f.at, 0usize);
    while hi - lo > 1 && runs < max_shrink_runs {
        let mid = lo + (hi - lo) / 2;
        runs += 1;
        let mut candidate = ops[..mid].to_vec();
        candidate.push(Op::Quiet);
        let r = run(cfg, &candidate, &format!("shrink-{runs:02}-prefix-{mid}")).await?;
        match r.failure {
            Some(f) => {
                hi = mid;
                best = candidate;
                best_failure = f;
            }
            None => lo = mid,
        }
    }
    Ok(Soak {
        report,
        shrunk: Some((best, best_failure)),
        shrink_runs: runs,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The figures of a run, for humans.
pub fn figures(r: &Report, seed: u64) -> String {
    let mut lat = r.add_latency.clone();
    lat.sort();
    let mut conv = r.converge.clone();
    conv.sort();
    format!(
        "seed {seed}: {} ops, {} quiet periods passed, {} invariant checks passed, wall {:.1?}\n\
         ADDs: {} ok, {} error 11, {} killed mid-ADD ({} of them after allocating); \
         node daemon kill -9: {}, controller kill -9: {}\n\
         ADD latency (cni-helper process): p50 {:.1?}, p99 {:.1?}, max {:.1?}\n\
         EC2: {} AssignPrivateIpAddresses, {} UnassignPrivateIpAddresses reached EC2\n\
         converge per quiet period: median {:.1?}, max {:.1?}",
        r.ops_run,
        r.quiet_passed,
        r.checks,
        r.wall,
        r.adds_ok,
        r.adds_try_again,
        r.adds_killed,
        r.killed_with_allocation,
        r.node_kills,
        r.controller_kills,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        r.assigns,
        r.unassigns,
        percentile(&conv, 0.5),
        conv.last().copied().unwrap_or_default(),
    )
}

/// `dir/<name>` when it is a file, for the binaries next to the test or soak binary.
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    p.is_file().then_some(p)
}
