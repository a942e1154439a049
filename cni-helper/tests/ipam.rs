//! cni-helper as the IPAM of its delegate (NodeENI `ipam`), with the real Debian ipvlan
//! (or host-device, where the kernel has no ipvlan) plugin in test-made network
//! namespaces, and real Multus. The pool is written into the state file through the
//! contract crate, as the node daemon writes it. Integration tier (root):
//! `make test-integration`.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::*;
use serde_json::{Value, json};

/// Addresses 10.77.0.20 .. 10.77.0.(20+n-1) as the ENI's pool.
fn write_pool(dir: &Path, addresses: usize, prefixes: &[&str]) {
    let path = eni_state::path(dir);
    let mut state = eni_state::load(&path)
        .expect("state")
        .expect("state file written first");
    state.pools.insert(
        "eni-0test".into(),
        eni_state::PodPool {
            subnet_cidr: "10.77.0.0/24".into(),
            gateway: "10.77.0.1".into(),
            addresses: (0..addresses)
                .map(|i| format!("10.77.0.{}", 20 + i))
                .collect(),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        },
    );
    eni_state::save(&path, &state).expect("write pool");
}

/// ipvlan when the kernel has it, host-device otherwise.
fn delegate() -> Value {
    if kernel_has_ipvlan() {
        json!({"type": "ipvlan", "mode": "l2",
               "ipam": {"type": "cni-helper", "routes": [{"dst": "10.78.0.0/16", "gw": "10.77.0.1"}]}})
    } else {
        json!({"type": "host-device",
               "ipam": {"type": "cni-helper", "routes": [{"dst": "10.78.0.0/16", "gw": "10.77.0.1"}]}})
    }
}

/// `CNI_PATH` with cni-helper itself (the delegate runs it as IPAM) and the Debian plugins.
fn cni_path() -> String {
    format!(
        "{}:{DEBIAN_CNI_DIR}",
        bin().parent().expect("bin dir").display()
    )
}

fn config(node: &Node) -> Value {
    node.write_node_config(DEAD_IMDS);
    json!({"cniVersion": "1.0.0", "name": "vpc", "type": "cni-helper", "deviceIndex": 2,
           "delegate": delegate()})
}

/// Runs cni-helper (`command`) in the node namespace for `container` in `pod`.
fn cni(node: &Node, command: &str, conf: &Value, container: &str, pod: &Netns) -> CniRun {
    let mut child = spawn(node, command, container, pod);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write config");
    CniRun::from(child.wait_with_output().expect("wait cni-helper"))
}

fn spawn(node: &Node, command: &str, container: &str, pod: &Netns) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", &node.ns.name])
        .arg(bin())
        .env_remove("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .env_remove("AWS_EC2_METADATA_DISABLED")
        .env("CNI_HELPER_CONFIG", node.node_config_path())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "net1")
        .env("CNI_PATH", cni_path())
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={container}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cni-helper")
}

/// Addresses the allocation file holds.
fn held(node: &Node) -> BTreeSet<String> {
    eni_state::alloc::lock(node.state_dir.path())
        .expect("allocations")
        .allocations
        .held("eni-0test")
}

fn pod_address(pod: &Netns) -> Option<String> {
    let out = Command::new("ip")
        .args(["-n", &pod.name, "-j", "addr", "show", "dev", "net1"])
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?.first()?["addr_info"]
        .as_array()?
        .iter()
        .find(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins, Multus"]
fn multus_pod_gets_a_pool_address_and_gives_it_back() {
    let multus = std::env::var_os("ENI_BIN_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/aws-multi-eni/bin"))
        })
        .expect("ENI_BIN_DIR or HOME")
        .join("multus");
    assert!(
        multus.is_file(),
        "{} missing: run make peers",
        multus.display()
    );
    let node = Node::new("vpm");
    node.write_state();
    write_pool(node.state_dir.path(), 3, &[]);
    let bin_dir = tempfile::tempdir().expect("tempdir");
    for name in ["ipvlan", "host-device"] {
        std::os::unix::fs::symlink(
            Path::new(DEBIAN_CNI_DIR).join(name),
            bin_dir.path().join(name),
        )
        .expect("symlink");
    }
    std::os::unix::fs::symlink(bin(), bin_dir.path().join("cni-helper")).expect("symlink");
    let cache = tempfile::tempdir().expect("tempdir");
    let conf = json!({
        "cniVersion": "1.0.0", "name": "multus-vpc", "type": "multus",
        "binDir": bin_dir.path(), "cniDir": cache.path(),
        "delegates": [config(&node)],
    });
    let multus_run = |cmd: &str, container: &str, pod: &Netns| {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.ns.name])
            .arg(&multus)
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "net1")
            .env("CNI_PATH", bin_dir.path())
            .env("CNI_HELPER_CONFIG", node.node_config_path())
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=true;K8S_POD_NAMESPACE=default;K8S_POD_NAME={container}"),
            )
            .env_remove("AWS_EC2_METADATA_DISABLED")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn multus");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("write config");
        child.wait_with_output().expect("wait multus")
    };
    let ok = |o: std::process::Output, what: &str| -> Value {
        assert!(
            o.status.success(),
            "multus {what}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    };

    let p1 = Netns::new("vpm-p1");
    let r = ok(multus_run("ADD", "c1", &p1), "ADD c1");
    assert_eq!(r["ips"][0]["address"], "10.77.0.20/24", "{r}");
    assert_eq!(r["ips"][0]["gateway"], "10.77.0.1", "{r}");
    assert_eq!(pod_address(&p1).as_deref(), Some("10.77.0.20/24"));
    assert_eq!(held(&node), BTreeSet::from(["10.77.0.20".to_string()]));

    ok(multus_run("DEL", "c1", &p1), "DEL c1");
    assert!(held(&node).is_empty(), "address back after DEL");
    assert!(p1.link("net1").is_none());

    // Reused later, not at once: the next pods get .21 and .22, then .20 again (one at
    // a time: with host-device the ENI itself moves into the pod).
    let mut got = Vec::new();
    for i in 2..=4 {
        let p = Netns::new(&format!("vpm-p{i}"));
        let c = format!("c{i}");
        let r = ok(multus_run("ADD", &c, &p), "ADD");
        got.push(
            r["ips"][0]["address"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        ok(multus_run("DEL", &c, &p), "DEL");
    }
    assert_eq!(got, ["10.77.0.21/24", "10.77.0.22/24", "10.77.0.20/24"]);
    assert!(held(&node).is_empty());
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins"]
fn empty_pool_is_try_again_later_through_the_delegate() {
    let node = Node::new("vpe");
    node.write_state();
    write_pool(node.state_dir.path(), 0, &[]);
    let conf = config(&node);
    let pod = Netns::new("vpe-p");
    let e = cni(&node, "ADD", &conf, "a", &pod).err();
    assert_eq!(e["code"], 11, "{e}");
    // The runtime's DEL for the failed ADD leaves the ENI where it was.
    cni(&node, "DEL", &conf, "a", &pod).ok();
    assert!(pod.link("net1").is_none());
    assert!(node.ns.link("ens7").is_some(), "ENI back on the node");
    assert!(held(&node).is_empty());
}

/// A state dir with the ENI at device index 2 and its pool, and the node-local config
/// naming it (no namespaces: cni-helper runs as the IPAM plugin directly).
fn direct_node(addresses: usize, prefixes: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_state_file(dir.path(), "ens7", ENS7_MAC);
    write_pool(dir.path(), addresses, prefixes);
    let conf_path = dir.path().join("cni-helper.json");
    std::fs::write(
        &conf_path,
        json!({"stateDir": dir.path(), "imdsEndpoint": DEAD_IMDS}).to_string(),
    )
    .expect("node config");
    (dir, conf_path)
}

/// cni-helper run the way ipvlan runs its IPAM plugin: the ipvlan config on stdin.
fn ipam_direct(conf_path: &Path, command: &str, container: &str) -> std::process::Child {
    let conf = json!({"cniVersion": "1.0.0", "name": "vpc", "type": "ipvlan", "master": "ens7",
                      "ipam": {"type": "cni-helper", "deviceIndex": 2}});
    let mut c = Command::new(bin())
        .env_remove("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .env("CNI_HELPER_CONFIG", conf_path)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", "/proc/self/ns/net")
        .env("CNI_IFNAME", "net1")
        .env("CNI_PATH", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cni-helper");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write config");
    c
}

/// 50 ADDs at once, each its own process (as 50 pods starting): never one address twice.
/// Needs no root: cni-helper is run as the IPAM plugin directly.
#[test]
fn fifty_concurrent_ipam_adds_never_share_an_address() {
    // 4 addresses + two /28 prefixes = 36: fewer than 50, so 14 ADDs get error 11.
    let (dir, conf_path) = direct_node(4, &["10.77.0.32/28", "10.77.0.48/28"]);
    let children: Vec<_> = (0..50)
        .map(|i| ipam_direct(&conf_path, "ADD", &format!("c{i}")))
        .collect();
    let mut addresses = BTreeSet::new();
    let mut try_again = 0;
    for c in children {
        let run = CniRun::from(c.wait_with_output().expect("wait"));
        if run.code == Some(0) {
            let v: Value = serde_json::from_str(&run.stdout).expect("result");
            let a = v["ips"][0]["address"]
                .as_str()
                .expect("address")
                .to_string();
            assert!(addresses.insert(a.clone()), "{a} handed out twice");
        } else {
            assert_eq!(run.err()["code"], 11);
            try_again += 1;
        }
    }
    assert_eq!((addresses.len(), try_again), (36, 14));
    let held = eni_state::alloc::lock(dir.path())
        .expect("allocations")
        .allocations
        .held("eni-0test");
    assert_eq!(held.len(), 36);
    // 50 DELs at once (14 of them for ADDs that failed) free everything.
    let children: Vec<_> = (0..50)
        .map(|i| ipam_direct(&conf_path, "DEL", &format!("c{i}")))
        .collect();
    for c in children {
        CniRun::from(c.wait_with_output().expect("wait")).ok();
    }
    let held = eni_state::alloc::lock(dir.path())
        .expect("allocations")
        .allocations
        .held("eni-0test");
    assert!(held.is_empty(), "{held:?}");
}

/// With ipvlan in the kernel: 50 pods at once through the real delegate, each with its own
/// address on its own ipvlan interface. (Kernels without ipvlan: the direct test above.)
#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins"]
fn fifty_concurrent_ipvlan_pods() {
    if !kernel_has_ipvlan() {
        println!(
            "skipped: this kernel has no ipvlan (fifty_concurrent_ipam_adds_never_share_an_address covers the allocator)"
        );
        return;
    }
    let node = Node::new("vpc50");
    node.write_state();
    write_pool(
        node.state_dir.path(),
        4,
        &["10.77.0.32/28", "10.77.0.48/28"],
    );
    let conf = config(&node);
    let pods: Vec<Netns> = (0..50).map(|i| Netns::new(&format!("v50-{i}"))).collect();
    let mut children = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let mut c = spawn(&node, "ADD", &format!("c{i}"), pod);
        c.stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("write config");
        children.push(c);
    }
    let mut addresses = BTreeSet::new();
    for (i, c) in children.into_iter().enumerate() {
        let run = CniRun::from(c.wait_with_output().expect("wait"));
        if run.code == Some(0) {
            let v: Value = serde_json::from_str(&run.stdout).expect("result");
            let a = v["ips"][0]["address"]
                .as_str()
                .expect("address")
                .to_string();
            assert!(addresses.insert(a.clone()), "{a} handed out twice");
            assert_eq!(pod_address(&pods[i]).as_deref(), Some(a.as_str()));
        } else {
            assert_eq!(run.err()["code"], 11);
            assert!(pods[i].link("net1").is_none());
        }
    }
    assert_eq!(addresses.len(), 36);
    for (i, pod) in pods.iter().enumerate() {
        cni(&node, "DEL", &conf, &format!("c{i}"), pod).ok();
    }
    assert!(held(&node).is_empty());
}

/// PIDs of processes that have `file` open.
fn holders_of(file: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == file))
        {
            out.push(pid);
        }
    }
    out
}

fn wait_until<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins"]
fn kill_9_mid_add_leaks_nothing() {
    let node = Node::new("vpk");
    node.write_state();
    write_pool(node.state_dir.path(), 2, &[]);
    let conf = config(&node);
    let lock_file = node.state_dir.path().join(eni_state::alloc::LOCK_NAME);
    let pod = Netns::new("vpk-p");

    // 1. The IPAM process is killed while it waits for the lock.
    let guard = eni_state::alloc::lock(node.state_dir.path()).expect("lock");
    let me = std::process::id() as i32;
    let mut child = spawn(&node, "ADD", "k1", &pod);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write config");
    let victim = wait_until(
        "the IPAM call to wait for the lock",
        Duration::from_secs(20),
        || holders_of(&lock_file).into_iter().find(|p| *p != me),
    );
    let killed = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let run = CniRun::from(child.wait_with_output().expect("wait"));
    assert_ne!(run.code, Some(0), "ADD cannot succeed without its IPAM");
    drop(guard);
    // The runtime sends DEL for a failed ADD.
    cni(&node, "DEL", &conf, "k1", &pod).ok();
    assert!(held(&node).is_empty(), "nothing allocated");
    assert!(pod.link("net1").is_none(), "no interface left");

    // 2. The top-level cni-helper is killed mid-ADD; its delegate carries on and
    //    allocates; the runtime's DEL for the failed ADD returns the address.
    let guard = eni_state::alloc::lock(node.state_dir.path()).expect("lock");
    let mut child = spawn(&node, "ADD", "k2", &pod);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write config");
    wait_until(
        "the IPAM call to wait for the lock",
        Duration::from_secs(20),
        || holders_of(&lock_file).into_iter().find(|p| *p != me),
    );
    // `ip netns exec` execs cni-helper: the child's PID is the wrapper's.
    child.kill().expect("kill -9 the wrapper");
    let _ = child.wait();
    drop(guard);
    wait_until(
        "the orphaned delegate to finish",
        Duration::from_secs(20),
        || holders_of(&lock_file).is_empty().then_some(()),
    );
    cni(&node, "DEL", &conf, "k2", &pod).ok();
    assert!(held(&node).is_empty(), "DEL returned the orphan's address");
    assert!(pod.link("net1").is_none());

    // 3. The lock is free: the next ADD works at once.
    let r = cni(&node, "ADD", &conf, "k3", &pod).ok();
    assert!(r["ips"][0]["address"].as_str().is_some(), "{r}");
    cni(&node, "DEL", &conf, "k3", &pod).ok();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Churn benchmark: 200 ADD/DEL cycles on a warm pool through the real delegate. Prints
/// the figures; asserts only correctness (every ADD succeeds, nothing is left held).
#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins (benchmark)"]
fn churn_200_add_del_cycles() {
    let node = Node::new("vpb");
    node.write_state();
    write_pool(node.state_dir.path(), 8, &[]);
    let conf = config(&node);
    let pods: Vec<Netns> = (0..4).map(|i| Netns::new(&format!("vpb-{i}"))).collect();
    let mut adds = Vec::new();
    let mut dels = Vec::new();
    for cycle in 0..200 {
        let pod = &pods[cycle % pods.len()];
        let id = format!("churn-{cycle}");
        let t = Instant::now();
        cni(&node, "ADD", &conf, &id, pod).ok();
        adds.push(t.elapsed());
        let t = Instant::now();
        cni(&node, "DEL", &conf, &id, pod).ok();
        dels.push(t.elapsed());
    }
    assert!(held(&node).is_empty());
    adds.sort();
    dels.sort();
    println!(
        "churn: 200 ADD/DEL cycles ({}): ADD p50 {:?} p99 {:?}; DEL p50 {:?} p99 {:?}; EC2 calls on the ADD/DEL path: 0 (cni-helper has no EC2 client)",
        delegate()["type"].as_str().unwrap_or_default(),
        percentile(&adds, 0.5),
        percentile(&adds, 0.99),
        percentile(&dels, 0.5),
        percentile(&dels, 0.99),
    );
}
