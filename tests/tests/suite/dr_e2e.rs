//! DR mode end to end: real TCP and UDP through program `xlb` between
//! network namespaces. Needs root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    time::Duration,
};

use xlb_tests::{
    daemon::Daemon,
    lab::{LB4, Lab, VIP4, VIP6},
    servers::{self, tcp_ask, tcp_spread},
};

fn web_vips(lab: &Lab) -> String {
    format!(
        r#"[[vip]]
name = "web4"
address = "{VIP4}"
port = 80
protocol = "tcp"
{}

[[vip]]
name = "web6"
address = "{VIP6}"
port = 80
protocol = "tcp"
{}

[[vip]]
name = "dns4"
address = "{VIP4}"
port = 53
protocol = "udp"
{}
"#,
        lab.backend_list(false),
        lab.backend_list(true),
        lab.backend_list(false)
    )
}

fn assert_fair(counts: &BTreeMap<String, usize>, backends: usize, total: usize) {
    let fair = total as f64 / backends as f64;
    assert_eq!(counts.len(), backends, "every backend answers: {counts:?}");
    for (name, n) in counts {
        let off = (*n as f64 - fair).abs() / fair;
        assert!(off <= 0.25, "{name} answered {n} of {total} (fair share {fair:.0}): {counts:?}");
    }
}

fn vip<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("VIP {name} in status: {status:#}"))
}

#[test]
fn tcp_connections_over_ipv4_and_ipv6_complete_and_spread_fairly() {
    let lab = Lab::new(3).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &lab.config(&web_vips(&lab))).unwrap();

    const N: usize = 600;
    for (name, addr) in [("web4", IpAddr::from(VIP4)), ("web6", IpAddr::from(VIP6))] {
        let counts = lab.client.run(|| tcp_spread(SocketAddr::new(addr, 80), N)).unwrap();
        assert_fair(&counts, 3, N);

        // Every connection went through xlb: SYN, ACK, data, FIN at least.
        let status = daemon.status().unwrap();
        let v = vip(&status, name);
        let packets = v["packets"].as_u64().unwrap();
        assert!(packets >= 4 * N as u64, "{name}: {packets} packets for {N} connections");
        let per_backend: u64 =
            v["backends"].as_array().unwrap().iter().map(|b| b["packets"].as_u64().unwrap()).sum();
        assert_eq!(per_backend, packets, "{name}: backend counters add up to the VIP's");
    }
}

#[test]
fn udp_counters_agree_with_what_was_sent() {
    let lab = Lab::new(3).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &lab.config(&web_vips(&lab))).unwrap();

    const N: usize = 300;
    const PAYLOAD: &[u8] = b"exactly-twenty-bytes";
    // One socket per datagram: a new source port, so a new flow each time.
    let answers: BTreeMap<String, u64> = lab.client.run(|| {
        let mut answers = BTreeMap::new();
        for _ in 0..N {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(PAYLOAD, (VIP4, 53)).unwrap();
            let mut buf = [0u8; 64];
            let n = s.recv(&mut buf).expect("answer from a backend");
            *answers.entry(String::from_utf8_lossy(&buf[..n]).into_owned()).or_default() += 1;
        }
        answers
    });
    // Ethernet 14 + IPv4 20 + UDP 8 + payload.
    let frame = (14 + 20 + 8 + PAYLOAD.len()) as u64;
    let status = daemon.status().unwrap();
    let v = vip(&status, "dns4");
    assert_eq!(v["packets"], N as u64);
    assert_eq!(v["bytes"], N as u64 * frame);
    for b in v["backends"].as_array().unwrap() {
        let addr: IpAddr = b["address"].as_str().unwrap().parse().unwrap();
        let name = &lab.backends.iter().find(|be| IpAddr::from(be.v4) == addr).unwrap().name;
        let answered = answers.get(name).copied().unwrap_or(0);
        assert_eq!(b["packets"], answered, "{name}: datagrams forwarded = answers received");
        assert_eq!(b["bytes"], answered * frame);
    }
    assert!(status["reasons"]["forwarded"]["packets"].as_u64().unwrap() >= N as u64);
}

#[test]
fn the_load_balancer_host_keeps_working() {
    let lab = Lab::new(2).unwrap();
    let _servers = servers::start(&lab.backends, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &lab.config(&web_vips(&lab))).unwrap();
    let before = daemon.status().unwrap()["reasons"]["not_vip"]["packets"].as_u64().unwrap();

    lab.client
        .exec("ping", &["-c", "3", "-i", "0.2", "-W", "2", &LB4.to_string()])
        .expect("ping the lb host");
    let listener = lab.lb.run(|| TcpListener::bind((LB4, 2222)).unwrap());
    let server = std::thread::spawn(move || {
        use std::io::{BufRead as _, BufReader, Write as _};
        let (conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        (&conn).write_all(b"lb-host\n").unwrap();
    });
    let answer = lab.client.run(|| tcp_ask(SocketAddr::from((LB4, 2222)))).unwrap();
    server.join().unwrap();
    assert_eq!(answer, "lb-host");

    let after = daemon.status().unwrap()["reasons"]["not_vip"]["packets"].as_u64().unwrap();
    // 3 echo requests + the TCP exchange (at least SYN, ACK, data, ACK, FIN).
    assert!(after >= before + 3 + 4, "not_vip went from {before} to {after}");
}
