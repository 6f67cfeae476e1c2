//! Second chance end to end, without a fleet: one TUN balancer, long-lived
//! TCP flows, a backend added (a quarter of the table moves), then the
//! connection table emptied, as a node that never saw the flows would be.
//! Every flow must survive, its packets passed on by the backend that
//! now owns the slot to the one that has the socket. Needs root.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use xlb::dataplane::conntrack::ConnTable;
use xlb_tests::{
    daemon::Daemon,
    lab::{VIP4, VIP6},
    servers,
    traffic::Conversation,
    tun_lab::TunLab,
};

fn config(lab: &TunLab, backends: usize, second_chance: Option<u64>) -> String {
    let window = second_chance.map_or(String::new(), |s| format!("second_chance = {s}\n"));
    format!(
        "interface = \"{}\"\n{window}\n[[vip]]\nname = \"web4\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\n\
         forward = \"tun\"\n{}\n\n[[vip]]\nname = \"web6\"\naddress = \"{VIP6}\"\nport = 80\nprotocol = \"tcp\"\n\
         forward = \"tun\"\n{}\n",
        lab.lb_if,
        lab.list_of(false, backends),
        lab.list_of(true, backends)
    )
}

/// Empties the balancer's connection table; how many records it held.
fn flush_connection_table(lab: &TunLab) -> usize {
    ConnTable::open(&xlb::config::default_pin_dir(&lab.lb_if)).unwrap().clear().unwrap()
}

fn previous_until(status: &serde_json::Value, vip: &str) -> Option<f64> {
    let vips = status["vips"].as_array().unwrap();
    vips.iter().find(|v| v["name"] == vip).unwrap()["previous_until"].as_f64()
}

fn decap_sum(lab: &TunLab, field: &str) -> u64 {
    lab.backends.iter().map(|b| b.decap_status().unwrap()[field].as_u64().unwrap()).sum()
}

/// 20 conversations per VIP on three backends; a fourth joins; the table
/// is emptied; they talk on for two seconds. The conversations' outcome.
fn churn(second_chance: Option<u64>) -> (TunLab, Daemon, Vec<Result<usize, String>>) {
    let lab = TunLab::new(4).unwrap();
    let hosts: Vec<_> = lab.backends.iter().map(|b| (&b.ns, b.name.as_str())).collect();
    let _servers = servers::start_in(&hosts, 80, 53);
    let mut daemon = Daemon::start(&lab.lb, &lab.lb_if, &config(&lab, 3, second_chance)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let talks: Vec<Conversation> = [IpAddr::from(VIP4), IpAddr::from(VIP6)]
        .iter()
        .flat_map(|&vip| (0..20).map(move |_| vip).collect::<Vec<_>>())
        .map(|vip| Conversation::start(&lab.client, SocketAddr::new(vip, 80), &stop))
        .collect();
    daemon.apply_config(&config(&lab, 4, second_chance)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(flush_connection_table(&lab) >= talks.len(), "every conversation was recorded");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let outcome = talks.into_iter().map(Conversation::finish).collect();
    drop(_servers);
    (lab, daemon, outcome)
}

#[test]
fn flows_survive_a_table_change_on_a_node_that_never_saw_them() {
    let (lab, daemon, outcome) = churn(None);
    let broken: Vec<&String> = outcome.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(broken.is_empty(), "{} of 40 conversations broke: {broken:?}", broken.len());
    let forwarded = decap_sum(&lab, "second_chance_forwarded");
    assert!(forwarded > 0, "some packets were passed on to their previous owner");
    assert_eq!(decap_sum(&lab, "second_chance_no_route"), 0);
    let sent = daemon.status().unwrap()["events"]["second_chance"].as_u64().unwrap();
    let status = daemon.status().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let until = previous_until(&status, "web4").expect("the table before the switch is kept");
    assert!(until > now + 20.0 && until < now + 31.0, "kept for about drain_timeout (30 s): {}", until - now);
    let text = daemon.xlb(&["status", "--interface", &lab.lb_if]).unwrap();
    assert!(text.contains("second chance: the table before the last switch is kept"), "{text}");
    let exchanges: usize = outcome.iter().flatten().sum();
    eprintln!(
        "second chance: 40 conversations, {exchanges} exchanges; {sent} packets wrapped, {forwarded} passed on"
    );
    assert!(sent >= forwarded, "the balancer wrapped {sent}, the backends passed on {forwarded}");
}

#[test]
fn without_second_chance_the_moved_flows_break() {
    // The same churn with the window at zero: the test above can fail.
    let (_lab, _daemon, outcome) = churn(Some(0));
    assert_eq!(previous_until(&_daemon.status().unwrap(), "web4"), None, "nothing kept");
    let broken = outcome.iter().filter(|o| o.is_err()).count();
    eprintln!("without second chance: {broken} of 40 conversations broke");
    assert!(broken > 0, "no conversation moved: the churn proves nothing");
}
