//! Backends from etcd, end to end: xlb follows a real etcd running in the
//! load balancer's namespace, and real TCP connections through a DR VIP
//! follow the keys. Needs root.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use xlb::dataplane::{BackendUse, Maps};
use xlb_tests::{
    daemon::Daemon,
    etcd::Etcd,
    http::request,
    lab::{Lab, VIP4},
    servers,
    traffic::{Arrivals, Conversation, finish_all},
};

const PREFIX: &str = "/services/web/";

fn put(etcd: &Etcd, lab: &Lab, i: usize) {
    let b = &lab.backends[i];
    etcd.put(&format!("{PREFIX}{}", b.name), &format!("{{\"address\": \"{}\", \"port\": 80}}", b.v4));
}

/// The backend's id in the VIP's table, from the admin API (cheaper to
/// poll than `xlb status`).
fn table_id(lab: &Lab, addr: IpAddr) -> Option<u16> {
    let status =
        lab.lb.run(|| request("127.0.0.1:9300".parse().unwrap(), "GET", "/api/v1/status", None, None));
    xlb_tests::daemon::table_id(&status.json(), addr)
}

/// The backend's weight in the VIP's table, from the admin API.
fn weight(lab: &Lab, addr: IpAddr) -> Option<u64> {
    let status =
        lab.lb.run(|| request("127.0.0.1:9300".parse().unwrap(), "GET", "/api/v1/status", None, None));
    let vip = &status.json()["vips"][0];
    vip["backends"].as_array()?.iter().find(|b| b["address"] == addr.to_string())?["weight"].as_u64()
}

#[test]
fn backends_follow_etcd_and_survive_its_outage() {
    let lab = Lab::new(4).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let mut etcd = Etcd::start_in(lab.lb.path()).unwrap();
    for i in 0..3 {
        put(&etcd, &lab, i);
    }
    let config = lab.config(&format!(
        "[etcd]\nendpoints = [\"{}\"]\nrequest_timeout_ms = 1000\n\n\
         [[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\netcd = {{ prefix = \"{PREFIX}\" }}\n",
        etcd.endpoint()
    ));
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config).unwrap();
    daemon.eventually("three backends from etcd answer", || lab.spread(60) == ["be1", "be2", "be3"]);
    let source = || daemon.status().unwrap()["discovery"][0].clone();
    assert_eq!((source()["kind"].as_str(), source()["name"].as_str()), (Some("etcd"), Some(PREFIX)));

    // etcd to table: delete be2's key, time until its id stops taking
    // flows; put it back, it returns. 20 changes each way.
    let maps = Maps::open_pinned(&xlb::config::default_pin_dir(&lab.lb_if)).unwrap();
    let be2: IpAddr = lab.backends[1].v4.into();
    let key = format!("{PREFIX}be2");
    let (mut gone, mut back) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let id = table_id(&lab, be2).expect("be2 in the table");
        etcd.delete(&key);
        let started = Instant::now();
        while maps.backend(id).unwrap().is_ok_and(|e| e.used != BackendUse::Unused) {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "be2 still in the table 2 s after its key went"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        gone.push(started.elapsed());
        put(&etcd, &lab, 1);
        let started = Instant::now();
        while table_id(&lab, be2).is_none() {
            assert!(started.elapsed() < Duration::from_secs(2), "be2 not back 2 s after its put");
            std::thread::sleep(Duration::from_millis(1));
        }
        back.push(started.elapsed());
    }
    let (summary, median) = xlb_tests::summary(&mut gone, "changes");
    eprintln!("etcd delete → out of the table {summary}");
    eprintln!(
        "etcd put → in the table (polled through the API) {}",
        xlb_tests::summary(&mut back, "changes").0
    );
    assert!(median < Duration::from_millis(200), "{gone:?}");
    assert_eq!(lab.spread(90), ["be1", "be2", "be3"], "be2 takes connections again");

    // Keys that cannot be this VIP's backends: left out, and status says why.
    etcd.put(&format!("{PREFIX}v6only"), "fd00::99");
    etcd.put(
        &format!("{PREFIX}otherport"),
        &format!("{{\"address\": \"{}\", \"port\": 8080}}", lab.backends[3].v4),
    );
    etcd.put(&format!("{PREFIX}junk"), "{not json");
    let notes = || daemon.status().unwrap()["vips"][0]["notes"].to_string();
    daemon.eventually("the family note", || notes().contains("key /services/web/v6only has no IPv4 address"));
    assert!(notes().contains("listens on port 8080, not the VIP's 80"), "{}", notes());
    daemon
        .eventually("the bad value", || source()["problems"].to_string().contains("key /services/web/junk"));
    assert_eq!(lab.spread(60), ["be1", "be2", "be3"], "the good keys still serve");
    etcd.delete(&format!("{PREFIX}otherport"));

    // Changes that must break no flow, while 12 long-lived conversations
    // and a stream of new connections run: a fourth backend joins, one is
    // reweighted, one drains (weight 0 keeps established flows) and comes
    // back, and the fourth (which carries no conversation) leaves.
    let stop = Arc::new(AtomicBool::new(false));
    let vip = SocketAddr::from((VIP4, 80));
    let talks: Vec<Conversation> = (0..12).map(|_| Conversation::start(&lab.client, vip, &stop)).collect();
    let arrivals = Arrivals::start(&lab.client, vip, Duration::from_millis(20), &stop);
    let json = |i: usize, extra: &str| format!("{{\"address\": \"{}\"{extra}}}", lab.backends[i].v4);
    put(&etcd, &lab, 3);
    daemon.eventually("be4 joins", || lab.spread(60).len() == 4);
    etcd.put(&format!("{PREFIX}be1"), &json(0, ", \"weight\": 3"));
    daemon.eventually("be1 weighs 3", || weight(&lab, lab.backends[0].v4.into()) == Some(3));
    etcd.put(&format!("{PREFIX}be3"), &json(2, ", \"state\": \"drain\""));
    daemon.eventually("be3 drains", || !lab.spread(60).contains(&"be3".to_owned()));
    etcd.put(&format!("{PREFIX}be3"), &json(2, ""));
    daemon.eventually("be3 is back", || lab.spread(60).contains(&"be3".to_owned()));
    etcd.delete(&format!("{PREFIX}be4"));
    daemon.eventually("be4 leaves", || lab.spread(60) == ["be1", "be2", "be3"]);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let exchanges = finish_all(talks);
    let arrived = arrivals.finish();
    eprintln!(
        "during 5 etcd changes: 12 conversations, {exchanges} exchanges, none broken; {} new connections, {} failed",
        arrived.ok, arrived.failed
    );
    assert_eq!(arrived.failed, 0, "new connections failed: {:?}", arrived.errors());

    // Weights belong to etcd: the API refuses, naming where to set them.
    let reply = lab.lb.run(|| {
        request(
            "127.0.0.1:9300".parse().unwrap(),
            "PUT",
            &format!("/api/v1/vips/web/backends/{be2}/weight"),
            None,
            Some("{\"weight\": 3}"),
        )
    });
    assert_eq!(reply.status, 409, "{}", reply.body);
    assert!(
        reply.body.contains("etcd prefix /services/web/") && reply.body.contains("\\\"weight\\\""),
        "{}",
        reply.body
    );

    // etcd goes away: the last set keeps serving, status and metrics say stale.
    etcd.kill(0);
    daemon.eventually("discovery marked stale", || source()["stale"] == true);
    assert_eq!(lab.spread(90), ["be1", "be2", "be3"], "traffic keeps flowing to the last known set");
    let human = xlb_tests::cmd::run(
        xlb_tests::cmd::xlb_bin().to_str().unwrap(),
        &["status", "--interface", &lab.lb_if],
    )
    .unwrap();
    assert!(human.contains("backends from etcd prefix /services/web/: STALE: etcd unreachable"), "{human}");
    let metrics =
        lab.lb.run(|| request("127.0.0.1:9300".parse().unwrap(), "GET", "/metrics", None, None)).body;
    assert!(
        metrics.contains("xlb_discovery_stale{source=\"etcd\",service=\"/services/web/\"} 1"),
        "{metrics}"
    );

    // Back (same data): in sync again, and changes flow.
    etcd.restart(0).unwrap();
    daemon.eventually("discovery resyncs", || source()["stale"] == false);
    etcd.delete(&format!("{PREFIX}be1"));
    daemon.eventually("be1's delete applies after the outage", || lab.spread(60) == ["be2", "be3"]);
}

#[test]
fn backends_beyond_capacity_are_named_and_placed_when_ids_free() {
    let lab = Lab::new(4).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let etcd = Etcd::start_in(lab.lb.path()).unwrap();
    for i in 0..4 {
        put(&etcd, &lab, i);
    }
    // Three backend ids (id 0 means none) for four keys.
    let config = lab.config(&format!(
        "max_backends = 4\n\n[etcd]\nendpoints = [\"{}\"]\n\n\
         [[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\netcd = {{ prefix = \"{PREFIX}\" }}\n",
        etcd.endpoint()
    ));
    let mut daemon = Daemon::start(&lab.lb, &lab.lb_if, &config).unwrap();
    daemon.eventually("the three that fit serve", || lab.spread(60) == ["be1", "be2", "be3"]);
    let be4 = lab.backends[3].v4.to_string();
    let sync = || daemon.status().unwrap()["daemon"]["sync"].clone();
    assert_eq!(sync()["state"], "short", "{}", sync());
    assert_eq!((sync()["vips_left_out"].as_u64(), sync()["backends_left_out"].as_u64()), (Some(0), Some(1)));
    assert_eq!(
        sync()["named"],
        serde_json::json!([{"kind": "backend", "vip": "web", "backend": be4, "max_backends": 4}])
    );
    let metrics =
        || lab.lb.run(|| request("127.0.0.1:9300".parse().unwrap(), "GET", "/metrics", None, None)).body;
    let m = metrics();
    assert!(m.contains("xlb_capacity_left_out{kind=\"backend\"} 1"), "{m}");
    assert!(m.contains(&format!("xlb_backend_left_out{{vip=\"web\",backend=\"{be4}\"}} 1")), "{m}");
    let human = xlb_tests::cmd::run(
        xlb_tests::cmd::xlb_bin().to_str().unwrap(),
        &["status", "--interface", &lab.lb_if],
    )
    .unwrap();
    assert!(human.contains(&format!("backend {be4} left out")) && human.contains("max_backends"), "{human}");
    // Said once, not on every retry.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(daemon.log().matches("short of capacity").count(), 1, "{}", daemon.log());

    // be1 leaves (discovered backends leave at once); its id goes to be4.
    etcd.delete(&format!("{PREFIX}be1"));
    let started = Instant::now();
    daemon.eventually("be4 takes the freed id", || lab.spread(60) == ["be2", "be3", "be4"]);
    eprintln!("be1's key deleted → be4 serving in {:?}", started.elapsed());
    assert_eq!(sync()["state"], "in_sync", "{}", sync());
    let m = metrics();
    assert!(m.contains("xlb_capacity_left_out{kind=\"backend\"} 0"), "{m}");
    assert!(!m.contains("xlb_backend_left_out{"), "{m}");
    daemon.wait_for_log(&format!("backend added vip=web backend={be4}"), Duration::from_secs(1)).unwrap();
}
