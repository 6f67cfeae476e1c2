//! The interface and the backends' MACs, from the kernel over netlink.
//!
//! XDP_TX bypasses the kernel's neighbour machinery, so xlb drives it: it
//! asks the kernel to resolve a backend (`NTF_USE`, as if the stack had a
//! packet for it) and reads the answer from the neighbour table. Entries
//! age to STALE because xlb's own traffic never confirms them; re-soliciting
//! those now and then catches a backend whose MAC changed.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressScope},
    link::{LinkAttribute, LinkXdp},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use rtnetlink::Handle;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("interface {name:?} not found in this network namespace")]
    NoInterface { name: String },
    #[error("interface {name:?} has no Ethernet address")]
    NoMac { name: String },
    #[error("netlink {op} failed")]
    Netlink {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    /// Id of the XDP program attached to it, if any.
    pub xdp_prog_id: Option<u32>,
}

/// How often a resolved-but-unconfirmed (STALE) neighbour is re-probed.
const REPROBE_STALE: Duration = Duration::from_secs(30);

pub struct Neighbours {
    handle: Handle,
    ifindex: u32,
    /// Last MAC seen per backend; kept when an entry ages out or a probe
    /// fails, so a flapping ARP entry does not reshuffle flows.
    known: HashMap<IpAddr, [u8; 6]>,
    solicited: HashMap<IpAddr, Instant>,
}

pub fn connect() -> Result<Handle, NetError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

pub async fn interface(handle: &Handle, name: &str) -> Result<Interface, NetError> {
    let no_interface = || NetError::NoInterface { name: name.to_owned() };
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    let link = match links.try_next().await {
        Ok(Some(link)) => link,
        // The kernel answers ENODEV for an unknown name.
        Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => return Err(no_interface()),
        Err(source) => {
            return Err(NetError::Netlink { op: "link get", source });
        }
    };
    let mac = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => None,
        })
        .ok_or_else(|| NetError::NoMac { name: name.to_owned() })?;
    let xdp_prog_id = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
            LinkXdp::ProgId(id) if *id != 0 => Some(*id),
            _ => None,
        }),
        _ => None,
    });
    Ok(Interface { name: name.to_owned(), index: link.header.index, mac, xdp_prog_id })
}

impl Neighbours {
    pub fn new(handle: Handle, ifindex: u32) -> Self {
        Self { handle, ifindex, known: HashMap::new(), solicited: HashMap::new() }
    }

    /// The MAC of every address in `wanted` that has one, soliciting those
    /// that do not (and stale ones now and then). Call it periodically.
    pub async fn refresh(&mut self, wanted: &[IpAddr]) -> Result<HashMap<IpAddr, [u8; 6]>, NetError> {
        let table = self.dump().await?;
        let now = Instant::now();
        for &addr in wanted {
            let entry = table.get(&addr);
            if let Some((mac, _)) = entry {
                self.known.insert(addr, *mac);
            }
            let due = match entry {
                None => true,
                Some((_, state)) => match state {
                    NeighbourState::Stale => {
                        self.solicited.get(&addr).is_none_or(|t| now - *t >= REPROBE_STALE)
                    }
                    _ => false,
                },
            };
            if due {
                self.solicit(addr).await?;
                self.solicited.insert(addr, now);
            }
        }
        self.known.retain(|a, _| wanted.contains(a));
        self.solicited.retain(|a, _| wanted.contains(a));
        Ok(self.known.clone())
    }

    /// Resolves `wanted`, waiting up to `patience` for the addresses it
    /// has never asked about (one that failed before does not hold up the
    /// rest again).
    pub async fn resolve(
        &mut self,
        wanted: &[IpAddr],
        patience: Duration,
    ) -> Result<HashMap<IpAddr, [u8; 6]>, NetError> {
        let fresh: Vec<IpAddr> = wanted
            .iter()
            .filter(|a| !self.known.contains_key(a) && !self.solicited.contains_key(a))
            .copied()
            .collect();
        let deadline = Instant::now() + patience;
        loop {
            let macs = self.refresh(wanted).await?;
            if fresh.iter().all(|a| macs.contains_key(a)) || Instant::now() >= deadline {
                return Ok(macs);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// MACs known from elsewhere (the pinned maps after a restart), kept
    /// until the neighbour table says otherwise.
    pub fn seed(&mut self, macs: impl IntoIterator<Item = (IpAddr, [u8; 6])>) {
        self.known.extend(macs);
    }

    /// Entries of our interface that carry a MAC (state REACHABLE, STALE,
    /// DELAY, PROBE, PERMANENT, NOARP).
    async fn dump(&self) -> Result<HashMap<IpAddr, ([u8; 6], NeighbourState)>, NetError> {
        let mut table = HashMap::new();
        let mut stream = self.handle.neighbours().get().execute();
        while let Some(msg) =
            stream.try_next().await.map_err(|source| NetError::Netlink { op: "neighbour dump", source })?
        {
            if msg.header.ifindex != self.ifindex {
                continue;
            }
            let mut dst = None;
            let mut mac = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
                    NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
                    _ => {}
                }
            }
            let usable = !matches!(
                msg.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
            );
            if let (Some(dst), Some(mac), true) = (dst, mac, usable) {
                table.insert(dst, (mac, msg.header.state));
            }
        }
        Ok(table)
    }

    /// Asks the kernel to (re)resolve `addr` on our interface.
    async fn solicit(&self, addr: IpAddr) -> Result<(), NetError> {
        self.handle
            .neighbours()
            .add(self.ifindex, addr)
            .state(NeighbourState::None)
            .flags(NeighbourFlags::Use)
            .replace()
            .execute()
            .await
            .map_err(|source| NetError::Netlink { op: "neighbour solicit", source })
    }
}

/// The first global IPv4 and IPv6 address of interface `index`.
pub async fn addresses(
    handle: &Handle,
    index: u32,
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), NetError> {
    let mut stream = handle.address().get().set_link_index_filter(index).execute();
    let (mut v4, mut v6) = (None, None);
    while let Some(msg) =
        stream.try_next().await.map_err(|source| NetError::Netlink { op: "address dump", source })?
    {
        if msg.header.scope != AddressScope::Universe {
            continue;
        }
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Local(IpAddr::V4(a)) | AddressAttribute::Address(IpAddr::V4(a)) => {
                    v4 = v4.or(Some(*a))
                }
                AddressAttribute::Address(IpAddr::V6(a)) => v6 = v6.or(Some(*a)),
                _ => {}
            }
        }
    }
    Ok((v4, v6))
}

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
