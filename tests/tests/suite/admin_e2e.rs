//! The admin API and the operator's commands, against a running daemon in
//! the lab. Needs root.

use std::{
    io::Write as _,
    net::{IpAddr, UdpSocket},
    process::{Command, Stdio},
    time::Duration,
};

use xlb_tests::{
    cmd,
    daemon::Daemon,
    http::{Reply, request, request_with},
    lab::{Lab, VIP4},
    servers,
};

const ADMIN: &str = "127.0.0.1:9300";

fn vips(lab: &Lab) -> String {
    format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\n{}\n\n\
         [[vip]]\nname = \"dns\"\naddress = \"{VIP4}\"\nport = 53\nprotocol = \"udp\"\n{}\n",
        lab.backend_list(false),
        lab.backend_list(false)
    )
}

fn api(lab: &Lab, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Reply {
    lab.lb.run(|| request(ADMIN.parse().unwrap(), method, path, token, body))
}

fn get(lab: &Lab, path: &str) -> Reply {
    api(lab, "GET", path, None, None)
}

/// The value of the sample `name{labels}` in a Prometheus exposition.
fn sample(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} with {labels}"))
}

#[test]
fn metrics_pass_promtool_and_count_what_was_sent() {
    let lab = Lab::new(3).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let _daemon = Daemon::start(&lab.lb, &lab.lb_if, &lab.config(&vips(&lab))).unwrap();

    const N: u64 = 200;
    lab.client.run(|| {
        for _ in 0..N {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(b"query", (VIP4, 53)).unwrap();
            s.recv(&mut [0u8; 64]).expect("an answer");
        }
    });
    let reply = get(&lab, "/metrics");
    assert_eq!(reply.status, 200);
    let m = reply.body;

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejects the metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(sample(&m, "xlb_vip_packets_total", "vip=\"dns\""), N as f64);
    assert_eq!(sample(&m, "xlb_vip_bytes_total", "vip=\"dns\""), (N * (14 + 20 + 8 + 5)) as f64);
    let per_backend: f64 = lab
        .backends
        .iter()
        .map(|b| sample(&m, "xlb_backend_packets_total", &format!("vip=\"dns\",backend=\"{}\"", b.v4)))
        .sum();
    assert_eq!(per_backend, N as f64);
    assert!(sample(&m, "xlb_packets_total", "reason=\"forwarded\"") >= N as f64);
    // Sockets may reuse a source port: a datagram is a new flow or a hit.
    let new = sample(&m, "xlb_events_total", "event=\"conntrack_new\"");
    let hits = sample(&m, "xlb_events_total", "event=\"conntrack_hit\"");
    assert!(new + hits >= N as f64, "{new} new + {hits} hits");
    assert!(sample(&m, "xlb_conntrack_entries", "") >= new.min(1.0));
    assert_eq!(sample(&m, "xlb_maglev_table_swaps_total", "vip=\"dns\""), 1.0);
    assert_eq!(sample(&m, "xlb_build_info", "version="), 1.0);
}

#[test]
fn the_api_shows_vips_and_changes_backends_live() {
    let lab = Lab::new(3).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &lab.config(&vips(&lab))).unwrap();
    let (be1, be2) = (lab.backends[0].v4, lab.backends[1].v4);

    assert_eq!(get(&lab, "/healthz").status, 200);
    assert_eq!(get(&lab, "/readyz").status, 200);
    let list = get(&lab, "/api/v1/vips").json();
    let mut names: Vec<&str> = list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["dns", "web"]);
    let web = get(&lab, "/api/v1/vips/web").json();
    assert_eq!(web["backends"].as_array().unwrap().len(), 3);
    assert!(web["backends"].as_array().unwrap().iter().all(|b| b["weight"] == 1 && b["state"] == "active"));

    // Drain be2: no new connection reaches it; undrain: it is back.
    let r = api(&lab, "POST", &format!("/api/v1/vips/web/backends/{be2}/drain"), None, None);
    assert_eq!(r.status, 200, "{}", r.body);
    let web = get(&lab, "/api/v1/vips/web").json();
    let b2 = web["backends"].as_array().unwrap().iter().find(|b| b["address"] == be2.to_string()).unwrap();
    assert_eq!((b2["state"].as_str(), b2["slots"].as_u64()), (Some("draining"), Some(0)));
    assert_eq!(lab.spread(60), ["be1", "be3"]);
    assert_eq!(
        api(&lab, "POST", &format!("/api/v1/vips/web/backends/{be2}/undrain"), None, None).status,
        200
    );
    assert_eq!(lab.spread(60), ["be1", "be2", "be3"]);

    // Weight 3 for be1: three fifths of the table.
    let r =
        api(&lab, "PUT", &format!("/api/v1/vips/web/backends/{be1}/weight"), None, Some(r#"{"weight": 3}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    let web = get(&lab, "/api/v1/vips/web").json();
    let b1 = web["backends"].as_array().unwrap().iter().find(|b| b["address"] == be1.to_string()).unwrap();
    assert_eq!(b1["weight"], 3);
    assert!((b1["share"].as_f64().unwrap() - 0.6).abs() < 0.01, "{b1}");

    // Bad input: 4xx with a JSON error.
    for (method, path, body, status) in [
        ("GET", "/api/v1/vips/nope".to_owned(), None, 404),
        ("POST", "/api/v1/vips/nope/backends/10.0.0.11/drain".to_owned(), None, 404),
        ("POST", "/api/v1/vips/web/backends/10.0.0.99/drain".to_owned(), None, 404),
        ("POST", "/api/v1/vips/web/backends/not-an-ip/drain".to_owned(), None, 400),
        ("PUT", format!("/api/v1/vips/web/backends/{be1}/weight"), Some(r#"{"weight": -1}"#), 400),
        ("PUT", format!("/api/v1/vips/web/backends/{be1}/weight"), Some(r#"{"weight": 100000}"#), 400),
        ("PUT", format!("/api/v1/vips/web/backends/{be1}/weight"), Some("three"), 400),
        ("GET", format!("/api/v1/vips/web/backends/{be1}/drain"), None, 405),
        ("GET", "/no/such/thing".to_owned(), None, 404),
    ] {
        let r = api(&lab, method, &path, None, body);
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert!(r.json()["error"].is_string(), "{method} {path}: {}", r.body);
    }
    // What a web page could send: a change that is not JSON, a name that
    // resolves to loopback (DNS rebinding).
    let drain = format!("/api/v1/vips/web/backends/{be1}/drain");
    for (method, path, headers, status) in [
        ("POST", drain.as_str(), vec![format!("Host: {ADMIN}"), "Content-Type: text/plain".into()], 415),
        ("POST", drain.as_str(), vec![format!("Host: {ADMIN}")], 415),
        ("GET", "/api/v1/vips", vec!["Host: rebind.example:9300".into()], 403),
    ] {
        let r = lab.lb.run(|| request_with(ADMIN.parse().unwrap(), method, path, &headers, None));
        assert_eq!(r.status, status, "{method} {path} {headers:?}: {}", r.body);
    }
    let web = get(&lab, "/api/v1/vips/web").json();
    assert!(web["backends"].as_array().unwrap().iter().all(|b| b["state"] == "active"), "{web}");

    // The CLI: through the API inside the namespace, from the maps outside.
    let xlb = cmd::xlb_bin();
    let inside = lab.lb.exec(xlb.to_str().unwrap(), &["status", "--interface", &lab.lb_if]).unwrap();
    assert!(inside.starts_with("(via the daemon's admin API"), "{inside}");
    let outside = daemon.status().unwrap();
    assert!(outside["source"].as_str().unwrap().starts_with("from the pinned maps"), "{outside}");
    let drained =
        lab.lb.exec(xlb.to_str().unwrap(), &["drain", "web", &be1.to_string(), "-i", &lab.lb_if]).unwrap();
    assert!(drained.contains("draining"), "{drained}");
    assert_eq!(lab.spread(60), ["be2", "be3"]);
    let stats =
        lab.lb.exec(xlb.to_str().unwrap(), &["stats", "-i", &lab.lb_if, "--interval", "0.2"]).unwrap();
    assert!(stats.contains("packets/s") && stats.contains(&be1.to_string()), "{stats}");
}

#[test]
fn drains_survive_a_restart() {
    let lab = Lab::new(2).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let mut daemon = Daemon::start(&lab.lb, &lab.lb_if, &lab.config(&vips(&lab))).unwrap();
    let be1: IpAddr = lab.backends[0].v4.into();
    assert_eq!(api(&lab, "POST", &format!("/api/v1/vips/web/backends/{be1}/drain"), None, None).status, 200);
    daemon.restart(&lab.lb).unwrap();
    assert_eq!(lab.spread(40), ["be2"], "still drained after the restart");
    let _ = std::fs::remove_file(xlb::files::RunFiles::new(&lab.lb_if).overrides());
}

#[test]
fn a_token_guards_every_request() {
    let lab = Lab::new(1).unwrap();
    let config = format!(
        "interface = \"{}\"\n\n[admin]\nlisten = \"0.0.0.0:9300\"\ntoken = \"s3cret\"\n\n{}",
        lab.lb_if,
        vips(&lab)
    );
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config).unwrap();
    assert_eq!(api(&lab, "GET", "/metrics", None, None).status, 401);
    assert_eq!(api(&lab, "GET", "/healthz", Some("wrong"), None).status, 401);
    assert_eq!(api(&lab, "GET", "/api/v1/vips", Some("s3cret"), None).status, 200);
    assert_eq!(api(&lab, "GET", "/healthz", Some("s3cret"), None).status, 200);

    // The CLI finds the daemon from its config, and a token given on the
    // command line or in the environment replaces the config's.
    let status = |token: Option<(&str, &str)>| {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", lab.lb.path().display())).arg(cmd::xlb_bin());
        command.args(["status", "--json", "--config", daemon.config.to_str().unwrap()]);
        match token {
            Some(("--token", t)) => command.args(["--token", t]),
            Some((var, t)) => command.env(var, t),
            None => &mut command,
        };
        let out = command.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = status(None);
    assert!(ok && out.contains("via the daemon's admin API"), "{out}");
    let (ok, out) = status(Some(("--token", "s3cret")));
    assert!(ok && out.contains("via the daemon's admin API"), "{out}");
    let (ok, out) = status(Some(("--token", "wrong")));
    assert!(!ok && out.contains("401"), "{out}");
    let (ok, out) = status(Some(("XLB_ADMIN_TOKEN", "wrong")));
    assert!(!ok && out.contains("401"), "{out}");
    drop(daemon);
}

#[test]
fn sighup_with_a_broken_file_keeps_the_old_config_serving() {
    let lab = Lab::new(2).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &lab.config(&vips(&lab))).unwrap();
    let rejected = daemon.log().matches("config rejected").count();
    daemon.rewrite_config("interface = \"broken").unwrap();
    daemon.hangup().unwrap();
    daemon.wait_for_log_count("config rejected", rejected + 1, Duration::from_secs(5)).unwrap();
    assert_eq!(lab.spread(40), ["be1", "be2"], "the old config keeps serving");
}
