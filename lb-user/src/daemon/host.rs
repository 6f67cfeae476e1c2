//! What the daemon asks of the host's network: MACs (the neighbour entries
//! of DR backends and of the next hops toward TUN backends, kept fresh so
//! the data plane's FIB lookups find them resolved) and VIP routes in the
//! announce table.

use std::{collections::HashMap, future::Future, net::IpAddr, time::Duration};

use rtnetlink::Handle;

use crate::net::{
    Neighbours, NetError, NextHops,
    table::{self, TableRoutes},
};

pub trait Host {
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
    pub fn new(handle: Handle, ifindex: u32, lo_index: u32) -> Self {
        NetHost {
            neighbours: Neighbours::new(handle.clone(), ifindex),
            next_hops: NextHops::new(handle.clone()),
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
