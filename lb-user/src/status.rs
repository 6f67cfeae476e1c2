//! The state of a data plane: what its pinned maps hold, labelled with what
//! the daemon last published. `xlb status`, the admin API and the metrics
//! all show this.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use lb_common::{BACKEND_ACTIVE, BACKEND_DRAINING, BackendId, Counter, Event, NO_BACKEND, Reason};
use serde::{Deserialize, Serialize};

use crate::{
    addr,
    dataplane::{Geometry, KernelMaps, MapReader as _},
    state::DaemonState,
    state::DiscoveryLabel,
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub interface: Option<String>,
    pub pin_dir: PathBuf,
    /// PID of the running daemon; `None` when it is not running (the data
    /// plane keeps forwarding with the last tables).
    pub daemon_pid: Option<u32>,
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub reasons: BTreeMap<String, Traffic>,
    pub events: BTreeMap<String, u64>,
    pub conntrack_entries: usize,
    pub conntrack_size: u32,
    pub vips: Vec<VipStatus>,
    /// Watched Consul services, as the daemon last published them.
    pub discovery: Vec<DiscoveryLabel>,
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
    pub protocol: String,
    /// "dr" or "tun".
    pub forward: String,
    /// The Consul service its backends come from.
    pub consul: Option<String>,
    pub id: u32,
    /// Table switches since the daemon started, and when the last was
    /// (seconds since the Unix epoch).
    pub generation: u64,
    pub swapped_at: Option<f64>,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: Option<IpAddr>,
    pub id: BackendId,
    /// "active" (takes new flows), "draining" (keeps established flows),
    /// "leaving" (removed, draining until its timeout), "unresolved" (no MAC).
    pub state: String,
    pub weight: Option<u32>,
    pub mac: Option<String>,
    /// Entries in the live Maglev table, and their share of it.
    pub slots: u32,
    pub share: f64,
    pub packets: u64,
    pub bytes: u64,
}

/// Reads the data plane pinned at `pin_dir`; `interface` finds the labels
/// the daemon publishes.
pub fn read(pin_dir: &Path, interface: Option<&str>) -> anyhow::Result<Status> {
    let maps = KernelMaps::open(pin_dir).with_context(|| {
        format!("no xlb data plane pinned at {} (is `xlb run` started?)", pin_dir.display())
    })?;
    let geometry = Geometry::from_meta(&maps.meta()?);
    let labels = interface.and_then(DaemonState::read);
    let alive = labels.as_ref().is_some_and(DaemonState::daemon_alive);
    let globals = maps.global_stats()?;
    let in_use = maps.backends()?;
    let mut vips = Vec::new();
    for (key, info) in maps.vips()? {
        let Some(address) = addr::from_bytes(key.addr, key.family) else {
            continue;
        };
        let port = u16::from_be(key.port_be);
        let label = labels.as_ref().and_then(|l| {
            l.vips.iter().find(|v| v.address == address && v.port == port && v.protocol == key.proto)
        });
        let tun = info.mode == lb_common::MODE_TUN;
        // Table fill: what a running daemon published, else counted off
        // the live table (a walk of table_size entries).
        let fill: BTreeMap<BackendId, u32> = match label.filter(|_| alive) {
            Some(l) => l.backends.iter().map(|b| (b.id, b.slots)).collect(),
            None => table_fill(&maps, &geometry, info.table)?,
        };
        let mut ids: BTreeSet<BackendId> = fill.keys().copied().filter(|&id| id != NO_BACKEND).collect();
        ids.extend(label.iter().flat_map(|l| l.backends.iter().map(|b| b.id)));
        ids.extend(in_use.iter().filter(|(_, b)| b.vip_id == info.id && b.flags != 0).map(|(id, _)| *id));
        let mut backends = Vec::new();
        for id in ids {
            let be = maps.backend(id)?;
            let known = label.and_then(|l| l.backends.iter().find(|b| b.id == id));
            let counter = maps.backend_stats(id)?;
            let slots = fill.get(&id).copied().unwrap_or(0);
            let state = if be.flags & BACKEND_ACTIVE != 0 {
                "active"
            } else if be.flags & BACKEND_DRAINING != 0 {
                "draining"
            } else {
                "inactive"
            };
            backends.push(BackendStatus {
                address: known.map(|k| k.address).or_else(|| addr::from_bytes(be.addr, be.family)),
                id,
                state: known.map_or_else(|| state.to_owned(), |k| k.role.clone()),
                weight: known.map(|k| k.weight),
                mac: if tun {
                    None
                } else if slots > 0 {
                    Some(addr::format_mac(&be.mac))
                } else {
                    known.and_then(|k| k.mac.clone())
                },
                slots,
                share: slots as f64 / geometry.table_size as f64,
                packets: counter.packets,
                bytes: counter.bytes,
            });
        }
        let counter = maps.vip_stats(info.id)?;
        vips.push(VipStatus {
            name: label.map(|l| l.name.clone()),
            address,
            port,
            protocol: match key.proto {
                lb_common::PROTO_TCP => "tcp",
                lb_common::PROTO_UDP => "udp",
                _ => "?",
            }
            .into(),
            forward: if tun { "tun" } else { "dr" }.into(),
            consul: label.and_then(|l| l.consul.clone()),
            generation: label.map_or(0, |l| l.generation),
            swapped_at: label.and_then(|l| l.swapped_at),
            id: info.id,
            packets: counter.packets,
            bytes: counter.bytes,
            backends,
        });
    }
    vips.sort_by(|a, b| (&a.name, a.address, a.port).cmp(&(&b.name, b.address, b.port)));
    let daemon_pid = labels.as_ref().filter(|_| alive).map(|l| l.pid);
    Ok(Status {
        interface: interface.map(str::to_owned),
        pin_dir: pin_dir.to_owned(),
        daemon_pid,
        discovery: labels.map(|l| l.discovery).unwrap_or_default().into_iter().map(with_age).collect(),
        table_size: geometry.table_size,
        max_vips: geometry.max_vips,
        max_backends: geometry.max_backends,
        reasons: Reason::ALL.iter().map(|r| (r.name().into(), globals.reasons[*r as usize].into())).collect(),
        events: Event::ALL.iter().map(|e| (e.name().into(), globals.events[*e as usize])).collect(),
        conntrack_entries: maps.conntrack_entries(),
        conntrack_size: geometry.conntrack_size,
        vips,
    })
}

/// Entries per backend id in table number `table`.
fn table_fill(
    maps: &KernelMaps,
    geometry: &Geometry,
    table: u32,
) -> anyhow::Result<BTreeMap<BackendId, u32>> {
    let chunks = geometry.table_chunks();
    let mut fill = BTreeMap::new();
    for c in 0..chunks {
        let chunk = maps.chunk(table * chunks + c)?;
        for (lane, id) in chunk.iter().enumerate() {
            if c as usize * chunk.len() + lane < geometry.table_size as usize {
                *fill.entry(*id).or_default() += 1;
            }
        }
    }
    Ok(fill)
}

/// Fills in a discovery label's age as of now.
fn with_age(mut d: DiscoveryLabel) -> DiscoveryLabel {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    d.synced_secs_ago = d.synced_at.map(|t| (now - t).max(0.0));
    d
}

pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let iface = s.interface.as_deref().unwrap_or("?");
    let daemon = match s.daemon_pid {
        Some(pid) => format!("daemon running (pid {pid})"),
        None => "daemon NOT running: forwarding continues with the last tables".to_owned(),
    };
    let _ = writeln!(out, "xlb on {iface} ({}) — {daemon}", s.pin_dir.display());
    let _ = writeln!(
        out,
        "table size {}, capacity {} VIPs / {} backends, connection table {} of {} entries\n",
        s.table_size,
        s.max_vips,
        s.max_backends - 1,
        s.conntrack_entries,
        s.conntrack_size
    );
    for v in &s.vips {
        let addr = match v.address {
            IpAddr::V6(a) => format!("[{a}]:{}", v.port),
            a => format!("{a}:{}", v.port),
        };
        let _ = writeln!(
            out,
            "VIP {} {} {} ({})  packets {}  bytes {}",
            v.name.as_deref().unwrap_or("(unnamed)"),
            v.protocol,
            addr,
            v.forward,
            v.packets,
            v.bytes
        );
        if let Some(service) = &v.consul {
            let view = s.discovery.iter().find(|d| &d.service == service);
            let _ = writeln!(out, "  backends from Consul service {service}: {}", describe_discovery(view));
        }
        let _ = writeln!(
            out,
            "  {:<40} {:<10} {:>6} {:>17} {:>7} {:>12} {:>14}",
            "backend", "state", "weight", "mac", "share", "packets", "bytes"
        );
        for b in &v.backends {
            let _ = writeln!(
                out,
                "  {:<40} {:<10} {:>6} {:>17} {:>6.2}% {:>12} {:>14}",
                b.address.map(|a| a.to_string()).unwrap_or_else(|| format!("id {}", b.id)),
                b.state,
                b.weight.map(|w| w.to_string()).unwrap_or_else(|| "?".into()),
                b.mac.as_deref().unwrap_or(if v.forward == "tun" { "-" } else { "unresolved" }),
                b.share * 100.0,
                b.packets,
                b.bytes
            );
        }
        if v.backends.is_empty() {
            let _ = writeln!(out, "  (no backends: packets are dropped and counted as no_backend)");
        }
        out.push('\n');
    }
    if s.vips.is_empty() {
        out.push_str("no VIPs configured\n\n");
    }
    let _ = writeln!(out, "{:<26} {:>12} {:>14}", "reason", "packets", "bytes");
    for (name, c) in &s.reasons {
        let _ = writeln!(out, "{name:<26} {:>12} {:>14}", c.packets, c.bytes);
    }
    out.push('\n');
    let _ = writeln!(out, "{:<26} {:>12}", "event", "count");
    for (name, n) in &s.events {
        let _ = writeln!(out, "{name:<26} {n:>12}");
    }
    out
}

fn describe_discovery(view: Option<&DiscoveryLabel>) -> String {
    let Some(d) = view else { return "not watched".into() };
    let age = d.synced_secs_ago.map_or_else(|| "never".into(), |s| format!("{s:.1} s ago"));
    let mut text = match (d.instances, d.stale) {
        (None, _) if d.empty_kept => {
            "Consul reports no healthy instance; keeping the backends the tables hold".into()
        }
        (None, _) => format!("waiting for Consul's first answer ({} errors)", d.errors_total),
        (Some(n), false) => format!("in sync, {n} instances, last answer {age}"),
        (Some(n), true) => format!(
            "STALE: Consul unreachable or failing (last answer {age}, {} errors{}); serving the last {n} known instances",
            d.errors_total,
            d.last_error.as_deref().map(|e| format!(", last: {e}")).unwrap_or_default()
        ),
    };
    if d.empty_kept {
        text.push_str("; ALARM: Consul reports no healthy instance, the last set is kept");
    }
    text
}
