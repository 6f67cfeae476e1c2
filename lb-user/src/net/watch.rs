//! What the kernel reports as it changes: routes, neighbours, links
//! (rtnetlink's multicast groups, as `ip monitor` reads them).

use std::time::Duration;

use futures::{StreamExt as _, channel::mpsc::UnboundedReceiver};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::{MulticastGroup, sys::AsyncSocket as _};

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
    /// nor are links and neighbours of interfaces other than `ifindex`
    /// (xlb's). Lost messages (the socket's buffer overran) may have said
    /// anything.
    pub fn add(&mut self, message: &NetlinkMessage<RouteNetlinkMessage>, ifindex: u32) {
        let message = match &message.payload {
            NetlinkPayload::InnerMessage(message) => message,
            NetlinkPayload::Overrun(_) => {
                *self = Changes { routes: true, neighbours: true };
                return;
            }
            _ => return,
        };
        match message {
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r)
                if u8::from(r.header.protocol) != RTPROT_XLB =>
            {
                self.routes = true
            }
            RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l)
                if l.header.index == ifindex =>
            {
                self.routes = true
            }
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

/// Room for a burst of notifications (a routing daemon installing a full
/// table) before the kernel drops some and reports an overrun.
const RECEIVE_BUFFER: usize = 4 << 20;

/// How long after a first notification the rest of its burst is awaited,
/// so that a burst costs one re-resolve, not hundreds.
const SETTLE: Duration = Duration::from_millis(10);

/// Subscribes to route, link and neighbour changes.
pub fn subscribe() -> Result<Messages, NetError> {
    let groups =
        [MulticastGroup::Link, MulticastGroup::Neigh, MulticastGroup::Ipv4Route, MulticastGroup::Ipv6Route];
    let (mut connection, _, messages) =
        rtnetlink::new_multicast_connection(&groups).map_err(NetError::Socket)?;
    // Best effort: without it the default buffer applies and an overrun
    // still triggers a full re-resolve.
    let _ = connection.socket_mut().socket_mut().set_rx_buf_sz(RECEIVE_BUFFER);
    tokio::spawn(connection);
    Ok(messages)
}

/// The next batch of changes as seen from interface `ifindex`: waits for
/// one message, then `SETTLE`, then takes whatever else is queued. `None`
/// when the connection is gone.
pub async fn next(messages: &mut Messages, ifindex: u32) -> Option<Changes> {
    let mut changes = Changes::default();
    changes.add(&messages.next().await?.0, ifindex);
    tokio::time::sleep(SETTLE).await;
    while let Ok((message, _)) = messages.try_recv() {
        changes.add(&message, ifindex);
    }
    Some(changes)
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::{
        link::LinkMessage,
        neighbour::NeighbourMessage,
        route::{RouteMessage, RouteProtocol},
    };

    use super::*;

    fn message(inner: RouteNetlinkMessage) -> NetlinkMessage<RouteNetlinkMessage> {
        NetlinkMessage::from(inner)
    }

    fn changes(messages: &[NetlinkMessage<RouteNetlinkMessage>]) -> Changes {
        let mut c = Changes::default();
        messages.iter().for_each(|m| c.add(m, 7));
        c
    }

    #[test]
    fn only_what_can_move_a_next_hop_is_news() {
        let mut ours = RouteMessage::default();
        ours.header.protocol = RouteProtocol::from(RTPROT_XLB);
        let mut link = LinkMessage::default();
        link.header.index = 8;
        let mut neighbour = NeighbourMessage::default();
        neighbour.header.ifindex = 8;
        let quiet = [
            message(RouteNetlinkMessage::NewRoute(ours)),
            message(RouteNetlinkMessage::NewLink(link.clone())),
            message(RouteNetlinkMessage::NewNeighbour(neighbour.clone())),
        ];
        assert!(!changes(&quiet).any(), "xlb's own routes, other interfaces");

        let route = message(RouteNetlinkMessage::DelRoute(RouteMessage::default()));
        assert_eq!(changes(&[route]), Changes { routes: true, neighbours: false });
        link.header.index = 7;
        assert!(changes(&[message(RouteNetlinkMessage::DelLink(link))]).routes);
        neighbour.header.ifindex = 7;
        let neighbour = message(RouteNetlinkMessage::NewNeighbour(neighbour));
        assert_eq!(changes(&[neighbour]), Changes { routes: false, neighbours: true });
    }

    #[test]
    fn lost_messages_mean_everything_may_have_changed() {
        let mut overrun = message(RouteNetlinkMessage::NewRoute(RouteMessage::default()));
        overrun.payload = NetlinkPayload::Overrun(Vec::new());
        assert_eq!(changes(&[overrun]), Changes { routes: true, neighbours: true });
    }
}
