//! One watcher task per discovery source the live config follows.

use std::{collections::BTreeMap, future::Future, pin::Pin};

use anyhow::Context as _;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::info;

use super::Event;
use crate::{
    config::{ConsulSettings, EtcdPrefix, EtcdSettings, LiveConfig, ServiceQuery, Source, SourceKind},
    discovery::{Discovery, Update, consul, etcd},
};

/// What one watcher follows, with what it needs to reach it.
pub enum Watch {
    Consul { client: consul::Client, query: ServiceQuery },
    Etcd { connector: etcd::Connector, prefix: EtcdPrefix },
}

/// Follows one source, reporting on a channel until it closes.
pub type WatchFn = fn(Watch, mpsc::Sender<Update>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// The real watchers: Consul's blocking queries, etcd's watch.
pub fn discovery_watch(
    watch: Watch,
    updates: mpsc::Sender<Update>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    match watch {
        Watch::Consul { client, query } => Box::pin(consul::watch(client, query, updates)),
        Watch::Etcd { connector, prefix } => Box::pin(etcd::watch(connector, prefix, updates)),
    }
}

/// A client for each discovery system the config uses.
pub(super) struct Clients {
    consul: Option<consul::Client>,
    etcd: Option<etcd::Connector>,
}

/// The clients `live`'s sources need, from its settings; an error names
/// the section whose settings cannot be used.
pub(super) fn clients(live: &LiveConfig) -> anyhow::Result<Clients> {
    let sources = live.sources();
    let uses = |kind| sources.iter().any(|s| s.kind() == kind);
    let consul = uses(SourceKind::Consul)
        .then(|| consul::Client::new(&live.consul_settings()))
        .transpose()
        .context("field `consul`")?;
    let etcd = uses(SourceKind::Etcd)
        .then(|| etcd::Connector::new(&live.etcd_settings()))
        .transpose()
        .context("field `etcd`")?;
    Ok(Clients { consul, etcd })
}

pub(super) struct Watchers {
    watch: WatchFn,
    events: mpsc::Sender<Event>,
    /// The settings the running watchers of each system use (`None`:
    /// that system unused).
    consul: Option<ConsulSettings>,
    etcd: Option<EtcdSettings>,
    tasks: BTreeMap<Source, JoinHandle<()>>,
    /// Per system, the epoch of its running watchers: bumped when they
    /// start over, so reports still queued from the ones before carry an
    /// older epoch and are dropped.
    epochs: BTreeMap<SourceKind, u64>,
    /// Where each system's watchers report (tagged with its epoch).
    channels: BTreeMap<SourceKind, mpsc::Sender<Update>>,
    last_epoch: u64,
}

/// Reports in flight per epoch before watchers wait.
const QUEUE: usize = 64;

const KINDS: [SourceKind; 2] = [SourceKind::Consul, SourceKind::Etcd];

impl Watchers {
    pub fn new(events: mpsc::Sender<Event>, watch: WatchFn) -> Self {
        let mut w = Watchers {
            watch,
            events,
            consul: None,
            etcd: None,
            tasks: BTreeMap::new(),
            epochs: BTreeMap::new(),
            channels: BTreeMap::new(),
            last_epoch: 0,
        };
        KINDS.into_iter().for_each(|kind| w.start_over(kind));
        w
    }

    /// The epoch of `kind`'s running watchers.
    pub fn epoch(&self, kind: SourceKind) -> u64 {
        self.epochs.get(&kind).copied().unwrap_or(0)
    }

    /// Watches exactly the sources `live` names, with its settings.
    pub fn follow(&mut self, live: &LiveConfig, discovery: &mut Discovery) -> anyhow::Result<()> {
        let sources = live.sources();
        // The clients first: settings they cannot use change nothing.
        let Clients { consul, etcd } = clients(live)?;
        let consul_settings = consul.as_ref().map(|_| live.consul_settings());
        // The empty-set policy is the consumer's: no reconnection for it.
        let etcd_settings =
            etcd.as_ref().map(|c| EtcdSettings { on_empty: Default::default(), ..c.settings().clone() });
        // Another agent, cluster, token or user: that system's sources start over.
        if self.consul != consul_settings {
            self.stop(SourceKind::Consul, discovery);
        }
        if self.etcd != etcd_settings {
            self.stop(SourceKind::Etcd, discovery);
        }
        (self.consul, self.etcd) = (consul_settings, etcd_settings);
        self.tasks.retain(|s, task| {
            let keep = sources.contains(s);
            if !keep {
                task.abort();
            }
            keep
        });
        for source in &sources {
            if self.tasks.contains_key(source) {
                continue;
            }
            let watch = match source {
                Source::Consul(query) => {
                    let client = consul.clone().expect("a client for a Consul source");
                    Watch::Consul { client, query: query.clone() }
                }
                Source::Etcd(prefix) => {
                    let connector = etcd.clone().expect("a connector for an etcd source");
                    Watch::Etcd { connector, prefix: prefix.clone() }
                }
            };
            info!(%source, "watching");
            let updates = self.channels[&source.kind()].clone();
            self.tasks.insert(source.clone(), tokio::spawn((self.watch)(watch, updates)));
        }
        let policies: Vec<_> = sources.iter().map(|s| (s.clone(), live.on_empty(s))).collect();
        discovery.watch_only(&policies);
        Ok(())
    }

    /// Stops `kind`'s watchers and forgets what they said.
    fn stop(&mut self, kind: SourceKind, discovery: &mut Discovery) {
        self.tasks.retain(|s, task| {
            let keep = s.kind() != kind;
            if !keep {
                task.abort();
            }
            keep
        });
        discovery.forget(kind);
        self.start_over(kind);
    }

    pub fn stop_all(&mut self) {
        self.tasks.values().for_each(JoinHandle::abort);
        self.tasks.clear();
        (self.consul, self.etcd) = (None, None);
        KINDS.into_iter().for_each(|kind| self.start_over(kind));
    }

    /// A new epoch for `kind` and a channel for its reports, forwarded as
    /// events.
    fn start_over(&mut self, kind: SourceKind) {
        self.last_epoch += 1;
        let epoch = self.last_epoch;
        self.epochs.insert(kind, epoch);
        let (updates, mut reports) = mpsc::channel(QUEUE);
        self.channels.insert(kind, updates);
        let events = self.events.clone();
        // Ends when this epoch's watchers are gone (their senders dropped).
        tokio::spawn(async move {
            while let Some(update) = reports.recv().await {
                if events.send(Event::Discovery { epoch, update }).await.is_err() {
                    return;
                }
            }
        });
    }
}
