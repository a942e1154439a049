//! The `hack/demo.sh` runner the real-kubelet e2e tests share.
//!
//! A [`Demo`] is one demo instance in its own directory and namespace prefix (so it never
//! collides with a demo someone has running); `hack/demo.sh down` runs on drop, also when
//! the test fails, and then the demo's logs are kept in `$TMPDIR/<prefix>-logs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$DEMO_BIN_DIR` when set (a shared target directory may hold another checkout's
/// binaries), else `target/<profile>` of this test binary (`target/<profile>/deps/<test>-<hash>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = std::env::var_os("DEMO_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            exe.parent()
                .and_then(Path::parent)
                .expect("target/<profile>")
                .to_path_buf()
        });
    for b in ["eni-controller", "eni-manager", "cni-helper"] {
        assert!(
            dir.join(b).is_file(),
            "{} missing: run `make build` (eni-manager needs the eni-node test-util feature: cargo build -p eni-node --bins --features test-util)",
            dir.join(b).display()
        );
    }
    dir
}

/// A demo instance; `hack/demo.sh down` runs on drop, also when the test fails.
pub struct Demo {
    dir: tempfile::TempDir,
    prefix: String,
    bins: PathBuf,
    /// Names the test in its messages ("e2e", "e2e-dra").
    label: &'static str,
}

impl Demo {
    /// A demo in a fresh temp dir `<tmp_prefix>*`, its namespaces named `<prefix>...`.
    pub fn new(label: &'static str, tmp_prefix: &str, prefix: String) -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix(tmp_prefix)
                .tempdir()
                .expect("tempdir"),
            prefix,
            bins: bin_dir(),
            label,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `hack/demo.sh ARGS` for this instance.
    pub fn sh(&self, args: &[&str]) -> Output {
        Command::new(repo_dir().join("hack/demo.sh"))
            .args(args)
            .env("DEMO_DIR", self.dir.path())
            .env("DEMO_PREFIX", &self.prefix)
            .env("DEMO_BIN_DIR", &self.bins)
            .env("DEMO_QUIET", "1")
            .output()
            .expect("run hack/demo.sh")
    }

    /// Runs `hack/demo.sh ARGS` and asserts it succeeded.
    pub fn run(&self, args: &[&str]) {
        let out = self.sh(args);
        assert!(
            out.status.success(),
            "hack/demo.sh {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The demo's `env.json` (endpoints, nodes, the pod).
    pub fn env(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.path().join("env.json")).expect("env.json"))
            .expect("env.json is JSON")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// `kubectl ARGS` against the demo's API server; stdout when it succeeds.
    pub fn kubectl(&self, args: &[&str]) -> Option<String> {
        let out = Command::new(eni_testkit::bin_dir().join("kubectl"))
            .env("KUBECONFIG", self.kubeconfig())
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `kubectl ARGS -o json` against the demo's API server.
    pub fn kubectl_json(&self, args: &[&str]) -> Option<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all)?).ok()
    }

    /// Runs `cmd` in the pod's container (`kubectl exec`: API server -> kubelet -> containerd).
    pub fn exec(&self, pod: &str, cmd: &[&str]) -> String {
        let mut args = vec!["exec", "-n", "default", pod, "--"];
        args.extend_from_slice(cmd);
        self.kubectl(&args)
            .unwrap_or_else(|| panic!("kubectl exec {pod} -- {cmd:?} failed"))
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let out = self.sh(&["down"]);
        if !out.status.success() {
            eprintln!(
                "{}: hack/demo.sh down: {}",
                self.label,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if std::thread::panicking() {
            // The temp dir goes away: keep the logs for the post-mortem.
            let keep = std::env::temp_dir().join(format!("{}-logs", self.prefix));
            let _ = Command::new("cp")
                .arg("-r")
                .arg(self.dir.path().join("logs"))
                .arg(&keep)
                .status();
            eprintln!("{}: demo logs kept in {}", self.label, keep.display());
        }
    }
}
