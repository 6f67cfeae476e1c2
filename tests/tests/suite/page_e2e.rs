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
