//! What the kernel reports as it changes: routes, neighbours, links
//! (rtnetlink's multicast groups, as `ip monitor` reads them).

use futures::{StreamExt as _, channel::mpsc::UnboundedReceiver};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};

use super::{NetError, table::RTPROT_XLB};

/// A kind of change, as far as next hops care.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// A route or a link (its MTU, its state) changed: next hops may have.
    pub routes: bool,
    /// A neighbour entry changed: a next hop's MAC may have.
    pub neighbours: bool,
}

impl Changes {
    pub fn any(&self) -> bool {
        self.routes || self.neighbours
    }

    /// Adds what `message` reports. xlb's own announce routes are not news,
    /// nor are neighbours of interfaces other than `ifindex` (xlb's).
    pub fn add(&mut self, message: &NetlinkMessage<RouteNetlinkMessage>, ifindex: u32) {
        let NetlinkPayload::InnerMessage(message) = &message.payload else { return };
        match message {
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r)
                if u8::from(r.header.protocol) != RTPROT_XLB =>
            {
                self.routes = true
            }
            RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_) => self.routes = true,
            RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n)
                if n.header.ifindex == ifindex =>
            {
                self.neighbours = true
            }
            _ => {}
        }
    }
}

/// The kernel's change messages, from a connection of their own.
pub type Messages = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, rtnetlink::sys::SocketAddr)>;

/// Subscribes to route, link and neighbour changes.
pub fn subscribe() -> Result<Messages, NetError> {
    let groups =
        [MulticastGroup::Link, MulticastGroup::Neigh, MulticastGroup::Ipv4Route, MulticastGroup::Ipv6Route];
    let (connection, _, messages) = rtnetlink::new_multicast_connection(&groups).map_err(NetError::Socket)?;
    tokio::spawn(connection);
    Ok(messages)
}

/// The next batch of changes as seen from interface `ifindex`: waits for
/// one message, then takes whatever else is already queued. `None` when the
/// connection is gone.
pub async fn next(messages: &mut Messages, ifindex: u32) -> Option<Changes> {
    let mut changes = Changes::default();
    changes.add(&messages.next().await?.0, ifindex);
    while let Ok((message, _)) = messages.try_recv() {
        changes.add(&message, ifindex);
    }
    Some(changes)
}
