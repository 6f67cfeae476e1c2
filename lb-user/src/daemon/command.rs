//! Operators' changes through the admin API.

use tracing::{info, warn};

use super::{Daemon, Resolve};
use crate::{
    config::Backends,
    control::desired::instance_address,
    dataplane::Store,
    observe::admin::{ApiError, Change, Command},
};

impl<S: Store, R: Resolve> Daemon<S, R> {
    /// A drain, undrain or weight change, in the maps before the answer
    /// goes back. The answer is about this change: a shortfall elsewhere
    /// does not make it fail.
    pub(super) fn command(&mut self, cmd: &Command) -> Result<(), ApiError> {
        let Some(vip) = self.live.vip(&cmd.vip) else {
            return Err(ApiError::new(404, format!("no VIP named {:?}", cmd.vip)));
        };
        let known = match &vip.backends {
            Backends::Static(list) => list.iter().any(|b| b.address == cmd.backend),
            Backends::Consul(q) => self
                .discovery
                .view(q)
                .and_then(|v| v.instances.as_ref())
                .is_some_and(|i| i.iter().any(|i| instance_address(i, vip.addr.ip) == Some(cmd.backend))),
        };
        if !known {
            return Err(ApiError::new(404, format!("VIP {:?} has no backend {}", cmd.vip, cmd.backend)));
        }
        let mut value = self.overrides.get(&cmd.vip, cmd.backend);
        match (cmd.change, &vip.backends) {
            (Change::Drain, _) => value.drained = true,
            (Change::Undrain, _) => value.drained = false,
            (Change::Weight(_), Backends::Consul(_)) => {
                return Err(ApiError::new(
                    409,
                    format!(
                        "backends of VIP {:?} come from Consul: set weights there (Weights or meta xlb-weight)",
                        cmd.vip
                    ),
                ));
            }
            (Change::Weight(w), Backends::Static(_)) => value.weight = Some(w),
        }
        self.overrides.set(&cmd.vip, cmd.backend, value);
        if let Err(e) = self.overrides.save(&self.files.overrides()) {
            warn!(error = %e, "cannot save drain/weight overrides; they will not survive a restart");
        }
        info!(vip = %cmd.vip, backend = %cmd.backend, change = ?cmd.change, "operator change");
        self.apply()
            .map_err(|_| ApiError::new(500, "the change is recorded but the map update failed; retrying"))
    }
}
