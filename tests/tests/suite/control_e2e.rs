//! The daemon's life: live config changes, rejected configs, restarts.
//! Needs root.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lb_common::Event;
use xlb::dataplane::{Counters as _, KernelCounters, KernelStore};
use xlb_tests::{
    daemon::{Daemon, run_refused},
    lab::{Lab, VIP4},
    servers,
    traffic::Conversation,
};

fn web(backends: &str) -> String {
    format!("[[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\n{backends}\n")
}

/// Runs `xlb run` with `config` in the lb namespace; returns (exit code, stderr).
fn run_once(lab: &Lab, config: &str) -> (Option<i32>, String) {
    let path = std::env::temp_dir().join(format!("xlb-bad-{:06x}.toml", xlb_tests::unique_id()));
    std::fs::write(&path, config).unwrap();
    let out = run_refused(&lab.lb, &path).unwrap();
    let _ = std::fs::remove_file(&path);
    out
}

#[test]
fn bad_configs_exit_non_zero_and_leave_the_data_plane_alone() {
    let lab = Lab::new(2).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &lab.config(&web(&lab.backend_list(false)))).unwrap();
    let before = daemon.status().unwrap()["vips"].clone();

    let unknown_field = format!("{}\ncolour = \"red\"\n", lab.config(&web(&lab.backend_list(false))));
    let (code, err) = run_once(&lab, &unknown_field);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unknown field `colour`"), "{err}");

    let missing_interface =
        web(&lab.backend_list(false)).replace("[[vip]]", "interface = \"nosuch0\"\n[[vip]]");
    let (code, err) = run_once(&lab, &missing_interface);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("field `interface`") && err.contains("\"nosuch0\" not found"), "{err}");

    let family_mismatch = lab.config(&web("backends = [ { address = \"fd00::11\" } ]"));
    let (code, err) = run_once(&lab, &family_mismatch);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("vip[0] (web).backends[0].address"), "{err}");

    let after = daemon.status().unwrap()["vips"].clone();
    assert_eq!(after.as_array().unwrap().len(), 1);
    assert_eq!(after[0]["backends"], before[0]["backends"], "tables untouched");
    assert_eq!(lab.spread(60).len(), 2, "still balancing across both backends");
}

#[test]
fn config_edits_apply_live_and_a_broken_edit_keeps_the_old_config() {
    let lab = Lab::new(3).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let mut daemon = Daemon::start(&lab.lb, &lab.lb_if, &lab.config(&web(&lab.backend_list(false)))).unwrap();
    assert_eq!(lab.spread(90), ["be1", "be2", "be3"]);

    daemon
        .rewrite_config(
            &lab.config(&web("backends = [ { address = \"10.0.0.11\" }, { address = \"10.0.0.13\" } ]")),
        )
        .unwrap();
    daemon.eventually("be2 still gets new connections", || lab.spread(60) == ["be1", "be3"]);
    assert_eq!(lab.spread(90), ["be1", "be3"]);

    daemon.rewrite_config("interface = [ this is not toml").unwrap();
    daemon.wait_for_log("config rejected", Duration::from_secs(5)).unwrap();
    assert_eq!(lab.spread(90), ["be1", "be3"], "the old config stays in force");

    daemon.rewrite_config(&lab.config(&web(&lab.backend_list(false)))).unwrap();
    daemon.eventually("be2 never came back", || lab.spread(60).len() == 3);
}

#[test]
fn forwarding_survives_the_daemon_and_a_restart_adopts_it() {
    let lab = Lab::new(3).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let mut daemon = Daemon::start(&lab.lb, &lab.lb_if, &lab.config(&web(&lab.backend_list(false)))).unwrap();
    let table = daemon.status().unwrap()["vips"][0]["backends"].clone();
    let pin_dir = xlb::config::default_pin_dir(&lab.lb_if);
    let seed = || KernelStore::open(&pin_dir).and_then(|s| s.meta()).unwrap().conntrack_seed;
    let first_seed = seed();
    // A connection that talks across the restart: the new program must
    // find its record where the old one put it.
    let stop = Arc::new(AtomicBool::new(false));
    let talk = Conversation::start(&lab.client, SocketAddr::from((VIP4, 80)), &stop);
    let events = || KernelCounters::open(&pin_dir).and_then(|c| c.global()).unwrap().events;

    daemon.stop().unwrap();
    assert_eq!(lab.spread(60), ["be1", "be2", "be3"], "forwarding continues without the daemon");
    assert!(daemon.status().unwrap()["daemon_pid"].is_null(), "status says the daemon is down");
    let before = events();

    daemon.restart(&lab.lb).unwrap();
    assert!(daemon.log().contains("adopted=true"), "{}", daemon.log());
    std::thread::sleep(Duration::from_millis(500));
    let after = events();
    stop.store(true, Ordering::Relaxed);
    assert!(talk.finish().unwrap() > 5, "the connection talked across the restart");
    assert_eq!(seed(), first_seed, "the adopted connection table keeps its seed");
    assert_eq!(after[Event::ConnNew as usize], before[Event::ConnNew as usize], "no record was missed");
    assert!(after[Event::ConnHit as usize] > before[Event::ConnHit as usize], "its record was found");
    let status = daemon.status().unwrap();
    let after = &status["vips"][0]["backends"];
    for (a, b) in after.as_array().unwrap().iter().zip(table.as_array().unwrap()) {
        assert_eq!((&a["id"], &a["slots"]), (&b["id"], &b["slots"]), "same ids and table after the restart");
    }
    assert_eq!(lab.spread(60), ["be1", "be2", "be3"]);
}
