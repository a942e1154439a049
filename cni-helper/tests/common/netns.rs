//! Network namespaces and an ENI stand-in for the root-only integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

/// MAC of the `ens7` ENI stand-in.
pub const ENS7_MAC: &str = "02:c0:ff:ee:00:07";
/// MAC of a stand-in primary ENI (device index 0) in IMDS.
pub const ETH0_MAC: &str = "02:c0:ff:ee:00:00";
/// Where the Debian containernetworking-plugins live.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";
/// An IMDS endpoint where nothing listens: configs of state-file tests use it so that a
/// fallback can never reach a real IMDS.
pub const DEAD_IMDS: &str = "http://127.0.0.1:9";

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// The cni-helper binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cni-helper"))
}

/// Fails clearly when the prerequisites are missing.
pub fn require_root_and_plugins() {
    let uid = Command::new("id").arg("-u").output().expect("run id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "integration tests create network namespaces: run them as root (make test-integration)"
    );
    for p in ["ipvlan", "macvlan", "host-device", "host-local"] {
        assert!(
            Path::new(DEBIAN_CNI_DIR).join(p).is_file(),
            "{DEBIAN_CNI_DIR}/{p} missing: run hack/peers.sh (or apt-get install containernetworking-plugins)"
        );
    }
}

/// Runs `ip`, asserting success; returns stdout.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made by the test, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "cnih-{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -j -d link show` in this namespace, as JSON (None: no such link).
    pub fn link(&self, name: &str) -> Option<Value> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-j", "-d", "link", "show", "dev", name])
            .output()
            .expect("run ip");
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        v.as_array().and_then(|a| a.first().cloned())
    }

    /// Names of all links in this namespace.
    pub fn links(&self) -> Vec<String> {
        let v: Value =
            serde_json::from_str(&ip(&["-n", &self.name, "-j", "link", "show"])).expect("json");
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A simulated node: a netns with the `ens7` stand-in (veth end, known MAC), a state dir and
/// a host-local data dir.
#[derive(Debug)]
pub struct Node {
    pub ns: Netns,
    pub state_dir: tempfile::TempDir,
    pub ipam_dir: tempfile::TempDir,
    /// Holds the node-local cni-helper config (`CNI_HELPER_CONFIG`).
    pub conf_dir: tempfile::TempDir,
}

impl Node {
    pub fn new(tag: &str) -> Self {
        require_root_and_plugins();
        let ns = Netns::new(&format!("{tag}-n"));
        // A veth end stands in for the ENI: this machine's kernel may lack CONFIG_DUMMY, and
        // a veth is a real netdev that host-device can move and macvlan can sit on.
        ip(&[
            "-n",
            &ns.name,
            "link",
            "add",
            "ens7",
            "address",
            ENS7_MAC,
            "type",
            "veth",
            "peer",
            "name",
            "ens7-wire",
        ]);
        ip(&["-n", &ns.name, "link", "set", "ens7-wire", "up"]);
        ip(&["-n", &ns.name, "link", "set", "ens7", "up"]);
        Self {
            ns,
            state_dir: tempfile::tempdir().expect("tempdir"),
            ipam_dir: tempfile::tempdir().expect("tempdir"),
            conf_dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Writes the node daemon's state file with ens7 at device index 2, through the same
    /// contract crate (types and atomic save) the daemon writes it with.
    pub fn write_state(&self) {
        write_state_file(self.state_dir.path(), "ens7", ENS7_MAC);
    }

    /// A primary interface: `eth0` (MAC [`ETH0_MAC`], a veth end) with an address and the
    /// namespace's default route.
    pub fn add_uplink(&self) {
        let n = self.ns.name.as_str();
        ip(&[
            "-n",
            n,
            "link",
            "add",
            "eth0",
            "address",
            ETH0_MAC,
            "type",
            "veth",
            "peer",
            "name",
            "eth0-wire",
        ]);
        ip(&["-n", n, "link", "set", "eth0-wire", "up"]);
        ip(&["-n", n, "link", "set", "eth0", "up"]);
        ip(&["-n", n, "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
        ip(&[
            "-n",
            n,
            "route",
            "add",
            "default",
            "via",
            "10.99.0.1",
            "dev",
            "eth0",
        ]);
    }

    pub fn ens7_ifindex(&self) -> u64 {
        self.ns.link("ens7").expect("ens7 exists")["ifindex"]
            .as_u64()
            .expect("ifindex")
    }

    /// Addresses host-local still has reserved (files named like IPs).
    pub fn reserved_ips(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(nets) = std::fs::read_dir(self.ipam_dir.path()) else {
            return out;
        };
        for net in nets.flatten() {
            if let Ok(files) = std::fs::read_dir(net.path()) {
                for f in files.flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.parse::<std::net::IpAddr>().is_ok() {
                        out.push(name);
                    }
                }
            }
        }
        out
    }

    /// The node-local cni-helper config file (what `CNI_HELPER_CONFIG` names).
    pub fn node_config_path(&self) -> PathBuf {
        self.conf_dir.path().join("cni-helper.json")
    }

    /// Writes the node-local config: this node's state dir and `imds`.
    pub fn write_node_config(&self, imds: &str) {
        let c = serde_json::json!({"stateDir": self.state_dir.path(), "imdsEndpoint": imds});
        std::fs::write(self.node_config_path(), c.to_string()).expect("write node config");
    }

    /// A cni-helper config for `delegate` with host-local IPAM in this node's data dir;
    /// also (re)writes the node-local config with `imds` (the NAD cannot carry it).
    pub fn config(&self, delegate: Value, imds: &str) -> Value {
        self.write_node_config(imds);
        let mut delegate = delegate;
        if delegate["type"] != "host-device" {
            delegate["ipam"] = serde_json::json!({
                "type": "host-local", "subnet": "10.77.0.0/24",
                "rangeStart": "10.77.0.10", "rangeEnd": "10.77.0.20",
                "dataDir": self.ipam_dir.path(),
            });
        }
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "eni-net", "type": "cni-helper",
            "deviceIndex": 2, "delegate": delegate,
        })
    }

    /// Runs cni-helper as a CNI plugin inside the node namespace.
    pub fn cni(&self, command: &str, config: &Value, pod: &Netns) -> CniRun {
        self.cni_with_path(command, config, pod, DEBIAN_CNI_DIR)
    }

    /// Like [`Node::cni`] with another `CNI_PATH`.
    pub fn cni_with_path(
        &self,
        command: &str,
        config: &Value,
        pod: &Netns,
        cni_path: &str,
    ) -> CniRun {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(bin())
            .env_remove("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .env_remove("AWS_EC2_METADATA_DISABLED")
            .env("CNI_HELPER_CONFIG", self.node_config_path())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("ctr-{}", pod.name))
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "net1")
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cni-helper");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(config.to_string().as_bytes())
            .expect("write config");
        CniRun::from(child.wait_with_output().expect("wait cni-helper"))
    }
}

/// The outcome of one plugin run.
#[derive(Debug)]
pub struct CniRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for CniRun {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl CniRun {
    /// Asserts success; returns stdout as JSON (Null when empty).
    pub fn ok(&self) -> Value {
        assert_eq!(self.code, Some(0), "plugin failed: {self:#?}");
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&self.stdout).expect("result JSON")
        }
    }

    /// Asserts a CNI error; returns it.
    pub fn err(&self) -> Value {
        assert_ne!(self.code, Some(0), "plugin should fail: {self:#?}");
        let v: Value = serde_json::from_str(&self.stdout).expect("error JSON");
        assert!(v["code"].is_u64() && v["msg"].is_string(), "{v}");
        v
    }
}

/// The fake IMDS, served by a child copy of this test binary running inside a namespace
/// (so that the plugin, in the node namespace, reaches it on 127.0.0.1).
#[derive(Debug)]
pub struct ImdsChild {
    child: Child,
    pub url: String,
}

/// Env var that turns the `fake_imds_child` test into the server.
pub const FAKE_IMDS_ENV: &str = "CNI_HELPER_TEST_FAKE_IMDS";

impl ImdsChild {
    /// Starts it in `ns`, serving `enis` ("mac=device" pairs).
    pub fn start(ns: &Netns, enis: &[(&str, u64)]) -> Self {
        let spec: Vec<String> = enis.iter().map(|(m, d)| format!("{m}={d}")).collect();
        let exe = std::env::current_exe().expect("current exe");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(exe)
            .args([
                "fake_imds_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(FAKE_IMDS_ENV, spec.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fake IMDS");
        let stdout = child.stdout.take().expect("stdout");
        let mut url = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read fake IMDS output");
            // libtest prints "test fake_imds_child ... " on the same line first.
            if let Some((_, u)) = line.split_once("FAKE_IMDS_LISTENING ") {
                url = Some(u.trim().to_owned());
                break;
            }
        }
        let url = url.expect("fake IMDS announced its address");
        Self { child, url }
    }
}

impl Drop for ImdsChild {
    fn drop(&mut self) {
        // Closing its stdin ends it; kill as a fallback.
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Body of the `fake_imds_child` test: serve until stdin closes.
pub fn fake_imds_child_main() {
    let Ok(spec) = std::env::var(FAKE_IMDS_ENV) else {
        return;
    };
    let enis: Vec<super::fake_imds::FakeEni> = spec
        .split(',')
        .filter_map(|p| p.split_once('='))
        .map(|(m, d)| {
            let mac: &'static str = Box::leak(m.to_owned().into_boxed_str());
            (mac, d.parse().expect("device number"), None)
        })
        .collect();
    let fake = super::fake_imds::FakeImds::start("127.0.0.1:0", &enis);
    println!("FAKE_IMDS_LISTENING {}", fake.url());
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
}

/// Whether the kernel can make ipvlan links (CONFIG_IPVLAN); probed once in a scratch netns.
pub fn kernel_has_ipvlan() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        let ns = Netns::new("probe");
        ip(&[
            "-n", &ns.name, "link", "add", "pa", "type", "veth", "peer", "name", "pb",
        ]);
        Command::new("ip")
            .args([
                "-n", &ns.name, "link", "add", "link", "pa", "name", "iv", "type", "ipvlan",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

/// Writes a node daemon state file in `dir` with `iface` (MAC `mac`) at device index 2,
/// through the same contract crate (types and atomic save) the daemon writes it with.
pub fn write_state_file(dir: &Path, iface: &str, mac: &str) {
    let mut state = eni_state::StateFile::empty("test-node");
    state.enis.push(eni_state::EniState {
        eni_id: "eni-0test".into(),
        mac_address: mac.into(),
        device_index: 2,
        network_card_index: 0,
        node_eni: "multus".into(),
        interface_name: Some(iface.into()),
        pci_address: None,
        driver: None,
        dpdk_bound: false,
        resource_name: None,
    });
    eni_state::save(&eni_state::path(dir), &state).expect("write state");
}
