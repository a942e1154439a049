//! moto's EC2 server on loopback.

use std::path::PathBuf;
use std::time::Duration;

use crate::{Child, Error, cache_dir, free_port};

/// A running `moto_server`.
#[derive(Debug)]
pub struct Moto {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts moto from the venv `hack/peers.sh` made and waits until it answers.
    pub async fn start() -> Result<Self, Error> {
        let bin = moto_bin();
        if !bin.is_file() {
            return Err(Error::MissingPeer("moto_server", bin));
        }
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            what: "create a temp dir".into(),
            source,
        })?;
        let port = free_port();
        let log = dir.path().join("moto.log");
        let args = ["-H", "127.0.0.1", "-p", &port.to_string()].map(String::from);
        let child = Child::spawn("moto", &bin, &args, &log)?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let addr = format!("127.0.0.1:{port}");
        let up = crate::eventually(Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ())
        })
        .await;
        if up.is_none() {
            return Err(Error::NotReady {
                what: "moto",
                after: Duration::from_secs(30),
                log: child.log().to_path_buf(),
            });
        }
        Ok(Self {
            endpoint,
            child,
            _dir: dir,
        })
    }

    /// The moto server process.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

/// An EC2 client for a loopback endpoint (moto or the fault layer) with dummy
/// credentials and no retries, so tests see every error.
pub fn ec2_client(endpoint: &str) -> aws_sdk_ec2::Client {
    use aws_sdk_ec2::config::{BehaviorVersion, Region, retry::RetryConfig};
    let creds = aws_credential_types::Credentials::new("testing", "testing", None, None, "testkit");
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(creds)
            .retry_config(RetryConfig::disabled())
            .build(),
    )
}

fn moto_bin() -> PathBuf {
    cache_dir().join("moto-venv/bin/moto_server")
}
