//! One watcher task per discovery source the live config follows.

use std::{collections::BTreeMap, future::Future, pin::Pin};

use anyhow::Context as _;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::info;

use super::Event;
use crate::{
    config::{ConsulSettings, LiveConfig, ServiceQuery},
    discovery::{
        Discovery,
        consul::{self, Update},
    },
};

/// Watches one Consul service with a client, reporting on a channel until
/// it closes.
pub type WatchFn =
    fn(consul::Client, ServiceQuery, mpsc::Sender<Update>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// The real watcher: Consul's blocking queries.
pub fn consul_watch(
    client: consul::Client,
    query: ServiceQuery,
    updates: mpsc::Sender<Update>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(consul::watch(client, query, updates))
}

pub(super) struct Watchers {
    watch: WatchFn,
    events: mpsc::Sender<Event>,
    settings: Option<ConsulSettings>,
    tasks: BTreeMap<ServiceQuery, JoinHandle<()>>,
    /// Bumped at every start-over: reports still queued from the watchers
    /// before it carry an older epoch and are dropped.
    epoch: u64,
    updates: mpsc::Sender<Update>,
}

/// Reports in flight per epoch before watchers wait.
const QUEUE: usize = 64;

impl Watchers {
    pub fn new(events: mpsc::Sender<Event>, watch: WatchFn) -> Self {
        let (updates, _) = mpsc::channel(1);
        let mut w = Watchers { watch, events, settings: None, tasks: BTreeMap::new(), epoch: 0, updates };
        w.start_over();
        w
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Watches exactly the services `live` names, with its settings.
    pub fn follow(&mut self, live: &LiveConfig, discovery: &mut Discovery) -> anyhow::Result<()> {
        let queries = live.consul_services();
        let settings = live.consul_settings();
        if queries.is_empty() {
            self.stop_all();
            discovery.watch_only(&[]);
            return Ok(());
        }
        // The client first: settings it cannot use change nothing.
        let client = consul::Client::new(&settings).context("field `consul`")?;
        if self.settings.as_ref() != Some(&settings) {
            // Another agent, datacenter or token: every service starts over.
            self.stop_all();
            discovery.watch_only(&[]);
        }
        self.settings = Some(settings);
        self.tasks.retain(|q, task| {
            let keep = queries.contains(q);
            if !keep {
                task.abort();
            }
            keep
        });
        for q in &queries {
            if !self.tasks.contains_key(q) {
                info!(service = %q, "watching Consul service");
                let task = tokio::spawn((self.watch)(client.clone(), q.clone(), self.updates.clone()));
                self.tasks.insert(q.clone(), task);
            }
        }
        discovery.watch_only(&queries);
        Ok(())
    }

    pub fn stop_all(&mut self) {
        self.tasks.values().for_each(JoinHandle::abort);
        self.tasks.clear();
        self.settings = None;
        self.start_over();
    }

    /// A new epoch and a channel for its reports, forwarded as events.
    fn start_over(&mut self) {
        self.epoch += 1;
        let (updates, mut reports) = mpsc::channel(QUEUE);
        self.updates = updates;
        let (epoch, events) = (self.epoch, self.events.clone());
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
