//! Next hops toward TUN backends, from the kernel's routing table.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric},
};
use rtnetlink::Handle;

use super::NetError;

/// The kernel's route toward one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub dest: IpAddr,
    /// The neighbour packets go to: the gateway, or `dest` when on-link.
    pub via: IpAddr,
    /// The interface they leave by.
    pub oif: u32,
    /// The route's own MTU (`ip route … mtu N`), if it sets one.
    pub mtu: Option<u16>,
}

/// Next hops toward TUN backends. A destination is looked up when first
/// wanted, again after [`NextHops::forget`] (the daemon calls it when the
/// kernel reports a route or link change), and, as a backstop, about every
/// `ROUTE_REFRESH`, each at its own pace so that thousands of backends do
/// not come due on the same tick.
pub struct NextHops {
    handle: Handle,
    /// The outer source addresses TUN packets carry: policy routing may
    /// route by them.
    sources: (Ipv4Addr, Ipv6Addr),
    /// Per destination: the answer, and when to ask again.
    cache: HashMap<IpAddr, (Option<Route>, Instant)>,
}

/// The longest a looked-up route is trusted without a change notification.
const ROUTE_REFRESH: Duration = Duration::from_secs(60);
/// How long "no route" is trusted.
const NO_ROUTE_RETRY: Duration = Duration::from_secs(5);

impl NextHops {
    pub fn new(handle: Handle, sources: (Ipv4Addr, Ipv6Addr)) -> Self {
        Self { handle, sources, cache: HashMap::new() }
    }

    /// The route of each of `dests` that has one, asking the kernel only
    /// about those due; destinations not in `dests` are forgotten.
    pub async fn lookup(&mut self, dests: &[IpAddr]) -> Result<Vec<Route>, NetError> {
        let now = Instant::now();
        let mut routes = Vec::with_capacity(dests.len());
        for &dest in dests {
            let route = match self.cache.get(&dest) {
                Some((route, due)) if now < *due => *route,
                _ => {
                    let source = match dest {
                        IpAddr::V4(_) => IpAddr::V4(self.sources.0),
                        IpAddr::V6(_) => IpAddr::V6(self.sources.1),
                    };
                    let route =
                        route_to(&self.handle, dest, Some(source).filter(|s| !s.is_unspecified())).await?;
                    // A missing route is asked about again soon: one added
                    // later should be followed at once.
                    let due = if route.is_some() { refresh_period(dest) } else { NO_ROUTE_RETRY };
                    self.cache.insert(dest, (route, now + due));
                    route
                }
            };
            routes.extend(route);
        }
        let wanted: HashSet<&IpAddr> = dests.iter().collect();
        self.cache.retain(|d, _| wanted.contains(d));
        Ok(routes)
    }

    /// Looks every destination up again on the next `lookup`.
    pub fn forget(&mut self) {
        self.cache.clear();
    }
}

/// Between half and all of `ROUTE_REFRESH`, fixed per destination, so that
/// destinations looked up together come due apart.
fn refresh_period(dest: IpAddr) -> Duration {
    let mut h = DefaultHasher::new();
    dest.hash(&mut h);
    ROUTE_REFRESH / 2 + ROUTE_REFRESH / 2 * (h.finish() % 1024) as u32 / 1024
}

/// The kernel's route to `dest` from `source` (`ip route get DEST from
/// SOURCE`); `None` without one.
pub async fn route_to(
    handle: &Handle,
    dest: IpAddr,
    source: Option<IpAddr>,
) -> Result<Option<Route>, NetError> {
    let mut msg = RouteMessage::default();
    let (family, len, addr) = match dest {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    };
    msg.header.address_family = family;
    msg.header.destination_prefix_length = len;
    msg.attributes.push(RouteAttribute::Destination(addr));
    if let Some(source) = source {
        let (len, addr) = match source {
            IpAddr::V4(a) => (32, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (128, RouteAddress::Inet6(a)),
        };
        msg.header.source_prefix_length = len;
        msg.attributes.push(RouteAttribute::Source(addr));
    }
    let mut stream = handle.route().get(msg).execute();
    let route = match stream.try_next().await {
        Ok(Some(route)) => route,
        // ENETUNREACH and friends: no route.
        Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => return Ok(None),
        Err(source) => return Err(NetError::Netlink { op: "route get", source }),
    };
    let (mut via, mut oif, mut mtu) = (dest, None, None);
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = IpAddr::V4(*a),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => via = IpAddr::V6(*a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Metrics(metrics) => {
                mtu = metrics.iter().find_map(|m| match m {
                    RouteMetric::Mtu(mtu) => u16::try_from(*mtu).ok(),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    Ok(oif.map(|oif| Route { dest, via, oif, mtu }))
}
