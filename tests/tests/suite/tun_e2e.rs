//! TUN mode end to end: backends on another subnet behind a router, the
//! load balancer tunnelling to them, xlb_decap unwrapping, replies going
//! straight back to the client; the next hop the daemon resolves following
//! the kernel's route and neighbour changes. Needs root.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use lb_common::{Event, Reason};
use xlb::model::format_mac;
use xlb_tests::{
    capture::Capture,
    daemon::Daemon,
    frames::{TCP_SYN, checksum, tcp, v4_frame, with_tcp_checksum_v4},
    http,
    lab::{VIP4, VIP6},
    netns::Netns,
    servers::{self, tcp_ask, tcp_spread},
    tun_lab::{LB4, LB6, TunLab},
};

/// The daemon's admin API, inside the load balancer's namespace.
const ADMIN: &str = "127.0.0.1:9300";

/// A change to a next hop must reach the data plane within this long of
/// the kernel's notification (the median of three changes: one slow
/// sample on a loaded machine is not a slow daemon).
const FOLLOW: Duration = Duration::from_millis(100);

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

/// Sends `count` IPIP packets from inside `ns` to `backend` (the kernel
/// writes the outer header, source the namespace's own address), each
/// holding a TCP SYN from the client to the IPv4 VIP.
fn send_ipip(ns: &Netns, backend: Ipv4Addr, count: u16) {
    ns.run(|| {
        // SAFETY: plain socket calls on a descriptor this function owns.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IPIP) };
        assert!(fd >= 0, "raw IPIP socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(backend).to_be() },
            sin_zero: [0; 8],
        };
        for i in 0..count {
            let frame = v4_frame(CLIENT4, VIP4, 6, &tcp(41000 + i, 80, TCP_SYN, b""));
            let inner = &with_tcp_checksum_v4(frame)[14..];
            // SAFETY: `inner` and `to` outlive the call; the lengths are theirs.
            let sent = unsafe {
                libc::sendto(
                    fd,
                    inner.as_ptr().cast(),
                    inner.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                )
            };
            assert_eq!(sent, inner.len() as isize, "sendto: {}", std::io::Error::last_os_error());
        }
        // SAFETY: closes the descriptor opened above, once.
        unsafe { libc::close(fd) };
    });
}

/// The lab's client, as the inner source of hand-made tunnels.
const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

#[test]
fn a_backend_takes_tunnels_to_its_vip_only_from_the_load_balancer() {
    let lab = TunLab::new(1).unwrap();
    let be = &lab.backends[0];
    let _servers = servers::start_in(&[(&be.ns, be.name.as_str())], 80, 53);
    let count = |field: &str| be.decap_status().unwrap()[field].as_u64().unwrap();
    let syn_acks =
        || Capture::start(&be.ns, "eth0", &format!("tcp and src host {VIP4} and tcp[13] & 2 != 0"));
    const N: u16 = 20;

    // The client forges what the load balancer would send: the same inner
    // packet, its own outer source. Dropped, counted, never answered.
    // Until `field` counts `n` (or 5 s), then a moment for stragglers.
    let settle = |field: &str, n: u64| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while count(field) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let answers = syn_acks().unwrap();
    send_ipip(&lab.client, be.v4, N);
    settle("untrusted", u64::from(N));
    assert_eq!((count("untrusted"), count("decapsulated")), (u64::from(N), 0));
    assert_eq!(answers.stop().unwrap().len(), 0, "a forged tunnel reached the server");

    // The same packets from the load balancer's address are the service's.
    let answers = syn_acks().unwrap();
    send_ipip(&lab.lb, be.v4, N);
    settle("decapsulated", u64::from(N));
    assert_eq!((count("untrusted"), count("decapsulated")), (u64::from(N), u64::from(N)));
    let ports: std::collections::BTreeSet<u16> =
        answers.stop().unwrap().iter().map(|f| u16::from_be_bytes([f[36], f[37]])).collect();
    assert_eq!(ports.len(), usize::from(N), "each tunnelled SYN answered by the server: {ports:?}");
    let status = be.decap_status().unwrap();
    assert_eq!(status["sources"], serde_json::json!([format!("{LB4}/32"), format!("{LB6}/128")]));
}

/// The daemon's published status, from its admin API (no process spawned,
/// so it can be polled quickly; its counters may be a second old: counted
/// figures come from `Daemon::globals`).
fn api_status(lab: &TunLab) -> serde_json::Value {
    lab.lb.run(|| http::request(ADMIN.parse().unwrap(), "GET", "/api/v1/status", None, None)).json()
}

/// The next-hop MAC of each backend of VIP `vip` (`None`: unresolved, the
/// packet path asks the FIB).
fn hop_macs(status: &serde_json::Value, vip: &str) -> Vec<Option<String>> {
    let vips = status["vips"].as_array().unwrap();
    let v = vips.iter().find(|v| v["name"] == vip).unwrap_or_else(|| panic!("no VIP {vip}"));
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["next_hop"]["mac"].as_str().map(str::to_owned))
        .collect()
}

fn fib_lookups(daemon: &Daemon) -> u64 {
    daemon.globals().unwrap().events[Event::TunFibLookup as usize]
}

fn packets(daemon: &Daemon, reason: Reason) -> u64 {
    daemon.globals().unwrap().reasons[reason as usize].packets
}

/// Runs `change` and then polls until every backend of `vip` has next hop
/// `mac`; the time from just before `change` (so an upper bound on the
/// time from the kernel's notification).
fn follow(lab: &TunLab, vip: &str, mac: [u8; 6], change: impl FnOnce()) -> Duration {
    let want = Some(format_mac(&mac));
    let started = Instant::now();
    change();
    loop {
        let status = api_status(lab);
        if hop_macs(&status, vip).iter().all(|m| *m == want) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{vip} never moved to {want:?}: {status:#}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The median of three follow-up times, all printed.
fn median_of(what: &str, mut took: Vec<Duration>) -> Duration {
    took.sort();
    eprintln!("{what} followed in {took:?}");
    let median = took[took.len() / 2];
    assert!(median < FOLLOW, "{what}: followed in {took:?}, median more than {FOLLOW:?}");
    median
}

/// Tunnelled frames (IPIP and IP6IP6) leaving for `router_mac`, while
/// `n` connections to each VIP complete.
fn tunnelled_to(lab: &TunLab, capture_ns: &xlb_tests::netns::Netns, router_mac: [u8; 6], n: usize) -> usize {
    let tunnels = Capture::start(capture_ns, "lan1", "ip proto 4 or ip6 proto 41").unwrap();
    for addr in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
        let counts = lab.client.run(|| tcp_spread(SocketAddr::new(addr, 80), n)).unwrap();
        assert_eq!(counts.values().sum::<usize>(), n, "{addr}: every connection completes");
    }
    let frames = tunnels.stop().unwrap();
    frames.iter().filter(|f| f[..6] == router_mac).count()
}

#[test]
fn a_route_change_to_a_second_router_is_followed() {
    let lab = TunLab::new(2).unwrap();
    let r2 = lab.second_router().unwrap();
    let hosts: Vec<_> = lab.backends.iter().map(|b| (&b.ns, b.name.as_str())).collect();
    let _servers = servers::start_in(&hosts, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config(&lab)).unwrap();
    let (_, r1_mac) = lab.router.link("lan1").unwrap();
    let (_, r2_mac) = r2.link("lan1").unwrap();
    follow(&lab, "web4", r1_mac, || {});
    follow(&lab, "web6", r1_mac, || {});
    assert!(tunnelled_to(&lab, &lab.router, r1_mac, 20) >= 80, "through the first router");

    // The load balancer knows the second router's MAC already (as it would
    // a router it talks to): the new hop is complete at once. The routes
    // move to it, back, and to it again.
    lab.lb.exec("ping", &["-c1", "-W1", "10.1.0.253"]).unwrap();
    lab.lb.exec("ping", &["-6", "-c1", "-W1", "fd01::fd"]).unwrap();
    for (family, net, gateways, vip) in [
        ("-4", "10.2.0.0/24", ["10.1.0.253", "10.1.0.254"], "web4"),
        ("-6", "fd02::/64", ["fd01::fd", "fd01::fe"], "web6"),
    ] {
        let mut took = Vec::new();
        for (gateway, mac) in [(gateways[0], r2_mac), (gateways[1], r1_mac), (gateways[0], r2_mac)] {
            took.push(follow(&lab, vip, mac, || {
                lab.lb.ip(&format!("{family} route replace {net} via {gateway}")).unwrap();
            }));
        }
        median_of(&format!("{vip}: a route change to another router"), took);
    }

    let fib_before = fib_lookups(&daemon);
    let r1_frames = Capture::start(&lab.router, "lan1", "ip proto 4 or ip6 proto 41").unwrap();
    assert!(tunnelled_to(&lab, &r2, r2_mac, 20) >= 80, "through the second router");
    assert_eq!(r1_frames.stop().unwrap().len(), 0, "nothing tunnelled through the first any more");
    assert_eq!(fib_lookups(&daemon), fib_before, "no FIB lookup");
}

#[test]
fn a_next_hop_whose_mac_changes_is_followed() {
    let lab = TunLab::new(1).unwrap();
    let hosts: Vec<_> = lab.backends.iter().map(|b| (&b.ns, b.name.as_str())).collect();
    let _servers = servers::start_in(&hosts, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config(&lab)).unwrap();
    let (_, old) = lab.router.link("lan1").unwrap();
    follow(&lab, "web4", old, || {});
    follow(&lab, "web6", old, || {});

    // The router is replaced by one with another MAC, which announces
    // itself; the load balancer's kernel learns the new MAC. Three times.
    let macs = [[0x02, 0, 0, 0, 0xab, 1], [0x02, 0, 0, 0, 0xab, 2], [0x02, 0, 0, 0, 0xab, 3]];
    for (family, gateway, vip) in [("-4", "10.1.0.254", "web4"), ("-6", "fd01::fe", "web6")] {
        let mut took = Vec::new();
        for mac in macs {
            took.push(follow(&lab, vip, mac, || {
                let cmd = format!(
                    "{family} neigh replace {gateway} lladdr {} nud reachable dev {}",
                    format_mac(&mac),
                    lab.lb_if
                );
                lab.lb.ip(&cmd).unwrap();
            }));
        }
        median_of(&format!("{vip}: a new next-hop MAC"), took);
    }
    let new = macs[2];
    lab.router.ip(&format!("link set lan1 address {}", format_mac(&new))).unwrap();
    // Frames to an old MAC would reach no one.
    let fib_before = fib_lookups(&daemon);
    assert!(tunnelled_to(&lab, &lab.router, new, 10) >= 40, "to the router's new MAC");
    assert_eq!(fib_lookups(&daemon), fib_before, "no FIB lookup");
}

#[test]
fn a_backend_without_a_route_is_passed_as_no_route_until_one_appears() {
    let lab = TunLab::new(1).unwrap();
    let hosts: Vec<_> = lab.backends.iter().map(|b| (&b.ns, b.name.as_str())).collect();
    let _servers = servers::start_in(&hosts, 80, 53);
    // A backend on a subnet the load balancer has no route to.
    lab.backends[0].ns.ip("addr add 10.5.0.11/32 dev lo").unwrap();
    let config = format!(
        "interface = \"{}\"\n\n[[vip]]\nname = \"lost\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\nforward = \"tun\"\nbackends = [ {{ address = \"10.5.0.11\" }} ]\n",
        lab.lb_if
    );
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config).unwrap();
    assert_eq!(hop_macs(&api_status(&lab), "lost"), [None], "no next hop without a route");
    let (no_route, fib) = (packets(&daemon, Reason::PassNoRoute), fib_lookups(&daemon));
    let refused = lab.client.run(|| tcp_ask(SocketAddr::new(VIP4.into(), 80)));
    assert!(refused.is_err(), "no way to the backend: {refused:?}");
    assert!(packets(&daemon, Reason::PassNoRoute) > no_route, "counted as tun_no_route");
    assert!(fib_lookups(&daemon) > fib, "asked the FIB");

    // A route appears: followed, and the backend answers.
    let (_, r1_mac) = lab.router.link("lan1").unwrap();
    lab.router.ip("route add 10.5.0.0/24 via 10.2.0.11").unwrap();
    let took = follow(&lab, "lost", r1_mac, || {
        lab.lb.ip("route add 10.5.0.0/24 via 10.1.0.254").unwrap();
    });
    eprintln!("a new route followed in {took:?}");
    assert!(took < Duration::from_secs(1), "followed on the notification, not the backstop: {took:?}");
    let fib = fib_lookups(&daemon);
    assert_eq!(lab.client.run(|| tcp_ask(SocketAddr::new(VIP4.into(), 80))).unwrap(), "be1");
    assert_eq!(fib_lookups(&daemon), fib, "through the resolved hop");
}

#[test]
fn a_flushed_neighbour_table_does_not_hold_tunnelled_packets_up() {
    // The resolved next hop stays in force while the kernel re-learns the
    // neighbour; the first packet after the flush is not handed to the
    // kernel to wait for ARP.
    let lab = TunLab::new(1).unwrap();
    let hosts: Vec<_> = lab.backends.iter().map(|b| (&b.ns, b.name.as_str())).collect();
    let _servers = servers::start_in(&hosts, 80, 53);
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config(&lab)).unwrap();
    let (_, r1_mac) = lab.router.link("lan1").unwrap();
    for (addr, family, vip) in [(IpAddr::from(VIP4), "-4", "web4"), (IpAddr::from(VIP6), "-6", "web6")] {
        follow(&lab, vip, r1_mac, || {});
        // Warm every other cache on the way (client, router, backend).
        lab.client.run(|| tcp_ask(SocketAddr::new(addr, 80))).unwrap();
        lab.lb.ip(&format!("{family} neigh flush dev {}", lab.lb_if)).unwrap();
        let (no_neigh, fib, sent) = (
            packets(&daemon, Reason::PassNoNeigh),
            fib_lookups(&daemon),
            packets(&daemon, Reason::Forwarded),
        );
        let started = Instant::now();
        let answer = lab.client.run(|| tcp_ask(SocketAddr::new(addr, 80))).unwrap();
        let took = started.elapsed();
        assert_eq!(answer, "be1");
        assert!(packets(&daemon, Reason::Forwarded) > sent, "{addr}: the test's packets were counted");
        assert_eq!(packets(&daemon, Reason::PassNoNeigh), no_neigh, "{addr}: none handed to the kernel");
        assert_eq!(fib_lookups(&daemon), fib, "{addr}: no FIB lookup");
        assert!(took < Duration::from_millis(900), "{addr}: no SYN retransmission needed ({took:?})");
        assert_eq!(hop_macs(&api_status(&lab), vip), [Some(format_mac(&r1_mac))], "{addr}: the hop stays");
    }
}
