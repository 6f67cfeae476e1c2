//! What the daemon asks of the host's network: MACs (the neighbour entries
//! of DR backends and of the next hops toward TUN backends, kept fresh so
//! the data plane's FIB lookups find them resolved) and VIP routes in the
//! announce table.

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use rtnetlink::Handle;

use crate::{
    control::desired::NextHop,
    net::{
        self, Neighbours, NetError, NextHops,
        table::{self, TableRoutes},
    },
};

/// What resolving found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// DR backends' MACs.
    pub macs: HashMap<IpAddr, [u8; 6]>,
    /// TUN backends' next hops (out of xlb's interface, neighbour known).
    pub hops: HashMap<IpAddr, NextHop>,
}

pub trait Host {
    /// The MACs of DR backends `dr` and the next hops toward TUN backends
    /// `tun` that have one, soliciting the neighbours that do not; waits up
    /// to `patience` for addresses never asked about before.
    fn resolve(
        &mut self,
        dr: &[IpAddr],
        tun: &[IpAddr],
        patience: Duration,
    ) -> impl Future<Output = Result<Resolved, NetError>>;

    /// Routes or links changed: next hops must be looked up again.
    fn routes_changed(&mut self);

    /// MACs known from elsewhere (the pinned maps after a restart), kept
    /// until the neighbour table says otherwise.
    fn seed(&mut self, macs: Vec<(IpAddr, [u8; 6])>);

    /// The routes of routing table `table`.
    fn routes(&mut self, table: u32) -> impl Future<Output = Result<TableRoutes, NetError>>;

    /// Adds xlb's host route for `ip` to `table`.
    fn add_route(&mut self, table: u32, ip: IpAddr) -> impl Future<Output = Result<(), NetError>>;

    /// Removes xlb's host route for `ip` from `table` (never anyone else's).
    fn delete_route(&mut self, table: u32, ip: IpAddr) -> impl Future<Output = Result<(), NetError>>;
}

/// The kernel's tables over netlink.
pub struct NetHost {
    handle: Handle,
    neighbours: Neighbours,
    next_hops: NextHops,
    ifindex: u32,
    lo_index: u32,
}

impl NetHost {
    /// `tun_sources`: the outer source addresses of TUN packets.
    pub fn new(handle: Handle, ifindex: u32, lo_index: u32, tun_sources: (Ipv4Addr, Ipv6Addr)) -> Self {
        NetHost {
            neighbours: Neighbours::new(handle.clone(), ifindex),
            next_hops: NextHops::new(handle.clone(), tun_sources),
            handle,
            ifindex,
            lo_index,
        }
    }
}

impl Host for NetHost {
    async fn resolve(
        &mut self,
        dr: &[IpAddr],
        tun: &[IpAddr],
        patience: Duration,
    ) -> Result<Resolved, NetError> {
        let mut targets = dr.to_vec();
        // Only next hops out of our own interface: the rest go to the kernel.
        let routes: Vec<_> =
            self.next_hops.lookup(tun).await?.into_iter().filter(|r| r.oif == self.ifindex).collect();
        targets.extend(routes.iter().map(|r| r.via));
        targets.sort();
        targets.dedup();
        let macs = self.neighbours.resolve(&targets, patience).await?;
        let mtu = net::mtu(&self.handle, self.ifindex).await?;
        let hops = routes
            .iter()
            .filter_map(|r| {
                let mac = *macs.get(&r.via)?;
                Some((r.dest, NextHop { mac, mtu: r.mtu.map_or(mtu, |m| m.min(mtu)) }))
            })
            .collect();
        let macs = dr.iter().filter_map(|a| Some((*a, *macs.get(a)?))).collect();
        Ok(Resolved { macs, hops })
    }

    fn routes_changed(&mut self) {
        self.next_hops.forget();
    }

    fn seed(&mut self, macs: Vec<(IpAddr, [u8; 6])>) {
        self.neighbours.seed(macs);
    }

    async fn routes(&mut self, table: u32) -> Result<TableRoutes, NetError> {
        table::list(&self.handle, table).await
    }

    async fn add_route(&mut self, table: u32, ip: IpAddr) -> Result<(), NetError> {
        table::add(&self.handle, table, self.lo_index, ip).await
    }

    async fn delete_route(&mut self, table: u32, ip: IpAddr) -> Result<(), NetError> {
        table::delete(&self.handle, table, ip).await
    }
}
