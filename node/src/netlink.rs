//! rtnetlink: list links, change them, and watch link events.
//!
//! With `--netns <path>` the netlink socket is opened from a dedicated thread that first
//! `setns()`s into that namespace: a socket stays in the namespace it was created in, so
//! every request and every event is about that namespace, while the rest of the daemon
//! (the Kubernetes client, the metrics server) stays in the host namespace. The thread
//! runs the connection on its own single-threaded runtime; the [`rtnetlink::Handle`] and
//! the event receiver are plain channels usable from any runtime.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt, TryStreamExt};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, Prop};
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkUnspec, MulticastGroup, RouteMessageBuilder};

use crate::error::{Error, Result};
use crate::plan::{Link, format_mac};

/// A netlink handle for one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

/// A link was added, changed or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkEvent;

type Connected = (
    Handle,
    futures::channel::mpsc::UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
);

/// Opens a netlink connection subscribed to link events, in `netns` when given (a path
/// like `/var/run/netns/node1`) or in the daemon's own namespace.
pub fn connect(
    netns: Option<&Path>,
) -> Result<(Netlink, impl Stream<Item = LinkEvent> + Send + 'static)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Connected>>(1);
    let netns: Option<PathBuf> = netns.map(Path::to_path_buf);
    std::thread::Builder::new()
        .name("netlink".into())
        .spawn(move || {
            if let Some(path) = &netns
                && let Err(e) = enter_netns(path)
            {
                let _ = tx.send(Err(e));
                return;
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(Error::NetlinkSocket(e)));
                    return;
                }
            };
            rt.block_on(async move {
                match rtnetlink::new_multicast_connection(&[MulticastGroup::Link]) {
                    Ok((conn, handle, messages)) => {
                        let _ = tx.send(Ok((handle, messages)));
                        conn.await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Error::NetlinkSocket(e)));
                    }
                }
            });
        })
        .map_err(Error::NetlinkSocket)?;
    let (handle, messages) = rx
        .recv()
        .map_err(|_| Error::NetlinkSocket(std::io::Error::other("netlink thread died")))??;
    let events = messages.filter_map(|(msg, _)| async move {
        use rtnetlink::packet_core::NetlinkPayload;
        match msg.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_),
            ) => Some(LinkEvent),
            _ => None,
        }
    });
    Ok((Netlink { handle }, events))
}

fn enter_netns(path: &Path) -> Result<()> {
    let err = |reason: String| Error::Netns {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| err(format!("setns: {e}")))
}

fn parse_link(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name.clone_from(n),
            LinkAttribute::Address(a) => link.mac = format_mac(a),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::PropList(props) => {
                for p in props {
                    if let Prop::AltIfName(n) = p {
                        link.alt_names.push(n.clone());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

impl Netlink {
    /// All links of the namespace.
    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self.handle.link().get().execute().try_collect().await?;
        Ok(msgs.iter().map(parse_link).collect())
    }

    /// Interfaces that carry a default route (IPv4 or IPv6, any table): the node's primary
    /// interface(s), which the daemon never touches.
    pub async fn default_route_links(&self) -> Result<BTreeSet<u32>> {
        let mut out = BTreeSet::new();
        let requests = [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ];
        for req in requests {
            let routes: Vec<RouteMessage> =
                self.handle.route().get(req).execute().try_collect().await?;
            for r in routes
                .iter()
                .filter(|r| r.header.destination_prefix_length == 0)
            {
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(i) => {
                            out.insert(*i);
                        }
                        RouteAttribute::MultiPath(hops) => {
                            out.extend(hops.iter().map(|h| h.interface_index));
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(out)
    }

    /// Sets the link up.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        Ok(self.handle.link().change(msg).execute().await?)
    }

    /// Sets the MTU.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        Ok(self.handle.link().change(msg).execute().await?)
    }

    /// Adds an alternative name.
    pub async fn add_alt_name(&self, index: u32, alt: &str) -> Result<()> {
        Ok(self
            .handle
            .link()
            .property_add(index)
            .alt_ifname(&[alt])
            .execute()
            .await?)
    }
}
