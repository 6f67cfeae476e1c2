//! The status of a data plane from its pinned maps, for `xlb status` when
//! the daemon's API does not answer: what the maps hold, labelled with
//! what the daemon last published in its state file (names, weights,
//! discovery).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::Context as _;

use super::status::{BackendStatus, HopStatus, Status, VipStatus};
use crate::{
    dataplane::{BackendId, BackendUse, KernelCounters, KernelStore, Maps, NO_BACKEND, VipEntry},
    files::RunFiles,
    model::{BackendRole, Forward, VipAddr, format_mac},
};

/// Reads the data plane pinned at `pin_dir`, labelled from `files` (when
/// the interface is known).
pub fn read(pin_dir: &Path, interface: Option<&str>, files: Option<&RunFiles>) -> anyhow::Result<Status> {
    let maps = Maps::open_pinned(pin_dir).with_context(|| {
        format!("no xlb data plane pinned at {} (is `xlb run` started?)", pin_dir.display())
    })?;
    let caps = maps.capacities();
    let counters = KernelCounters::open(pin_dir)?;
    let labels = files.and_then(published);
    let alive = labels.as_ref().and_then(|l| l.daemon_pid).filter(|pid| is_xlb(*pid));
    let mut vips = Vec::new();
    for (addr, entry) in maps.vips()?.into_iter().flatten() {
        let label = labels.as_ref().and_then(|l| {
            l.vips.iter().find(|v| v.address == addr.ip && v.port == addr.port && v.protocol == addr.protocol)
        });
        vips.push(vip_status(&maps, addr, &entry, label, alive.is_some())?);
    }
    vips.sort_by(|a, b| (&a.name, a.address, a.port).cmp(&(&b.name, b.address, b.port)));
    let mut status = Status {
        interface: interface.map(str::to_owned).unwrap_or_default(),
        pin_dir: pin_dir.to_owned(),
        daemon_pid: alive,
        table_size: caps.table_size,
        max_vips: caps.max_vips,
        max_backends: caps.max_backends,
        conntrack_size: caps.conntrack_slots(),
        vips,
        ..Status::default()
    };
    if let Some(labels) = labels {
        status.discovery = labels.discovery;
        status.announce = labels.announce;
        status.daemon = labels.daemon.filter(|_| alive.is_some());
    }
    status.count(&counters)?;
    Ok(status)
}

fn vip_status(
    maps: &Maps<KernelStore>,
    addr: VipAddr,
    entry: &VipEntry,
    label: Option<&VipStatus>,
    daemon_alive: bool,
) -> anyhow::Result<VipStatus> {
    let table_size = maps.capacities().table_size;
    // Table fill: what a running daemon published, else counted off the
    // live table (a walk of table_size entries).
    let fill: BTreeMap<BackendId, u32> = match label.filter(|_| daemon_alive) {
        Some(l) => l.backends.iter().map(|b| (b.id, b.slots)).collect(),
        None => maps.table_fill(entry)?,
    };
    let mut ids: BTreeSet<BackendId> = fill.keys().copied().filter(|&id| id != NO_BACKEND).collect();
    ids.extend(label.iter().flat_map(|l| l.backends.iter().map(|b| b.id)));
    for slot in maps.backends()? {
        if slot.entry.is_ok_and(|e| e.vip == entry.id && e.used != BackendUse::Unused) {
            ids.insert(slot.id);
        }
    }
    let mut backends = Vec::new();
    for id in ids {
        let found = maps.backend(id)?.ok();
        let known = label.and_then(|l| l.backends.iter().find(|b| b.id == id));
        let slots = fill.get(&id).copied().unwrap_or(0);
        let used = found.map_or(BackendUse::Unused, |e| e.used);
        let state = known.map(|k| k.state).unwrap_or(match used {
            BackendUse::Active => BackendRole::Active,
            BackendUse::Draining => BackendRole::Draining,
            BackendUse::Unused => BackendRole::Inactive,
        });
        let mac = match (entry.forward, found) {
            (Forward::Tun, _) => None,
            (Forward::Dr, Some(e)) if slots > 0 => Some(format_mac(&e.mac)),
            _ => known.and_then(|k| k.mac.clone()),
        };
        let next_hop = match (entry.forward, found) {
            (Forward::Tun, Some(e)) => e.hop_mtu.map(|mtu| HopStatus { mac: format_mac(&e.mac), mtu }),
            _ => None,
        };
        backends.push(BackendStatus {
            address: known
                .and_then(|k| k.address)
                .or(found.filter(|e| e.used != BackendUse::Unused).map(|e| e.addr)),
            id,
            state,
            weight: known.and_then(|k| k.weight),
            mac,
            next_hop,
            slots,
            share: slots as f64 / table_size as f64,
            packets: 0,
            bytes: 0,
        });
    }
    Ok(VipStatus {
        name: label.and_then(|l| l.name.clone()),
        address: addr.ip,
        port: addr.port,
        protocol: addr.protocol,
        forward: entry.forward,
        source: label.and_then(|l| l.source.clone()),
        id: entry.id,
        generation: label.map_or(0, |l| l.generation),
        swapped_at: label.and_then(|l| l.swapped_at),
        previous_until: label.and_then(|l| l.previous_until),
        packets: 0,
        bytes: 0,
        backends,
        notes: label.map(|l| l.notes.clone()).unwrap_or_default(),
        // What the daemon last published: the routes it left stay as they were.
        announce: label.and_then(|l| l.announce),
        // Health checks as a running daemon last saw them.
        checks: label.filter(|_| daemon_alive).map(|l| l.checks.clone()).unwrap_or_default(),
        check_panic: label.is_some_and(|l| daemon_alive && l.check_panic),
    })
}

/// What the daemon last published in its state file.
pub fn published(files: &RunFiles) -> Option<Status> {
    serde_json::from_slice(&std::fs::read(files.state()).ok()?).ok()
}

/// Whether process `pid` is an xlb (the state file's writer, still running).
fn is_xlb(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|&b| b == 0).next().is_some_and(|argv0| argv0.ends_with(b"xlb")))
        .unwrap_or(false)
}
