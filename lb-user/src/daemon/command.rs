//! Operators' changes through the admin API.

use std::net::IpAddr;

use tracing::{info, warn};

use super::{Daemon, Host};
use crate::{
    config::{Backends, Source},
    control::desired::instance_address,
    dataplane::Store,
    observe::admin::{Action, ApiError, Change},
};

impl<S: Store, R: Host> Daemon<S, R> {
    /// An operator's change, in effect before the answer goes back.
    pub(super) async fn command(&mut self, action: &Action) -> Result<(), ApiError> {
        match action {
            Action::Backend { vip, backend, change } => self.backend_change(vip, *backend, *change),
            Action::Announce { on } => self.announce_switch(*on).await,
        }
    }

    /// `xlb announce on|off`, kept across restarts like the other overrides.
    async fn announce_switch(&mut self, on: bool) -> Result<(), ApiError> {
        if self.set_announcing(on).await.is_none() {
            return Err(ApiError::new(409, "announcements are not configured: add an [announce] section"));
        }
        self.overrides.announce_off = !on;
        self.save_overrides();
        info!(announce = if on { "on" } else { "off" }, "operator change");
        Ok(())
    }

    fn save_overrides(&self) {
        if let Err(e) = self.overrides.save(&self.files.overrides()) {
            warn!(error = %e, "cannot save the operator's overrides; they will not survive a restart");
        }
    }

    /// A drain, undrain or weight change, in the maps before the answer
    /// goes back. The answer is about this change: a shortfall elsewhere
    /// does not make it fail.
    fn backend_change(&mut self, name: &str, backend: IpAddr, change: Change) -> Result<(), ApiError> {
        let Some(vip) = self.live.vip(name) else {
            return Err(ApiError::new(404, format!("no VIP named {name:?}")));
        };
        let known = match &vip.backends {
            Backends::Static(list) => list.iter().any(|b| b.address == backend),
            Backends::Discovered(source) => self
                .discovery
                .view(source)
                .and_then(|v| v.instances.as_ref())
                .is_some_and(|i| i.iter().any(|i| instance_address(i, vip.addr.ip) == Some(backend))),
        };
        if !known {
            return Err(ApiError::new(404, format!("VIP {:?} has no backend {}", name, backend)));
        }
        let mut value = self.overrides.get(name, backend);
        match (change, &vip.backends) {
            (Change::Drain, _) => value.drained = true,
            (Change::Undrain, _) => value.drained = false,
            (Change::Weight(_), Backends::Discovered(source)) => {
                let how = match source {
                    Source::Consul(_) => "Weights or meta xlb-weight",
                    Source::Etcd(_) => "\"weight\" in the key's JSON value",
                };
                return Err(ApiError::new(
                    409,
                    format!("backends of VIP {name:?} come from {source}: set weights there ({how})"),
                ));
            }
            (Change::Weight(w), Backends::Static(_)) => value.weight = Some(w),
        }
        self.overrides.set(name, backend, value);
        self.save_overrides();
        info!(vip = %name, backend = %backend, change = ?change, "operator change");
        self.apply()
            .map_err(|_| ApiError::new(500, "the change is recorded but the map update failed; retrying"))
    }
}
