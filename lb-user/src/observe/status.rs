//! What `xlb status`, the admin API and `/metrics` show: one family of
//! types. The running daemon publishes a [`Status`] from its memory after
//! every change (counters left at zero); readers fill in the counters from
//! the maps with [`Status::count`]. The same value, written to the state
//! file, labels the pinned maps while the daemon is down (`pinned`).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use lb_common::{Counter, Event, Reason};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Source, SourceKind},
    control::{
        announce::{Announcement, Switch},
        reconcile::Shortfall,
    },
    dataplane::{BackendId, Counters, DataplaneError, VipId},
    model::{Attachment, BackendRole, Forward, Protocol},
    net::bird,
};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub pin_dir: PathBuf,
    /// PID of the running daemon; `None` when it is not running (the data
    /// plane keeps forwarding with the last tables).
    pub daemon_pid: Option<u32>,
    /// What the daemon says of itself, as it last published it.
    pub daemon: Option<DaemonStatus>,
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    /// Connection-table slots: `conntrack_size` rounded up to whole sets.
    pub conntrack_size: u32,
    pub conntrack_entries: usize,
    pub reasons: BTreeMap<String, Traffic>,
    pub events: BTreeMap<String, u64>,
    pub vips: Vec<VipStatus>,
    /// Watched discovery sources (Consul services).
    pub discovery: Vec<SourceStatus>,
    /// VIP routes for BGP, when `[announce]` is configured.
    #[serde(default)]
    pub announce: Option<AnnounceStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// The routing table the VIP routes are kept in.
    pub table: u32,
    /// Seconds a graceful stop or `xlb announce off` waits after withdrawing.
    pub withdraw_wait: f64,
    pub switch: Switch,
    /// The last failure to read or change the table, if it persists.
    pub error: Option<String>,
    pub bird: BirdStatus,
}

/// What BIRD's control socket said last.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BirdStatus {
    pub socket: PathBuf,
    /// Why it could not be read; `None` when it answered.
    pub error: Option<String>,
    pub protocols: Vec<bird::Protocol>,
    /// When it was last asked (seconds since the Unix epoch).
    pub checked_at: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub config: PathBuf,
    pub attachment: Attachment,
    pub sync: Sync,
    /// Start-only fields the config file changed since the daemon started:
    /// they apply at the next restart.
    #[serde(default)]
    pub restart_needed: Vec<String>,
}

/// Whether the maps hold what the daemon wants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Sync {
    /// Not applied yet (start-up).
    Starting,
    InSync,
    /// A map write failed; the daemon retries with a full rewrite.
    Retrying {
        error: String,
    },
    /// Everything that has an id is applied; the rest is placed as soon
    /// as ids free up.
    Short(Shortfalls),
}

impl Sync {
    pub fn is_in_sync(&self) -> bool {
        *self == Sync::InSync
    }

    /// One line for logs, `readyz` and `xlb status`.
    pub fn describe(&self) -> String {
        match self {
            Sync::Starting => "starting: the maps are not written yet".to_owned(),
            Sync::InSync => "in sync".to_owned(),
            Sync::Retrying { error } => format!("map writes failed, retrying with a full rewrite: {error}"),
            Sync::Short(s) => format!("short of capacity: {}", s.describe(SAID)),
        }
    }
}

/// What is left out for want of ids: counted in full, named up to
/// [`Shortfalls::NAMED`] (a discovery source can list thousands).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Shortfalls {
    pub vips_left_out: usize,
    pub backends_left_out: usize,
    /// The first [`Shortfalls::NAMED`], in the order the reconciler met them.
    pub named: Vec<Shortfall>,
}

/// How many shortfalls one line (log, readiness, `xlb status`) names.
pub const SAID: usize = 10;

impl Shortfalls {
    pub const NAMED: usize = 100;

    pub fn new(all: &[Shortfall]) -> Self {
        let vips_left_out = all.iter().filter(|s| matches!(s, Shortfall::Vip { .. })).count();
        Shortfalls {
            vips_left_out,
            backends_left_out: all.len() - vips_left_out,
            named: all.iter().take(Self::NAMED).cloned().collect(),
        }
    }

    /// The first `n` joined, and how many more there are.
    pub fn describe(&self, n: usize) -> String {
        let total = self.vips_left_out + self.backends_left_out;
        let mut text: Vec<String> = self.named.iter().take(n).map(ToString::to_string).collect();
        if total > text.len() {
            text.push(format!("and {} more", total - text.len()));
        }
        text.join("; ")
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

impl From<Counter> for Traffic {
    fn from(c: Counter) -> Self {
        Self { packets: c.packets, bytes: c.bytes }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: Option<String>,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forward: Forward,
    /// The discovery source its backends come from.
    #[serde(default)]
    pub source: Option<SourceRef>,
    pub id: VipId,
    /// Table switches since the daemon started, and when the last was
    /// (seconds since the Unix epoch).
    pub generation: u64,
    pub swapped_at: Option<f64>,
    /// Second chance (TUN): until when the table before the last switch
    /// stays readable (seconds since the Unix epoch); `None` when it is not.
    #[serde(default)]
    pub previous_until: Option<f64>,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendStatus>,
    /// Discovered instances left out of this VIP, and why.
    #[serde(default)]
    pub notes: Vec<String>,
    /// Whether its address is announced for BGP, and why not.
    #[serde(default)]
    pub announce: Option<Announcement>,
    /// Its backends' health checks (every candidate, in the table or not).
    #[serde(default)]
    pub checks: Vec<CheckStatus>,
    /// Every backend fails its check and all are kept (panic mode).
    #[serde(default)]
    pub check_panic: bool,
}

/// One backend's health check, as the checker last saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckStatus {
    /// Where it is probed (the backend's real address, the check's port).
    pub address: std::net::SocketAddr,
    pub state: crate::health::State,
    /// Since when (seconds since the Unix epoch).
    pub since: f64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub last_latency_ms: Option<f64>,
    pub probes: u64,
    pub failures: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: Option<IpAddr>,
    pub id: BackendId,
    pub state: BackendRole,
    pub weight: Option<u32>,
    /// DR: the backend's MAC.
    pub mac: Option<String>,
    /// TUN: where its packets leave for, as the daemon resolved it; `None`
    /// while unresolved, when the packet path asks the kernel's FIB.
    #[serde(default)]
    pub next_hop: Option<HopStatus>,
    /// Entries in the live Maglev table, and their share of it.
    pub slots: u32,
    pub share: f64,
    pub packets: u64,
    pub bytes: u64,
}

/// A TUN backend's next hop: the gateway's (or the backend's own) MAC and
/// the largest outer packet the path takes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopStatus {
    pub mac: String,
    pub mtu: u16,
}

/// A discovery source, as status names it: `{"kind": "consul", "name":
/// "web[tag=blue]"}`, `{"kind": "etcd", "name": "/services/web/"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    pub kind: SourceKind,
    pub name: String,
}

impl From<&Source> for SourceRef {
    fn from(source: &Source) -> Self {
        SourceRef { kind: source.kind(), name: source.name() }
    }
}

impl std::fmt::Display for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.noun(), self.name)
    }
}

/// A watched discovery source.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceStatus {
    #[serde(flatten)]
    pub source: SourceRef,
    /// Instances in force; `None` before the first answer.
    pub instances: Option<usize>,
    /// Queries are failing: the last known instances stay in force.
    pub stale: bool,
    /// When the source last answered, and when the instances in force last
    /// changed (seconds since the Unix epoch).
    pub synced_at: Option<f64>,
    #[serde(default)]
    pub changed_at: Option<f64>,
    /// Seconds since those, as of reading.
    #[serde(default)]
    pub synced_secs_ago: Option<f64>,
    #[serde(default)]
    pub changed_secs_ago: Option<f64>,
    pub index: u64,
    pub errors_total: u64,
    pub last_error: Option<String>,
    /// The source reports no healthy instance and the last set is kept.
    pub empty_kept: bool,
    pub empty_alarms: u64,
    /// What in the source's answers was skipped or changed, and why.
    #[serde(default)]
    pub problems: Vec<String>,
}

/// Seconds since the Unix epoch.
pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Status {
    /// Fills in every counter from `counters`, and the ages as of now.
    pub fn count(&mut self, counters: &dyn Counters) -> Result<(), DataplaneError> {
        let globals = counters.global()?;
        self.reasons =
            Reason::ALL.iter().map(|r| (r.name().to_owned(), globals.reasons[*r as usize].into())).collect();
        self.events = Event::ALL.iter().map(|e| (e.name().to_owned(), globals.events[*e as usize])).collect();
        self.conntrack_entries = counters.conntrack_entries();
        for vip in &mut self.vips {
            let c = counters.vip(vip.id)?;
            (vip.packets, vip.bytes) = (c.packets, c.bytes);
            for b in &mut vip.backends {
                let c = counters.backend(b.id)?;
                (b.packets, b.bytes) = (c.packets, c.bytes);
            }
        }
        self.age(SystemTime::now());
        Ok(())
    }

    /// Sets the sources' ages as of `now`.
    pub fn age(&mut self, now: SystemTime) {
        let now = unix_secs(now);
        let ago = |t: Option<f64>| t.map(|t| (now - t).max(0.0));
        for d in &mut self.discovery {
            d.synced_secs_ago = ago(d.synced_at);
            d.changed_secs_ago = ago(d.changed_at);
        }
    }

    pub fn vip(&self, name: &str) -> Option<&VipStatus> {
        self.vips.iter().find(|v| v.name.as_deref() == Some(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_state_written_before_the_counts_existed_still_reads() {
        let sync: Sync = serde_json::from_str(r#"{"state": "short"}"#).unwrap();
        assert_eq!(sync, Sync::Short(Shortfalls::default()));
    }
}
