//! Host routes for VIPs in a routing table of xlb's own, which a BGP
//! speaker (BIRD's kernel protocol with `learn`) picks up and announces.
//! The table is never used for lookups (no `ip rule` names it), so these
//! routes change nothing on the host itself.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::NetError;

/// The routing protocol number xlb's routes carry (`ip route show table T
/// proto 247`), so they are told from anyone else's. Unassigned in the
/// kernel's list (BIRD's own is 12).
pub const RTPROT_XLB: u8 = 247;

/// A host route in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRoute {
    pub ip: IpAddr,
    /// Its routing protocol number: [`RTPROT_XLB`] for xlb's.
    pub proto: u8,
}

/// A route in the table that is not a host route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherRoute {
    pub destination: String,
    pub proto: u8,
}

/// What the table holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableRoutes {
    pub hosts: Vec<HostRoute>,
    pub others: Vec<OtherRoute>,
}

/// The routes of table `table` (both families).
pub async fn list(handle: &Handle, table: u32) -> Result<TableRoutes, NetError> {
    let mut routes = TableRoutes::default();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut query = RouteMessage::default();
        query.header.address_family = family;
        let mut stream = handle.route().get(query).execute();
        while let Some(msg) =
            stream.try_next().await.map_err(|source| NetError::Netlink { op: "route dump", source })?
        {
            if table_of(&msg) != table {
                continue;
            }
            let proto = u8::from(msg.header.protocol);
            let full = if family == AddressFamily::Inet { 32 } else { 128 };
            match (destination(&msg), msg.header.destination_prefix_length) {
                (Some(ip), len) if len == full => routes.hosts.push(HostRoute { ip, proto }),
                (dst, len) => routes.others.push(OtherRoute {
                    destination: dst.map_or_else(|| format!("default/{len}"), |d| format!("{d}/{len}")),
                    proto,
                }),
            }
        }
    }
    Ok(routes)
}

/// Adds xlb's host route for `ip` to `table`, via loopback `lo_index`.
/// Fails (`EEXIST`) rather than replace a route someone else put there.
pub async fn add(handle: &Handle, table: u32, lo_index: u32, ip: IpAddr) -> Result<(), NetError> {
    let msg = message(table, ip).output_interface(lo_index).build();
    handle.route().add(msg).execute().await.map_err(|source| NetError::Netlink { op: "route add", source })
}

/// Deletes xlb's host route for `ip` from `table`; only a route carrying
/// [`RTPROT_XLB`] matches, so nobody else's is touched.
pub async fn delete(handle: &Handle, table: u32, ip: IpAddr) -> Result<(), NetError> {
    let msg = message(table, ip).build();
    match handle.route().del(msg).execute().await {
        // Gone already (someone removed it by hand): what was wanted.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
        result => result.map_err(|source| NetError::Netlink { op: "route delete", source }),
    }
}

/// Deletes every route of xlb's in `table`; how many there were.
pub async fn delete_all_ours(handle: &Handle, table: u32) -> Result<usize, NetError> {
    let ours: Vec<IpAddr> =
        list(handle, table).await?.hosts.iter().filter(|r| r.proto == RTPROT_XLB).map(|r| r.ip).collect();
    for ip in &ours {
        delete(handle, table, *ip).await?;
    }
    Ok(ours.len())
}

fn message(table: u32, ip: IpAddr) -> RouteMessageBuilder<IpAddr> {
    let builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(ip, if ip.is_ipv4() { 32 } else { 128 })
        .expect("a host prefix fits its family")
        .table_id(table)
        .protocol(RouteProtocol::from(RTPROT_XLB));
    // As `ip route add ADDR dev lo` does: a route with no gateway is link-scoped (IPv4).
    if ip.is_ipv4() { builder.scope(RouteScope::Link) } else { builder }
}

fn table_of(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn destination(msg: &RouteMessage) -> Option<IpAddr> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })
}
