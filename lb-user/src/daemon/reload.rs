//! Rereading the config file while running.

use tracing::{error, info};

use super::{Daemon, Host, checks, mtime};
use crate::{config::Config, dataplane::Store, errors::error_chain};

impl<S: Store, R: Host> Daemon<S, R> {
    /// Rereads the config file and takes in its live part; start-only
    /// fields it changed keep their running values and are named. Returns
    /// whether the live config changed.
    pub(super) fn reload(&mut self) -> bool {
        // Noted before reading, so a write during the read is seen next tick.
        self.config_mtime = mtime(&self.config_path);
        let reload = match Config::reload(&self.config_path, &self.start) {
            Ok(reload) => reload,
            Err(e) => {
                error!(error = %error_chain(&e), "config rejected; the running config stays in force");
                return false;
            }
        };
        if let Err(e) = checks::check_tun(&self.start.interface, &reload.live, &self.params) {
            error!(error = %e, "config rejected; the running config stays in force");
            return false;
        }
        if reload.refused != self.restart_needed {
            if !reload.refused.is_empty() {
                error!(
                    fields = %reload.refused.join(", "),
                    "config change needs a restart: {} apply only at start and keep their running values \
                     until xlb restarts; the rest of the file applies",
                    reload.refused.join(", ")
                );
            }
            self.restart_needed = reload.refused;
        }
        if reload.live == self.live {
            return false;
        }
        if let Err(e) = self.watchers.follow(&reload.live, &mut self.discovery) {
            error!(error = %error_chain(e.as_ref()), "config rejected; the running config stays in force");
            return false;
        }
        self.live = reload.live;
        info!(config = %self.config_path.display(), "config reloaded");
        true
    }
}
