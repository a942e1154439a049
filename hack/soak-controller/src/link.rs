//! A TCP forwarder between one controller replica and the API server that can cut the
//! replica off (leader loss: the replica can no longer renew its Lease, while EC2 stays
//! reachable). TLS passes through untouched.

use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::debug;

/// A running forwarder. Stops (and closes its connections) when dropped.
#[derive(Debug)]
pub struct ApiLink {
    /// The loopback port to give the replica instead of the API server's.
    pub port: u16,
    cut: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for ApiLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiLink {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, _) = watch::channel(false);
        let task = tokio::spawn(serve(listener, upstream, cut.subscribe()));
        Ok(Self { port, cut, task })
    }

    /// Closes every connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }
}

async fn serve(listener: TcpListener, upstream: SocketAddr, cut: watch::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                if *cut.borrow() {
                    drop(client);
                    continue;
                }
                let mut cut = cut.clone();
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        r = tokio::io::copy_bidirectional(&mut client, &mut server) => {
                            debug!(result = ?r, "api link connection closed");
                        }
                        _ = cut.wait_for(|c| *c) => debug!("api link cut"),
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
