//! The connection table through BPF_PROG_TEST_RUN: established flows stay
//! on their backend across table changes, SYNs choose afresh, draining
//! keeps flows, freed backends' flows rebalance, and the flood guard holds.
//! Needs root.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use lb_common::{ConnEntry, Event, FlowKey, PROTO_TCP, PROTO_UDP, Reason, conn_seal, flow_hash};
use xlb::{
    config::Capacities, control::desired::DesiredVip, dataplane::Counters as _, dataplane::loader::Params,
    model::Protocol,
};
use xlb_tests::{
    frames::*,
    plane::{Plane, XDP_DROP, XDP_PASS, XDP_TX, backend, backend_mac, dr_vip, flow_key, params},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

fn plane(conn_insert_limit: u64) -> Plane {
    let capacities = Capacities { table_size: 251, max_vips: 4, max_backends: 32, conntrack_size: 4096 };
    Plane::new(Params { conn_insert_limit, ..params(capacities) }).expect("load program xlb")
}

/// Backends 10.0.0.1..=n (MAC tag = last byte) with the given weights.
fn web(weights: &[(u8, u32)]) -> DesiredVip {
    let backends = weights.iter().map(|&(b, w)| backend(IpAddr::from([10, 0, 0, b]), w, b)).collect();
    dr_vip("web", VIP.into(), 80, Protocol::Tcp, backends)
}

fn tcp_frame(sport: u16, flags: u8) -> Vec<u8> {
    v4_frame(CLIENT, VIP, PROTO_TCP, &tcp(sport, 80, flags, b""))
}

/// The backend (MAC tag) a frame was sent to.
fn sent_to(plane: &Plane, frame: &[u8]) -> u8 {
    let out = plane.run(frame).unwrap();
    assert_eq!(out.action, XDP_TX, "forwarded");
    assert_eq!(out.frame[..5], backend_mac(0)[..5]);
    out.frame[5]
}

/// A source port whose SYN goes to `from` now and, once `later` is applied,
/// to `to`.
fn port_moving(from: u8, to: u8, now: &DesiredVip, later: &DesiredVip) -> u16 {
    let mut a = plane(0);
    a.apply(std::slice::from_ref(now)).unwrap();
    let mut b = plane(0);
    b.apply(std::slice::from_ref(later)).unwrap();
    (1024..u16::MAX)
        .find(|&p| sent_to(&a, &tcp_frame(p, TCP_SYN)) == from && sent_to(&b, &tcp_frame(p, TCP_SYN)) == to)
        .expect("some port moves")
}

#[test]
fn established_flows_stay_across_table_changes_and_syns_choose_afresh() {
    let before = web(&[(1, 1), (2, 1)]);
    let after = web(&[(1, 1), (2, 1), (3, 1)]);
    let port = port_moving(1, 3, &before, &after);
    let mut plane = plane(0);
    plane.apply(std::slice::from_ref(&before)).unwrap();
    assert_eq!(sent_to(&plane, &tcp_frame(port, TCP_SYN)), 1);

    plane.apply(std::slice::from_ref(&after)).unwrap();
    let hits = plane.event(Event::ConnHit).unwrap();
    for _ in 0..10 {
        assert_eq!(sent_to(&plane, &tcp_frame(port, TCP_ACK)), 1, "established flow stays");
    }
    assert_eq!(plane.event(Event::ConnHit).unwrap(), hits + 10);
    assert_eq!(sent_to(&plane, &tcp_frame(port, TCP_SYN)), 3, "a new connection follows the new table");
    assert_eq!(sent_to(&plane, &tcp_frame(port, TCP_ACK)), 3, "and is recorded there");
}

#[test]
fn udp_flows_are_recorded_too() {
    let before = web(&[(1, 1), (2, 1)]);
    let after = web(&[(1, 1), (2, 1), (3, 1)]);
    let udp_vip = |v: &DesiredVip| dr_vip("dns", VIP.into(), 53, Protocol::Udp, v.backends.clone());
    let frame = |p: u16| v4_frame(CLIENT, VIP, PROTO_UDP, &udp(p, 53, b"q"));
    let mut plane = plane(0);
    plane.apply(&[udp_vip(&before)]).unwrap();
    let first: Vec<u8> = (2000..2100).map(|p| sent_to(&plane, &frame(p))).collect();
    plane.apply(&[udp_vip(&after)]).unwrap();
    let again: Vec<u8> = (2000..2100).map(|p| sent_to(&plane, &frame(p))).collect();
    assert_eq!(first, again, "every UDP flow keeps its backend");
    assert!((3000..3100).any(|p| sent_to(&plane, &frame(p)) == 3), "new flows reach the new backend");
}

#[test]
fn draining_keeps_established_flows_and_takes_no_new_ones() {
    let mut plane = plane(0);
    plane.apply(&[web(&[(1, 1), (2, 1), (3, 1)])]).unwrap();
    let on_two: Vec<u16> = (1024..2024).filter(|&p| sent_to(&plane, &tcp_frame(p, TCP_SYN)) == 2).collect();
    assert!(on_two.len() > 200);

    plane.apply(&[web(&[(1, 1), (2, 0), (3, 1)])]).unwrap();
    for &p in &on_two {
        assert_eq!(sent_to(&plane, &tcp_frame(p, TCP_ACK)), 2, "port {p}: drained backend keeps its flow");
    }
    assert!((5000..6000).all(|p| sent_to(&plane, &tcp_frame(p, TCP_SYN)) != 2), "no new flow goes to it");
}

#[test]
fn a_removed_backend_drains_until_its_timeout_then_flows_rebalance() {
    let mut plane = plane(0);
    let t0 = Instant::now();
    let timeout = Duration::from_secs(30);
    plane.apply_at(&[web(&[(1, 1), (2, 1)])], timeout, t0).unwrap();
    let on_two: Vec<u16> = (1024..1224).filter(|&p| sent_to(&plane, &tcp_frame(p, TCP_SYN)) == 2).collect();

    plane.apply_at(&[web(&[(1, 1)])], timeout, t0).unwrap();
    assert!(on_two.iter().all(|&p| sent_to(&plane, &tcp_frame(p, TCP_ACK)) == 2), "still draining");

    plane.apply_at(&[web(&[(1, 1)])], timeout, t0 + timeout).unwrap();
    let rebalanced = plane.event(Event::ConnRebalanced).unwrap();
    assert!(on_two.iter().all(|&p| sent_to(&plane, &tcp_frame(p, TCP_ACK)) == 1), "moved to the survivor");
    assert_eq!(plane.event(Event::ConnRebalanced).unwrap(), rebalanced + on_two.len() as u64);
}

#[test]
fn an_established_flow_of_a_removed_vip_goes_to_the_host() {
    let mut plane = plane(0);
    plane.apply(&[web(&[(1, 1), (2, 1)])]).unwrap();
    sent_to(&plane, &tcp_frame(4000, TCP_SYN));
    assert_eq!(plane.counters.conntrack_entries(), 1);
    plane.apply(&[]).unwrap();
    let ack = tcp_frame(4000, TCP_ACK);
    let out = plane.run(&ack).unwrap();
    assert_eq!((out.action, out.frame), (XDP_PASS, ack), "its entry no longer leads to a backend");
    assert_eq!(plane.reason(Reason::PassNotVip).unwrap().packets, 1);
}

#[test]
fn a_table_entry_naming_another_vips_backend_is_neither_used_nor_recorded() {
    // As for a packet that read the table just before its id was freed and
    // given to a backend of another VIP.
    let mut plane = plane(0);
    let want = web(&[(1, 1)]);
    plane.apply(std::slice::from_ref(&want)).unwrap();
    let id = plane.reconciler.vips()[&want.addr].backends[&IpAddr::from([10, 0, 0, 1])].id;
    let mut entry = plane.maps.backend(id).unwrap().unwrap();
    entry.vip += 1;
    plane.maps.put_backend(id, &entry).unwrap();
    let out = plane.run(&tcp_frame(4100, TCP_SYN)).unwrap();
    assert_eq!(out.action, XDP_DROP);
    assert_eq!(plane.reason(Reason::DropNoBackend).unwrap().packets, 1);
    assert_eq!(plane.counters.conntrack_entries(), 0, "nothing recorded for the flow");
}

fn tcp_flow(sport: u16) -> FlowKey {
    flow_key(PROTO_TCP, CLIENT.into(), sport, VIP.into(), 80)
}

#[test]
fn a_record_caught_mid_write_reads_as_empty_and_only_a_whole_stale_one_counts_as_rebalanced() {
    let mut plane = plane(0);
    plane.apply(&[web(&[(1, 1), (2, 1), (3, 1)])]).unwrap();
    let table = plane.counters.conntrack();
    // A real record of backend `b` (from its SYN), and four flows that
    // Maglev sends elsewhere, given copies of that record.
    let b_port = 40_000;
    let b = sent_to(&plane, &tcp_frame(b_port, TCP_SYN));
    let record = table.get(&tcp_flow(b_port)).unwrap().expect("the SYN was recorded");
    let mut elsewhere = (b_port + 1..u16::MAX).filter(|&p| sent_to(&plane, &tcp_frame(p, TCP_SYN)) != b);
    let [sealed, torn, stale, syn] = [(); 4].map(|_| elsewhere.next().expect("Maglev spreads flows"));
    // SYNs above recorded these flows: start them afresh.
    table.clear().unwrap();
    let seal = |port, entry| conn_seal(flow_hash(&tcp_flow(port)), &entry);
    table.plant(&tcp_flow(sealed), record, seal(sealed, record)).unwrap();
    table.plant(&tcp_flow(torn), record, seal(torn, record) ^ 1).unwrap();
    let old = ConnEntry { generation: record.generation.wrapping_sub(1), ..record };
    table.plant(&tcp_flow(stale), old, seal(stale, old)).unwrap();

    let events = |plane: &Plane| {
        [Event::ConnHit, Event::ConnNew, Event::ConnRebalanced].map(|e| plane.event(e).unwrap())
    };
    let before = events(&plane);
    assert_eq!(sent_to(&plane, &tcp_frame(sealed, TCP_ACK)), b, "a whole record is followed");
    let after_sealed = events(&plane);
    assert_eq!(after_sealed, [before[0] + 1, before[1], before[2]], "hit, nothing chosen");

    let chosen = sent_to(&plane, &tcp_frame(torn, TCP_ACK));
    assert_ne!(chosen, b, "a slot whose seal does not match reads as empty: Maglev's choice");
    let after_torn = events(&plane);
    assert_eq!(after_torn, [after_sealed[0], after_sealed[1] + 1, after_sealed[2]], "chosen, not rebalanced");
    let rewritten = table.get(&tcp_flow(torn)).unwrap().expect("rewritten in place, sealed");
    assert_ne!(rewritten.backend_id, record.backend_id);
    assert_eq!(sent_to(&plane, &tcp_frame(torn, TCP_ACK)), chosen, "and followed from then on");

    // A SYN meeting a torn record: chosen afresh, the record made whole.
    table.plant(&tcp_flow(syn), record, seal(syn, record) ^ 1).unwrap();
    assert_ne!(sent_to(&plane, &tcp_frame(syn, TCP_SYN)), b);
    assert_eq!(events(&plane)[2], after_torn[2], "a SYN rebalances nothing");
    assert_ne!(table.get(&tcp_flow(syn)).unwrap().expect("sealed").backend_id, record.backend_id);
    let after_torn = events(&plane);

    assert_ne!(sent_to(&plane, &tcp_frame(stale, TCP_ACK)), b, "a record of a backend's old generation");
    let after_stale = events(&plane);
    assert_eq!(after_stale[1..], [after_torn[1] + 1, after_torn[2] + 1], "rebalanced");
    assert_eq!(table.entries().unwrap(), 4, "every flow in the one slot it had");
}

#[test]
fn every_new_table_draws_its_own_odd_seed() {
    let seeds: Vec<u32> = (0..3).map(|_| plane(0).maps.store().meta().unwrap().conntrack_seed).collect();
    assert!(seeds.iter().all(|s| s % 2 == 1), "{seeds:x?}");
    assert!(seeds[0] != seeds[1] && seeds[1] != seeds[2] && seeds[0] != seeds[2], "{seeds:x?}");
}

#[test]
fn the_flood_guard_stops_recording_new_flows_beyond_the_limit() {
    let mut plane = plane(5);
    plane.apply(&[web(&[(1, 1), (2, 1)])]).unwrap();
    for p in 1024..1044 {
        sent_to(&plane, &tcp_frame(p, TCP_SYN));
    }
    assert_eq!(plane.event(Event::ConnNew).unwrap(), 20, "every SYN still gets a backend");
    assert_eq!(plane.event(Event::ConnInsertSkipped).unwrap(), 15);
    assert_eq!(plane.counters.conntrack_entries(), 5, "established entries are not pushed out");
}

#[test]
fn a_full_table_replaces_flows_that_never_talked_before_those_that_do() {
    // 1024 slots: 256 sets of four, two sets per flow.
    let capacities = Capacities { table_size: 251, max_vips: 4, max_backends: 32, conntrack_size: 1024 };
    let mut plane = Plane::new(params(capacities)).expect("load program xlb");
    let before = web(&[(1, 1), (2, 1)]);
    plane.apply(std::slice::from_ref(&before)).unwrap();
    let talking: Vec<u16> = (1024..1040).collect();
    let owner: Vec<u8> = talking.iter().map(|&p| sent_to(&plane, &tcp_frame(p, TCP_SYN))).collect();
    talking.iter().for_each(|&p| {
        sent_to(&plane, &tcp_frame(p, TCP_ACK));
    });
    // A SYN flood four times the table's size, the talking flows going on
    // between its waves.
    for wave in 0..8u16 {
        for p in 0..512 {
            sent_to(&plane, &tcp_frame(10_000 + wave * 512 + p, TCP_SYN));
        }
        talking.iter().for_each(|&p| {
            sent_to(&plane, &tcp_frame(p, TCP_ACK));
        });
    }
    let evicted = plane.event(Event::ConnEvicted).unwrap();
    assert!(evicted >= 4096 - 1024, "the flood replaced records: {evicted} counted");
    assert_eq!(plane.counters.conntrack_entries(), 1024, "every slot holds a record");
    // A new table moves flows; the talking ones keep their recorded backend.
    plane.apply(&[web(&[(1, 1), (2, 1), (3, 1), (4, 1)])]).unwrap();
    let hits = plane.event(Event::ConnHit).unwrap();
    let now: Vec<u8> = talking.iter().map(|&p| sent_to(&plane, &tcp_frame(p, TCP_ACK))).collect();
    assert_eq!(now, owner, "no talking flow lost its record");
    assert_eq!(plane.event(Event::ConnHit).unwrap(), hits + talking.len() as u64);
}
