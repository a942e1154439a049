//! Drives the Go `kubelet-dp` harness (the kubelet's own device-manager code) over stdio.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// The harness binary, if built.
pub fn binary_if_present() -> Option<PathBuf> {
    let p = binary_path();
    p.is_file().then_some(p)
}

/// `$ENI_BIN_DIR/kubelet-dp`, default `~/.cache/aws-multi-eni/bin/kubelet-dp`; panics
/// when missing.
pub fn binary() -> PathBuf {
    let p = binary_path();
    assert!(
        p.is_file(),
        "{} missing: run hack/peers.sh first",
        p.display()
    );
    p
}

fn binary_path() -> PathBuf {
    let bin = std::env::var_os("ENI_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("ENI_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let home = std::env::var_os("HOME")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from("/root"));
                    home.join(".cache/aws-multi-eni")
                });
            cache.join("bin")
        });
    let p = bin.join("kubelet-dp");
    assert!(
        p.is_file(),
        "{} missing: run hack/peers.sh first",
        p.display()
    );
    p
}

/// A running harness. Events are JSON objects with an `event` field and a `ts` (ns).
pub struct KubeletDp {
    child: Child,
    stdin: ChildStdin,
    events: mpsc::UnboundedReceiver<Value>,
    /// Events read while waiting for a command's result, not yet matched.
    pending: std::collections::VecDeque<Value>,
    /// Every event seen so far, for failure messages.
    pub seen: Vec<Value>,
}

impl KubeletDp {
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        Self::spawn(dir, extra, Stdio::inherit())
    }

    /// Like [`Self::start`] with the harness's klog output discarded.
    pub fn start_quiet(dir: &Path, extra: &[&str]) -> Self {
        Self::spawn(dir, extra, Stdio::null())
    }

    fn spawn(dir: &Path, extra: &[&str], stderr: Stdio) -> Self {
        let mut child = Command::new(binary())
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn kubelet-dp");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("kubelet-dp: {line}"),
                }
            }
        });
        Self {
            child,
            stdin,
            events,
            pending: Default::default(),
            seen: Vec::new(),
        }
    }

    pub async fn send(&mut self, cmd: &str) {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Next event satisfying `pred`, within `within`; panics (listing what was seen)
    /// otherwise. Returns the event and when it was received.
    pub async fn expect(
        &mut self,
        within: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (Value, Instant) {
        while let Some(v) = self.pending.pop_front() {
            if pred(&v) {
                return (v, Instant::now());
            }
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(v)) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return (v, Instant::now());
                    }
                }
                Ok(None) => panic!(
                    "kubelet-dp exited while waiting for {what}; seen: {:#?}",
                    self.seen
                ),
                Err(_) => panic!(
                    "timed out after {within:?} waiting for {what}; seen: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Sends a command and waits for its `result` event; other events that arrive
    /// meanwhile stay queued for [`Self::expect`].
    pub async fn command(&mut self, cmd: &str) -> Value {
        self.send(cmd).await;
        let name = cmd.split_whitespace().next().unwrap_or_default().to_owned();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(v)) => {
                    self.seen.push(v.clone());
                    if v["event"] == "result" && v["cmd"] == name.as_str() {
                        return v;
                    }
                    self.pending.push_back(v);
                }
                Ok(None) => panic!(
                    "kubelet-dp exited while running {cmd}; seen: {:#?}",
                    self.seen
                ),
                Err(_) => panic!("no result for {cmd}; seen: {:#?}", self.seen),
            }
        }
    }

    /// Forgets queued events.
    pub fn clear_pending(&mut self) {
        self.pending.clear();
    }

    pub async fn quit(mut self) {
        self.send("quit").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

pub fn is(v: &Value, event: &str) -> bool {
    v["event"] == event
}
