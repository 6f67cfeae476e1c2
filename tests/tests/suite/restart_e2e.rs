//! Restarts and upgrades without breaking a flow: the daemon killed with
//! SIGKILL and started again, restarted with a changed config, and each
//! start swapping its freshly loaded program in through the pinned link,
//! all under continuous traffic. And pinned state of another layout is
//! refused, never misread. Needs root.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use xlb_tests::{
    daemon::{Daemon, run_refused},
    lab::{Lab, VIP4},
    servers,
    traffic::{Arrivals, Conversation},
};

fn config(lab: &Lab, backends: &[u8]) -> String {
    let list: Vec<String> =
        backends.iter().map(|i| format!("{{ address = \"10.0.0.{}\" }}", 10 + i)).collect();
    lab.config(&format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\nbackends = [ {} ]\n",
        list.join(", ")
    ))
}

/// TCP segments the client retransmitted so far (lost or late packets).
fn retransmits(lab: &Lab) -> u64 {
    let out = lab.client.exec("nstat", &["-az", "TcpRetransSegs"]).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("TcpRetransSegs"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The XDP program id attached to the load balancer's interface.
fn program_id(lab: &Lab) -> u64 {
    let link: serde_json::Value =
        serde_json::from_str(&lab.lb.ip(&format!("-j link show {}", lab.lb_if)).unwrap()).unwrap();
    link[0]["xdp"]["prog"]["id"].as_u64().expect("an XDP program is attached")
}

#[test]
fn kill_restart_reconfigure_and_program_swap_break_nothing() {
    let lab = Lab::new(3).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let mut daemon = Daemon::start(&lab.lb, &lab.lb_if, &config(&lab, &[1, 2, 3])).unwrap();
    let vip = SocketAddr::from((VIP4, 80));
    let stop = Arc::new(AtomicBool::new(false));
    let talks: Vec<Conversation> = (0..24).map(|_| Conversation::start(&lab.client, vip, &stop)).collect();
    let arrivals = Arrivals::start(&lab.client, vip, Duration::from_millis(20), &stop);
    let retrans_before = retransmits(&lab);
    let first_program = program_id(&lab);

    // SIGKILL: forwarding goes on without the daemon; a new one adopts.
    daemon.kill9().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    daemon.restart(&lab.lb).unwrap();
    assert!(daemon.log().contains("adopted=true"));
    let second_program = program_id(&lab);
    assert_ne!(first_program, second_program, "the restart swapped in a new program");

    // A restart with a changed config: a heavier backend.
    daemon.stop().unwrap();
    let mut restarted = config(&lab, &[1, 2, 3]);
    restarted = restarted.replace("{ address = \"10.0.0.13\" }", "{ address = \"10.0.0.13\", weight = 2 }");
    daemon.rewrite_config(&restarted).unwrap();
    daemon.restart(&lab.lb).unwrap();
    let status = daemon.status().unwrap();
    let be3 = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == "10.0.0.13")
        .cloned();
    let be3 = be3.expect("be3 in the status");
    assert_eq!(be3["weight"], 2, "the changed config applied: {be3}");
    assert!((be3["share"].as_f64().unwrap() - 0.5).abs() < 0.01, "{be3}");
    std::thread::sleep(Duration::from_millis(500));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut broken = Vec::new();
    for t in talks {
        if let Err(e) = t.finish() {
            broken.push(e);
        }
    }
    let arrived = arrivals.finish();
    let (ok, failed, errors) = (arrived.ok, arrived.failed, arrived.errors());
    let lost = retransmits(&lab) - retrans_before;
    eprintln!(
        "restarts under traffic: {ok} new connections, {failed} failed, {lost} TCP segments retransmitted"
    );
    assert!(broken.is_empty(), "long-lived connections broke: {broken:#?}");
    assert_eq!(failed, 0, "new connections failed: {errors:?}");
    assert!(ok > 50, "the arrival stream kept going ({ok})");
    assert_ne!(program_id(&lab), second_program, "every start swaps the program in");
}

#[test]
fn pinned_state_of_another_layout_is_refused_not_misread() {
    let lab = Lab::new(2).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let mut daemon = Daemon::start(&lab.lb, &lab.lb_if, &config(&lab, &[1, 2])).unwrap();
    daemon.stop().unwrap();
    let other = config(&lab, &[1, 2]).replace("interface =", "max_vips = 32\ninterface =");
    let path = daemon.dir.join("other.toml");
    std::fs::write(&path, other).unwrap();
    let (code, err) = run_refused(&lab.lb, &path).unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("holds maps from another xlb version or configuration") && err.contains("max_vips 64"),
        "{err}"
    );
    // The pinned data plane still forwards with its last tables.
    let answers = lab.client.run(|| servers::tcp_spread(SocketAddr::from((VIP4, 80)), 20)).unwrap();
    assert_eq!(answers.values().sum::<usize>(), 20);
}

#[test]
fn detach_on_exit_leaves_nothing_attached_or_pinned() {
    let lab = Lab::new(1).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let mut daemon =
        Daemon::start_with(&lab.lb, &lab.lb_if, &config(&lab, &[1]), &["--detach-on-exit"]).unwrap();
    let pins = Path::new("/sys/fs/bpf/xlb").join(&lab.lb_if);
    assert!(pins.join("VIPS").exists() && pins.join("link").exists(), "pinned while it runs");
    program_id(&lab);
    let answers = lab.client.run(|| servers::tcp_spread(SocketAddr::from((VIP4, 80)), 10)).unwrap();
    assert_eq!(answers.values().sum::<usize>(), 10);

    daemon.stop().unwrap();
    assert!(daemon.log().contains("detached"), "{}", daemon.log());
    assert!(!pins.exists(), "pins removed: {:?}", std::fs::read_dir(&pins).map(|d| d.count()));
    let link: serde_json::Value =
        serde_json::from_str(&lab.lb.ip(&format!("-j link show {}", lab.lb_if)).unwrap()).unwrap();
    assert!(link[0]["xdp"].is_null(), "no XDP program left: {link}");
}

#[test]
fn a_second_daemon_on_the_same_maps_is_refused() {
    let lab = Lab::new(1).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config(&lab, &[1])).unwrap();
    // Another admin port, so only the data plane can collide.
    let other = config(&lab, &[1]) + "\n[admin]\nlisten = \"127.0.0.1:9301\"\n";
    let path = daemon.dir.join("second.toml");
    std::fs::write(&path, other).unwrap();
    let (code, err) = run_refused(&lab.lb, &path).unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another `xlb run` holds"), "{err}");
    let answers = lab.client.run(|| servers::tcp_spread(SocketAddr::from((VIP4, 80)), 10)).unwrap();
    assert_eq!(answers.values().sum::<usize>(), 10, "the first daemon's data plane is untouched");
}
