//! Backends' MACs from the kernel's neighbour table.
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
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState};
use rtnetlink::Handle;

use super::NetError;

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
