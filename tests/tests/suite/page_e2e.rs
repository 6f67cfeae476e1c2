//! The admin listener's status page in a real browser: headless Chromium
//! loads it from a running `xlb run`, sees the VIPs and their counters
//! move, and drains a backend with its button. Needs root.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use xlb_tests::{
    browser::Browser,
    daemon::Daemon,
    lab::{Lab, VIP4},
    servers::{self, tcp_ask},
};

#[test]
fn the_status_page_shows_vips_moving_counters_and_drains_a_backend() {
    let lab = Lab::new(2).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let config = lab.config(&format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\n{}\n\
         check = {{ kind = \"tcp\", interval_ms = 500 }}\n",
        lab.backend_list(false)
    ));
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config).unwrap();
    let browser = Browser::start(&lab.lb, 9515).unwrap();
    browser.open("http://127.0.0.1:9300/").unwrap();
    let be2 = lab.backends[1].v4.to_string();
    let title = browser
        .wait_text("section[data-vip=\"web\"] h2", Duration::from_secs(10), |t| t.contains("192.0.2.10:80"))
        .unwrap();
    println!("VIP header: {title}");
    browser
        .wait_text(&format!("tr[data-backend=\"{be2}\"] .state"), Duration::from_secs(10), |t| t == "active")
        .unwrap();

    // Traffic through the VIP while the page polls: its rate moves.
    let stop = AtomicBool::new(false);
    let rate = std::thread::scope(|s| {
        s.spawn(|| {
            lab.client.run(|| {
                while !stop.load(Ordering::Relaxed) {
                    let _ = tcp_ask(SocketAddr::from((VIP4, 80)));
                }
            })
        });
        let rate = browser.wait_text("section[data-vip=\"web\"] .vip-pps", Duration::from_secs(10), |t| {
            t.split_whitespace().next().and_then(|n| n.parse::<f64>().ok()).is_some_and(|n| n > 0.0)
        });
        let shot = browser.screenshot();
        stop.store(true, Ordering::Relaxed);
        (rate, shot)
    });
    let (rate, shot) = rate;
    println!("VIP rate on the page: {}", rate.unwrap());
    let png = shot.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/status-page.png");
    std::fs::write(&path, &png).unwrap();
    println!("screenshot: {}", path.display());

    browser.click(&format!("tr[data-backend=\"{be2}\"] button[data-action=\"drain\"]")).unwrap();
    browser
        .wait_text(&format!("tr[data-backend=\"{be2}\"] .state"), Duration::from_secs(10), |t| {
            t == "draining"
        })
        .unwrap();
    let status = daemon.status().unwrap();
    let b = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == be2.as_str())
        .cloned();
    assert_eq!(b.unwrap()["state"], "draining", "the page's click drained it in the daemon");
    browser
        .wait_text(&format!("tr[data-backend=\"{be2}\"] button"), Duration::from_secs(5), |t| t == "undrain")
        .unwrap();
}

/// A status of `vips` VIPs with `backends` backends each, every backend
/// checked, as the API would answer.
fn big_status(vips: usize, backends: usize) -> String {
    let vips: Vec<serde_json::Value> = (0..vips)
        .map(|v| {
            let addr = |b: usize| format!("10.{}.{}.{}", v, b / 250, b % 250 + 1);
            serde_json::json!({
                "name": format!("vip{v}"), "address": format!("192.0.2.{}", v + 1), "port": 80, "protocol": "tcp",
                "forward": "dr", "source": null, "id": v, "generation": 1, "swapped_at": null,
                "packets": 1000 * v, "bytes": 64000 * v, "notes": [], "announce": null, "check_panic": false,
                "backends": (0..backends).map(|b| serde_json::json!({
                    "address": addr(b), "id": v * backends + b + 1, "state": "active", "weight": 1,
                    "mac": "02:00:00:00:00:01", "next_hop": null, "slots": 655, "share": 0.01,
                    "packets": 10 * b, "bytes": 640 * b,
                })).collect::<Vec<_>>(),
                "checks": (0..backends).map(|b| serde_json::json!({
                    "address": format!("{}:80", addr(b)), "state": "up", "since": 0.0, "consecutive_failures": 0,
                    "last_error": null, "last_latency_ms": 0.2, "probes": 10, "failures": 0,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "interface": "eth0", "daemon": { "sync": { "state": "in_sync" } }, "conntrack_entries": 1000,
        "conntrack_size": 262144, "discovery": [], "vips": vips,
    })
    .to_string()
}

#[test]
fn the_status_page_stays_usable_with_100_vips_of_100_backends() {
    let ns = xlb_tests::netns::Netns::new(&format!("xt{:06x}-page", xlb_tests::unique_id())).unwrap();
    ns.ip("link set lo up").unwrap();
    let page = include_str!("../../../lb-user/src/observe/page.html");
    let status = big_status(100, 100);
    // The page and a fixed status, served as the admin API would.
    let listener = ns.run(|| std::net::TcpListener::bind("127.0.0.1:9301").unwrap());
    listener.set_nonblocking(true).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::io::{BufRead as _, Write as _};
            while !stop.load(Ordering::Relaxed) {
                let Ok((conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                // A connection the browser opens ahead and leaves idle must
                // not hold up this one-at-a-time server.
                conn.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                let mut reader = std::io::BufReader::new(&conn);
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let (kind, body) =
                    if first.contains("/api/v1/status") { ("application/json", status.as_str()) } else { ("text/html", page) };
                let _ = (&conn).write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        .as_bytes(),
                );
            }
        });
        // Stops the server however this ends (a failed assertion too).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        let browser = Browser::start(&ns, 9516).unwrap();
        browser.open("http://127.0.0.1:9301/").unwrap();
        // Collapsed at this size: one summary line per VIP.
        let summary = browser
            .wait_text("section[data-vip=\"vip99\"] .count", Duration::from_secs(20), |t| {
                t.starts_with("100 backends")
            })
            .unwrap();
        assert!(
            browser.text("section[data-vip=\"vip0\"] tr[data-backend]").is_none(),
            "VIPs start closed: {summary}"
        );
        browser.click("section[data-vip=\"vip99\"] summary").unwrap();
        let shown = browser.wait_text(
            "section[data-vip=\"vip99\"] tr[data-backend=\"10.99.0.100\"] .state",
            Duration::from_secs(20),
            |t| t == "active",
        );
        assert!(
            shown.is_ok(),
            "{shown:?}; the page says {:?} / {:?}",
            browser.text("#summary"),
            browser.text("#error")
        );
        // One poll's fetch and render, as the page does every second.
        let mut ms: Vec<f64> = (0..5)
            .map(|_| {
                browser
                    .execute_async(
                        "const done = arguments[arguments.length - 1]; const t = performance.now(); \
                         refresh().then(() => done(performance.now() - t));",
                    )
                    .unwrap()
                    .as_f64()
                    .unwrap()
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        println!(
            "100 VIPs x 100 backends: one refresh takes {:.0} ms (median of 5; min {:.0}, max {:.0})",
            ms[2], ms[0], ms[4]
        );
        assert!(ms[2] < 700.0, "a refresh takes {:.0} ms: the page would lag its one-second poll", ms[2]);
    });
}
