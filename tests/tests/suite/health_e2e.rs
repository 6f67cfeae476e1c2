//! Active health checks end to end: xlb probes real servers in the lab's
//! backend namespaces and the table follows. Needs root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;
use xlb::dataplane::{BackendUse, Maps};
use xlb_tests::{
    capture::Capture,
    consul_fake::FakeConsul,
    daemon::{Daemon, table_id},
    http::request,
    lab::{LB4, Lab, VIP4},
    servers::{self, Health, HealthServer, NameServers, tcp_ask, tcp_spread},
};

fn web(lab: &Lab, check: &str) -> String {
    lab.config(&format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\n{}\ncheck = {{ {check} }}\n",
        lab.backend_list(false)
    ))
}

/// A name server on port 80 of backend `i` alone, so one can be stopped.
fn serve(lab: &Lab, i: usize) -> NameServers {
    let b = &lab.backends[i];
    servers::start_in(&[(&b.ns, &b.name)], 80, 53)
}

/// Whether `addr` has entries in the VIP's live table.
fn in_table(status: &serde_json::Value, addr: IpAddr) -> bool {
    table_id(status, addr).is_some()
}

/// The health check status of `addr`.
fn check_of(status: &serde_json::Value, addr: IpAddr) -> serde_json::Value {
    status["vips"][0]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"].as_str().unwrap().starts_with(&format!("{addr}:")))
        .cloned()
        .unwrap_or_else(|| panic!("no check of {addr}: {status:#}"))
}

/// Polls the status until `done` holds; how long that took.
fn until(
    daemon: &Daemon,
    what: &str,
    limit: Duration,
    mut done: impl FnMut(&serde_json::Value) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let status = daemon.status().unwrap();
        if done(&status) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what} within {limit:?}: {status:#}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_stopped_server_leaves_within_interval_times_fall_plus_timeout_and_returns_after_rise() {
    let lab = Lab::new(3).unwrap();
    let mut servers: Vec<Option<NameServers>> = (0..3).map(|i| Some(serve(&lab, i))).collect();
    // Probes from the balancer: SYNs it sends to port 80.
    let capture = Capture::start(
        &lab.lb,
        &lab.lb_if,
        &format!("src host {LB4} and tcp dst port 80 and tcp[13] & 2 != 0"),
    )
    .unwrap();
    let (interval, timeout, fall, rise) = (200u64, 100u64, 2u64, 2u64);
    let daemon = Daemon::start(
        &lab.lb,
        &lab.lb_if,
        &web(&lab, &format!("kind = \"tcp\", interval_ms = {interval}, timeout_ms = {timeout}, fall = {fall}, rise = {rise}")),
    )
    .unwrap();
    let addrs: Vec<IpAddr> = lab.backends.iter().map(|b| b.addr(false)).collect();
    until(&daemon, "every backend passes and serves", Duration::from_secs(5), |s| {
        addrs.iter().all(|a| in_table(s, *a) && check_of(s, *a)["state"] == "up")
    });

    // Connections through the VIP all the while: how many fail while the
    // stopped server is still in the table.
    let stop = Arc::new(AtomicBool::new(false));
    let (tried, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (stop, tried, failed) = (stop.clone(), tried.clone(), failed.clone());
        let client = &lab.client;
        move || {
            client.run(|| {
                while !stop.load(Ordering::Relaxed) {
                    tried.fetch_add(1, Ordering::Relaxed);
                    if tcp_ask(SocketAddr::from((VIP4, 80))).is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        }
    };
    let bound = Duration::from_millis(interval * fall + timeout);
    // Timed on the data plane: until be2's entry is unused (the table
    // without it is live by then).
    let maps = Maps::open_pinned(&xlb::config::default_pin_dir(&lab.lb_if)).unwrap();
    let id = table_id(&daemon.status().unwrap(), addrs[1]).expect("be2 in the table");
    let left = std::thread::scope(|s| {
        let t = s.spawn(traffic);
        std::thread::sleep(Duration::from_millis(300));
        servers[1] = None;
        let stopped = Instant::now();
        while maps.backend(id).unwrap().is_ok_and(|e| e.used != BackendUse::Unused) {
            assert!(stopped.elapsed() < Duration::from_secs(5), "be2 still in the table after 5 s");
            std::thread::sleep(Duration::from_micros(500));
        }
        let left = stopped.elapsed();
        let failed_before = failed.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert_eq!(failed.load(Ordering::Relaxed), failed_before, "no connection fails once it is out");
        left
    });
    println!(
        "server stopped -> out of the table in {left:?} (bound interval x fall + timeout = {bound:?}); \
         {} of {} connections failed meanwhile",
        failed.load(Ordering::Relaxed),
        tried.load(Ordering::Relaxed)
    );
    // Jitter stretches each period by up to 10%.
    assert!(left <= bound + bound / 10, "left after {left:?}, bound {bound:?}");
    let status = daemon.status().unwrap();
    let check = check_of(&status, addrs[1]);
    assert_eq!(check["state"], "down");
    assert!(check["last_error"].as_str().unwrap().contains("refused"), "{check}");
    let counts: BTreeMap<String, usize> =
        lab.client.run(|| tcp_spread(SocketAddr::from((VIP4, 80)), 90)).unwrap();
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["be1", "be3"], "{counts:?}");
    assert!(daemon.log().contains("health check failing: backend down"), "{}", daemon.log());

    servers[1] = Some(serve(&lab, 1));
    let back =
        until(&daemon, "the restarted backend returns", Duration::from_secs(5), |s| in_table(s, addrs[1]));
    println!("server back -> in the table in {back:?} (rise = {rise} probes at {interval} ms)");
    assert!(back <= Duration::from_millis(interval * (rise + 1)) + Duration::from_millis(200), "{back:?}");

    // Every probe went to a backend's own address, none to the VIP.
    let probes = capture.stop().unwrap();
    assert!(probes.len() >= 10, "{} probes captured", probes.len());
    for frame in &probes {
        let dst = IpAddr::from([frame[30], frame[31], frame[32], frame[33]]);
        assert!(addrs.contains(&dst), "a probe went to {dst}");
    }
}

/// Two backends serving port 80 with an HTTP health endpoint on 8080 each,
/// and xlb checking them with `check`.
fn http_lab(check: &str) -> (Lab, NameServers, Vec<HealthServer>, Daemon) {
    let lab = Lab::new(2).unwrap();
    let servers = servers::start(&lab.backends, 80, 53);
    let health = lab.backends.iter().map(|b| HealthServer::start(&b.ns, 8080)).collect();
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &web(&lab, check)).unwrap();
    (lab, servers, health, daemon)
}

#[test]
fn http_checks_fail_on_an_error_status_a_wrong_body_and_a_timeout() {
    let (lab, _servers, health, daemon) = http_lab(
        "kind = \"http\", port = 8080, path = \"/healthz\", status = \"200\", body = \"ok\", \
         interval_ms = 200, timeout_ms = 150, fall = 1, rise = 1",
    );
    let be2 = lab.backends[1].addr(false);
    until(&daemon, "both pass", Duration::from_secs(5), |s| {
        in_table(s, be2) && in_table(s, lab.backends[0].addr(false))
    });
    for (mode, error) in [
        (Health::Error, "status 500, expected 200-200"),
        (Health::WrongBody, "body does not contain \"ok\""),
        (Health::Silent, "timed out after 150 ms"),
    ] {
        health[1].set(mode);
        let took = until(&daemon, &format!("{mode:?} takes be2 out"), Duration::from_secs(5), |s| {
            !in_table(s, be2) && check_of(s, be2)["state"] == "down"
        });
        let check = check_of(&daemon.status().unwrap(), be2);
        assert_eq!(check["last_error"], error, "{mode:?}: {check}");
        println!("{mode:?}: out in {took:?} ({error})");
        health[1].set(Health::Ok);
        until(&daemon, "be2 back", Duration::from_secs(5), |s| in_table(s, be2));
    }
}

#[test]
fn every_backend_failing_keeps_them_all_in_panic_mode() {
    let (lab, _servers, health, daemon) =
        http_lab("kind = \"http\", port = 8080, interval_ms = 200, timeout_ms = 100, fall = 1, rise = 1");
    let [be1, be2] = [lab.backends[0].addr(false), lab.backends[1].addr(false)];
    until(&daemon, "both pass", Duration::from_secs(5), |s| in_table(s, be1) && in_table(s, be2));
    health[1].set(Health::Error);
    until(&daemon, "be2 out", Duration::from_secs(5), |s| !in_table(s, be2));
    health[0].set(Health::Error);
    until(&daemon, "panic mode", Duration::from_secs(5), |s| s["vips"][0]["check_panic"] == true);
    let status = daemon.status().unwrap();
    assert!(in_table(&status, be1) && in_table(&status, be2), "both kept: {status:#}");
    assert_eq!(check_of(&status, be1)["state"], "down");
    let metrics =
        lab.lb.run(|| request("127.0.0.1:9300".parse().unwrap(), "GET", "/metrics", None, None)).body;
    assert!(metrics.contains("xlb_vip_check_panic{vip=\"web\"} 1"), "{metrics}");
    assert!(daemon.log().contains("panic mode"), "{}", daemon.log());
    // Traffic still flows to both meanwhile.
    let counts = lab.client.run(|| tcp_spread(SocketAddr::from((VIP4, 80)), 60)).unwrap();
    assert_eq!(counts.len(), 2, "{counts:?}");

    health[0].set(Health::Ok);
    until(&daemon, "panic over, be1 alone", Duration::from_secs(5), |s| {
        s["vips"][0]["check_panic"] == false && in_table(s, be1) && !in_table(s, be2)
    });
}

#[test]
fn a_backend_serves_only_while_consul_and_the_check_both_pass() {
    let lab = Lab::new(2).unwrap();
    let mut servers: Vec<Option<NameServers>> = (0..2).map(|i| Some(serve(&lab, i))).collect();
    let consul =
        lab.lb.run(|| FakeConsul::builder().bind("127.0.0.1:8500".parse().unwrap()).start()).unwrap();
    for b in &lab.backends {
        consul.register(json!({
            "Name": "web", "ID": format!("web-{}", b.name), "Address": b.v4.to_string(), "Port": 80,
            "Check": { "TTL": "1h", "Status": "passing" },
        }));
    }
    let config = lab.config(&format!(
        "[consul]\naddress = \"http://127.0.0.1:8500\"\n\n\
         [[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\nconsul = {{ service = \"web\" }}\n\
         check = {{ kind = \"tcp\", interval_ms = 200, timeout_ms = 100, fall = 1, rise = 1 }}\n"
    ));
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config).unwrap();
    let [be1, be2] = [lab.backends[0].addr(false), lab.backends[1].addr(false)];
    until(&daemon, "both serve", Duration::from_secs(5), |s| in_table(s, be1) && in_table(s, be2));

    // Consul says passing, the check fails: out.
    servers[1] = None;
    until(&daemon, "the failing check takes be2 out", Duration::from_secs(5), |s| !in_table(s, be2));
    // The check passes again, but Consul says critical: still out.
    consul.fail(&format!("service:web-{}", lab.backends[1].name));
    servers[1] = Some(serve(&lab, 1));
    std::thread::sleep(Duration::from_millis(800));
    assert!(!in_table(&daemon.status().unwrap(), be2), "Consul's critical keeps it out");
    // Both pass: in.
    consul.pass(&format!("service:web-{}", lab.backends[1].name));
    until(&daemon, "be2 back", Duration::from_secs(5), |s| in_table(s, be2));
    let counts = lab.client.run(|| tcp_spread(SocketAddr::from((VIP4, 80)), 60)).unwrap();
    assert_eq!(counts.len(), 2, "{counts:?}");
}

#[test]
fn a_restart_keeps_checked_backends_serving() {
    let lab = Lab::new(2).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    // rise = 5 at 500 ms: a restart that waited for fresh passes would take
    // the backends out for 2.5 s.
    let mut daemon =
        Daemon::start(&lab.lb, &lab.lb_if, &web(&lab, "kind = \"tcp\", interval_ms = 500, rise = 5"))
            .unwrap();
    let addrs: Vec<IpAddr> = lab.backends.iter().map(|b| b.addr(false)).collect();
    until(&daemon, "both pass", Duration::from_secs(10), |s| addrs.iter().all(|a| in_table(s, *a)));
    let status = daemon.status().unwrap();
    let ids: Vec<u16> = addrs.iter().map(|a| table_id(&status, *a).unwrap()).collect();
    let maps = Maps::open_pinned(&xlb::config::default_pin_dir(&lab.lb_if)).unwrap();
    let serving =
        || ids.iter().all(|&id| maps.backend(id).unwrap().is_ok_and(|e| e.used == BackendUse::Active));
    daemon.restart(&lab.lb).unwrap();
    // From the restarted daemon's first apply on, for a second: both stay.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        assert!(serving(), "a backend left the table after the restart:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = daemon.status().unwrap();
    assert!(addrs.iter().all(|a| check_of(&status, *a)["state"] == "up"), "{status:#}");
    assert!(!daemon.log().contains("health check: removed"), "{}", daemon.log());
}
