//! Next hops toward TUN backends, from the kernel's routing table.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    net::IpAddr,
    time::{Duration, Instant},
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use rtnetlink::Handle;

use super::NetError;

/// Next hops toward TUN backends. The kernel answers one destination per
/// route lookup and routes rarely change, so a destination is looked up
/// when first wanted and then about every `ROUTE_REFRESH`, each at its own
/// pace so that thousands of backends do not come due on the same tick.
pub struct NextHops {
    handle: Handle,
    /// Per destination: the answer, and when to ask again.
    cache: HashMap<IpAddr, (Option<(IpAddr, u32)>, Instant)>,
}

/// The longest a looked-up next hop is trusted: how late a route change
/// reaches the neighbour refresh (packets follow it at once; the kernel
/// resolves a new next hop on the first packet meanwhile).
const ROUTE_REFRESH: Duration = Duration::from_secs(30);
/// How long "no route" is trusted.
const NO_ROUTE_RETRY: Duration = Duration::from_secs(5);

impl NextHops {
    pub fn new(handle: Handle) -> Self {
        Self { handle, cache: HashMap::new() }
    }

    /// `next_hop` of each of `dests` that has a route, asking the kernel
    /// only about those due; destinations not in `dests` are forgotten.
    pub async fn lookup(&mut self, dests: &[IpAddr]) -> Result<Vec<(IpAddr, u32)>, NetError> {
        let now = Instant::now();
        let mut hops = Vec::with_capacity(dests.len());
        for &dest in dests {
            let hop = match self.cache.get(&dest) {
                Some((hop, due)) if now < *due => *hop,
                _ => {
                    let hop = next_hop(&self.handle, dest).await?;
                    // A missing route is asked about again soon: one added
                    // later should have its neighbour kept fresh at once.
                    let due = if hop.is_some() { refresh_period(dest) } else { NO_ROUTE_RETRY };
                    self.cache.insert(dest, (hop, now + due));
                    hop
                }
            };
            hops.extend(hop);
        }
        let wanted: HashSet<&IpAddr> = dests.iter().collect();
        self.cache.retain(|d, _| wanted.contains(d));
        Ok(hops)
    }
}

/// Between half and all of `ROUTE_REFRESH`, fixed per destination, so that
/// destinations looked up together come due apart.
fn refresh_period(dest: IpAddr) -> Duration {
    let mut h = DefaultHasher::new();
    dest.hash(&mut h);
    ROUTE_REFRESH / 2 + ROUTE_REFRESH / 2 * (h.finish() % 1024) as u32 / 1024
}

/// The neighbour packets to `dest` go to (the gateway, or `dest` itself
/// when on-link) and the interface they leave by; `None` without a route.
pub async fn next_hop(handle: &Handle, dest: IpAddr) -> Result<Option<(IpAddr, u32)>, NetError> {
    let mut msg = RouteMessage::default();
    let (family, len, addr) = match dest {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    };
    msg.header.address_family = family;
    msg.header.destination_prefix_length = len;
    msg.attributes.push(RouteAttribute::Destination(addr));
    let mut stream = handle.route().get(msg).execute();
    let route = match stream.try_next().await {
        Ok(Some(route)) => route,
        // ENETUNREACH and friends: no route.
        Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => return Ok(None),
        Err(source) => return Err(NetError::Netlink { op: "route get", source }),
    };
    let mut hop = dest;
    let mut oif = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => hop = IpAddr::V4(*a),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => hop = IpAddr::V6(*a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Ok(oif.map(|oif| (hop, oif)))
}
