//! The host's network, from the kernel over netlink: the interface xlb
//! attaches to and its addresses, backends' MACs from the neighbour table,
//! next hops toward TUN backends, the sysctls TUN mode needs, VIP routes
//! for a BGP speaker in a table of xlb's own, and that speaker's (BIRD's)
//! session state.

pub mod bird;
mod neighbours;
mod routes;
pub mod sysctl;
pub mod table;
pub mod watch;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
pub use neighbours::Neighbours;
use netlink_packet_route::{
    address::{AddressAttribute, AddressScope},
    link::{LinkAttribute, LinkXdp},
};
pub use routes::{NextHops, Route, route_to};
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

/// The MTU of interface `index`.
pub async fn mtu(handle: &Handle, index: u32) -> Result<u16, NetError> {
    let mut links = handle.link().get().match_index(index).execute();
    let link = links
        .try_next()
        .await
        .map_err(|source| NetError::Netlink { op: "link get", source })?
        .ok_or_else(|| NetError::NoInterface { name: format!("#{index}") })?;
    let mtu = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    });
    Ok(mtu.map_or(1500, |m| u16::try_from(m).unwrap_or(u16::MAX)))
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
