//! TUN mode through BPF_PROG_TEST_RUN, run as if received on an interface
//! of a scratch namespace whose routes and neighbours the FIB lookup sees:
//! exact outer headers for IPv4-in-IPv4 and IPv6-in-IPv6, the fallbacks
//! (no neighbour, no route), the ICMP errors for too-big packets, and
//! established flows following a change of forwarding mode; then the same
//! with the next hop the daemon resolved in the backend entry, where the
//! FIB must not be asked.
//! Needs root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{Event, FlowKey, PROTO_TCP, Reason};
use xlb::{
    config::Capacities,
    control::desired::{DesiredBackend, DesiredVip, NextHop},
    dataplane::loader::Params,
    model::{Forward, Protocol},
};
use xlb_tests::{
    frames::*,
    netns::Netns,
    plane::{Outcome, Plane, XDP_DROP, XDP_PASS, XDP_TX, backend, backend_mac, dr_vip, flow_key, params},
    unique_id,
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const VIP4_NO_NEIGH: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const VIP4_NO_ROUTE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const LB4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 2);
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xfe, 0xfe];
const MTU: usize = 1500;

/// A namespace with interface t0 (10.1.0.2, fd01::2, MTU 1500, forwarding) and routes:
/// 10.2.0.0/24 and fd02::/64 via a router with a known MAC; 10.3.0.0/24 via
/// one whose MAC is unknown; nothing else.
struct FibNet {
    ns: Netns,
    ifindex: u32,
    mac: [u8; 6],
}

fn fib_net() -> FibNet {
    xlb_tests::require_root();
    let name = format!("xt{:06x}-fib", unique_id());
    let (ns, ifindex, mac) = Netns::fib(&name, &["route add 10.3.0.0/24 via 10.1.0.253"]).unwrap();
    FibNet { ns, ifindex, mac }
}

fn tun_vip(name: &str, vip: IpAddr, backends: &[IpAddr]) -> DesiredVip {
    let list = backends.iter().enumerate().map(|(i, a)| backend(*a, 1, i as u8 + 1)).collect();
    DesiredVip { forward: Forward::Tun, ..dr_vip(name, vip, 80, Protocol::Tcp, list) }
}

fn plane() -> Plane {
    let capacities = Capacities { table_size: 251, max_vips: 8, max_backends: 32, conntrack_size: 1024 };
    let mut plane =
        Plane::new(Params { tun_source_v4: LB4, tun_source_v6: LB6, ..params(capacities) }).unwrap();
    let v4 = |c: u8, d: u8| IpAddr::from([10, c, 0, d]);
    let v6 = |d: u16| IpAddr::from(Ipv6Addr::new(0xfd02, 0, 0, 0, 0, 0, 0, d));
    plane
        .apply(&[
            tun_vip("tun4", VIP4.into(), &[v4(2, 11), v4(2, 12)]),
            tun_vip("tun6", VIP6.into(), &[v6(0x11), v6(0x12)]),
            tun_vip("no-neigh", VIP4_NO_NEIGH.into(), &[v4(3, 11)]),
            tun_vip("no-route", VIP4_NO_ROUTE.into(), &[IpAddr::from([10, 9, 9, 9])]),
        ])
        .unwrap();
    plane
}

fn flow4(dst: Ipv4Addr, sport: u16) -> FlowKey {
    flow_key(PROTO_TCP, CLIENT4.into(), sport, dst.into(), 80)
}

/// An IPv4 TCP frame of exactly `ip_len` IP bytes, with DF as given.
fn tcp4(dst: Ipv4Addr, sport: u16, ip_len: usize, df: bool) -> Vec<u8> {
    let seg = tcp(sport, 80, TCP_ACK, &vec![0x61; ip_len - 40]);
    let mut f = eth(ETH_P_IP);
    f.extend(ipv4(CLIENT4, dst, PROTO_TCP, &[], seg.len(), if df { 0x4000 } else { 0 }));
    f.extend(seg);
    f
}

fn tcp6(sport: u16, ip_len: usize) -> Vec<u8> {
    v6_frame(CLIENT6, VIP6, PROTO_TCP, &tcp(sport, 80, TCP_ACK, &vec![0x62; ip_len - 60]))
}

fn backend_addr(plane: &Plane, flow: &FlowKey) -> IpAddr {
    plane.expected_backend(flow).unwrap().addr
}

/// The outer IPv4 header xlb must write, with the ID it chose.
fn outer4(dst: IpAddr, inner: &[u8], id: [u8; 2]) -> Vec<u8> {
    let IpAddr::V4(dst) = dst else { panic!("v4 backend") };
    let total = ((inner.len() + 20) as u16).to_be_bytes();
    let mut h = vec![0x45, inner[1], total[0], total[1], id[0], id[1], 0x40, 0, 64, 4, 0, 0];
    h.extend(LB4.octets());
    h.extend(dst.octets());
    let c = checksum(&h).to_be_bytes();
    h[10..12].copy_from_slice(&c);
    h
}

/// The checksum over the pseudo-header and the ICMPv6 message of a frame
/// whose IPv6 header starts at `l3` (0 when it verifies).
fn icmpv6_checksum(f: &[u8], l3: usize) -> u16 {
    let mut pseudo = f[l3 + 8..l3 + 40].to_vec();
    pseudo.extend(((f.len() - l3 - 40) as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, 58]);
    pseudo.extend(&f[l3 + 40..]);
    checksum(&pseudo)
}

fn run(net: &FibNet, plane: &Plane, frame: &[u8]) -> Outcome {
    net.ns.run(|| plane.run_on(frame, net.ifindex)).unwrap()
}

#[test]
fn established_flows_follow_a_change_of_forwarding_mode() {
    // They find their backend in the connection table without looking the
    // VIP up, so the backend's entry must carry the VIP's mode.
    let (net, mut plane) = (fib_net(), plane());
    let addrs = [IpAddr::from([10, 2, 0, 11]), IpAddr::from([10, 2, 0, 12])];
    let tun = tun_vip("tun4", VIP4.into(), &addrs);
    let dr = DesiredVip { forward: Forward::Dr, ..tun.clone() };
    let syn = v4_frame(CLIENT4, VIP4, PROTO_TCP, &tcp(41000, 80, TCP_SYN, b""));
    let ack = tcp4(VIP4, 41000, 100, true);
    let is_dr = |out: &Outcome, sent: &[u8]| {
        out.action == XDP_TX && out.frame.len() == sent.len() && out.frame[..5] == backend_mac(0)[..5]
    };
    let is_tun = |out: &Outcome, sent: &[u8]| {
        out.action == XDP_TX && out.frame.len() == sent.len() + 20 && out.frame[23] == 4
    };

    plane.apply(std::slice::from_ref(&dr)).unwrap();
    let first = run(&net, &plane, &syn);
    assert!(is_dr(&first, &syn), "{first:?}");
    let hits = plane.event(Event::ConnHit).unwrap();
    for (want, label) in [(&tun, "DR → TUN"), (&dr, "TUN → DR")] {
        plane.apply(std::slice::from_ref(want)).unwrap();
        let out = run(&net, &plane, &ack);
        let ok = if want.forward == Forward::Tun { is_tun(&out, &ack) } else { is_dr(&out, &ack) };
        assert!(ok, "{label}: {out:?}");
        if want.forward != Forward::Tun {
            assert_eq!(out.frame[5], first.frame[5], "{label}: the same backend throughout");
        }
    }
    assert_eq!(plane.event(Event::ConnHit).unwrap(), hits + 2, "both through the connection table");
}

#[test]
fn ipv4_in_ipv4_has_the_exact_outer_header_and_the_inner_packet_untouched() {
    let (net, plane) = (fib_net(), plane());
    for (sport, tagged) in [(40000, false), (40001, false), (40002, true)] {
        let plain = tcp4(VIP4, sport, 100, true);
        let frame = if tagged { vlan(plain.clone(), 7) } else { plain.clone() };
        let before = plane.reason(Reason::Forwarded).unwrap();
        let out = run(&net, &plane, &frame);
        assert_eq!(out.action, XDP_TX, "sport {sport}");
        let inner = &plain[14..];
        let mut expected = ROUTER_MAC.to_vec();
        expected.extend(net.mac);
        expected.extend([0x08, 0x00]);
        expected.extend(outer4(
            backend_addr(&plane, &flow4(VIP4, sport)),
            inner,
            [out.frame[18], out.frame[19]],
        ));
        expected.extend(inner);
        assert_eq!(out.frame, expected, "sport {sport}, tagged {tagged}");
        assert_eq!(checksum(&out.frame[14..34]), 0, "outer checksum verifies");
        assert_eq!(plane.reason(Reason::Forwarded).unwrap().packets, before.packets + 1);
    }
}

#[test]
fn a_mid_flow_packet_whose_owner_moved_carries_the_previous_owner_inside() {
    let (net, mut plane) = (fib_net(), plane());
    let window = std::time::Duration::from_secs(30);
    let v4 = |d: u8| IpAddr::from([10, 2, 0, d]);
    let vip =
        |backends: &[IpAddr]| DesiredVip { second_chance: window, ..tun_vip("tun4", VIP4.into(), backends) };
    let now = std::time::Instant::now();
    plane.apply_at(&[vip(&[v4(11), v4(12)])], window, now).unwrap();
    let ports: Vec<u16> = (42000..42100).collect();
    let before: Vec<IpAddr> = ports.iter().map(|&p| backend_addr(&plane, &flow4(VIP4, p))).collect();
    plane.apply_at(&[vip(&[v4(11), v4(12), v4(13)])], window, now).unwrap();

    let mut moved = 0;
    for (&sport, &old) in ports.iter().zip(&before) {
        let now_owner = backend_addr(&plane, &flow4(VIP4, sport));
        let plain = tcp4(VIP4, sport, 100, true);
        let inner = &plain[14..];
        // Twice: the first finds no record, the second the one it left.
        for _ in 0..2 {
            let out = run(&net, &plane, &plain);
            assert_eq!(out.action, XDP_TX, "sport {sport}");
            let id = [out.frame[18], out.frame[19]];
            let mut expected = ROUTER_MAC.to_vec();
            expected.extend(net.mac);
            expected.extend([0x08, 0x00]);
            if old == now_owner {
                expected.extend(outer4(now_owner, inner, id));
                expected.extend(inner);
            } else {
                // Inside: exactly what the previous owner would get.
                let mut middle = outer4(old, inner, id);
                middle.extend(inner);
                expected.extend(outer4(now_owner, &middle, id));
                expected.extend(middle);
            }
            assert_eq!(out.frame, expected, "sport {sport}: {old} then {now_owner}");
        }
        moved += usize::from(old != now_owner);
        // A SYN opens a connection where the current table says, alone.
        let syn = v4_frame(CLIENT4, VIP4, PROTO_TCP, &tcp(sport, 80, TCP_SYN, b""));
        let out = run(&net, &plane, &syn);
        assert_eq!(out.frame.len(), syn.len() + 20, "sport {sport}: a SYN is wrapped once");
    }
    // One that fits wrapped once but not twice goes wrapped once: a hint
    // is not worth lowering the client's path MTU.
    let (&sport, _) =
        ports.iter().zip(&before).find(|(p, old)| backend_addr(&plane, &flow4(VIP4, **p)) != **old).unwrap();
    let big = tcp4(VIP4, sport, MTU - 30, true);
    let out = run(&net, &plane, &big);
    assert_eq!((out.action, out.frame.len()), (XDP_TX, big.len() + 20), "sport {sport}: wrapped once");
    // A third backend takes about a third of the flows.
    assert!((15..=55).contains(&moved), "{moved} of 100 flows moved");
    assert_eq!(plane.event(Event::SecondChance).unwrap(), 2 * moved as u64);

    // Once the window is over the previous table is forgotten: a new
    // mid-flow packet goes to its owner alone.
    plane.apply_at(&[vip(&[v4(11), v4(12), v4(13)])], window, now + window).unwrap();
    for sport in 43000..43100 {
        let out = run(&net, &plane, &tcp4(VIP4, sport, 100, true));
        assert_eq!(out.frame.len(), 14 + 20 + 100, "sport {sport}: wrapped once");
    }
    assert_eq!(plane.event(Event::SecondChance).unwrap(), 2 * moved as u64);
}

#[test]
fn ipv6_in_ipv6_has_the_exact_outer_header_and_the_inner_packet_untouched() {
    let (net, plane) = (fib_net(), plane());
    let mut labels = std::collections::BTreeSet::new();
    for sport in 41000..41020 {
        let frame = tcp6(sport, 120);
        let out = run(&net, &plane, &frame);
        assert_eq!(out.action, XDP_TX);
        let flow = flow_key(PROTO_TCP, CLIENT6.into(), sport, VIP6.into(), 80);
        let IpAddr::V6(backend) = backend_addr(&plane, &flow) else { panic!("v6 backend") };
        let inner = &frame[14..];
        let got = &out.frame;
        assert_eq!(got[..6], ROUTER_MAC);
        assert_eq!(got[6..12], net.mac);
        assert_eq!(got[12..14], [0x86, 0xdd]);
        assert_eq!(got[14] >> 4, 6, "version");
        assert_eq!((got[14] & 0x0f, got[15] >> 4), (0, 0), "traffic class copied (0)");
        assert_eq!(got[18..20], (inner.len() as u16).to_be_bytes(), "payload length");
        assert_eq!((got[20], got[21]), (41, 64), "next header 41, hop limit 64");
        assert_eq!(got[22..38], LB6.octets());
        assert_eq!(got[38..54], backend.octets());
        assert_eq!(&got[54..], inner);
        labels.insert(u32::from_be_bytes([0, got[15] & 0x0f, got[16], got[17]]));
    }
    assert!(labels.len() > 10, "flow labels carry entropy: {labels:?}");
}

#[test]
fn a_next_hop_without_neighbour_passes_the_encapsulated_packet_to_the_kernel() {
    let (net, plane) = (fib_net(), plane());
    let frame = tcp4(VIP4_NO_NEIGH, 42000, 100, true);
    let before = plane.reason(Reason::PassNoNeigh).unwrap();
    let out = run(&net, &plane, &frame);
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(plane.reason(Reason::PassNoNeigh).unwrap().packets, before.packets + 1);
    assert_eq!(out.frame[..12], [LB_MAC, LB_MAC].concat(), "addressed to the host itself");
    assert_eq!(out.frame[14 + 9], 4, "encapsulated");
    assert_eq!(out.frame[14 + 16..14 + 20], [10, 3, 0, 11]);
    assert_eq!(&out.frame[34..], &frame[14..]);
}

#[test]
fn no_route_passes_the_original_packet() {
    let (net, plane) = (fib_net(), plane());
    let frame = tcp4(VIP4_NO_ROUTE, 43000, 100, true);
    let out = run(&net, &plane, &frame);
    assert_eq!(out, Outcome { action: XDP_PASS, frame: frame.clone() });
    assert_eq!(plane.reason(Reason::PassNoRoute).unwrap().packets, 1);
}

#[test]
fn too_big_once_encapsulated_gets_icmp_fragmentation_needed() {
    let (net, plane) = (fib_net(), plane());
    let fits = tcp4(VIP4, 44000, MTU - 20, true);
    assert_eq!(run(&net, &plane, &fits).action, XDP_TX, "exactly the MTU once wrapped");

    let frame = tcp4(VIP4, 44001, MTU - 19, true);
    let out = run(&net, &plane, &frame);
    assert_eq!(out.action, XDP_TX, "bounced to the client");
    assert_eq!(plane.reason(Reason::IcmpTooBig).unwrap().packets, 1);
    let f = &out.frame;
    assert_eq!(f.len(), 14 + 20 + 8 + 28);
    assert_eq!(f[..6], CLIENT_MAC);
    assert_eq!(f[6..12], LB_MAC);
    assert_eq!(f[12..14], [0x08, 0x00]);
    assert_eq!(f[14], 0x45);
    assert_eq!(f[16..18], 56u16.to_be_bytes());
    assert_eq!((f[22], f[23]), (64, 1), "TTL 64, protocol ICMP");
    assert_eq!(f[26..30], VIP4.octets(), "from the VIP");
    assert_eq!(f[30..34], CLIENT4.octets(), "to the client");
    assert_eq!(checksum(&f[14..34]), 0, "IP checksum verifies");
    assert_eq!((f[34], f[35]), (3, 4), "destination unreachable, fragmentation needed");
    assert_eq!(f[40..42], ((MTU - 20) as u16).to_be_bytes(), "next-hop MTU leaves room for the outer header");
    assert_eq!(f[42..70], frame[14..42], "quotes the IP header and 8 bytes");
    assert_eq!(checksum(&f[34..]), 0, "ICMP checksum verifies");

    // A tagged client gets its answer under the same tag.
    let tagged = vlan(tcp4(VIP4, 44003, MTU - 19, true), 7);
    let out = run(&net, &plane, &tagged);
    assert_eq!(out.action, XDP_TX, "bounced to the tagged client");
    let f = &out.frame;
    assert_eq!(f.len(), 18 + 20 + 8 + 28);
    assert_eq!(f[..12], [CLIENT_MAC, LB_MAC].concat());
    assert_eq!(f[12..18], [0x81, 0x00, 0, 7, 0x08, 0x00], "same tag, then IPv4");
    assert_eq!(f[30..38], [VIP4.octets(), CLIENT4.octets()].concat());
    assert_eq!(checksum(&f[18..38]), 0, "IP checksum verifies");
    assert_eq!((f[38], f[39]), (3, 4));
    assert_eq!(f[46..], tagged[18..46], "quotes the IP header and 8 bytes");
    assert_eq!(checksum(&f[38..]), 0, "ICMP checksum verifies");
    assert_eq!(plane.reason(Reason::IcmpTooBig).unwrap().packets, 2);

    let no_df = tcp4(VIP4, 44002, MTU - 19, false);
    let out = run(&net, &plane, &no_df);
    assert_eq!(out.action, XDP_DROP, "no ICMP for packets that allow fragmentation");
    assert_eq!(plane.reason(Reason::DropTooBig).unwrap().packets, 1);
}

#[test]
fn too_big_ipv6_gets_icmpv6_packet_too_big() {
    let (net, plane) = (fib_net(), plane());
    assert_eq!(run(&net, &plane, &tcp6(45000, MTU - 40)).action, XDP_TX);
    let frame = tcp6(45001, MTU - 39);
    let out = run(&net, &plane, &frame);
    assert_eq!(out.action, XDP_TX);
    let f = &out.frame;
    assert_eq!(f.len(), 14 + 40 + 8 + 48);
    assert_eq!(f[..6], CLIENT_MAC);
    assert_eq!(f[12..14], [0x86, 0xdd]);
    assert_eq!(f[18..20], 56u16.to_be_bytes());
    assert_eq!((f[20], f[21]), (58, 64));
    assert_eq!(f[22..38], VIP6.octets());
    assert_eq!(f[38..54], CLIENT6.octets());
    assert_eq!((f[54], f[55]), (2, 0), "packet too big");
    assert_eq!(f[58..62], ((MTU - 40) as u32).to_be_bytes());
    assert_eq!(f[62..], frame[14..62]);
    assert_eq!(icmpv6_checksum(f, 14), 0, "ICMPv6 checksum verifies");

    let tagged = vlan(tcp6(45002, MTU - 39), 9);
    let out = run(&net, &plane, &tagged);
    assert_eq!(out.action, XDP_TX, "bounced to the tagged client");
    let f = &out.frame;
    assert_eq!(f.len(), 18 + 40 + 8 + 48);
    assert_eq!(f[12..18], [0x81, 0x00, 0, 9, 0x86, 0xdd], "same tag, then IPv6");
    assert_eq!(f[26..58], [VIP6.octets(), CLIENT6.octets()].concat());
    assert_eq!((f[58], f[59]), (2, 0), "packet too big");
    assert_eq!(f[66..], tagged[18..66]);
    assert_eq!(icmpv6_checksum(f, 18), 0, "ICMPv6 checksum verifies");
}

/// A next hop the FIB does not know: frames sent to it prove the entry's
/// hop was used.
const CACHED_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xca, 0xfe];

/// TUN VIPs whose backends carry a resolved next hop of MTU `mtu`.
fn cached_plane(mtu: u16) -> Plane {
    let capacities = Capacities { table_size: 251, max_vips: 8, max_backends: 32, conntrack_size: 1024 };
    let mut plane =
        Plane::new(Params { tun_source_v4: LB4, tun_source_v6: LB6, ..params(capacities) }).unwrap();
    let hop = Some(NextHop { mac: CACHED_MAC, mtu });
    let vip = |name: &str, vip: IpAddr, backends: &[IpAddr]| {
        let list = backends.iter().map(|a| DesiredBackend { addr: *a, weight: 1, mac: None, hop }).collect();
        DesiredVip { forward: Forward::Tun, ..dr_vip(name, vip, 80, Protocol::Tcp, list) }
    };
    let v6 = |d: u16| IpAddr::from(Ipv6Addr::new(0xfd02, 0, 0, 0, 0, 0, 0, d));
    plane
        .apply(&[
            vip("tun4", VIP4.into(), &[IpAddr::from([10, 2, 0, 11]), IpAddr::from([10, 2, 0, 12])]),
            vip("tun6", VIP6.into(), &[v6(0x11), v6(0x12)]),
            // No route in the namespace: only the entry knows the way.
            vip("no-route", VIP4_NO_ROUTE.into(), &[IpAddr::from([10, 9, 9, 9])]),
        ])
        .unwrap();
    plane
}

#[test]
fn a_resolved_next_hop_is_used_without_asking_the_fib() {
    let (net, plane) = (fib_net(), cached_plane(MTU as u16));
    for (dst, sport) in [(VIP4, 46000), (VIP4, 46001), (VIP4_NO_ROUTE, 46002)] {
        let frame = tcp4(dst, sport, 100, true);
        let out = run(&net, &plane, &frame);
        assert_eq!(out.action, XDP_TX, "{dst} sport {sport}");
        let inner = &frame[14..];
        let mut expected = CACHED_MAC.to_vec();
        expected.extend(LB_MAC);
        expected.extend([0x08, 0x00]);
        expected.extend(outer4(
            backend_addr(&plane, &flow4(dst, sport)),
            inner,
            [out.frame[18], out.frame[19]],
        ));
        expected.extend(inner);
        assert_eq!(out.frame, expected, "{dst} sport {sport}: to the cached MAC from the interface's");
    }
    let out = run(&net, &plane, &tcp6(46003, 120));
    assert_eq!(out.action, XDP_TX);
    assert_eq!(out.frame[..12], [CACHED_MAC, LB_MAC].concat());
    assert_eq!(out.frame[12..14], [0x86, 0xdd]);
    assert_eq!(plane.event(Event::TunFibLookup).unwrap(), 0, "the FIB was never asked");
    assert_eq!(plane.reason(Reason::Forwarded).unwrap().packets, 4);

    // Without a resolved hop every TUN packet is a FIB lookup, counted.
    let plain = plane_for_fib(&net);
    assert_eq!(plain.event(Event::TunFibLookup).unwrap(), 2);
}

/// The FIB-backed plane after two packets, one forwarded and one without
/// a route.
fn plane_for_fib(net: &FibNet) -> Plane {
    let plane = plane();
    assert_eq!(run(net, &plane, &tcp4(VIP4, 46100, 100, true)).action, XDP_TX);
    assert_eq!(run(net, &plane, &tcp4(VIP4_NO_ROUTE, 46101, 100, true)).action, XDP_PASS);
    plane
}

#[test]
fn a_resolved_path_mtu_bounds_the_outer_packet() {
    // Smaller than the interface's 1500, as a route's mtu would make it.
    let (net, plane) = (fib_net(), cached_plane(1400));
    assert_eq!(run(&net, &plane, &tcp4(VIP4, 47000, 1380, true)).action, XDP_TX, "exactly 1400 once wrapped");
    let frame = tcp4(VIP4, 47001, 1381, true);
    let out = run(&net, &plane, &frame);
    assert_eq!(out.action, XDP_TX, "bounced to the client");
    assert_eq!(out.frame[..6], CLIENT_MAC);
    assert_eq!((out.frame[34], out.frame[35]), (3, 4), "fragmentation needed");
    assert_eq!(out.frame[40..42], 1380u16.to_be_bytes(), "the hop's MTU less the outer header");
    assert_eq!(checksum(&out.frame[34..]), 0, "ICMP checksum verifies");

    assert_eq!(run(&net, &plane, &tcp6(47002, 1360)).action, XDP_TX);
    let out = run(&net, &plane, &tcp6(47003, 1361));
    assert_eq!(out.action, XDP_TX);
    assert_eq!((out.frame[54], out.frame[55]), (2, 0), "packet too big");
    assert_eq!(out.frame[58..62], 1360u32.to_be_bytes());
    assert_eq!(icmpv6_checksum(&out.frame, 14), 0, "ICMPv6 checksum verifies");

    assert_eq!(
        run(&net, &plane, &tcp4(VIP4, 47004, 1381, false)).action,
        XDP_DROP,
        "DF clear: dropped, counted"
    );
    assert_eq!(plane.reason(Reason::IcmpTooBig).unwrap().packets, 2);
    assert_eq!(plane.reason(Reason::DropTooBig).unwrap().packets, 1);
    assert_eq!(plane.event(Event::TunFibLookup).unwrap(), 0);
}
