//! Keeping the announce table in step: a host route for every VIP address
//! that can serve, none for the others, nobody else's routes touched.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use tracing::{info, warn};

use super::{Daemon, Host};
use crate::{
    config::AnnounceConfig,
    control::{
        announce::{Announcement, Plan, Switch, VipFacts, plan},
        reconcile::Role,
    },
    dataplane::Store,
    errors::error_chain,
    net::table::RTPROT_XLB,
    observe::status::{AnnounceStatus, BirdStatus, Sync, unix_secs},
};

/// How often BIRD's sessions are looked at.
const BIRD_EVERY: Duration = Duration::from_secs(5);

pub(super) struct Announcing {
    config: AnnounceConfig,
    switch: Switch,
    pub plan: Plan,
    /// The last failure to read or change the table, while it lasts.
    error: Option<String>,
    bird: BirdStatus,
    bird_checked: Option<Instant>,
}

impl Announcing {
    pub fn new(config: AnnounceConfig, maintenance: bool) -> Self {
        let bird = BirdStatus { socket: config.bird_socket.clone(), ..BirdStatus::default() };
        let switch = if maintenance { Switch::Maintenance } else { Switch::On };
        Announcing { config, switch, plan: Plan::default(), error: None, bird, bird_checked: None }
    }

    pub fn status(&self) -> AnnounceStatus {
        AnnounceStatus {
            table: self.config.table,
            withdraw_wait: self.config.withdraw_wait.as_secs_f64(),
            switch: self.switch,
            error: self.error.clone(),
            bird: self.bird.clone(),
        }
    }

    fn failed(&mut self, what: &str, e: &dyn std::error::Error) {
        let error = format!("{what}: {}", error_chain(e));
        if self.error.as_ref() != Some(&error) {
            warn!(table = self.config.table, "announce table: {error}");
        }
        self.error = Some(error);
    }
}

impl<S: Store, H: Host> Daemon<S, H> {
    /// What each VIP looks like to announcing.
    fn vip_facts(&self) -> Vec<VipFacts> {
        self.live
            .vips
            .iter()
            .map(|v| {
                let state = self.reconciler.vips().get(&v.addr);
                let active = state.map_or(0, |s| {
                    s.backends.values().filter(|b| b.role == Role::Active && b.slots > 0).count()
                });
                VipFacts { name: v.name.clone(), ip: v.addr.ip, in_maps: state.is_some(), active }
            })
            .collect()
    }

    /// Brings the announce table in line with what can serve, logging
    /// what changed; whether any VIP's announcement did.
    pub(super) async fn announce(&mut self) -> bool {
        let facts = self.vip_facts();
        let in_sync = !matches!(self.sync, Sync::Starting | Sync::Retrying { .. });
        let Some(a) = self.announcing.as_mut() else { return false };
        let table = a.config.table;
        let routes = match self.host.routes(table).await {
            Ok(routes) => routes,
            Err(e) => {
                a.failed("cannot read it", &e);
                return false;
            }
        };
        let foreign: BTreeMap<IpAddr, u8> =
            routes.hosts.iter().filter(|r| r.proto != RTPROT_XLB).map(|r| (r.ip, r.proto)).collect();
        let ours: BTreeSet<IpAddr> =
            routes.hosts.iter().filter(|r| r.proto == RTPROT_XLB).map(|r| r.ip).collect();
        let new = plan(&facts, in_sync, a.switch, &foreign);
        let before = a.error.clone();
        let mut error = None;
        for (ip, _) in new.announce.iter().filter(|(ip, want)| **want && !ours.contains(ip)) {
            match self.host.add_route(table, *ip).await {
                Ok(()) => info!(address = %ip, table, "VIP address announced"),
                Err(e) => error = Some(("cannot add a route", e)),
            }
        }
        for ip in ours.iter().filter(|ip| !new.announce.get(ip).copied().unwrap_or(false)) {
            match self.host.delete_route(table, *ip).await {
                Ok(()) => info!(address = %ip, table, "VIP address withdrawn"),
                Err(e) => error = Some(("cannot delete a route", e)),
            }
        }
        match error {
            Some((what, e)) => a.failed(what, &e),
            None => a.error = None,
        }
        for (vip, state) in &new.vips {
            if a.plan.vips.get(vip) != Some(state) {
                match state {
                    Announcement::Foreign { .. } => warn!(vip = %vip, "announcement: {state}"),
                    _ => info!(vip = %vip, "announcement: {state}"),
                }
            }
        }
        let changed = a.plan != new || a.error != before;
        a.plan = new;
        changed
    }

    /// Looks at BIRD's sessions now and then (logged when reachability
    /// changes); whether it looked.
    pub(super) async fn poll_bird(&mut self) -> bool {
        let Some(a) = self.announcing.as_mut() else { return false };
        if a.bird_checked.is_some_and(|t| t.elapsed() < BIRD_EVERY) {
            return false;
        }
        a.bird_checked = Some(Instant::now());
        a.bird.checked_at = Some(unix_secs(SystemTime::now()));
        match self.host.bird(&a.config.bird_socket).await {
            Ok(protocols) => {
                if a.bird.error.take().is_some() {
                    info!(socket = %a.config.bird_socket.display(), "BIRD answers again");
                }
                a.bird.protocols = protocols;
            }
            Err(e) => {
                let error = error_chain(&e);
                if a.bird.error.is_none() {
                    warn!("{error}; VIP routes are kept in table {} all the same", a.config.table);
                }
                a.bird.error = Some(error);
                a.bird.protocols.clear();
            }
        }
        true
    }

    /// Switches announcing on or off (maintenance); `None` when
    /// `[announce]` is not configured.
    pub(super) async fn set_announcing(&mut self, on: bool) -> Option<Duration> {
        let a = self.announcing.as_mut()?;
        a.switch = if on { Switch::On } else { Switch::Maintenance };
        let wait = a.config.withdraw_wait;
        self.announce().await;
        Some(wait)
    }

    /// Withdraws everything before a graceful stop; how long to wait then
    /// for routers to move flows away.
    pub async fn withdraw_for_stop(&mut self) -> Option<Duration> {
        let a = self.announcing.as_mut()?;
        a.switch = Switch::Stopping;
        let wait = a.config.withdraw_wait;
        self.announce().await;
        self.publish();
        Some(wait)
    }
}
