//! The daemon's status, from its memory: published on a watch channel for
//! the admin API at every change, and written to the state file for
//! `xlb status` while the daemon is down — by a thread of its own, so a
//! slow disk never holds up a table change.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;
use tracing::warn;

use super::{Daemon, Host};
use crate::{
    config::Backends,
    control::reconcile::VipState,
    dataplane::Store,
    discovery::ServiceView,
    files::{Durability, write_json_atomic},
    health::{Progress, Target},
    model::{Forward, VipAddr, format_mac},
    observe::{
        admin::Published,
        status::{
            BackendStatus, CheckStatus, DaemonStatus, HopStatus, SourceRef, SourceStatus, Status, Sync,
            VipStatus, unix_secs,
        },
    },
};

/// How long shutdown waits for the last state file write.
const FINAL_WRITE: Duration = Duration::from_secs(2);

pub(super) struct Publisher {
    version: u64,
    channel: watch::Sender<Published>,
    writer: StateWriter,
}

impl Publisher {
    pub fn new(state_file: PathBuf) -> (Self, watch::Receiver<Published>) {
        let (channel, receiver) = watch::channel((0, Arc::new(Status::default())));
        (Publisher { version: 0, channel, writer: StateWriter::spawn(state_file) }, receiver)
    }

    fn publish(&mut self, status: Status) {
        self.version += 1;
        let status = Arc::new(status);
        self.channel.send_replace((self.version, status.clone()));
        self.writer.offer(status);
    }

    /// Writes the last status out, waiting at most `FINAL_WRITE`.
    pub fn finish(&mut self) {
        self.writer.finish();
    }
}

impl<S: Store, R: Host> Daemon<S, R> {
    pub(super) fn publish(&mut self) {
        let status = self.status();
        let backends: usize =
            status.vips.iter().map(|v| v.backends.iter().filter(|b| b.slots > 0).count()).sum();
        self.systemd.status(format!(
            "{} VIPs, {backends} backends in the tables, {}",
            status.vips.len(),
            self.sync.describe()
        ));
        self.systemd.ready_once(matches!(self.sync, Sync::InSync | Sync::Short(_)));
        self.publisher.publish(status);
    }

    /// What the daemon knows, counters left at zero.
    fn status(&self) -> Status {
        let caps = self.start.capacities;
        let now = (Instant::now(), SystemTime::now());
        Status {
            interface: self.start.interface.clone(),
            pin_dir: self.start.pin_dir.clone(),
            daemon_pid: Some(std::process::id()),
            daemon: Some(DaemonStatus {
                pid: std::process::id(),
                config: self.config_path.clone(),
                attachment: self.attachment,
                sync: self.sync.clone(),
                restart_needed: self.restart_needed.iter().map(|f| f.to_string()).collect(),
            }),
            table_size: caps.table_size,
            max_vips: caps.max_vips,
            max_backends: caps.max_backends,
            conntrack_size: caps.conntrack_slots(),
            vips: {
                // One copy of the checker's table for every VIP's checks.
                let progress = self.checker.progress();
                self.reconciler
                    .vips()
                    .iter()
                    .map(|(addr, vip)| self.vip_status(addr, vip, &progress))
                    .collect()
            },
            discovery: self
                .discovery
                .services()
                .iter()
                .map(|(s, view)| source_status(s.into(), view, now))
                .collect(),
            announce: self.announcing.as_ref().map(super::announce::Announcing::status),
            ..Status::default()
        }
    }

    fn vip_status(&self, addr: &VipAddr, vip: &VipState, progress: &HashMap<Target, Progress>) -> VipStatus {
        let table_size = self.start.capacities.table_size as f64;
        let source = self.live.vip(&vip.name).and_then(|v| match &v.backends {
            Backends::Discovered(source) => Some(SourceRef::from(source)),
            Backends::Static(_) => None,
        });
        VipStatus {
            name: Some(vip.name.clone()),
            address: addr.ip,
            port: addr.port,
            protocol: addr.protocol,
            forward: vip.forward,
            source,
            id: vip.id,
            generation: vip.generation,
            swapped_at: vip.swapped_at.map(unix_secs),
            previous_until: vip
                .previous_until()
                .map(|t| unix_secs(SystemTime::now() + t.saturating_duration_since(Instant::now()))),
            packets: 0,
            bytes: 0,
            backends: vip
                .backends
                .iter()
                .map(|(a, b)| BackendStatus {
                    address: Some(*a),
                    id: b.id,
                    state: b.shown(),
                    weight: Some(b.weight),
                    mac: b.mac.as_ref().filter(|_| vip.forward == Forward::Dr).map(format_mac),
                    next_hop: b
                        .hop
                        .filter(|_| vip.forward == Forward::Tun)
                        .map(|h| HopStatus { mac: format_mac(&h.mac), mtu: h.mtu }),
                    slots: b.slots,
                    share: b.slots as f64 / table_size,
                    packets: 0,
                    bytes: 0,
                })
                .collect(),
            notes: self.notes.iter().filter(|n| n.vip == vip.name).map(|n| n.text.clone()).collect(),
            announce: self.announcing.as_ref().and_then(|a| a.plan.vips.get(&vip.name).copied()),
            checks: self.check_status(&vip.name, progress),
            check_panic: self.panics.contains(&vip.name),
        }
    }

    fn check_status(&self, vip: &str, progress: &HashMap<Target, Progress>) -> Vec<CheckStatus> {
        let Some(targets) = self.targets.get(vip) else { return Vec::new() };
        targets
            .iter()
            .filter_map(|t| {
                let p = progress.get(t)?;
                Some(CheckStatus {
                    address: t.addr,
                    state: p.state,
                    since: unix_secs(p.since),
                    consecutive_failures: p.consecutive_failures,
                    last_error: p.last_error.clone(),
                    last_latency_ms: p.last_latency.map(|d| d.as_secs_f64() * 1000.0),
                    probes: p.probes,
                    failures: p.failures,
                })
            })
            .collect()
    }
}

fn source_status(source: SourceRef, view: &ServiceView, (now, wall): (Instant, SystemTime)) -> SourceStatus {
    let at = |t: Option<Instant>| {
        t.and_then(|t| wall.checked_sub(now.saturating_duration_since(t))).map(unix_secs)
    };
    SourceStatus {
        source,
        instances: view.instances.as_ref().map(Vec::len),
        stale: view.stale(),
        synced_at: at(view.synced_at),
        changed_at: at(view.changed_at),
        synced_secs_ago: None,
        changed_secs_ago: None,
        index: view.index,
        errors_total: view.errors_total,
        last_error: view.last_error.clone(),
        empty_kept: view.empty_kept,
        empty_alarms: view.empty_alarms,
        problems: view.problems.clone(),
    }
}

/// Writes the newest status it is offered to the state file, skipping any
/// it had no time for.
struct StateWriter {
    shared: Arc<(Mutex<Pending>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Pending {
    status: Option<Arc<Status>>,
    writing: bool,
    closing: bool,
}

impl StateWriter {
    fn spawn(path: PathBuf) -> Self {
        let shared = Arc::new((Mutex::new(Pending::default()), Condvar::new()));
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("xlb-state".into())
            .spawn(move || write_loop(&path, &worker))
            .expect("a thread for the state file");
        StateWriter { shared, thread: Some(thread) }
    }

    fn offer(&self, status: Arc<Status>) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).status = Some(status);
        wake.notify_all();
    }

    fn finish(&mut self) {
        let (lock, wake) = &*self.shared;
        let mut pending = lock.lock().unwrap_or_else(|e| e.into_inner());
        pending.closing = true;
        wake.notify_all();
        let deadline = Instant::now() + FINAL_WRITE;
        while pending.status.is_some() || pending.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!("the state file write did not finish; `xlb status` may show an older state");
                return;
            }
            pending = wake.wait_timeout(pending, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(pending);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StateWriter {
    /// A daemon dropped without `finish` (a test's, say) lets its writer
    /// end after the write in hand instead of waiting forever.
    fn drop(&mut self) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).closing = true;
        wake.notify_all();
    }
}

fn write_loop(path: &std::path::Path, shared: &(Mutex<Pending>, Condvar)) {
    let (lock, wake) = shared;
    let mut failing = false;
    loop {
        let status = {
            let mut pending = lock.lock().unwrap_or_else(|e| e.into_inner());
            while pending.status.is_none() && !pending.closing {
                pending = wake.wait(pending).unwrap_or_else(|e| e.into_inner());
            }
            let Some(status) = pending.status.take() else { return };
            pending.writing = true;
            status
        };
        match write_json_atomic(path, &*status, Durability::Cached) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                warn!(error = %e, path = %path.display(), "cannot write the state file for `xlb status`");
                failing = true;
            }
            Err(_) => {}
        }
        lock.lock().unwrap_or_else(|e| e.into_inner()).writing = false;
        wake.notify_all();
    }
}
