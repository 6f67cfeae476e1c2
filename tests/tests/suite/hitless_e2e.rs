//! Flows that never break: long-lived TCP connections through xlb while
//! backends are added, removed, reweighted and drained, and tables swap
//! fifty times in a row. Needs root.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use xlb_tests::{
    daemon::Daemon,
    lab::{Lab, VIP4},
    servers::{self, tcp_spread},
    traffic::Conversation,
};

const LONG_LIVED: usize = 24;

fn converse(lab: &Lab, stop: &Arc<AtomicBool>) -> Conversation {
    Conversation::start(&lab.client, SocketAddr::from((VIP4, 80)), stop)
}

fn config(lab: &Lab, backends: &[(u8, u32)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(i, w)| format!("{{ address = \"10.0.0.{}\", weight = {w} }}", 10 + i))
        .collect();
    lab.config(&format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [ {} ]\n",
        list.join(", ")
    ))
    .replace("interface =", "drain_timeout = 600\ninterface =")
}

fn new_connections(lab: &Lab, n: usize) -> BTreeMap<String, usize> {
    lab.client.run(|| tcp_spread(SocketAddr::from((VIP4, 80)), n)).expect("new connections succeed")
}

#[test]
fn long_lived_connections_survive_every_kind_of_change() {
    let lab = Lab::new(4).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let mut daemon = Daemon::start(&lab.lb, &lab.lb_if, &config(&lab, &[(1, 1), (2, 1), (3, 1)])).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut talks: Vec<Conversation> = (0..LONG_LIVED).map(|_| converse(&lab, &stop)).collect();

    // Add be4: new connections reach all four.
    daemon.apply_config(&config(&lab, &[(1, 1), (2, 1), (3, 1), (4, 1)])).unwrap();
    assert_eq!(new_connections(&lab, 120).len(), 4, "be4 joined");
    talks.extend((0..8).map(|_| converse(&lab, &stop)));

    // Remove be1: no new connection reaches it; its old ones drain.
    daemon.apply_config(&config(&lab, &[(2, 1), (3, 1), (4, 1)])).unwrap();
    let spread = new_connections(&lab, 120);
    assert!(!spread.contains_key("be1"), "removed be1 took new connections: {spread:?}");

    // Weights 3:1:1.
    daemon.apply_config(&config(&lab, &[(2, 3), (3, 1), (4, 1)])).unwrap();
    let spread = new_connections(&lab, 400);
    let share = spread.get("be2").copied().unwrap_or(0) as f64 / 400.0;
    assert!((0.5..=0.7).contains(&share), "be2 at weight 3 of 5 got {share:.2}: {spread:?}");

    // Drain be3 (weight 0): no new connections, old ones stay.
    daemon.apply_config(&config(&lab, &[(2, 3), (3, 0), (4, 1)])).unwrap();
    let spread = new_connections(&lab, 120);
    assert!(!spread.contains_key("be3"), "drained be3 took new connections: {spread:?}");

    // Fifty table swaps in a row under traffic.
    for i in 0..50 {
        // Alternating from the weight in force, so every step is a change.
        let w = 2 - i % 2;
        daemon.apply_config(&config(&lab, &[(2, 3), (3, 0), (4, w)])).unwrap();
    }
    let swaps = daemon.log().matches("backend weight changed").count();
    assert!(swaps >= 50, "{swaps} weight changes logged");

    stop.store(true, Ordering::Relaxed);
    let mut on: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for t in talks {
        let backend = t.backend.clone();
        match t.finish() {
            Ok(exchanges) => {
                assert!(exchanges >= 5, "{backend} had only {exchanges} exchanges");
                *on.entry(backend).or_default() += 1;
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "broken conversations: {failures:#?}");
    assert!(
        on.contains_key("be1") && on.contains_key("be3"),
        "removed and drained backends kept theirs: {on:?}"
    );
    let status = daemon.status().unwrap();
    assert!(status["events"]["conntrack_hit"].as_u64().unwrap() > 0);
}
