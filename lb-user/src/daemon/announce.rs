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
        announce::{Announcement, Plan, Switch, VipFacts, Withdrawn, plan},
        reconcile::Role,
    },
    dataplane::Store,
    errors::error_chain,
    net::{bird, table::RTPROT_XLB},
    observe::status::{AnnounceStatus, BirdStatus, Sync, unix_secs},
};

/// How long failing map writes leave the announcements as they are before
/// withdrawing: one transient error must not move every flow of the fleet.
pub(super) const RETRY_GRACE: Duration = Duration::from_secs(5);
/// With nothing to change, the table is still looked at this often (a
/// route removed by hand comes back).
const RECHECK: Duration = Duration::from_secs(5);

pub(super) struct Announcing {
    config: AnnounceConfig,
    switch: Switch,
    pub plan: Plan,
    /// Addresses routed by someone else, as last seen.
    foreign: BTreeMap<IpAddr, u8>,
    /// When the table was last listed.
    checked: Option<Instant>,
    /// The last failure to read or change the table, while it lasts.
    error: Option<String>,
    bird: BirdStatus,
}

impl Announcing {
    pub fn new(config: AnnounceConfig, maintenance: bool) -> Self {
        let bird = BirdStatus { socket: config.bird_socket.clone(), ..BirdStatus::default() };
        let switch = if maintenance { Switch::Maintenance } else { Switch::On };
        Announcing {
            config,
            switch,
            plan: Plan::default(),
            foreign: BTreeMap::new(),
            checked: None,
            error: None,
            bird,
        }
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

    /// Takes in what BIRD's socket said; whether it changed.
    pub fn bird(&mut self, answer: Result<Vec<bird::Protocol>, String>) -> bool {
        let before = (self.bird.error.clone(), self.bird.protocols.clone());
        self.bird.checked_at = Some(unix_secs(SystemTime::now()));
        match answer {
            Ok(protocols) => {
                if self.bird.error.take().is_some() {
                    info!(socket = %self.config.bird_socket.display(), "BIRD answers again");
                }
                self.bird.protocols = protocols;
            }
            Err(error) => {
                if self.bird.error.is_none() {
                    warn!("{error}; VIP routes are kept in table {} all the same", self.config.table);
                }
                self.bird.error = Some(error);
                self.bird.protocols.clear();
            }
        }
        before != (self.bird.error.clone(), self.bird.protocols.clone())
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
    /// what changed; whether anything status shows did.
    pub(super) async fn announce(&mut self) -> bool {
        let facts = self.vip_facts();
        // A failed write holds the announcements as they are for a grace
        // period; only a lasting failure withdraws.
        let failing_for = self.retrying_since.map(|t| t.elapsed());
        if failing_for.is_some_and(|f| f < RETRY_GRACE) {
            return false;
        }
        let in_sync = self.sync != Sync::Starting && failing_for.is_none();
        let Some(a) = self.announcing.as_mut() else { return false };
        let guess = plan(&facts, in_sync, a.switch, &a.foreign);
        if guess.announce == a.plan.announce
            && a.error.is_none()
            && a.checked.is_some_and(|t| t.elapsed() < RECHECK)
        {
            let changed = guess.vips != a.plan.vips;
            a.plan = guess;
            return changed;
        }
        let table = a.config.table;
        let before = a.error.clone();
        let routes = match self.host.routes(table).await {
            Ok(routes) => routes,
            Err(e) => {
                a.failed("cannot read it", &e);
                return a.error != before;
            }
        };
        a.checked = Some(Instant::now());
        a.foreign = routes.hosts.iter().filter(|r| r.proto != RTPROT_XLB).map(|r| (r.ip, r.proto)).collect();
        let ours: BTreeSet<IpAddr> =
            routes.hosts.iter().filter(|r| r.proto == RTPROT_XLB).map(|r| r.ip).collect();
        let mut new = plan(&facts, in_sync, a.switch, &a.foreign);
        let mut error = None;
        for ip in new
            .announce
            .iter()
            .filter(|(ip, want)| **want && !ours.contains(ip))
            .map(|(ip, _)| *ip)
            .collect::<Vec<_>>()
        {
            match self.host.add_route(table, ip).await {
                Ok(()) => info!(address = %ip, table, "VIP address announced"),
                Err(e) => {
                    // Status says what happened, not what was planned.
                    for v in facts.iter().filter(|v| v.ip == ip) {
                        new.vips.insert(
                            v.name.clone(),
                            Announcement::Withdrawn { reason: Withdrawn::TableError },
                        );
                    }
                    error = Some(("cannot add a route", e));
                }
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
                    Announcement::Foreign { .. }
                    | Announcement::Withdrawn { reason: Withdrawn::TableError } => {
                        warn!(vip = %vip, "announcement: {state}")
                    }
                    _ => info!(vip = %vip, "announcement: {state}"),
                }
            }
        }
        let changed = a.plan != new || a.error != before;
        a.plan = new;
        changed
    }

    /// Switches announcing on or off (maintenance); `None` when
    /// `[announce]` is not configured.
    pub(super) async fn set_announcing(&mut self, on: bool) -> Option<Duration> {
        let a = self.announcing.as_mut()?;
        a.switch = if on { Switch::On } else { Switch::Maintenance };
        a.checked = None;
        let wait = a.config.withdraw_wait;
        self.announce().await;
        Some(wait)
    }

    /// Withdraws everything before a graceful stop; how long to wait then
    /// for routers to move flows away (`None` when nothing was announced).
    pub async fn withdraw_for_stop(&mut self) -> Option<Duration> {
        let a = self.announcing.as_mut()?;
        let announced = a.plan.announce.values().any(|on| *on);
        a.switch = Switch::Stopping;
        a.checked = None;
        let wait = a.config.withdraw_wait;
        self.announce().await;
        self.publish();
        announced.then_some(wait)
    }
}
