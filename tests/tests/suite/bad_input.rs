//! Malformed and unusual frames through BPF_PROG_TEST_RUN: each gets its
//! expected action and is counted under its reason, and nothing for a VIP
//! is misforwarded. Also ICMP errors about a VIP's connection, which go to
//! the backend that owns the connection. Needs root.

use std::net::{IpAddr, Ipv6Addr};

use lb_common::{Event, PROTO_TCP, Reason};
use xlb::{config::Capacities, model::Protocol};
use xlb_tests::{
    frames::*,
    malformed::{self, CLIENT4, CLIENT6, VIP4, VIP6, frag_needed, packet_too_big, tcp4, tcp6, udp4},
    plane::{Plane, XDP_DROP, XDP_TX, backend, dr_vip, params},
};

fn plane() -> Plane {
    let capacities = Capacities { table_size: 251, max_vips: 8, max_backends: 32, conntrack_size: 1024 };
    let mut plane = Plane::new(params(capacities)).unwrap();
    let v4: Vec<_> = (1..4).map(|i| backend(IpAddr::from([10, 0, 0, i]), 1, i)).collect();
    let v6: Vec<_> =
        (1..4).map(|i| backend(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16).into(), 1, i)).collect();
    plane
        .apply(&[
            dr_vip("tcp4", VIP4.into(), 80, Protocol::Tcp, v4.clone()),
            dr_vip("udp4", VIP4.into(), 53, Protocol::Udp, v4),
            dr_vip("tcp6", VIP6.into(), 80, Protocol::Tcp, v6),
        ])
        .unwrap();
    plane
}

/// Runs `frame`; checks the action and that exactly `reason` moved by one.
fn expect(plane: &Plane, name: &str, frame: &[u8], action: u32, reason: Reason, failures: &mut Vec<String>) {
    let before: Vec<_> = Reason::ALL.iter().map(|r| plane.reason(*r).unwrap().packets).collect();
    let out = match plane.run(frame) {
        Ok(out) => out,
        Err(e) => return failures.push(format!("{name}: test run failed: {e}")),
    };
    if out.action != action {
        failures.push(format!("{name}: action {} instead of {action}", out.action));
    }
    for (i, r) in Reason::ALL.iter().enumerate() {
        let moved = plane.reason(*r).unwrap().packets - before[i];
        let want = u64::from(*r == reason);
        if moved != want {
            failures.push(format!("{name}: {} moved by {moved}, expected {want}", r.name()));
        }
    }
    if action != XDP_TX && out.frame != frame {
        failures.push(format!("{name}: a frame that was not forwarded came out changed"));
    }
}

#[test]
fn frames_truncated_at_every_offset_are_dropped_as_malformed() {
    let plane = plane();
    let mut failures = Vec::new();
    for (kind, full) in [
        ("tcp4", tcp4(1000)),
        ("tcp6", tcp6(1001)),
        ("udp4", udp4(1002, b"q")),
        ("vlan tcp4", vlan(tcp4(1003), 5)),
    ] {
        // The kernel runs XDP test frames of at least an Ethernet header.
        for cut in 14..full.len() {
            let name = format!("{kind} cut at {cut} of {}", full.len());
            expect(&plane, &name, &full[..cut], XDP_DROP, Reason::DropMalformed, &mut failures);
        }
        let name = format!("{kind} whole");
        expect(&plane, &name, &full, XDP_TX, Reason::Forwarded, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn malformed_and_unusual_headers_get_their_reasons() {
    let plane = plane();
    let mut failures = Vec::new();
    for case in malformed::cases() {
        expect(&plane, case.name, &case.frame, case.action, case.reason, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn icmp_too_big_reaches_the_backend_that_owns_the_connection() {
    let plane = plane();
    for cport in 4000..4050u16 {
        // The connection, as the client opened it.
        let conn = plane.run(&v4_frame(CLIENT4, VIP4, PROTO_TCP, &tcp(cport, 80, TCP_SYN, b""))).unwrap();
        let icmp = plane.run(&frag_needed(cport, 28)).unwrap();
        assert_eq!(icmp.action, XDP_TX);
        assert_eq!(icmp.frame[..6], conn.frame[..6], "port {cport}: same backend as the connection");

        let conn6 = plane.run(&v6_frame(CLIENT6, VIP6, PROTO_TCP, &tcp(cport, 80, TCP_SYN, b""))).unwrap();
        let ptb = plane.run(&packet_too_big(cport)).unwrap();
        assert_eq!(ptb.action, XDP_TX);
        assert_eq!(ptb.frame[..6], conn6.frame[..6], "port {cport}: same IPv6 backend");
    }
    assert_eq!(plane.event(Event::IcmpSteered).unwrap(), 100);
    assert_eq!(plane.event(Event::ConnNew).unwrap(), 100, "ICMP errors record no flows");
}
