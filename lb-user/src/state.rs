//! What the daemon knows beyond the maps (VIP names, weights, MAC
//! resolution), published to /run/xlb/<interface>.json after every change
//! so `xlb status` can label what it reads from the pinned maps.

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    addr,
    config::Config,
    discovery::Discovery,
    reconcile::{Reconciler, Role},
};

#[derive(Debug, Serialize, Deserialize)]
pub struct DaemonState {
    pub pid: u32,
    pub config: PathBuf,
    pub interface: String,
    pub pin_dir: PathBuf,
    /// How the program is attached: "native", "generic" or "existing link".
    pub attach: String,
    pub vips: Vec<VipLabel>,
    /// One per watched Consul service.
    #[serde(default)]
    pub discovery: Vec<DiscoveryLabel>,
}

/// A watched Consul service, as `xlb status` reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiscoveryLabel {
    /// "name" or "name[tag=…]".
    pub service: String,
    /// Instances in force; `None` before Consul first answered.
    pub instances: Option<usize>,
    /// Queries are failing: the last known instances stay in force.
    pub stale: bool,
    /// When Consul last answered (seconds since the Unix epoch).
    pub synced_at: Option<f64>,
    /// Seconds since then, as of reading (filled in by `status::read`).
    #[serde(default)]
    pub synced_secs_ago: Option<f64>,
    pub index: u64,
    pub errors_total: u64,
    pub last_error: Option<String>,
    /// Consul reports no healthy instance and the last set is kept.
    pub empty_kept: bool,
    pub empty_alarms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VipLabel {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: u8,
    pub backends: Vec<BackendLabel>,
    /// The Consul service the backends come from, if any.
    #[serde(default)]
    pub consul: Option<String>,
    /// Table switches since the daemon started, and the last one's time
    /// (seconds since the Unix epoch).
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub swapped_at: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendLabel {
    pub address: IpAddr,
    pub id: u16,
    pub weight: u32,
    pub mac: Option<String>,
    /// Entries in the VIP's live table.
    #[serde(default)]
    pub slots: u32,
    /// See `status::BackendStatus::state`.
    pub role: String,
}

pub fn path(interface: &str) -> PathBuf {
    Path::new("/run/xlb").join(format!("{interface}.json"))
}

impl DaemonState {
    pub fn discovery(discovery: &Discovery, now: Instant) -> Vec<DiscoveryLabel> {
        discovery
            .services()
            .iter()
            .map(|(query, view)| DiscoveryLabel {
                service: query.to_string(),
                instances: view.instances.as_ref().map(Vec::len),
                stale: view.stale(),
                synced_at: view.age(now).and_then(|age| {
                    let at = SystemTime::now().checked_sub(age)?;
                    Some(at.duration_since(UNIX_EPOCH).ok()?.as_secs_f64())
                }),
                synced_secs_ago: None,
                index: view.index,
                errors_total: view.errors_total,
                last_error: view.last_error.clone(),
                empty_kept: view.empty_kept,
                empty_alarms: view.empty_alarms,
            })
            .collect()
    }

    pub fn labels(reconciler: &Reconciler, config: &Config) -> Vec<VipLabel> {
        reconciler
            .vips()
            .iter()
            .filter_map(|(key, vip)| {
                Some(VipLabel {
                    name: vip.name.clone(),
                    address: addr::from_bytes(key.addr, key.family)?,
                    port: u16::from_be(key.port_be),
                    protocol: key.proto,
                    generation: vip.generation,
                    swapped_at: vip
                        .swapped_at
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs_f64()),
                    consul: config
                        .vips
                        .iter()
                        .find(|v| v.name == vip.name)
                        .and_then(|v| v.consul.as_ref())
                        .map(ToString::to_string),
                    backends: vip
                        .backends
                        .iter()
                        .map(|(a, b)| BackendLabel {
                            address: *a,
                            id: b.id,
                            weight: b.weight,
                            mac: b.mac.as_ref().map(addr::format_mac),
                            slots: b.slots,
                            role: match b.role {
                                Role::Active => "active".into(),
                                Role::Idle if b.mac.is_none() => "unresolved".into(),
                                Role::Idle => "draining".into(),
                                Role::Leaving { .. } => "leaving".into(),
                            },
                        })
                        .collect(),
                })
            })
            .collect()
    }

    /// Replaces the file atomically.
    pub fn write(&self) -> io::Result<()> {
        crate::files::write_json_atomic(&path(&self.interface), self)
    }

    pub fn read(interface: &str) -> Option<DaemonState> {
        let text = std::fs::read(path(interface)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Forgets everything published for `interface`: the state file and
    /// the operator's drain/weight overrides (`xlb detach`).
    pub fn forget(interface: &str) {
        let _ = std::fs::remove_file(path(interface));
        let _ = std::fs::remove_file(crate::overrides::Overrides::path(interface));
    }

    /// Whether the process that wrote this is still an xlb.
    pub fn daemon_alive(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|c| c.split(|&b| b == 0).next().is_some_and(|argv0| argv0.ends_with(b"xlb")))
            .unwrap_or(false)
    }
}
