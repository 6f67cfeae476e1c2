//! The interface and the backends' MACs, from the kernel over netlink.
//!
//! XDP_TX bypasses the kernel's neighbour machinery, so xlb drives it: it
//! asks the kernel to resolve a backend (`NTF_USE`, as if the stack had a
//! packet for it) and reads the answer from the neighbour table. Entries
//! age to STALE because xlb's own traffic never confirms them; re-soliciting
//! those now and then catches a backend whose MAC changed.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    link::{LinkAttribute, LinkXdp},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
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
    let no_interface = || NetError::NoInterface {
        name: name.to_owned(),
    };
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    let link = match links.try_next().await {
        Ok(Some(link)) => link,
        // The kernel answers ENODEV for an unknown name.
        Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => return Err(no_interface()),
        Err(source) => {
            return Err(NetError::Netlink {
                op: "link get",
                source,
            });
        }
    };
    let mac = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => None,
        })
        .ok_or_else(|| NetError::NoMac {
            name: name.to_owned(),
        })?;
    let xdp_prog_id = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
            LinkXdp::ProgId(id) if *id != 0 => Some(*id),
            _ => None,
        }),
        _ => None,
    });
    Ok(Interface {
        name: name.to_owned(),
        index: link.header.index,
        mac,
        xdp_prog_id,
    })
}

impl Neighbours {
    pub fn new(handle: Handle, ifindex: u32) -> Self {
        Self {
            handle,
            ifindex,
            known: HashMap::new(),
            solicited: HashMap::new(),
        }
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
                    NeighbourState::Stale => self
                        .solicited
                        .get(&addr)
                        .is_none_or(|t| now - *t >= REPROBE_STALE),
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

    /// Resolves `wanted`, waiting up to `patience` for all of them.
    pub async fn resolve(
        &mut self,
        wanted: &[IpAddr],
        patience: Duration,
    ) -> Result<HashMap<IpAddr, [u8; 6]>, NetError> {
        let deadline = Instant::now() + patience;
        loop {
            let macs = self.refresh(wanted).await?;
            if macs.len() == wanted.len() || Instant::now() >= deadline {
                return Ok(macs);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Entries of our interface that carry a MAC (state REACHABLE, STALE,
    /// DELAY, PROBE, PERMANENT, NOARP).
    async fn dump(&self) -> Result<HashMap<IpAddr, ([u8; 6], NeighbourState)>, NetError> {
        let mut table = HashMap::new();
        let mut stream = self.handle.neighbours().get().execute();
        while let Some(msg) = stream.try_next().await.map_err(|source| NetError::Netlink {
            op: "neighbour dump",
            source,
        })? {
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
            .map_err(|source| NetError::Netlink {
                op: "neighbour solicit",
                source,
            })
    }
}
