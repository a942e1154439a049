//! Helpers shared by the node daemon's tests: network namespaces and the daemon process.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A network namespace created for the test (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "eni-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip -n <ns> <args>`, returning the raw output.
    pub fn try_ip(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run ip")
    }

    /// Adds an ENI stand-in with `mac`: a dummy interface, or, on kernels built without
    /// the dummy driver (some CI VMs), one end of a veth pair (the peer, `<name>p`, gets
    /// a random MAC and is just another interface the daemon must not touch).
    pub fn add_dummy(&self, name: &str, mac: &str) {
        let out = self.try_ip(&["link", "add", name, "address", mac, "type", "dummy"]);
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Unknown device type"),
            "ip link add {name} type dummy: {err}"
        );
        let peer = format!("{name}p");
        self.ip(&[
            "link", "add", name, "address", mac, "type", "veth", "peer", "name", &peer,
        ]);
    }

    /// `ip -j link show dev <name>` as JSON, or None when it does not resolve.
    pub fn link(&self, name: &str) -> Option<serde_json::Value> {
        let out = self.try_ip(&["-j", "link", "show", "dev", name]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.first().cloned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn is_up(link: &serde_json::Value) -> bool {
    link["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP"))
}

pub fn mtu(link: &serde_json::Value) -> u64 {
    link["mtu"].as_u64().unwrap_or(0)
}

/// Polls `check` until it returns Some or `deadline` passes.
pub fn poll<T>(deadline: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `eni-manager` binary, killed on drop. Its log is in `<dir>/eni-manager.log`.
#[derive(Debug)]
pub struct Manager {
    pub child: Child,
    pub log: PathBuf,
    pub metrics_port: u16,
}

impl Manager {
    pub fn start(kubeconfig: &Path, node: &str, netns: &Path, dir: &Path, extra: &[&str]) -> Self {
        let log = dir.join("eni-manager.log");
        let metrics_port = eni_testkit::free_port();
        let file = std::fs::File::create(&log).expect("log file");
        let bin = option_env!("CARGO_BIN_EXE_eni-manager")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("ENI_MANAGER_BIN").map(PathBuf::from))
            .expect("the eni-manager binary: set ENI_MANAGER_BIN");
        let child = Command::new(bin)
            .env("KUBECONFIG", kubeconfig)
            .env("NODE_NAME", node)
            .env("RUST_LOG", "info,eni_node=debug")
            .arg("--netns")
            .arg(netns)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--sysfs-root")
            .arg(dir.join("sys"))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn eni-manager");
        Self {
            child,
            log,
            metrics_port,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until /readyz answers 200 (first reconcile done).
    pub fn wait_ready(&mut self, deadline: Duration) {
        let port = self.metrics_port;
        let ok = poll(deadline, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "eni-manager exited with {status}; log:\n{}",
                    self.log_text()
                );
            }
            http_get(port, "/readyz")
                .filter(|r| r.starts_with("HTTP/1.1 200"))
                .map(|_| ())
        });
        assert!(
            ok.is_some(),
            "eni-manager not ready; log:\n{}",
            self.log_text()
        );
    }

    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET on 127.0.0.1, returning the whole response.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
