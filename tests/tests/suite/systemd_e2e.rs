//! Running under systemd: the notify protocol as a `Type=notify` unit sees
//! it (a datagram socket stands in for systemd, which this machine does
//! not boot), and the shipped unit file as systemd reads it. Needs root.

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    time::{Duration, Instant},
};

use xlb_tests::{
    daemon::Daemon,
    lab::{Lab, VIP4},
    servers, unique_id,
};

/// Every message received until `until` holds for the messages so far
/// (or `limit` passes).
fn collect(socket: &UnixDatagram, got: &mut Vec<String>, limit: Duration, until: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while !until(got) {
        assert!(Instant::now() < deadline, "notifications so far: {got:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned());
        }
    }
}

fn count(got: &[String], message: &str) -> usize {
    got.iter().filter(|m| m.lines().any(|l| l == message)).count()
}

#[test]
fn the_notify_protocol_says_ready_reloading_status_watchdog_and_stopping() {
    let lab = Lab::new(2).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let path = std::env::temp_dir().join(format!("xlb-notify-{:06x}.sock", unique_id()));
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let config = lab.config(&format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\n{}\n",
        lab.backend_list(false)
    ));
    // A 2 s watchdog: pings at least every second.
    let mut daemon = Daemon::start_env(
        &lab.lb,
        &lab.lb_if,
        &config,
        &[],
        &[("NOTIFY_SOCKET", path.to_str().unwrap()), ("WATCHDOG_USEC", "2000000")],
    )
    .unwrap();
    let mut got = Vec::new();
    collect(&socket, &mut got, Duration::from_secs(5), |g| {
        count(g, "READY=1") == 1 && count(g, "WATCHDOG=1") >= 2
    });
    let ready = got.iter().position(|m| m == "READY=1").unwrap();
    let status = got[..ready].iter().rev().find(|m| m.starts_with("STATUS=")).expect("a status before READY");
    assert_eq!(status, "STATUS=1 VIPs, 2 backends in the tables, in sync", "{got:?}");
    assert!(
        got[..ready].iter().all(|m| m.starts_with("STATUS=")),
        "nothing but status before READY: {got:?}"
    );

    daemon.hangup().unwrap();
    collect(&socket, &mut got, Duration::from_secs(5), |g| count(g, "READY=1") == 2);
    let reloading = got.iter().position(|m| m.lines().next() == Some("RELOADING=1")).expect("RELOADING=1");
    assert!(got[reloading].lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{got:?}");
    assert!(reloading > ready && got[reloading..].iter().any(|m| m == "READY=1"), "{got:?}");

    daemon.stop().unwrap();
    collect(&socket, &mut got, Duration::from_secs(5), |g| count(g, "STOPPING=1") == 1);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn the_shipped_unit_passes_systemd_analyze_verify() {
    let tool = xlb_tests::cmd::which("systemd-analyze")
        .expect("systemd-analyze (Debian's systemd; scripts/setup.sh installs it)");
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/xlb.service"))
            .unwrap();
    // The installed binary's path, pointed at this build (verify checks it).
    let bin = xlb_tests::cmd::xlb_bin();
    let dir = std::env::temp_dir().join(format!("xlb-unit-{:06x}", unique_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("xlb.service");
    std::fs::write(&file, unit.replace("/usr/bin/xlb", bin.to_str().unwrap())).unwrap();
    // --man=no: the man page is installed by the package, not here.
    let out = std::process::Command::new(tool).args(["verify", "--man=no"]).arg(&file).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}
