//! From what is wanted to the maps: the desired state, MAC resolution, the
//! reconciler's apply and the sync state it leaves.

use std::{
    collections::HashSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use tracing::{error, info, warn};

use super::{Daemon, Host};
use crate::{
    control::{
        desired::{self, Built, Desired, Inputs},
        reconcile::Shortfall,
    },
    dataplane::{DataplaneError, Store},
    errors::error_chain,
    health::State,
    model::Forward,
    observe::status::{SAID, Shortfalls, Sync},
};

impl<S: Store, R: Host> Daemon<S, R> {
    /// The desired state now; instances left out are logged when they
    /// first are, and so is panic mode. The health checker follows its
    /// candidates: new ones are probed from now on.
    pub(super) fn desired(&mut self) -> Desired {
        let mut built = self.build();
        let targets = built.targets.values().flatten().cloned();
        // A backend already in the table starts up: a restart or reload
        // that adds or keeps a check takes nothing out.
        let serving: HashSet<IpAddr> =
            self.reconciler.vips().values().flat_map(|v| v.backends.keys().copied()).collect();
        if self
            .checker
            .follow(targets, |t| if serving.contains(&t.addr.ip()) { State::Up } else { State::Unknown })
        {
            built = self.build();
        }
        for note in built.notes.iter().filter(|n| !self.notes.contains(n)) {
            warn!("{note}");
        }
        for vip in built.panics.iter().filter(|v| !self.panics.contains(v)) {
            error!(vip = %vip, "every backend fails its health check: all kept (panic mode; on_all_failed = \"keep\")");
        }
        for vip in self.panics.iter().filter(|v| !built.panics.contains(v)) {
            info!(vip = %vip, "a backend passes its health check again: panic mode over");
        }
        self.notes = built.notes;
        self.panics = built.panics;
        self.targets = built.targets;
        built.desired
    }

    fn build(&self) -> Built {
        let health = self.checker.states();
        let inputs = Inputs {
            discovery: &self.discovery,
            overrides: &self.overrides,
            macs: &self.resolved.macs,
            hops: &self.resolved.hops,
            health: &health,
        };
        desired::build(&self.live, &inputs)
    }

    /// Makes the maps match the desired state, and records how that went.
    pub(super) fn apply(&mut self) -> Result<(), DataplaneError> {
        let desired = self.desired();
        let result = self.reconciler.apply(&desired, Instant::now(), &mut self.maps);
        let shortfalls = self.reconciler.shortfalls().to_vec();
        // Thousands may wait on an oversized source: a set, not a scan each.
        let before: HashSet<&Shortfall> = self.shortfalls.iter().collect();
        let new: Vec<Shortfall> = shortfalls.iter().filter(|s| !before.contains(s)).cloned().collect();
        if !new.is_empty() {
            warn!(left_out = new.len(), "short of capacity: {}", Shortfalls::new(&new).describe(SAID));
        }
        self.retrying_since = match (&result, self.retrying_since) {
            (Err(_), None) => Some(Instant::now()),
            (Err(_), since) => since,
            (Ok(()), _) => None,
        };
        self.sync = match &result {
            Err(e) => {
                error!(error = %error_chain(e), "map update failed; retrying with a full resync");
                Sync::Retrying { error: error_chain(e) }
            }
            // What found no id is placed when ids free up (backends leave).
            Ok(()) if !shortfalls.is_empty() => Sync::Short(Shortfalls::new(&shortfalls)),
            Ok(()) => Sync::InSync,
        };
        self.shortfalls = shortfalls;
        result
    }

    /// Refreshes the MACs of DR backends and the next hops of TUN ones,
    /// waiting up to `patience` for addresses never asked about; whether
    /// they changed.
    pub(super) async fn resolve_neighbours(&mut self, patience: Duration) -> bool {
        let desired = self.desired();
        let (mut dr, mut tun) = (Vec::new(), Vec::new());
        for vip in &desired.vips {
            let addrs = vip.backends.iter().map(|b| b.addr);
            match vip.forward {
                Forward::Dr => dr.extend(addrs),
                Forward::Tun => tun.extend(addrs),
            }
        }
        match self.host.resolve(&dr, &tun, patience).await {
            Ok(resolved) if resolved != self.resolved => {
                self.resolved = resolved;
                true
            }
            Ok(_) => false,
            Err(e) => {
                warn!(error = %error_chain(&e), "resolving MACs and next hops failed");
                false
            }
        }
    }

    /// After an event: MACs refreshed (new backends get `patience` to
    /// resolve, so they join with the change rather than a tick later),
    /// then an apply if anything calls for one; whether it applied.
    pub(super) async fn settle(&mut self, patience: Duration, changed: bool) -> bool {
        let resolved_changed = self.resolve_neighbours(patience).await;
        let due = self.reconciler.next_deadline().is_some_and(|d| d <= Instant::now());
        // Short of ids, it waits for one to free: no apply a tick for nothing.
        let retry = match self.sync {
            Sync::InSync => false,
            Sync::Short(_) => self.reconciler.could_place_more(),
            Sync::Starting | Sync::Retrying { .. } => true,
        };
        let apply = changed || resolved_changed || due || retry;
        if apply {
            let _ = self.apply();
        }
        apply
    }
}
