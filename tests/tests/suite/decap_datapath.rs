//! Program `xlb_decap` through BPF_PROG_TEST_RUN: what it strips, what it
//! leaves as it came, what it drops, and the counter each case moves.
//! Needs root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::PerCpuArray;
use lb_common::{
    DECAP_DONE, DECAP_NOT_OURS, DECAP_PASSED, DECAP_SECOND_CHANCE_FORWARDED, DECAP_SECOND_CHANCE_KEPT,
    DECAP_SECOND_CHANCE_NO_ROUTE, DECAP_UNTRUSTED, maps,
};
use xlb::dataplane::decap::{self, Accept};
use xlb_tests::{
    frames::*,
    plane::{Outcome, XDP_DROP, XDP_PASS, XDP_TX, outcome},
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const OTHER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const LB4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 5);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 2);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd02, 0, 0, 0, 0, 0, 0, 5);
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const DF: u16 = 0x4000;

struct Decap {
    ebpf: aya::Ebpf,
}

impl Decap {
    fn new() -> Decap {
        xlb_tests::require_root();
        // The IPv4 balancer by its address, the IPv6 ones by their prefix.
        let accept = Accept {
            vips: vec![IpAddr::V4(VIP4), IpAddr::V6(VIP6)],
            sources: vec!["10.1.0.2".parse().unwrap(), "fd01::/64".parse().unwrap()],
        };
        Decap { ebpf: decap::load_detached(&accept).expect("xlb_decap loads") }
    }

    fn run(&mut self, frame: &[u8]) -> Outcome {
        outcome(decap::program_mut(&mut self.ebpf), frame, 0).expect("test run")
    }

    /// (decapsulated, passed, not ours, untrusted), summed over CPUs.
    fn counters(&self) -> [u64; 4] {
        [DECAP_DONE, DECAP_PASSED, DECAP_NOT_OURS, DECAP_UNTRUSTED].map(|slot| self.count(slot))
    }

    fn count(&self, slot: u32) -> u64 {
        let stats: PerCpuArray<_, u64> =
            self.ebpf.map(maps::DECAP_STATS).expect("DECAP_STATS").try_into().expect("per-CPU array");
        stats.get(&slot, 0).expect("read").iter().sum()
    }
}

fn inner_v4(dst: Ipv4Addr) -> Vec<u8> {
    let l4 = tcp(40000, 80, TCP_SYN, b"hello");
    let mut p = ipv4(CLIENT4, dst, 6, &[], l4.len(), DF);
    p.extend(l4);
    p
}

fn inner_v6(dst: Ipv6Addr) -> Vec<u8> {
    let l4 = udp(40000, 53, b"query");
    let mut p = ipv6(CLIENT6, dst, 17, l4.len());
    p.extend(l4);
    p
}

/// `inner` from the balancer in an outer IPv4 header with flags+offset `frag`.
fn ipip(inner: &[u8], frag: u16) -> Vec<u8> {
    ipip_from(LB4, inner, frag)
}

fn ipip_from(src: Ipv4Addr, inner: &[u8], frag: u16) -> Vec<u8> {
    let mut f = eth(ETH_P_IP);
    f.extend(ipv4(src, BACKEND4, IPPROTO_IPIP, &[], inner.len(), frag));
    f.extend_from_slice(inner);
    f
}

fn ip6ip6(inner: &[u8]) -> Vec<u8> {
    ip6ip6_from(LB6, inner)
}

fn ip6ip6_from(src: Ipv6Addr, inner: &[u8]) -> Vec<u8> {
    let mut f = eth(ETH_P_IPV6);
    f.extend(ipv6(src, BACKEND6, IPPROTO_IPV6, inner.len()));
    f.extend_from_slice(inner);
    f
}

/// The frame the kernel should get: the same Ethernet header, then `inner`.
fn stripped(frame: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut f = frame[..14].to_vec();
    f.extend_from_slice(inner);
    f
}

#[test]
fn tunnelled_packets_for_a_vip_are_stripped_to_the_inner_packet() {
    let mut decap = Decap::new();
    let inner = inner_v4(VIP4);
    let frame = ipip(&inner, DF);
    assert_eq!(decap.run(&frame), Outcome { action: XDP_PASS, frame: stripped(&frame, &inner) });

    let inner = inner_v6(VIP6);
    let frame = ip6ip6(&inner);
    assert_eq!(decap.run(&frame), Outcome { action: XDP_PASS, frame: stripped(&frame, &inner) });
    assert_eq!(decap.counters(), [2, 0, 0, 0]);
}

#[test]
fn tunnels_to_a_vip_only_from_the_balancers_sources() {
    let mut decap = Decap::new();
    // Inside the trusted IPv6 prefix, not only its first address.
    let inner = inner_v6(VIP6);
    let frame = ip6ip6_from("fd01::99".parse().unwrap(), &inner);
    assert_eq!(decap.run(&frame), Outcome { action: XDP_PASS, frame: stripped(&frame, &inner) });
    let forged = [
        ("IPv4 neighbour of the balancer", ipip_from(Ipv4Addr::new(10, 1, 0, 3), &inner_v4(VIP4), DF)),
        ("IPv4 from the internet", ipip_from(CLIENT4, &inner_v4(VIP4), DF)),
        ("IPv6 outside the prefix", ip6ip6_from("fd01:0:0:1::2".parse().unwrap(), &inner_v6(VIP6))),
        // The family is part of the key: the IPv4 balancer's bytes as IPv6 are not it.
        ("IPv6 holding the IPv4 balancer's bytes", ip6ip6_from("a01:2::".parse().unwrap(), &inner_v6(VIP6))),
        ("IPv4-mapped balancer", ip6ip6_from("::ffff:10.1.0.2".parse().unwrap(), &inner_v6(VIP6))),
    ];
    for (name, frame) in &forged {
        assert_eq!(decap.run(frame).action, XDP_DROP, "{name}");
    }
    // Not for a VIP: the host's business (its own tunnels), passed.
    let other = ipip_from(CLIENT4, &inner_v4(OTHER4), DF);
    assert_eq!(decap.run(&other), Outcome { action: XDP_PASS, frame: other.clone() });
    assert_eq!(decap.counters(), [1, 0, 1, forged.len() as u64]);
}

#[test]
fn tunnels_to_other_addresses_are_left_as_they_came() {
    let mut decap = Decap::new();
    let frame = ipip(&inner_v4(OTHER4), DF);
    assert_eq!(decap.run(&frame), Outcome { action: XDP_PASS, frame: frame.clone() });
    assert_eq!(decap.counters(), [0, 0, 1, 0]);
}

#[test]
fn fragments_wrong_inner_versions_and_plain_traffic_pass_untouched() {
    let mut decap = Decap::new();
    let inner = inner_v4(VIP4);
    let mut inner_as_v6 = inner_v4(VIP4);
    inner_as_v6[0] = 0x65;
    let cases = [
        ("outer first fragment (MF)", ipip(&inner, 0x2000)),
        ("outer later fragment", ipip(&inner, 0x0003)),
        ("IPv4 outer, inner version 6", ipip(&inner_as_v6, DF)),
        ("IPv6 outer, inner IPv4", ip6ip6(&inner_v4(VIP4))),
        ("plain TCP to the VIP", v4_frame(CLIENT4, VIP4, 6, &tcp(40000, 80, TCP_SYN, b""))),
        ("truncated outer header", ipip(&inner, DF)[..30].to_vec()),
        ("ARP", eth(ETH_P_ARP).into_iter().chain([0; 28]).collect()),
    ];
    for (name, frame) in &cases {
        assert_eq!(decap.run(frame), Outcome { action: XDP_PASS, frame: frame.clone() }, "{name}");
    }
    assert_eq!(decap.counters(), [0, cases.len() as u64, 0, 0]);
}

const OTHER_BACKEND4: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 6);

/// A second-chance packet: to this backend, holding the tunnel to the
/// previous owner.
fn wrapped_twice(inner: &[u8]) -> Vec<u8> {
    let middle = &ipip_from_to(LB4, OTHER_BACKEND4, inner)[14..];
    ipip(middle, DF)
}

fn ipip_from_to(src: Ipv4Addr, dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let mut f = eth(ETH_P_IP);
    f.extend(ipv4(src, dst, IPPROTO_IPIP, &[], inner.len(), DF));
    f.extend_from_slice(inner);
    f
}

fn ack_v4() -> Vec<u8> {
    let l4 = tcp(40000, 80, TCP_ACK, b"data");
    let mut p = ipv4(CLIENT4, VIP4, 6, &[], l4.len(), DF);
    p.extend(l4);
    p
}

#[test]
fn a_second_chance_packet_is_passed_on_at_most_once() {
    // Run outside any lab the FIB knows no route out of "interface 0":
    // with no socket here, the packet is delivered here, stripped whole.
    let mut decap = Decap::new();
    let inner = ack_v4();
    let frame = wrapped_twice(&inner);
    assert_eq!(decap.run(&frame), Outcome { action: XDP_PASS, frame: stripped(&frame, &inner) });
    assert_eq!(decap.count(DECAP_SECOND_CHANCE_NO_ROUTE), 1);

    // A SYN stays where the current table sent it.
    let syn = inner_v4(VIP4);
    let frame = wrapped_twice(&syn);
    assert_eq!(decap.run(&frame), Outcome { action: XDP_PASS, frame: stripped(&frame, &syn) });
    assert_eq!(decap.count(DECAP_SECOND_CHANCE_KEPT), 1);

    // Wrapped three times is nobody's: a passed-on packet has one header
    // left, so it can never be passed on again.
    let thrice = wrapped_twice(&ipip_from_to(LB4, OTHER_BACKEND4, &inner)[14..]);
    assert_eq!(decap.run(&thrice), Outcome { action: XDP_PASS, frame: thrice.clone() });
    // From anyone but the balancer: dropped like any forged tunnel; and
    // a trusted outer header around someone else's inner one would make
    // this host a relay: dropped too.
    let middle = &ipip_from_to(LB4, OTHER_BACKEND4, &inner)[14..];
    assert_eq!(decap.run(&ipip_from(CLIENT4, middle, DF)).action, XDP_DROP);
    let relayed = &ipip_from_to(CLIENT4, OTHER_BACKEND4, &inner)[14..];
    assert_eq!(decap.run(&ipip(relayed, DF)).action, XDP_DROP);
    assert_eq!(decap.counters(), [0, 0, 1, 2]);
}

#[test]
fn a_second_chance_packet_goes_on_as_one_router_hop() {
    // In a namespace whose FIB routes 10.2.0.0/24 through a router with a
    // known MAC, out of the interface the packet came in on.
    let name = format!("xt{:06x}-dfib", xlb_tests::unique_id());
    let (ns, ifindex, mac) = xlb_tests::netns::Netns::fib(&name, &[]).unwrap();
    let mut decap = Decap::new();
    let inner = ack_v4();
    let frame = wrapped_twice(&inner);
    let out = ns.run(|| outcome(decap::program_mut(&mut decap.ebpf), &frame, ifindex)).unwrap();
    assert_eq!(out.action, XDP_TX);
    let mut middle = ipip_from_to(LB4, OTHER_BACKEND4, &inner)[14..34].to_vec();
    middle[8] -= 1;
    middle[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&middle).to_be_bytes();
    middle[10..12].copy_from_slice(&c);
    let mut expected = vec![0x02, 0, 0, 0, 0xfe, 0xfe];
    expected.extend(mac);
    expected.extend([0x08, 0x00]);
    expected.extend(&middle);
    expected.extend(&inner);
    assert_eq!(out.frame, expected, "the router's MAC, TTL one less, the checksum redone");
    assert_eq!(checksum(&out.frame[14..34]), 0);
    assert_eq!(decap.count(DECAP_SECOND_CHANCE_FORWARDED), 1);
}
