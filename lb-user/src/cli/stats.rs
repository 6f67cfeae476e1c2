//! `xlb stats`: rates from two samples of the counters.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use crate::{
    cli::{args::StatsArgs, client, target::Target},
    observe::status::Status,
};

pub fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let target = Target::resolve(&args.target)?;
    let interval = Duration::from_secs_f64(args.interval.clamp(0.1, 3600.0));
    let (mut before, _) = client::status(&target)?;
    let mut taken = Instant::now();
    loop {
        std::thread::sleep(interval);
        let (now, source) = client::status(&target)?;
        let elapsed = taken.elapsed().as_secs_f64();
        taken = Instant::now();
        let table = render(&before, &now, elapsed);
        if args.watch {
            // Clear the screen and home the cursor: refresh in place.
            print!("\x1b[2J\x1b[H");
        }
        println!("({source}; over {elapsed:.1} s)\n{table}");
        if !args.watch {
            return Ok(());
        }
        before = now;
    }
}

/// Per VIP and backend: packets/s and bits/s between two samples.
fn render(before: &Status, now: &Status, secs: f64) -> String {
    let key = |name: &Option<String>, addr: &str| format!("{}/{addr}", name.as_deref().unwrap_or("?"));
    let mut old = BTreeMap::new();
    for v in &before.vips {
        old.insert(key(&v.name, ""), (v.packets, v.bytes));
        for b in &v.backends {
            old.insert(key(&v.name, &b.id.to_string()), (b.packets, b.bytes));
        }
    }
    let rate = |k: &str, packets: u64, bytes: u64| {
        let (p0, b0) = old.get(k).copied().unwrap_or((packets, bytes));
        (packets.saturating_sub(p0) as f64 / secs, bytes.saturating_sub(b0) as f64 * 8.0 / secs)
    };
    let mut out = String::new();
    let _ = writeln!(out, "{:<44} {:>12} {:>14}", "VIP / backend", "packets/s", "bits/s");
    for v in &now.vips {
        let (pps, bps) = rate(&key(&v.name, ""), v.packets, v.bytes);
        let label = format!("{} {} {}:{}", v.name.as_deref().unwrap_or("?"), v.protocol, v.address, v.port);
        let _ = writeln!(out, "{label:<44} {pps:>12.1} {:>14}", human(bps));
        for b in &v.backends {
            let (pps, bps) = rate(&key(&v.name, &b.id.to_string()), b.packets, b.bytes);
            let addr = b.address.map_or_else(|| format!("id {}", b.id), |a| a.to_string());
            let _ = writeln!(out, "  {addr:<42} {pps:>12.1} {:>14}", human(bps));
        }
    }
    out
}

fn human(bits: f64) -> String {
    match bits {
        b if b >= 1e9 => format!("{:.2} G", b / 1e9),
        b if b >= 1e6 => format!("{:.2} M", b / 1e6),
        b if b >= 1e3 => format!("{:.2} k", b / 1e3),
        b => format!("{b:.0}"),
    }
}
