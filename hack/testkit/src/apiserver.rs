//! etcd + kube-apiserver on loopback, like envtest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::sync::OnceCell;

use crate::{Child, Error, free_port, peer};

const TOKEN: &str = "testkit-admin-token";
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// A running etcd + kube-apiserver pair with an admin kubeconfig.
#[derive(Debug)]
pub struct ApiServer {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// Admin kubeconfig (token auth, group `system:masters`).
    pub kubeconfig: PathBuf,
    /// `gitVersion` the server reports, e.g. `v1.37.2`.
    pub version: String,
    apiserver: Child,
    etcd: Child,
    dir: tempfile::TempDir,
}

const DIR_PREFIX: &str = "eni-apiserver-";
const OWNER_FILE: &str = "owner.pid";

/// Removes the directories (etcd data, certs) of API servers whose test process is gone.
/// The shared server lives in a static and is never dropped, so its directory outlives
/// the test binary; the next start cleans it up.
fn sweep_stale_dirs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let owner = std::fs::read_to_string(e.path().join(OWNER_FILE))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(pid) = owner else {
            continue; // not ours to judge (no owner recorded)
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl ApiServer {
    /// One API server per test binary, started on first use.
    pub async fn shared() -> Result<&'static ApiServer, Error> {
        static SHARED: OnceCell<ApiServer> = OnceCell::const_new();
        SHARED.get_or_try_init(ApiServer::start).await
    }

    /// Starts a fresh etcd + kube-apiserver and waits for `/readyz`.
    pub async fn start() -> Result<Self, Error> {
        let etcd_bin = peer("etcd")?;
        let apiserver_bin = peer("kube-apiserver")?;
        sweep_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(io("create a temp dir"))?;
        let d = dir.path();
        std::fs::write(d.join(OWNER_FILE), std::process::id().to_string())
            .map_err(io("write the owner pid"))?;

        let (client_port, peer_port) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Child::spawn(
            "etcd",
            &etcd_bin,
            &[
                "--name=testkit".into(),
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=testkit={peer_url}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            &d.join("etcd.log"),
        )?;

        let sa_key = d.join("sa.key");
        let status = Command::new("openssl")
            .args([
                "ecparam",
                "-genkey",
                "-name",
                "prime256v1",
                "-noout",
                "-out",
            ])
            .arg(&sa_key)
            .status()
            .map_err(io("run openssl to make a service-account key"))?;
        if !status.success() {
            return Err(io("make a service-account key")(std::io::Error::other(
                "openssl failed",
            )));
        }
        let tokens = d.join("tokens.csv");
        std::fs::write(&tokens, format!("{TOKEN},admin,admin,\"system:masters\"\n"))
            .map_err(io("write the token file"))?;

        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let apiserver = Child::spawn(
            "kube-apiserver",
            &apiserver_bin,
            &[
                format!("--etcd-servers={etcd_url}"),
                format!("--secure-port={port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                // Loopback cannot be advertised as the kubernetes Service endpoint.
                "--endpoint-reconciler-type=none".into(),
                format!("--cert-dir={}", d.join("certs").display()),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", sa_key.display()),
                format!("--service-account-signing-key-file={}", sa_key.display()),
                "--service-cluster-ip-range=10.96.0.0/24".into(),
                "--authorization-mode=RBAC".into(),
                format!("--token-auth-file={}", tokens.display()),
                "--disable-admission-plugins=ServiceAccount".into(),
                "--allow-privileged=true".into(),
                "--v=1".into(),
            ],
            &d.join("kube-apiserver.log"),
        )?;

        let kubeconfig = d.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &url)?;
        let mut server = Self {
            url,
            kubeconfig,
            version: String::new(),
            apiserver,
            etcd,
            dir,
        };
        server.version = server.wait_ready().await?;
        eprintln!(
            "testkit: kube-apiserver {} ready at {} (logs in {})",
            server.version,
            server.url,
            server.dir.path().display()
        );
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<String, Error> {
        let client = self.client().await?;
        let ready = crate::eventually(READY_TIMEOUT, || {
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new()).ok()?;
                let body = client.request_text(req).await.ok()?;
                (body.trim() == "ok").then_some(())
            }
        })
        .await;
        if ready.is_none() || !self.apiserver.running() || !self.etcd.running() {
            return Err(Error::NotReady {
                what: "kube-apiserver",
                after: READY_TIMEOUT,
                log: self.apiserver.log().to_path_buf(),
            });
        }
        Ok(client.apiserver_version().await?.git_version)
    }

    /// Applies a CRD (server-side apply) and waits until it is Established.
    pub async fn install_crd(&self, crd: &CustomResourceDefinition) -> Result<Client, Error> {
        let client = self.client().await?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.patch(
            &name,
            &PatchParams::apply("eni-testkit").force(),
            &Patch::Apply(crd),
        )
        .await?;
        let established = crate::eventually(Duration::from_secs(30), || {
            let (crds, name) = (crds.clone(), name.clone());
            async move {
                let crd = crds.get(&name).await.ok()?;
                crd.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await;
        match established {
            Some(()) => Ok(client),
            None => Err(Error::NotReady {
                what: "CustomResourceDefinition",
                after: Duration::from_secs(30),
                log: self.apiserver.log().to_path_buf(),
            }),
        }
    }

    /// A client with cluster-admin rights.
    pub async fn client(&self) -> Result<Client, Error> {
        Ok(Client::try_from(self.config().await?)?)
    }

    /// The admin client configuration.
    pub async fn config(&self) -> Result<Config, Error> {
        crate::install_crypto_provider();
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
    }

    /// A client that impersonates `user` (and `groups`), for RBAC tests.
    pub async fn impersonating(&self, user: &str, groups: &[&str]) -> Result<Client, Error> {
        let mut config = self.config().await?;
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
        Ok(Client::try_from(config)?)
    }

    /// A client that authenticates with a bearer `token` only (for example a service
    /// account token from a TokenRequest), as a pod would.
    pub async fn with_token(&self, token: &str) -> Result<Client, Error> {
        let mut config = self.config().await?;
        config.auth_info = kube::config::AuthInfo {
            token: Some(token.to_string().into()),
            ..Default::default()
        };
        Ok(Client::try_from(config)?)
    }

    /// Directory holding the logs, certificates and etcd data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn write_kubeconfig(path: &Path, url: &str) -> Result<(), Error> {
    let yaml = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testkit
  cluster:
    server: {url}
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: {TOKEN}
contexts:
- name: testkit
  context:
    cluster: testkit
    user: admin
current-context: testkit
"
    );
    std::fs::write(path, yaml).map_err(io("write the kubeconfig"))
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.to_string(),
        source,
    }
}
