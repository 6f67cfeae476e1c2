//! TUN mode end to end: backends on another subnet behind a router, the
//! load balancer tunnelling to them, xlb_decap unwrapping, replies going
//! straight back to the client. Needs root.

use std::net::{IpAddr, SocketAddr};

use xlb_tests::{
    capture::Capture,
    daemon::Daemon,
    frames::checksum,
    lab::{VIP4, VIP6},
    servers::{self, tcp_spread},
    tun_lab::{LB4, LB6, TunLab},
};

fn config(lab: &TunLab) -> String {
    format!(
        "interface = \"{}\"\n\n[[vip]]\nname = \"web4\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\nforward = \"tun\"\n{}\n\n\
         [[vip]]\nname = \"web6\"\naddress = \"{VIP6}\"\nport = 80\nprotocol = \"tcp\"\nforward = \"tun\"\n{}\n",
        lab.lb_if,
        lab.backend_list(false),
        lab.backend_list(true)
    )
}

fn vip_packets(status: &serde_json::Value) -> u64 {
    status["vips"].as_array().unwrap().iter().map(|v| v["packets"].as_u64().unwrap()).sum()
}

#[test]
fn tcp_over_tunnels_completes_and_replies_bypass_the_load_balancer() {
    let lab = TunLab::new(3).unwrap();
    let hosts: Vec<_> = lab.backends.iter().map(|b| (&b.ns, b.name.as_str())).collect();
    let _servers = servers::start_in(&hosts, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config(&lab)).unwrap();

    // Replies must never reach the load balancer; tunnelled packets must
    // look as specified on the router's side of segment 1.
    let replies =
        Capture::start(&lab.lb, &lab.lb_if, &format!("src host {VIP4} or src host {VIP6}")).unwrap();
    let tunnels = Capture::start(&lab.router, "lan1", "ip proto 4 or ip6 proto 41").unwrap();

    const N: usize = 150;
    for addr in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
        let counts = lab.client.run(|| tcp_spread(SocketAddr::new(addr, 80), N)).unwrap();
        assert_eq!(counts.len(), 3, "{addr}: every backend answers: {counts:?}");
        assert_eq!(counts.values().sum::<usize>(), N);
    }

    let status = daemon.status().unwrap();
    assert_eq!(replies.stop().unwrap().len(), 0, "no reply passed the load balancer");
    let frames = tunnels.stop().unwrap();
    assert!(frames.len() as u64 >= 4 * N as u64, "{} tunnelled frames", frames.len());
    let backend4: Vec<[u8; 4]> = lab.backends.iter().map(|b| b.v4.octets()).collect();
    let backend6: Vec<[u8; 16]> = lab.backends.iter().map(|b| b.v6.octets()).collect();
    for f in &frames {
        match u16::from_be_bytes([f[12], f[13]]) {
            0x0800 => {
                let (outer, inner) = (&f[14..34], &f[34..]);
                assert_eq!(outer[0], 0x45);
                assert_eq!(u16::from_be_bytes([outer[2], outer[3]]) as usize, 20 + inner.len());
                assert_eq!(outer[6] & 0x40, 0x40, "DF");
                assert_eq!((outer[8], outer[9]), (64, 4), "TTL 64, protocol 4");
                assert_eq!(checksum(outer), 0);
                assert_eq!(outer[12..16], LB4.octets());
                assert!(backend4.iter().any(|b| outer[16..20] == *b));
                assert_eq!(inner[16..20], VIP4.octets(), "inner destination is the VIP");
                assert_eq!(inner[9], 6, "inner TCP");
            }
            0x86dd => {
                let (outer, inner) = (&f[14..54], &f[54..]);
                assert_eq!(outer[0] >> 4, 6);
                assert_eq!(u16::from_be_bytes([outer[4], outer[5]]) as usize, inner.len());
                assert_eq!((outer[6], outer[7]), (41, 64));
                assert_eq!(outer[8..24], LB6.octets());
                assert!(backend6.iter().any(|b| outer[24..40] == *b));
                assert_eq!(inner[24..40], VIP6.octets());
            }
            t => panic!("unexpected ethertype {t:#06x}"),
        }
    }

    // Every packet xlb tunnelled, a backend decapsulated, and only those.
    let decapsulated: u64 =
        lab.backends.iter().map(|b| b.decap_status().unwrap()["decapsulated"].as_u64().unwrap()).sum();
    assert_eq!(decapsulated, vip_packets(&status), "decap counters match xlb's");
    assert_eq!(frames.len() as u64, vip_packets(&status), "capture matches xlb's counters");
}

#[test]
fn a_next_hop_without_neighbour_entry_is_resolved_by_the_kernel_on_the_first_packet() {
    let lab = TunLab::new(1).unwrap();
    let hosts: Vec<_> = lab.backends.iter().map(|b| (&b.ns, b.name.as_str())).collect();
    let _servers = servers::start_in(&hosts, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config(&lab)).unwrap();
    for (addr, family) in [(IpAddr::from(VIP4), "-4"), (IpAddr::from(VIP6), "-6")] {
        // Warm every other cache on the way (client, router, backend), so
        // only the load balancer's neighbour entry is missing.
        lab.client.run(|| xlb_tests::servers::tcp_ask(SocketAddr::new(addr, 80))).unwrap();
        lab.lb.ip(&format!("{family} neigh flush dev {}", lab.lb_if)).unwrap();
        let before = daemon.status().unwrap()["reasons"]["tun_no_neighbour"]["packets"].as_u64().unwrap();
        let started = std::time::Instant::now();
        let answer = lab.client.run(|| xlb_tests::servers::tcp_ask(SocketAddr::new(addr, 80))).unwrap();
        let took = started.elapsed();
        assert_eq!(answer, "be1");
        let after = daemon.status().unwrap()["reasons"]["tun_no_neighbour"]["packets"].as_u64().unwrap();
        assert!(after > before, "{addr}: the first packet found no neighbour ({before} → {after})");
        assert!(
            took < std::time::Duration::from_millis(900),
            "{addr}: no SYN retransmission needed ({took:?})"
        );
    }
}
