//! Where the daemon gets MACs: the neighbour entries of DR backends and of
//! the next hops toward TUN backends (kept fresh so the data plane's FIB
//! lookups find them resolved).

use std::{collections::HashMap, future::Future, net::IpAddr, time::Duration};

use crate::net::{Neighbours, NetError, NextHops};

pub trait Resolve {
    /// The MACs of DR backends `dr` and of the next hops toward TUN
    /// backends `tun` that have one, soliciting the rest; waits up to
    /// `patience` for addresses never asked about before.
    fn resolve(
        &mut self,
        dr: &[IpAddr],
        tun: &[IpAddr],
        patience: Duration,
    ) -> impl Future<Output = Result<HashMap<IpAddr, [u8; 6]>, NetError>>;

    /// MACs known from elsewhere (the pinned maps after a restart), kept
    /// until the neighbour table says otherwise.
    fn seed(&mut self, macs: Vec<(IpAddr, [u8; 6])>);
}

/// The kernel's neighbour and routing tables, over netlink.
pub struct NetResolver {
    neighbours: Neighbours,
    next_hops: NextHops,
    ifindex: u32,
}

impl NetResolver {
    pub fn new(handle: rtnetlink::Handle, ifindex: u32) -> Self {
        NetResolver {
            neighbours: Neighbours::new(handle.clone(), ifindex),
            next_hops: NextHops::new(handle),
            ifindex,
        }
    }
}

impl Resolve for NetResolver {
    async fn resolve(
        &mut self,
        dr: &[IpAddr],
        tun: &[IpAddr],
        patience: Duration,
    ) -> Result<HashMap<IpAddr, [u8; 6]>, NetError> {
        let mut targets = dr.to_vec();
        let hops = self.next_hops.lookup(tun).await?;
        targets.extend(hops.into_iter().filter(|(_, oif)| *oif == self.ifindex).map(|(hop, _)| hop));
        targets.sort();
        targets.dedup();
        self.neighbours.resolve(&targets, patience).await
    }

    fn seed(&mut self, macs: Vec<(IpAddr, [u8; 6])>) {
        self.neighbours.seed(macs);
    }
}
