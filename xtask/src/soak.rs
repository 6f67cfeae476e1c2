//! `cargo xtask soak --minutes N`: xlb under churn. One node of the fleet
//! lab (DR and TUN backends, BIRD announcing to the router) and a real etcd
//! beside it; long-lived conversations and streams of new connections go
//! through a DR VIP, a TUN VIP and a DR VIP fed by etcd while, every
//! 100 ms, one change lands (the config file, the admin API or an etcd
//! key) and SIGHUP arrives every second. Fails when a long flow breaks, a
//! map write fails, backend ids leak, or the daemon's memory or open
//! descriptors grow.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use xlb::dataplane::{BackendUse, Maps};
use xlb_tests::{
    daemon::Daemon,
    etcd::Etcd,
    fleet::{Fleet, TUN_VIP4},
    http::{Reply, request},
    lab::VIP4,
    servers,
    traffic::{Arrivals, Conversation},
};

const PREFIX: &str = "/soak/disc/";
const CHANGE_EVERY: Duration = Duration::from_millis(100);
const HANGUP_EVERY: Duration = Duration::from_secs(1);
/// Conversations per VIP; they start while only the core backends serve,
/// and the core backends never leave (the churned ones come and go).
const TALKS: usize = 8;
/// The fleet config's drain_timeout, plus a tick: by then every removed
/// backend's id is free.
const SETTLE: Duration = Duration::from_secs(7);

/// The three VIPs: (name, address, port).
const VIPS: [(&str, IpAddr, u16); 3] =
    [("dr", IpAddr::V4(VIP4), 80), ("tun", IpAddr::V4(TUN_VIP4), 80), ("disc", IpAddr::V4(VIP4), 81)];

/// What the config file says now: which churned backends are in and the
/// first DR backend's weight.
#[derive(Clone, Copy)]
struct Shape {
    /// be3, be4 in the DR VIP.
    dr_extra: [bool; 2],
    /// The third TUN backend in the TUN VIP.
    tun_extra: bool,
    dr_weight: u32,
}

impl Shape {
    const CORE: Shape = Shape { dr_extra: [false, false], tun_extra: false, dr_weight: 1 };
    const ALL: Shape = Shape { dr_extra: [true, true], tun_extra: true, dr_weight: 1 };

    /// Backends the config lists, VIP by VIP (etcd's not counted).
    fn listed(&self) -> usize {
        2 + self.dr_extra.iter().filter(|x| **x).count() + 2 + usize::from(self.tun_extra)
    }
}

fn config(fleet: &Fleet, etcd: &Etcd, shape: Shape) -> String {
    let entry = |a: IpAddr, w: u32| format!("{{ address = \"{a}\", weight = {w} }}");
    let mut dr =
        vec![entry(fleet.backends[0].v4.into(), shape.dr_weight), entry(fleet.backends[1].v4.into(), 1)];
    for (i, on) in shape.dr_extra.iter().enumerate() {
        if *on {
            dr.push(entry(fleet.backends[2 + i].v4.into(), 1));
        }
    }
    let count = if shape.tun_extra { 3 } else { 2 };
    let tun: Vec<String> = fleet.tun_backends[..count].iter().map(|b| entry(b.v4.into(), 1)).collect();
    let vips = format!(
        "[etcd]\nendpoints = [\"{}\"]\n\n\
         [[vip]]\nname = \"dr\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [ {} ]\n\n\
         [[vip]]\nname = \"tun\"\naddress = \"{TUN_VIP4}\"\nport = 80\nprotocol = \"tcp\"\nforward = \"tun\"\n\
         backends = [ {} ]\n\n\
         [[vip]]\nname = \"disc\"\naddress = \"{VIP4}\"\nport = 81\nprotocol = \"tcp\"\netcd = {{ prefix = \"{PREFIX}\" }}\n",
        etcd.endpoint(),
        dr.join(", "),
        tun.join(", ")
    );
    fleet.config(0, 1, &vips)
}

/// A DR backend's etcd key and value.
fn key(fleet: &Fleet, i: usize, weight: u32) -> (String, String) {
    let b = &fleet.backends[i];
    (format!("{PREFIX}{}", b.name), format!("{{\"address\": \"{}\", \"weight\": {weight}}}", b.v4))
}

/// The daemon's resident memory (MiB) and open descriptors.
fn footprint(pid: u64) -> anyhow::Result<(f64, usize)> {
    let rss = crate::bench::kit::proc_mib(pid, "VmRSS:")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Counts what the churn did and what came back.
#[derive(Default)]
struct Tally {
    config_writes: u64,
    api_calls: u64,
    api_refused: Vec<String>,
    etcd_changes: u64,
    hangups: u64,
}

impl Tally {
    /// An admin API call that must answer 200.
    fn call(
        &mut self,
        api: &impl Fn(&str, &str, Option<&str>) -> Reply,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) {
        let reply = api(method, path, body);
        self.api_calls += 1;
        if reply.status != 200 {
            self.api_refused.push(format!("{method} {path}: {} {}", reply.status, reply.body));
        }
    }
}

pub fn run(xlb: &Path, minutes: f64) -> anyhow::Result<()> {
    // SAFETY: set before any thread starts; the daemon harness reads it.
    unsafe { std::env::set_var("XLB_BIN", xlb) };
    let duration = Duration::from_secs_f64(minutes * 60.0);
    eprintln!("soak: setting up (fleet lab with one node, etcd)");
    let mut fleet = Fleet::new(1, 4, 3)?;
    let dr_hosts: Vec<_> = fleet.backends.iter().map(|b| (&b.ns, b.name.as_str())).collect();
    let tun_hosts: Vec<_> = fleet.tun_backends.iter().map(|b| (&b.ns, b.name.as_str())).collect();
    let _dr_servers = servers::start_in(&dr_hosts, 80, 53);
    let _disc_servers = servers::start_in(&dr_hosts, 81, 54);
    let _tun_servers = servers::start_in(&tun_hosts, 80, 53);
    let etcd = Etcd::start_in(fleet.nodes[0].ns.path())?;
    for i in 0..2 {
        let (k, v) = key(&fleet, i, 1);
        etcd.put(&k, &v);
    }
    fleet.start_xlb(0, &config(&fleet, &etcd, Shape::CORE))?;
    fleet.wait_sessions()?;
    for (_, addr, _) in VIPS {
        fleet.wait_paths(addr, 1, Duration::from_secs(20))?;
    }
    let node = &fleet.nodes[0];
    let status = || -> anyhow::Result<serde_json::Value> {
        let reply =
            node.ns.run(|| request("127.0.0.1:9300".parse().unwrap(), "GET", "/api/v1/status", None, None));
        ensure!(reply.status == 200, "status: HTTP {}", reply.status);
        Ok(reply.json())
    };
    let serving = |s: &serde_json::Value, vip: &str| -> usize {
        s["vips"].as_array().into_iter().flatten().find(|v| v["name"] == vip).map_or(0, |v| {
            v["backends"].as_array().map_or(0, |b| b.iter().filter(|b| b["state"] == "active").count())
        })
    };
    let started = Instant::now();
    loop {
        let now = status()?;
        if ["dr", "tun", "disc"].iter().all(|v| serving(&now, v) >= 2) {
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(20), "the core backends do not serve: {}", status()?);
        std::thread::sleep(Duration::from_millis(100));
    }

    let stop = Arc::new(AtomicBool::new(false));
    // An early error still stops the traffic threads.
    let _stop_guard = StopOnDrop(stop.clone());
    let mut talks = Vec::new();
    let mut arrivals = Vec::new();
    for (name, addr, port) in VIPS {
        let to = SocketAddr::new(addr, port);
        for _ in 0..TALKS {
            talks.push((name, Conversation::start(&fleet.client, to, &stop)));
        }
        arrivals.push((name, Arrivals::start(&fleet.client, to, Duration::from_millis(50), &stop)));
    }
    let pid = status()?["daemon_pid"].as_u64().context("no daemon pid")?;
    let daemon: &Daemon = node.xlb();
    let (rss_start, fds_start) = footprint(pid)?;
    eprintln!(
        "soak: {} conversations and 3 connection streams running; churning for {duration:?}",
        talks.len()
    );

    let api = |method: &str, path: &str, body: Option<&str>| {
        node.ns.run(|| request("127.0.0.1:9300".parse().unwrap(), method, path, None, body))
    };
    let mut tally = Tally::default();
    let mut shape = Shape::CORE;
    let began = Instant::now();
    // One change per 100 ms, unless a change itself takes longer (etcdctl
    // starts a process per put).
    let mut next_hangup = began + HANGUP_EVERY;
    let mut step: u64 = 0;
    while began.elapsed() < duration {
        let tick = Instant::now();
        let round = step / 6;
        let drain = if round.is_multiple_of(2) { "drain" } else { "undrain" };
        match step % 6 {
            // The config file: a churned DR or TUN backend comes or goes,
            // the first DR backend's weight moves.
            0 => {
                match round % 3 {
                    0 => shape.dr_extra[0] = !shape.dr_extra[0],
                    1 => shape.dr_extra[1] = !shape.dr_extra[1],
                    _ => shape.tun_extra = !shape.tun_extra,
                }
                shape.dr_weight = 1 + (round % 4) as u32;
                daemon.rewrite_config(&config(&fleet, &etcd, shape))?;
                tally.config_writes += 1;
            }
            // The API: a core backend of each static VIP drains and comes
            // back (its flows stay), a TUN backend is reweighted.
            1 => tally.call(
                &api,
                "POST",
                &format!("/api/v1/vips/dr/backends/{}/{drain}", fleet.backends[1].v4),
                None,
            ),
            3 => tally.call(
                &api,
                "POST",
                &format!("/api/v1/vips/tun/backends/{}/{drain}", fleet.tun_backends[1].v4),
                None,
            ),
            5 => tally.call(
                &api,
                "PUT",
                &format!("/api/v1/vips/tun/backends/{}/weight", fleet.tun_backends[0].v4),
                Some(&format!("{{\"weight\": {}}}", 1 + round % 5)),
            ),
            // etcd: a churned instance comes or goes, a core one is
            // reweighted.
            2 => {
                let (k, v) = key(&fleet, 2 + (round % 2) as usize, 1);
                if (round / 2).is_multiple_of(2) {
                    etcd.put(&k, &v);
                } else {
                    etcd.delete(&k);
                }
                tally.etcd_changes += 1;
            }
            _ => {
                let (k, v) = key(&fleet, 0, 1 + (round % 3) as u32);
                etcd.put(&k, &v);
                tally.etcd_changes += 1;
            }
        }
        step += 1;
        if Instant::now() >= next_hangup {
            daemon.hangup()?;
            tally.hangups += 1;
            next_hangup += HANGUP_EVERY;
        }
        std::thread::sleep(CHANGE_EVERY.saturating_sub(tick.elapsed()));
    }

    // Every churned backend in, every drain undone: the config needs one
    // id per listed backend and etcd key.
    daemon.rewrite_config(&config(&fleet, &etcd, Shape::ALL))?;
    daemon.hangup()?;
    for (vip, addr) in [("dr", fleet.backends[1].v4), ("tun", fleet.tun_backends[1].v4)] {
        let reply = api("POST", &format!("/api/v1/vips/{vip}/backends/{addr}/undrain"), None);
        ensure!(reply.status == 200, "undrain {vip} {addr}: {} {}", reply.status, reply.body);
    }
    for i in 0..4 {
        let (k, v) = key(&fleet, i, 1);
        etcd.put(&k, &v);
    }
    std::thread::sleep(SETTLE);
    let (rss_end, fds_end) = footprint(pid)?;
    stop.store(true, Ordering::Relaxed);

    let mut broken = Vec::new();
    let mut exchanges = 0;
    for (vip, talk) in talks {
        let backend = talk.backend.clone();
        match talk.finish() {
            Ok(n) => exchanges += n,
            Err(e) => broken.push(format!("{vip}: a conversation with {backend} broke: {e}")),
        }
    }
    let mut streams = Vec::new();
    for (vip, a) in arrivals {
        let arrived = a.finish();
        streams.push(format!("{vip} {} ok / {} failed", arrived.ok, arrived.failed));
    }

    let s = status()?;
    let needed = Shape::ALL.listed() + 4;
    let maps = Maps::open_pinned(&xlb::config::default_pin_dir(&node.interface))?;
    let used: Vec<_> = maps
        .backends()?
        .into_iter()
        .filter(|b| b.entry.as_ref().is_ok_and(|e| e.used != BackendUse::Unused))
        .collect();
    let max_generation = used.iter().map(|b| b.generation).max().unwrap_or(0);
    let log = daemon.log();
    let write_errors = log.matches("map update failed").count();
    let rejected = log.matches("config rejected").count();
    let sync = s["daemon"]["sync"]["state"].as_str().unwrap_or("?").to_owned();

    let churned = began.elapsed();
    println!(
        "soak: {:.1} min of churn, {step} changes (one every {:.0} ms)",
        churned.as_secs_f64() / 60.0,
        churned.as_secs_f64() * 1e3 / step.max(1) as f64
    );
    println!(
        "  changes: {} config writes, {} API calls ({} refused), {} etcd changes, {} SIGHUPs",
        tally.config_writes,
        tally.api_calls,
        tally.api_refused.len(),
        tally.etcd_changes,
        tally.hangups
    );
    println!(
        "  long flows: {} conversations, {exchanges} exchanges, {} broken (goal 0)",
        TALKS * VIPS.len(),
        broken.len()
    );
    println!("  new connections: {}", streams.join(", "));
    println!("  daemon RSS: {rss_start:.1} MiB at start, {rss_end:.1} MiB at end");
    println!("  daemon open fds: {fds_start} at start, {fds_end} at end");
    println!(
        "  backend ids in use: {} (the config and etcd need {needed}); highest generation {max_generation}",
        used.len()
    );
    println!(
        "  map write errors: {write_errors} (goal 0); configs rejected: {rejected} (goal 0); maps {sync}"
    );

    let mut failures = broken;
    failures.extend(tally.api_refused);
    if write_errors > 0 {
        failures.push(format!("{write_errors} map writes failed"));
    }
    if rejected > 0 {
        failures.push(format!("the daemon rejected {rejected} of the configs written"));
    }
    if used.len() != needed {
        failures.push(format!("{} backend ids in use, {needed} needed", used.len()));
    }
    if sync != "in_sync" {
        failures.push(format!("maps not in sync at the end: {}", s["daemon"]["sync"]));
    }
    // A minute cannot show a slow leak; these catch a gross one.
    if rss_end > rss_start * 1.5 + 8.0 {
        failures.push(format!("RSS grew from {rss_start:.1} to {rss_end:.1} MiB"));
    }
    if fds_end > fds_start + 8 {
        failures.push(format!("open fds grew from {fds_start} to {fds_end}"));
    }
    if !failures.is_empty() {
        bail!("soak failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}
