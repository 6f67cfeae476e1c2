//! `xlb run`: the daemon, one owned object driven by one stream of
//! [`Event`]s.
//!
//! The daemon owns the running config, discovery's state, the reconciler
//! and the maps it writes, the discovery watchers, the resolved MACs and
//! the operator's overrides. Everything that happens to it (a tick, a
//! SIGHUP, a discovery answer, an admin API command, a signal to stop)
//! arrives as an event on one channel, and [`Daemon::handle`] deals with
//! it to the end before the next: apply what changed, then publish the
//! status the admin API and the state file show.
//!
//! Its environment comes in through [`Parts`]: the maps' [`Store`], a
//! [`Host`]r for MACs, the function that watches a discovery source.
//! [`start`] puts together the real ones; the tests use in-memory ones.

mod announce;
mod apply;
mod checks;
mod command;
mod host;
mod publish;
mod reload;
mod sources;
mod start;
mod systemd;
#[cfg(test)]
mod tests;
mod watchers;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, SystemTime},
};

pub use host::{Host, NetHost, Resolved};
pub use start::{Running, start};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
pub use watchers::{Watch, WatchFn, discovery_watch};

use crate::{
    config::{Config, LiveConfig, StartConfig},
    control::{
        desired::Note,
        overrides::Overrides,
        reconcile::{Reconciler, Shortfall},
    },
    dataplane::{Maps, Store, loader::Params},
    discovery::{Discovery, Update},
    files::RunFiles,
    health::{Checker, Target},
    model::Attachment,
    net::bird,
    observe::{admin, status::Sync},
};
use announce::Announcing;
use publish::Publisher;
use watchers::Watchers;

/// How long start-up waits for backends' MACs before going on without the
/// missing ones (they join the table as soon as they resolve).
const INITIAL_RESOLVE: Duration = Duration::from_secs(3);
/// How long a change waits for new backends' MACs.
const CHANGE_RESOLVE: Duration = Duration::from_secs(1);
/// Config file and neighbour table polling interval.
pub const TICK: Duration = Duration::from_secs(1);

/// Everything that moves the daemon.
#[derive(Debug)]
pub enum Event {
    /// Once per [`TICK`]: the config file's mtime, the neighbour table,
    /// drain deadlines, retries.
    Tick,
    /// SIGHUP: reread the config file.
    Reload,
    /// A discovery watcher's report; `epoch` tells reports of watchers
    /// replaced since (another agent or token) from current ones.
    Discovery { epoch: u64, update: Update },
    /// An operator's change through the admin API.
    Api(admin::Command),
    /// What BIRD's control socket said (every few seconds, when announcing).
    Bird(Result<Vec<bird::Protocol>, String>),
    /// The kernel reported route, link or neighbour changes.
    Net(crate::net::watch::Changes),
    /// A health check's verdict changed.
    Health,
    /// SIGTERM or SIGINT.
    Stop,
}

/// Whether the daemon goes on after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// What a daemon is made of.
pub struct Parts<S, R> {
    pub config_path: PathBuf,
    pub config: Config,
    pub params: Params,
    pub maps: Maps<S>,
    pub reconciler: Reconciler,
    pub host: R,
    pub files: RunFiles,
    pub attachment: Attachment,
    /// Where watchers send their reports (the daemon's own event channel).
    pub events: mpsc::Sender<Event>,
    /// How a discovery source is watched.
    pub watch: WatchFn,
}

pub struct Daemon<S, R> {
    config_path: PathBuf,
    /// When the config file was last read (to notice edits).
    config_mtime: Option<SystemTime>,
    start: StartConfig,
    live: LiveConfig,
    /// Start-only fields the file changed since start (they wait for a restart).
    restart_needed: Vec<&'static str>,
    params: Params,
    maps: Maps<S>,
    reconciler: Reconciler,
    discovery: Discovery,
    watchers: Watchers,
    host: R,
    /// Resolved MACs of DR backends and next hops of TUN ones.
    resolved: Resolved,
    /// Drains and weights set through the admin API.
    overrides: Overrides,
    files: RunFiles,
    sync: Sync,
    /// Since when map writes have been failing.
    retrying_since: Option<std::time::Instant>,
    /// Discovered instances left out, and what found no id, as last logged.
    notes: Vec<Note>,
    shortfalls: Vec<Shortfall>,
    attachment: Attachment,
    publisher: Publisher,
    /// VIP routes for BGP, when configured.
    announcing: Option<Announcing>,
    checker: Checker,
    /// What the checker probes for each VIP, as of the last desired state.
    targets: BTreeMap<String, Vec<Target>>,
    /// VIPs in panic mode (every backend failing, all kept).
    panics: Vec<String>,
    /// Forwards the checker's notifications (stopped with the daemon).
    health_events: tokio::task::JoinHandle<()>,
    systemd: systemd::Systemd,
}

impl<S: Store, R: Host> Daemon<S, R> {
    /// The daemon, following the config's discovery sources, and the
    /// channel its status is published on.
    pub fn new(parts: Parts<S, R>) -> anyhow::Result<(Self, watch::Receiver<admin::Published>)> {
        let Parts {
            config_path,
            config,
            params,
            maps,
            reconciler,
            mut host,
            files,
            attachment,
            events,
            watch,
        } = parts;
        // Unreadable overrides fail closed: a node an operator took out of
        // service must not come back by itself.
        let overrides = Overrides::load(&files.overrides()).unwrap_or_else(|e| {
            let path = files.overrides();
            warn!(
                error = %e,
                path = %path.display(),
                "cannot read the operator's overrides: drains and weights are lost, and announcing (if \
                 configured) starts off; fix or remove the file, then `xlb announce on`"
            );
            let mut fail_closed = Overrides::default();
            fail_closed.announce_off = true;
            fail_closed
        });
        // After a restart, DR backends keep the MACs their pinned entries
        // hold while the neighbour table catches up.
        host.seed(
            reconciler
                .vips()
                .values()
                .filter(|v| v.forward == crate::model::Forward::Dr)
                .flat_map(|v| v.backends.iter().filter_map(|(a, b)| Some((*a, b.mac?))))
                .collect(),
        );
        let mut discovery = Discovery::default();
        let verdicts = crate::health::checker::Notify::default();
        let health_events = sources::health(verdicts.clone(), events.clone());
        let mut watchers = Watchers::new(events, watch);
        watchers.follow(&config.live, &mut discovery)?;
        let (publisher, published) = Publisher::new(files.state());
        let announcing = config.start.announce.clone().map(|a| Announcing::new(a, overrides.announce_off));
        let mut daemon = Daemon {
            config_mtime: mtime(&config_path),
            config_path,
            start: config.start,
            live: config.live,
            restart_needed: Vec::new(),
            params,
            maps,
            reconciler,
            discovery,
            watchers,
            host,
            resolved: Resolved::default(),
            overrides,
            files,
            sync: Sync::Starting,
            retrying_since: None,
            notes: Vec::new(),
            shortfalls: Vec::new(),
            attachment,
            publisher,
            announcing,
            checker: Checker::new(verdicts),
            targets: BTreeMap::new(),
            panics: Vec::new(),
            health_events,
            systemd: systemd::Systemd::from_env(),
        };
        daemon.publish();
        Ok((daemon, published))
    }

    /// The first apply, once backends' MACs had a moment to resolve.
    pub async fn begin(&mut self) {
        self.resolve_neighbours(INITIAL_RESOLVE).await;
        let _ = self.apply();
        self.announce().await;
        self.publish();
        info!(vips = self.live.vips.len(), admin = %self.start.admin.listen, "xlb ready");
    }

    /// Handles events until told to stop.
    pub async fn run(&mut self, events: &mut mpsc::Receiver<Event>) {
        while let Some(event) = events.recv().await {
            if self.handle(event).await == Flow::Stop {
                return;
            }
        }
    }

    /// Deals with one event to the end: whatever it changed is in the maps
    /// (or the failure is recorded for a retry) and published.
    pub async fn handle(&mut self, event: Event) -> Flow {
        self.systemd.watchdog();
        let changed = match event {
            Event::Stop => return Flow::Stop,
            Event::Api(cmd) => {
                let result = self.command(&cmd.action).await;
                self.announce().await;
                self.publish();
                let _ = cmd.reply.send(result);
                return Flow::Continue;
            }
            Event::Discovery { epoch, update } => {
                if self.discovery_update(epoch, update) {
                    self.settle(CHANGE_RESOLVE, false).await;
                }
                // Every answer moves the source's age.
                true
            }
            Event::Bird(answer) => self.announcing.as_mut().is_some_and(|a| a.bird(answer)),
            // A failed backend goes at once, before anything waits on the
            // neighbour table.
            Event::Health => {
                let _ = self.apply();
                // One that passes again may need its MAC looked up anew.
                self.settle(CHANGE_RESOLVE, false).await;
                true
            }
            Event::Net(changes) => {
                if changes.routes {
                    self.host.routes_changed();
                }
                self.settle(Duration::ZERO, false).await
            }
            Event::Reload => self.reload_and_settle().await,
            Event::Tick if mtime(&self.config_path) != self.config_mtime => self.reload_and_settle().await,
            Event::Tick => self.settle(Duration::ZERO, false).await,
        };
        let announced = self.announce().await;
        if changed || announced {
            self.publish();
        }
        Flow::Continue
    }

    /// Whether it reloaded.
    async fn reload_and_settle(&mut self) -> bool {
        self.systemd.reloading();
        let reloaded = self.reload();
        self.settle(if reloaded { CHANGE_RESOLVE } else { Duration::ZERO }, reloaded).await;
        self.systemd.reloaded();
        if reloaded && !matches!(self.sync, Sync::Retrying { .. }) {
            info!(vips = self.live.vips.len(), sync = %self.sync.describe(), "config applied");
        }
        // A refused edit changes what status says (restart needed).
        true
    }

    /// Takes in a watcher's report; whether it changed the instances in force.
    fn discovery_update(&mut self, epoch: u64, update: Update) -> bool {
        if epoch != self.watchers.epoch(update.source().kind()) {
            return false;
        }
        let changed = self.discovery.update(update, std::time::Instant::now());
        // A health change applies at once, before anything waits on the
        // neighbour table: a failed backend must not wait for a new one.
        if changed {
            let _ = self.apply();
        }
        changed
    }

    /// Tells systemd (if it started us) that we are on the way out.
    pub fn stopping(&mut self) {
        self.systemd.stopping();
    }

    /// Stops the watchers and writes the last status out.
    pub fn finish(mut self) -> (Maps<S>, StartConfig, RunFiles) {
        self.watchers.stop_all();
        self.health_events.abort();
        self.publisher.finish();
        (self.maps, self.start, self.files)
    }
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
