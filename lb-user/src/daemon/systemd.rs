//! systemd's notify protocol, spoken when `NOTIFY_SOCKET` is set (a
//! `Type=notify` unit): `READY=1` once the program is attached and the maps
//! are in sync, `RELOADING=1` and `READY=1` around a reload, `STATUS=` a
//! one-line summary, `WATCHDOG=1` from the event loop when `WATCHDOG_USEC`
//! is set, `STOPPING=1` on the way out. Without the variable it says
//! nothing.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::warn;

pub(super) struct Systemd {
    enabled: bool,
    /// How often systemd wants to hear from us (`WatchdogSec`).
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    ready: bool,
    status: String,
    failed: bool,
}

impl Systemd {
    pub fn from_env() -> Self {
        Systemd {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: None,
            ready: false,
            status: String::new(),
            failed: false,
        }
    }

    fn send(&mut self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            if !self.failed {
                warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
            }
            self.failed = true;
        }
    }

    /// `READY=1`, the first time the maps are in sync.
    pub fn ready_once(&mut self, in_sync: bool) {
        if in_sync && !self.ready {
            self.ready = true;
            self.send(&[NotifyState::Ready]);
        }
    }

    /// Before rereading the config. systemd 253 and later insist on the
    /// monotonic time beside it.
    pub fn reloading(&mut self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// After the reload was applied (or refused: the old config runs on).
    pub fn reloaded(&mut self) {
        if self.ready {
            self.send(&[NotifyState::Ready]);
        }
    }

    /// `STATUS=` when the summary changed.
    pub fn status(&mut self, line: String) {
        if line != self.status {
            self.send(&[NotifyState::Status(&line)]);
            self.status = line;
        }
    }

    /// `WATCHDOG=1` at least twice per watchdog period, from the event
    /// loop: a daemon stuck on one event stops pinging and systemd
    /// restarts it.
    pub fn watchdog(&mut self) {
        let Some(period) = self.watchdog else { return };
        if self.last_ping.is_none_or(|t| t.elapsed() >= period / 2) {
            self.last_ping = Some(Instant::now());
            self.send(&[NotifyState::Watchdog]);
        }
    }

    pub fn stopping(&mut self) {
        self.send(&[NotifyState::Stopping]);
    }
}
