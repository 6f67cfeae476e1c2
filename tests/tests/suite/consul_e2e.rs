//! Backends from Consul, end to end: xlb follows a (faithful, in-process)
//! Consul agent's health over HTTP, in the lab's namespaces. Needs root.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use serde_json::json;
use xlb::dataplane::{BackendUse, Maps};
use xlb_tests::{
    consul_fake::FakeConsul,
    daemon::Daemon,
    lab::{Lab, VIP4},
    servers::{self, tcp_spread},
};

fn register(consul: &FakeConsul, lab: &Lab, i: usize) {
    let b = &lab.backends[i];
    consul.register(json!({
        "Name": "web",
        "ID": format!("web-{}", b.name),
        "Address": b.v4.to_string(),
        "Port": 80,
        "Check": { "TTL": "1h", "Status": "passing" },
    }));
}

fn check(lab: &Lab, i: usize) -> String {
    format!("service:web-{}", lab.backends[i].name)
}

fn table_id(daemon: &Daemon, addr: IpAddr) -> Option<u16> {
    xlb_tests::daemon::table_id(&daemon.status().unwrap(), addr)
}

#[test]
fn backends_follow_consul_health_and_survive_its_outage() {
    let lab = Lab::new(4).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    // The agent listens inside the load balancer's namespace, where xlb runs.
    let consul =
        lab.lb.run(|| FakeConsul::builder().bind("127.0.0.1:8500".parse().unwrap()).start()).unwrap();
    for i in 0..3 {
        register(&consul, &lab, i);
    }
    let config = lab.config(&format!(
        "[consul]\naddress = \"http://127.0.0.1:8500\"\n\n\
         [[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\nconsul = {{ service = \"web\" }}\n"
    ));
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config).unwrap();
    daemon.eventually("three registered backends answer", || lab.spread(60) == ["be1", "be2", "be3"]);

    // Health to table: fail be2's check, time until its id stops taking
    // flows (the table without it is live by then); pass it, it returns.
    let maps = Maps::open_pinned(&xlb::config::default_pin_dir(&lab.lb_if)).unwrap();
    let be2: IpAddr = lab.backends[1].v4.into();
    let mut latencies = Vec::new();
    for _ in 0..10 {
        let id = table_id(&daemon, be2).expect("be2 in the table");
        let started = Instant::now();
        consul.fail(&check(&lab, 1));
        while maps.backend(id).unwrap().is_ok_and(|e| e.used != BackendUse::Unused) {
            assert!(started.elapsed() < Duration::from_secs(1), "be2 still in the table after 1 s");
            std::thread::sleep(Duration::from_micros(500));
        }
        latencies.push(started.elapsed());
        assert!(!lab.spread(30).contains(&"be2".to_owned()), "no new connection reaches a failed backend");
        consul.pass(&check(&lab, 1));
        daemon.eventually("be2 back after passing", || table_id(&daemon, be2).is_some());
    }
    let (summary, median) = xlb_tests::summary(&mut latencies, "failures");
    eprintln!("health → table latency {summary}");
    assert!(median < Duration::from_millis(200), "median {median:?}");
    assert_eq!(lab.spread(90), ["be1", "be2", "be3"], "be2 takes connections again");

    // A fourth instance gets its share.
    register(&consul, &lab, 3);
    daemon.eventually("be4 joins", || lab.spread(60).len() == 4);

    // One registered without an address falls back to the dev agent's
    // Node.Address, 127.0.0.1: left out, and status says why.
    consul.register(json!({ "Name": "web", "ID": "web-noaddr", "Port": 80 }));
    let problems = || daemon.status().unwrap()["discovery"][0]["problems"].to_string();
    daemon.eventually("the problem is shown", || problems().contains("web-noaddr: no Service.Address"));
    assert!(problems().contains("127.0.0.1 is a loopback address"), "{}", problems());
    assert_eq!(lab.spread(60).len(), 4, "the four good instances still serve");

    // Consul goes away: the last known set keeps serving, status says stale.
    consul.set_down(true);
    daemon.eventually("discovery marked stale", || daemon.status().unwrap()["discovery"][0]["stale"] == true);
    assert_eq!(lab.spread(90).len(), 4, "traffic keeps flowing to the last known set");
    let human = xlb_tests::cmd::run(
        xlb_tests::cmd::xlb_bin().to_str().unwrap(),
        &["status", "--interface", &lab.lb_if],
    )
    .unwrap();
    assert!(human.contains("STALE"), "{human}");

    // Changes made while it was away arrive once it is back.
    consul.fail(&check(&lab, 0));
    lab.lb.run(|| consul.set_down(false));
    daemon.eventually("discovery resyncs", || daemon.status().unwrap()["discovery"][0]["stale"] == false);
    daemon.eventually("be1's failure applies after the outage", || lab.spread(60) == ["be2", "be3", "be4"]);
}

#[test]
fn one_service_backs_an_ipv4_and_an_ipv6_vip() {
    let lab = Lab::new(2).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let consul =
        lab.lb.run(|| FakeConsul::builder().bind("127.0.0.1:8500".parse().unwrap()).start()).unwrap();
    for b in &lab.backends {
        consul.register(json!({
            "Name": "web",
            "ID": format!("web-{}", b.name),
            "Address": b.v4.to_string(),
            "TaggedAddresses": { "lan_ipv6": { "Address": b.v6.to_string(), "Port": 80 } },
            "Port": 80,
            "Check": { "TTL": "1h", "Status": "passing" },
        }));
    }
    let vip = |name: &str, addr: IpAddr| {
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{addr}\"\nport = 80\nprotocol = \"tcp\"\nconsul = {{ service = \"web\" }}\n"
        )
    };
    let config = lab.config(&format!(
        "[consul]\naddress = \"http://127.0.0.1:8500\"\n\n{}\n{}",
        vip("web4", VIP4.into()),
        vip("web6", xlb_tests::lab::VIP6.into())
    ));
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config).unwrap();
    for addr in [IpAddr::from(VIP4), IpAddr::from(xlb_tests::lab::VIP6)] {
        let target = SocketAddr::new(addr, 80);
        daemon.eventually(&format!("{addr} served by both instances"), || {
            lab.client.run(|| tcp_spread(target, 40)).map(|c| c.len() == 2).unwrap_or(false)
        });
    }
}
