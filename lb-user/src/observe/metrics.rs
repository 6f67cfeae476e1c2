//! Prometheus text exposition (format 0.0.4) of a data plane's status.

use std::fmt::Write as _;

use super::status::{Shortfalls, Status, Sync, VipStatus};
use crate::control::{
    announce::{Announcement, Switch},
    reconcile::Shortfall,
};

/// Escapes a label value.
fn esc(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{}}} {value}", labels.join(","));
        }
    }
}

/// What is wanted but found no id (max_vips, max_backends): a count per
/// kind, always present for alerts, and one series per thing left out.
fn left_out(o: &mut Out, s: &Status) {
    let none = Shortfalls::default();
    let short = match s.daemon.as_ref().map(|d| &d.sync) {
        Some(Sync::Short(short)) => short,
        _ => &none,
    };
    o.family(
        "xlb_capacity_left_out",
        "gauge",
        "VIPs and backends wanted but left out: no id left (raise max_vips or max_backends).",
    );
    o.sample("xlb_capacity_left_out", &[("kind", "vip")], short.vips_left_out);
    o.sample("xlb_capacity_left_out", &[("kind", "backend")], short.backends_left_out);
    o.family("xlb_vip_left_out", "gauge", "1 for each VIP left out for want of a VIP id.");
    for f in &short.named {
        if let Shortfall::Vip { vip, .. } = f {
            o.sample("xlb_vip_left_out", &[("vip", vip)], 1);
        }
    }
    o.family(
        "xlb_backend_left_out",
        "gauge",
        "1 for each backend left out for want of a backend id (the first 100 named).",
    );
    for f in &short.named {
        if let Shortfall::Backend { vip, backend, .. } = f {
            o.sample("xlb_backend_left_out", &[("vip", vip), ("backend", &backend.to_string())], 1);
        }
    }
}

/// Announcement state per VIP and BIRD's sessions, when `[announce]` is set.
fn announce(o: &mut Out, s: &Status) {
    let Some(a) = &s.announce else { return };
    o.family(
        "xlb_vip_announced",
        "gauge",
        "1 while a VIP's address is announced for BGP (its route is in the announce table).",
    );
    for v in &s.vips {
        let on =
            matches!(v.announce, Some(Announcement::Announced | Announcement::AnnouncedForShared { .. }));
        o.sample("xlb_vip_announced", &[("vip", v.name.as_deref().unwrap_or(""))], u8::from(on));
    }
    o.family(
        "xlb_announce_maintenance",
        "gauge",
        "1 while announcing is off (xlb announce off) or the daemon is stopping.",
    );
    o.sample("xlb_announce_maintenance", &[], u8::from(a.switch != Switch::On));
    o.family("xlb_bird_reachable", "gauge", "1 while BIRD's control socket answers.");
    o.sample("xlb_bird_reachable", &[], u8::from(a.bird.error.is_none() && a.bird.checked_at.is_some()));
    o.family("xlb_bird_protocol_up", "gauge", "1 for a BIRD protocol that is up (for BGP: Established).");
    for p in &a.bird.protocols {
        let up = p.state == "up" && (p.proto != "BGP" || p.info.starts_with("Established"));
        o.sample("xlb_bird_protocol_up", &[("protocol", &p.name), ("proto", &p.proto)], u8::from(up));
    }
}

pub fn render(s: &Status) -> String {
    let mut o = Out(String::new());
    announce(&mut o, s);
    o.family("xlb_build_info", "gauge", "Version of the running xlb.");
    o.sample("xlb_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    o.family("xlb_daemon_up", "gauge", "1 while the daemon runs (the data plane forwards either way).");
    o.sample("xlb_daemon_up", &[], u8::from(s.daemon_pid.is_some()));
    o.family("xlb_maps_in_sync", "gauge", "1 while the maps hold everything the daemon wants.");
    o.sample("xlb_maps_in_sync", &[], u8::from(s.daemon.as_ref().is_some_and(|d| d.sync.is_in_sync())));
    left_out(&mut o, s);

    o.family("xlb_packets_total", "counter", "Packets by verdict reason.");
    for (reason, t) in &s.reasons {
        o.sample("xlb_packets_total", &[("reason", reason)], t.packets);
    }
    o.family("xlb_bytes_total", "counter", "Bytes (whole frames) by verdict reason.");
    for (reason, t) in &s.reasons {
        o.sample("xlb_bytes_total", &[("reason", reason)], t.bytes);
    }
    o.family("xlb_events_total", "counter", "Connection-table events.");
    for (event, n) in &s.events {
        o.sample("xlb_events_total", &[("event", event)], n);
    }
    o.family("xlb_conntrack_entries", "gauge", "Entries in the connection table.");
    o.sample("xlb_conntrack_entries", &[], s.conntrack_entries);
    o.family("xlb_conntrack_capacity", "gauge", "Capacity of the connection table.");
    o.sample("xlb_conntrack_capacity", &[], s.conntrack_size);
    o.family("xlb_maglev_table_size", "gauge", "Maglev table size M.");
    o.sample("xlb_maglev_table_size", &[], s.table_size);

    let vip_labels =
        |v: &VipStatus| (v.name.clone().unwrap_or_default(), v.address.to_string(), v.port.to_string());
    o.family("xlb_vip_packets_total", "counter", "Packets forwarded for a VIP.");
    for v in &s.vips {
        let (name, addr, port) = vip_labels(v);
        let labels =
            [("vip", &*name), ("address", &*addr), ("port", &*port), ("protocol", v.protocol.name())];
        o.sample("xlb_vip_packets_total", &labels, v.packets);
    }
    o.family("xlb_vip_bytes_total", "counter", "Bytes forwarded for a VIP.");
    for v in &s.vips {
        let (name, addr, port) = vip_labels(v);
        let labels =
            [("vip", &*name), ("address", &*addr), ("port", &*port), ("protocol", v.protocol.name())];
        o.sample("xlb_vip_bytes_total", &labels, v.bytes);
    }
    o.family("xlb_maglev_table_swaps_total", "counter", "Table switches of a VIP since the daemon started.");
    for v in &s.vips {
        o.sample("xlb_maglev_table_swaps_total", &[("vip", &vip_labels(v).0)], v.generation);
    }
    o.family("xlb_maglev_last_swap_timestamp_seconds", "gauge", "When a VIP's table last switched.");
    for v in &s.vips {
        if let Some(t) = v.swapped_at {
            o.sample("xlb_maglev_last_swap_timestamp_seconds", &[("vip", &vip_labels(v).0)], t);
        }
    }

    let backends = || {
        s.vips.iter().flat_map(|v| {
            v.backends.iter().map(move |b| {
                let addr = b.address.map_or_else(|| format!("id {}", b.id), |a| a.to_string());
                (vip_labels(v).0, addr, b)
            })
        })
    };
    o.family("xlb_backend_packets_total", "counter", "Packets forwarded to a backend.");
    for (vip, addr, b) in backends() {
        o.sample("xlb_backend_packets_total", &[("vip", &vip), ("backend", &addr)], b.packets);
    }
    o.family("xlb_backend_bytes_total", "counter", "Bytes forwarded to a backend.");
    for (vip, addr, b) in backends() {
        o.sample("xlb_backend_bytes_total", &[("vip", &vip), ("backend", &addr)], b.bytes);
    }
    o.family("xlb_backend_weight", "gauge", "A backend's weight (0: draining).");
    for (vip, addr, b) in backends() {
        if let Some(w) = b.weight {
            o.sample("xlb_backend_weight", &[("vip", &vip), ("backend", &addr)], w);
        }
    }
    o.family("xlb_backend_table_share", "gauge", "A backend's share of its VIP's Maglev table (0 to 1).");
    for (vip, addr, b) in backends() {
        o.sample("xlb_backend_table_share", &[("vip", &vip), ("backend", &addr)], b.share);
    }
    o.family("xlb_backend_state", "gauge", "1 for a backend's current state.");
    for (vip, addr, b) in backends() {
        o.sample("xlb_backend_state", &[("vip", &vip), ("backend", &addr), ("state", b.state.name())], 1);
    }

    let checks = || {
        s.vips.iter().flat_map(|v| v.checks.iter().map(move |c| (vip_labels(v).0, c.address.to_string(), c)))
    };
    o.family(
        "xlb_backend_check_up",
        "gauge",
        "1 while a backend passes its health check, 0 while it fails or is unchecked.",
    );
    for (vip, addr, c) in checks() {
        let up = u8::from(c.state == crate::health::State::Up);
        o.sample(
            "xlb_backend_check_up",
            &[("vip", &vip), ("backend", &addr), ("state", c.state.as_str())],
            up,
        );
    }
    o.family("xlb_backend_check_consecutive_failures", "gauge", "Health check failures in a row.");
    for (vip, addr, c) in checks() {
        o.sample(
            "xlb_backend_check_consecutive_failures",
            &[("vip", &vip), ("backend", &addr)],
            c.consecutive_failures,
        );
    }
    o.family("xlb_backend_check_failures_total", "counter", "Failed health check probes.");
    for (vip, addr, c) in checks() {
        o.sample("xlb_backend_check_failures_total", &[("vip", &vip), ("backend", &addr)], c.failures);
    }
    o.family("xlb_backend_check_latency_seconds", "gauge", "How long the last passing probe took.");
    for (vip, addr, c) in checks() {
        if let Some(ms) = c.last_latency_ms {
            o.sample("xlb_backend_check_latency_seconds", &[("vip", &vip), ("backend", &addr)], ms / 1000.0);
        }
    }
    o.family(
        "xlb_vip_check_panic",
        "gauge",
        "1 while every backend of a VIP fails its health check and all are kept (panic mode).",
    );
    for v in s.vips.iter().filter(|v| !v.checks.is_empty()) {
        o.sample("xlb_vip_check_panic", &[("vip", &vip_labels(v).0)], u8::from(v.check_panic));
    }

    o.family(
        "xlb_discovery_stale",
        "gauge",
        "1 while queries to a discovery source (Consul service, etcd prefix) fail (last set in force).",
    );
    for d in &s.discovery {
        o.sample(
            "xlb_discovery_stale",
            &[("source", d.source.kind.label()), ("service", &d.source.name)],
            u8::from(d.stale),
        );
    }
    o.family(
        "xlb_discovery_last_sync_age_seconds",
        "gauge",
        "Seconds since the source last answered (Consul: a blocking query answers at least every wait; etcd: progress is asked every 10 s).",
    );
    for d in &s.discovery {
        if let Some(age) = d.synced_secs_ago {
            o.sample(
                "xlb_discovery_last_sync_age_seconds",
                &[("source", d.source.kind.label()), ("service", &d.source.name)],
                age,
            );
        }
    }
    o.family(
        "xlb_discovery_last_change_age_seconds",
        "gauge",
        "Seconds since the instances in force for a service last changed.",
    );
    for d in &s.discovery {
        if let Some(age) = d.changed_secs_ago {
            o.sample(
                "xlb_discovery_last_change_age_seconds",
                &[("source", d.source.kind.label()), ("service", &d.source.name)],
                age,
            );
        }
    }
    o.family("xlb_discovery_errors_total", "counter", "Failed queries or watches of a discovery source.");
    for d in &s.discovery {
        o.sample(
            "xlb_discovery_errors_total",
            &[("source", d.source.kind.label()), ("service", &d.source.name)],
            d.errors_total,
        );
    }
    o.family("xlb_discovery_instances", "gauge", "Instances in force for a service.");
    for d in &s.discovery {
        o.sample(
            "xlb_discovery_instances",
            &[("source", d.source.kind.label()), ("service", &d.source.name)],
            d.instances.unwrap_or(0),
        );
    }
    o.family(
        "xlb_discovery_empty_alarms_total",
        "counter",
        "Times a service reported no healthy instance and the last set was kept.",
    );
    for d in &s.discovery {
        o.sample(
            "xlb_discovery_empty_alarms_total",
            &[("source", d.source.kind.label()), ("service", &d.source.name)],
            d.empty_alarms,
        );
    }
    o.0
}
