//! `xlb status` as text.

use std::{fmt::Write as _, net::IpAddr, time::SystemTime};

use super::status::{SourceStatus, Status, VipStatus, unix_secs};
use crate::{config::SourceKind, control::announce::Switch, model::Forward};

pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let daemon = match (s.daemon_pid, &s.daemon) {
        (Some(pid), Some(d)) => {
            format!("daemon running (pid {pid}, attached {}): {}", d.attachment, d.sync.describe())
        }
        (Some(pid), None) => format!("daemon running (pid {pid})"),
        (None, _) => "daemon NOT running: forwarding continues with the last tables".to_owned(),
    };
    let _ = writeln!(out, "xlb on {} ({}) — {daemon}", s.interface, s.pin_dir.display());
    if let Some(a) = &s.announce {
        let bird = match (&a.bird.error, a.bird.protocols.as_slice()) {
            (Some(e), _) => format!("BIRD: {e}"),
            (None, []) => format!("BIRD at {}: no protocols", a.bird.socket.display()),
            (None, protocols) => {
                let bgp: Vec<String> = protocols
                    .iter()
                    .filter(|p| p.proto == "BGP" || p.proto == "BFD")
                    .map(|p| format!("{} {} {}", p.name, p.state, p.info).trim_end().to_owned())
                    .collect();
                format!(
                    "BIRD: {}",
                    if bgp.is_empty() { "no BGP sessions".to_owned() } else { bgp.join(", ") }
                )
            }
        };
        let switch = match a.switch {
            Switch::On => String::new(),
            Switch::Maintenance => " — ANNOUNCING OFF (xlb announce on to resume)".to_owned(),
            Switch::Stopping => " — stopping: withdrawn".to_owned(),
        };
        let _ = writeln!(out, "announcing VIP routes in table {}{switch}; {bird}", a.table);
        if let Some(e) = &a.error {
            let _ = writeln!(out, "ANNOUNCE TABLE ERROR: {e}");
        }
    }
    if let Some(d) = s.daemon.as_ref().filter(|d| !d.restart_needed.is_empty()) {
        let _ =
            writeln!(out, "RESTART NEEDED: the config changes {} (start-only)", d.restart_needed.join(", "));
    }
    let _ = writeln!(
        out,
        "table size {}, capacity {} VIPs / {} backends, connection table {} of {} entries\n",
        s.table_size,
        s.max_vips,
        s.max_backends.saturating_sub(1),
        s.conntrack_entries,
        s.conntrack_size
    );
    for v in &s.vips {
        vip(&mut out, v, s);
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

fn vip(out: &mut String, v: &VipStatus, s: &Status) {
    let addr = match v.address {
        IpAddr::V6(a) => format!("[{a}]:{}", v.port),
        a => format!("{a}:{}", v.port),
    };
    let name = v.name.as_deref().unwrap_or("(unnamed)");
    let _ = writeln!(
        out,
        "VIP {name} {} {addr} ({})  packets {}  bytes {}",
        v.protocol, v.forward, v.packets, v.bytes
    );
    if let Some(announce) = &v.announce {
        let _ = writeln!(out, "  {announce}");
    }
    if let Some(source) = &v.source {
        let view = s.discovery.iter().find(|d| &d.source == source);
        let _ = writeln!(out, "  backends from {source}: {}", describe_source(source.kind, view));
    }
    for note in &v.notes {
        let _ = writeln!(out, "  left out: {note}");
    }
    if let Some(until) = v.previous_until {
        let left = until - unix_secs(SystemTime::now());
        let _ = writeln!(out, "  second chance: the table before the last switch is kept {left:.0} s more");
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
            match (v.forward, &b.next_hop) {
                (Forward::Dr, _) => b.mac.as_deref().unwrap_or("unresolved"),
                (Forward::Tun, Some(hop)) => hop.mac.as_str(),
                // The packet path asks the kernel's FIB.
                (Forward::Tun, None) => "fib",
            },
            b.share * 100.0,
            b.packets,
            b.bytes
        );
    }
    if v.backends.is_empty() {
        let _ = writeln!(out, "  (no backends: packets are dropped and counted as no_backend)");
    }
    if v.check_panic {
        let _ = writeln!(
            out,
            "  PANIC: every backend fails its health check; all kept (on_all_failed = \"keep\")"
        );
    }
    if !v.checks.is_empty() {
        let _ = writeln!(
            out,
            "  {:<40} {:<8} {:>8} {:>9} {:>6}  last error",
            "health check", "state", "for", "latency", "fails"
        );
    }
    let now = unix_secs(SystemTime::now());
    for c in &v.checks {
        let _ = writeln!(
            out,
            "  {:<40} {:<8} {:>8} {:>9} {:>6}  {}",
            c.address.to_string(),
            c.state.as_str(),
            format!("{:.0} s", (now - c.since).max(0.0)),
            c.last_latency_ms.map(|ms| format!("{ms:.1} ms")).unwrap_or_else(|| "-".into()),
            c.consecutive_failures,
            c.last_error.as_deref().unwrap_or("-")
        );
    }
    out.push('\n');
}

fn describe_source(kind: SourceKind, view: Option<&SourceStatus>) -> String {
    let Some(d) = view else { return "not watched".into() };
    let ago = |t: Option<f64>| t.map_or_else(|| "never".into(), |s| format!("{s:.1} s ago"));
    let (answer, change) = (ago(d.synced_secs_ago), ago(d.changed_secs_ago));
    let mut text = match (d.instances, d.stale) {
        (None, _) if d.empty_kept => {
            format!("{kind} reports no healthy instance; keeping the backends the tables hold")
        }
        (None, _) => format!("waiting for {kind}'s first answer ({} errors)", d.errors_total),
        (Some(n), false) => format!("in sync, {n} instances, last answer {answer}, last change {change}"),
        (Some(n), true) => format!(
            "STALE: {kind} unreachable or failing (last answer {answer}, {} errors{}); serving the last {n} known instances",
            d.errors_total,
            d.last_error.as_deref().map(|e| format!(", last: {e}")).unwrap_or_default()
        ),
    };
    if d.empty_kept {
        let _ = write!(text, "; ALARM: {kind} reports no healthy instance, the last set is kept");
    }
    for problem in &d.problems {
        let _ = write!(text, "\n    {problem}");
    }
    text
}
