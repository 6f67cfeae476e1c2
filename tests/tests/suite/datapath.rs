//! Program `xlb` on crafted frames through BPF_PROG_TEST_RUN: frame in,
//! action, frame out and counters checked. Needs root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{FlowKey, PROTO_TCP, PROTO_UDP, Reason};
use xlb::{
    config::Capacities,
    control::desired::DesiredBackend,
    dataplane::{Counters as _, wire::addr_to_wire},
    model::{Protocol, VipAddr},
};
use xlb_tests::{
    frames::*,
    plane::{Outcome, Plane, XDP_DROP, XDP_PASS, XDP_TX, backend, dr_vip as vip, flow_key, params},
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const EMPTY_VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);

fn backends(addrs: &[IpAddr]) -> Vec<DesiredBackend> {
    addrs.iter().enumerate().map(|(i, a)| backend(*a, 1, i as u8 + 1)).collect()
}

fn plane() -> Plane {
    let capacities = Capacities { table_size: 65_537, max_vips: 8, max_backends: 64, conntrack_size: 4096 };
    let mut plane = Plane::new(params(capacities)).expect("load program xlb");
    let v4: Vec<IpAddr> = (11..14).map(|i| IpAddr::from([10, 0, 0, i])).collect();
    let v6: Vec<IpAddr> =
        (0x11..0x14).map(|i| IpAddr::from(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))).collect();
    plane
        .apply(&[
            vip("web4", VIP4.into(), 80, Protocol::Tcp, backends(&v4)),
            vip("dns4", VIP4.into(), 53, Protocol::Udp, backends(&v4)),
            vip("web6", VIP6.into(), 80, Protocol::Tcp, backends(&v6)),
            vip("empty", EMPTY_VIP4.into(), 80, Protocol::Tcp, vec![]),
        ])
        .expect("apply");
    plane
}

fn flow4(proto: u8, sport: u16, dst: Ipv4Addr, dport: u16) -> FlowKey {
    flow_key(proto, CLIENT4.into(), sport, dst.into(), dport)
}

fn flow6(proto: u8, sport: u16, dport: u16) -> FlowKey {
    flow_key(proto, CLIENT6.into(), sport, VIP6.into(), dport)
}

enum Expect {
    /// XDP_TX to the backend the control plane's table names for this flow.
    Forward(FlowKey),
    Verdict(u32, Reason),
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    expect: Expect,
}

fn tcp4(sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    v4_frame(CLIENT4, dst, PROTO_TCP, &tcp(sport, dport, TCP_SYN, b""))
}

fn cases() -> Vec<Case> {
    use Expect::*;
    let syn = tcp(40000, 80, TCP_SYN, b"");
    let mut with_options = eth(ETH_P_IP);
    with_options.extend(ipv4(
        CLIENT4,
        VIP4,
        PROTO_TCP,
        &[1, 1, 1, 0, 0x44, 4, 5, 0, 1, 1, 1, 1],
        syn.len(),
        0,
    ));
    with_options.extend_from_slice(&syn);
    let mut bad_ihl = tcp4(40001, VIP4, 80);
    bad_ihl[14] = 0x44;
    let mut long_total = tcp4(40002, VIP4, 80);
    long_total[16..18].copy_from_slice(&200u16.to_be_bytes());
    let mut first_fragment = eth(ETH_P_IP);
    first_fragment.extend(ipv4(CLIENT4, VIP4, PROTO_TCP, &[], syn.len(), 0x2000));
    first_fragment.extend_from_slice(&syn);
    let mut later_fragment = eth(ETH_P_IP);
    later_fragment.extend(ipv4(CLIENT4, VIP4, PROTO_TCP, &[], 8, 0x0003));
    later_fragment.extend_from_slice(&[0; 8]);
    let mut hop_by_hop = eth(ETH_P_IPV6);
    hop_by_hop.extend(ipv6(CLIENT6, VIP6, 0, 8 + syn.len()));
    hop_by_hop.extend_from_slice(&[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
    hop_by_hop.extend_from_slice(&syn);
    let mut arp = eth(ETH_P_ARP);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0; 20]);
    let mut truncated_tcp = tcp4(40003, VIP4, 80);
    truncated_tcp.truncate(14 + 20 + 10);
    truncated_tcp[16..18].copy_from_slice(&30u16.to_be_bytes());

    vec![
        Case {
            name: "ipv4 tcp syn to vip",
            frame: tcp4(40000, VIP4, 80),
            expect: Forward(flow4(PROTO_TCP, 40000, VIP4, 80)),
        },
        Case {
            name: "ipv4 tcp data to vip",
            frame: v4_frame(CLIENT4, VIP4, PROTO_TCP, &tcp(40100, 80, TCP_ACK, b"GET / HTTP/1.1\r\n\r\n")),
            expect: Forward(flow4(PROTO_TCP, 40100, VIP4, 80)),
        },
        Case {
            name: "ipv4 udp to vip",
            frame: v4_frame(CLIENT4, VIP4, PROTO_UDP, &udp(5000, 53, b"query")),
            expect: Forward(flow4(PROTO_UDP, 5000, VIP4, 53)),
        },
        Case {
            name: "ipv6 tcp to vip",
            frame: v6_frame(CLIENT6, VIP6, PROTO_TCP, &tcp(40200, 80, TCP_SYN, b"")),
            expect: Forward(flow6(PROTO_TCP, 40200, 80)),
        },
        Case {
            name: "802.1q tagged ipv4 tcp to vip",
            frame: vlan(tcp4(40300, VIP4, 80), 42),
            expect: Forward(flow4(PROTO_TCP, 40300, VIP4, 80)),
        },
        Case {
            name: "ipv4 with options (ihl 8) to vip",
            frame: with_options,
            expect: Forward(flow4(PROTO_TCP, 40000, VIP4, 80)),
        },
        Case {
            name: "vip address, other port",
            frame: tcp4(40400, VIP4, 81),
            expect: Verdict(XDP_PASS, Reason::PassNotVip),
        },
        Case {
            name: "udp to a tcp vip's port",
            frame: v4_frame(CLIENT4, VIP4, PROTO_UDP, &udp(5000, 80, b"x")),
            expect: Verdict(XDP_PASS, Reason::PassNotVip),
        },
        Case {
            name: "icmp echo to vip address",
            frame: v4_frame(CLIENT4, VIP4, 1, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]),
            expect: Verdict(XDP_PASS, Reason::PassNotVip),
        },
        Case {
            name: "tcp to another host",
            frame: tcp4(40500, Ipv4Addr::new(10, 0, 0, 2), 22),
            expect: Verdict(XDP_PASS, Reason::PassNotVip),
        },
        Case { name: "arp", frame: arp, expect: Verdict(XDP_PASS, Reason::PassNotIp) },
        Case {
            name: "lldp ethertype",
            frame: {
                let mut f = eth(0x88cc);
                f.extend_from_slice(&[0; 46]);
                f
            },
            expect: Verdict(XDP_PASS, Reason::PassNotIp),
        },
        Case { name: "ipv4 ihl below 5", frame: bad_ihl, expect: Verdict(XDP_DROP, Reason::DropMalformed) },
        Case {
            name: "ipv4 total length past the frame",
            frame: long_total,
            expect: Verdict(XDP_DROP, Reason::DropMalformed),
        },
        Case {
            name: "tcp header cut short",
            frame: truncated_tcp,
            expect: Verdict(XDP_DROP, Reason::DropMalformed),
        },
        Case {
            name: "ipv4 header cut short",
            frame: tcp4(40600, VIP4, 80)[..24].to_vec(),
            expect: Verdict(XDP_DROP, Reason::DropMalformed),
        },
        Case {
            name: "first fragment",
            frame: first_fragment,
            expect: Verdict(XDP_PASS, Reason::PassFragment),
        },
        Case {
            name: "later fragment",
            frame: later_fragment,
            expect: Verdict(XDP_PASS, Reason::PassFragment),
        },
        Case {
            name: "ipv6 hop-by-hop before tcp",
            frame: hop_by_hop,
            expect: Forward(flow6(PROTO_TCP, 40000, 80)),
        },
        Case {
            name: "vip without backends",
            frame: tcp4(40700, EMPTY_VIP4, 80),
            expect: Verdict(XDP_DROP, Reason::DropNoBackend),
        },
    ]
}

#[test]
fn frames_get_the_expected_action_output_and_counters() {
    let plane = plane();
    let mut failures = Vec::new();
    for case in cases() {
        let (reason, expected) = match &case.expect {
            Expect::Forward(flow) => {
                let mac =
                    plane.expected_backend(flow).expect("model has a backend for the flow").mac.expect("DR");
                let mut out = case.frame.clone();
                out[0..6].copy_from_slice(&mac);
                out[6..12].copy_from_slice(&LB_MAC);
                (Reason::Forwarded, Outcome { action: XDP_TX, frame: out })
            }
            Expect::Verdict(action, reason) => {
                (*reason, Outcome { action: *action, frame: case.frame.clone() })
            }
        };
        let before = plane.reason(reason).unwrap();
        let got = plane.run(&case.frame).unwrap();
        let after = plane.reason(reason).unwrap();
        if got != expected {
            failures.push(format!("{}: expected {expected:?}, got {got:?}", case.name));
        }
        if after.packets != before.packets + 1 || after.bytes != before.bytes + case.frame.len() as u64 {
            failures.push(format!(
                "{}: counter {} moved from {before:?} to {after:?}",
                case.name,
                reason.name()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn vip_and_backend_counters_follow_forwarded_packets() {
    let plane = plane();
    let vip_id = plane.reconciler.vips()[&VipAddr { ip: VIP4.into(), port: 80, protocol: Protocol::Tcp }].id;
    let mut per_backend = std::collections::BTreeMap::<u16, u64>::new();
    for sport in 1000..1300u16 {
        let frame = tcp4(sport, VIP4, 80);
        let id = plane.expected_backend(&flow4(PROTO_TCP, sport, VIP4, 80)).unwrap().id;
        *per_backend.entry(id).or_default() += 1;
        assert_eq!(plane.run(&frame).unwrap().action, XDP_TX);
    }
    let frame_len = tcp4(1, VIP4, 80).len() as u64;
    let vip = plane.counters.vip(vip_id).unwrap();
    assert_eq!((vip.packets, vip.bytes), (300, 300 * frame_len));
    assert_eq!(per_backend.len(), 3, "300 flows reach all three backends");
    for (id, n) in per_backend {
        let c = plane.counters.backend(id).unwrap();
        assert_eq!((c.packets, c.bytes), (n, n * frame_len), "backend id {id}");
    }
}

#[test]
fn a_changed_backend_set_takes_effect_at_once() {
    let mut plane = plane();
    let one = vec![DesiredBackend {
        addr: IpAddr::from([10, 0, 0, 99]),
        weight: 1,
        mac: Some([0x02, 0, 0, 0, 9, 9]),
        hop: None,
    }];
    plane.apply(&[vip("web4", VIP4.into(), 80, Protocol::Tcp, one)]).unwrap();
    for sport in 2000..2050u16 {
        let out = plane.run(&tcp4(sport, VIP4, 80)).unwrap();
        assert_eq!(out.action, XDP_TX);
        assert_eq!(out.frame[0..6], [0x02, 0, 0, 0, 9, 9]);
    }
    // The other VIPs were removed with the change.
    let out = plane.run(&v6_frame(CLIENT6, VIP6, PROTO_TCP, &tcp(1, 80, TCP_SYN, b""))).unwrap();
    assert_eq!(out.action, XDP_PASS);
}

/// The bits `addrs` set in the VIP filter.
fn filter_of(addrs: &[IpAddr]) -> Vec<u64> {
    let mut words = vec![0u64; lb_common::VIP_FILTER_WORDS as usize];
    for a in addrs {
        let (bytes, family) = addr_to_wire(*a);
        let bit = lb_common::vip_filter_bit(&bytes, family);
        words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    words
}

#[test]
fn the_vip_filter_holds_exactly_the_vip_addresses() {
    let mut plane = plane();
    let all = [VIP4.into(), VIP6.into(), EMPTY_VIP4.into()];
    assert_eq!(plane.maps.store().vip_filter().unwrap(), filter_of(&all));

    // web4 and dns4 share an address: the bit stays while one is left.
    let v4 = backends(&[IpAddr::from([10, 0, 0, 11])]);
    plane.apply(&[vip("dns4", VIP4.into(), 53, Protocol::Udp, v4.clone())]).unwrap();
    assert_eq!(plane.maps.store().vip_filter().unwrap(), filter_of(&[VIP4.into()]));
    assert_eq!(plane.run(&v4_frame(CLIENT4, VIP4, PROTO_UDP, &udp(1, 53, b"q"))).unwrap().action, XDP_TX);

    plane.apply(&[]).unwrap();
    assert!(plane.maps.store().vip_filter().unwrap().iter().all(|w| *w == 0));
    let before = plane.reason(Reason::PassNotVip).unwrap().packets;
    assert_eq!(plane.run(&tcp4(1, VIP4, 80)).unwrap().action, XDP_PASS);
    assert_eq!(plane.reason(Reason::PassNotVip).unwrap().packets, before + 1);
}
