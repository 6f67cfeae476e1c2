//! Part of 3: the daemon following one etcd prefix of 10,000 instances
//! (a real etcd in the daemon's namespace): time to the first table,
//! resident memory, and one key's delete to the table.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use xlb::dataplane::{BackendUse, Maps};
use xlb_tests::{daemon::Daemon, etcd::Etcd, http::request};

use super::{
    control::tun_namespace,
    kit,
    report::{Row, Section},
};

const INSTANCES: usize = 10_000;
const PREFIX: &str = "/services/big/";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn address(i: usize) -> String {
    format!("10.64.{}.{}", i / 250, i % 250 + 1)
}

pub fn run(section: &mut Section, smoke: bool) -> anyhow::Result<()> {
    let (ns, iface) = tun_namespace("etcd")?;
    let etcd = Etcd::start_in(ns.path())?;
    let keys: Vec<(String, String)> =
        (0..INSTANCES).map(|i| (format!("{PREFIX}{i:05}"), address(i))).collect();
    etcd.put_many(&keys)?;
    let mut config = format!("interface = \"{iface}\"\nmax_backends = 10240\n");
    let _ = write!(
        config,
        "\n[etcd]\nendpoints = [\"{}\"]\n\n[[vip]]\nname = \"big\"\naddress = \"192.0.2.1\"\nport = 80\n\
         protocol = \"tcp\"\nforward = \"tun\"\netcd = {{ prefix = \"{PREFIX}\" }}\n",
        etcd.endpoint()
    );
    let status = || -> anyhow::Result<serde_json::Value> {
        let reply =
            ns.run(|| request("127.0.0.1:9300".parse().unwrap(), "GET", "/api/v1/status", None, None));
        ensure!(reply.status == 200, "status: HTTP {}", reply.status);
        Ok(reply.json())
    };
    let backends = |s: &serde_json::Value| s["vips"][0]["backends"].as_array().map_or(0, Vec::len);

    // Fresh starts: start → the table holds every instance.
    let mut first = Vec::new();
    let mut daemon = None;
    for _ in 0..if smoke { 1 } else { 3 } {
        drop(daemon.take());
        let start = Instant::now();
        daemon = Some(Daemon::start(&ns, &iface, &config)?);
        while backends(&status()?) < INSTANCES {
            ensure!(start.elapsed() < Duration::from_secs(60), "not {INSTANCES} backends after 60 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        first.push(ms(start.elapsed()));
    }
    let daemon = daemon.context("no daemon started")?;
    let pid = status()?["daemon_pid"].as_u64().context("no daemon pid")?;
    std::thread::sleep(Duration::from_millis(if smoke { 200 } else { 1000 }));
    let rss = kit::proc_mib(pid, "VmRSS:")?;
    let hwm = kit::proc_mib(pid, "VmHWM:")?;

    // One key deleted among 10,000: its backend leaves the table (read
    // from the pinned maps, which cost the daemon nothing to poll).
    let maps = Maps::open_pinned(&xlb::config::default_pin_dir(&iface))?;
    let gone_addr: std::net::IpAddr = address(0).parse()?;
    let mut change = Vec::new();
    for _ in 0..if smoke { 3 } else { 10 } {
        let id = xlb_tests::daemon::table_id(&status()?, gone_addr).context("the backend in the table")?;
        let start = Instant::now();
        etcd.delete(&format!("{PREFIX}00000"));
        while maps.backend(id)?.is_ok_and(|e| e.used != BackendUse::Unused) {
            ensure!(start.elapsed() < Duration::from_secs(10), "still in the table after 10 s");
            std::thread::sleep(Duration::from_micros(500));
        }
        change.push(ms(start.elapsed()));
        etcd.put(&format!("{PREFIX}00000"), &address(0));
        while xlb_tests::daemon::table_id(&status()?, gone_addr).is_none() {
            ensure!(start.elapsed() < Duration::from_secs(20), "not back after 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(daemon);

    section.push(
        Row::new(
            format!("etcd: daemon start → table with {INSTANCES} instances from one prefix"),
            "ms",
            first,
        )
        .note(
            "A fresh `xlb run` (TUN VIP, nothing pinned) against a real etcd holding the keys; until the \
                 admin API lists every backend (10 ms polling). Includes loading the program, the paged read \
                 of the prefix (1,000 keys a page), Maglev and the map writes.",
        ),
    );
    section.push(
        Row::new(format!("etcd: daemon resident memory with {INSTANCES} instances"), "MiB", vec![rss])
            .note(format!("VmRSS after settling; peak (VmHWM) {hwm:.1} MiB."))
            .extra("vm_hwm_mib", hwm),
    );
    section.push(
        Row::new(format!("etcd: one key deleted → out of the table, {INSTANCES} instances"), "ms", change).note(
            "From before `etcdctl del` (its own start-up, ~10 ms, included) until the backend's pinned entry \
             is unused: the watch event, the set rebuilt from all 10,000 keys, Maglev rebuilt, the table \
             switched.",
        ),
    );
    Ok(())
}
