use lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_HOP, BACKEND_TUN, BackendInfo, VIP_PREVIOUS, VipInfo, VipKey,
    maps::{BACKENDS, VIPS},
};

use super::*;
use crate::{
    control::{
        desired::{DesiredBackend, NextHop},
        maglev,
    },
    dataplane::{MemoryMaps, MemoryStore},
    model::Protocol,
};

const G: Capacities = Capacities { table_size: 251, max_vips: 4, max_backends: 16, conntrack_size: 1024 };

fn mem() -> MemoryMaps {
    Maps::new(MemoryStore::default(), G)
}

fn addr(last: u8) -> VipAddr {
    VipAddr { ip: IpAddr::from([192, 0, 2, last]), port: 80, protocol: Protocol::Tcp }
}

fn vip(name: &str, last: u8, backends: &[(u8, u32)]) -> DesiredVip {
    DesiredVip {
        name: name.into(),
        addr: addr(last),
        forward: Forward::Dr,
        leave: Leave::Drain,
        failed: Vec::new(),
        hold: false,
        claim: Claim::Listed,
        second_chance: Duration::ZERO,
        backends: backends
            .iter()
            .map(|&(b, weight)| DesiredBackend {
                addr: IpAddr::from([10, 0, 0, b]),
                weight,
                mac: Some([2, 0, 0, 0, 0, b]),
                hop: None,
            })
            .collect(),
    }
}

/// Applies `vips` now, freeing removed backends at once.
fn apply(r: &mut Reconciler, vips: &[DesiredVip], maps: &mut MemoryMaps) -> Result<(), DataplaneError> {
    let desired = Desired { vips: vips.to_vec(), drain_timeout: Duration::ZERO };
    r.apply(&desired, Instant::now(), maps)
}

/// The backend addresses each live table entry points to, per VIP.
fn live(maps: &MemoryMaps) -> BTreeMap<VipAddr, Vec<IpAddr>> {
    maps.vips()
        .unwrap()
        .into_iter()
        .map(|decoded| {
            let (vip, entry) = decoded.unwrap();
            let table = maps.read_table(entry.id, entry.live).unwrap();
            let addrs = table.iter().map(|id| maps.backend(*id).unwrap().unwrap().addr).collect();
            (vip, addrs)
        })
        .collect()
}

fn expected(v: &DesiredVip) -> Vec<IpAddr> {
    let live: Vec<&DesiredBackend> = v.backends.iter().filter(|b| b.weight > 0).collect();
    let names: Vec<String> = live.iter().map(|b| b.addr.to_string()).collect();
    let entries: Vec<maglev::Entry<'_>> = live
        .iter()
        .zip(&names)
        .enumerate()
        .map(|(i, (b, n))| maglev::Entry { identity: n, id: i as BackendId + 1, weight: b.weight })
        .collect();
    maglev::build(&entries, G.table_size).iter().map(|id| live[*id as usize - 1].addr).collect()
}

fn backend<'m>(maps: &'m MemoryMaps, r: &Reconciler, v: &DesiredVip, last: u8) -> Option<&'m BackendInfo> {
    let state = r.vips()[&v.addr].backends.get(&IpAddr::from([10, 0, 0, last]))?;
    maps.store().backends.get(&state.id)
}

#[test]
fn tables_match_the_desired_backends_and_unchanged_input_writes_nothing() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    let want = [vip("a", 1, &[(1, 1), (2, 1), (3, 2)]), vip("b", 2, &[(4, 1)])];
    apply(&mut r, &want, &mut maps).unwrap();
    let tables = live(&maps);
    for v in &want {
        assert_eq!(tables[&v.addr], expected(v), "VIP {}", v.name);
    }
    let writes = maps.store().chunk_writes;
    apply(&mut r, &want, &mut maps).unwrap();
    assert_eq!(maps.store().chunk_writes, writes, "nothing changed, nothing written");
}

#[test]
fn a_change_goes_to_the_other_table_then_flips() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1), (3, 1)])], &mut maps).unwrap();
    let key = vip("a", 1, &[]).addr;
    let first = maps.store().vips[&VipKey::from(&key)];
    let changed = vip("a", 1, &[(1, 1), (2, 1), (3, 2)]);
    apply(&mut r, std::slice::from_ref(&changed), &mut maps).unwrap();
    let second = maps.store().vips[&VipKey::from(&key)];
    assert_eq!(first.id, second.id);
    assert_ne!(first.table, second.table, "the new table is the other one");
    assert_eq!(live(&maps)[&key], expected(&changed));
    // Back again: the first table is rewritten only where it differs.
    let before = maps.store().chunk_writes;
    apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1), (3, 1)])], &mut maps).unwrap();
    assert_eq!(maps.store().vips[&VipKey::from(&key)].table, first.table);
    assert!(
        maps.store().chunk_writes - before < crate::dataplane::maps::table_chunks(&G) as usize / 2,
        "diff, not a full rewrite"
    );
}

#[test]
fn a_failed_write_is_followed_by_a_full_resync() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    let unchanged = vip("b", 2, &[(4, 1)]);
    apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1)]), unchanged.clone()], &mut maps).unwrap();
    let want = [vip("a", 1, &[(1, 1), (3, 1)]), unchanged];
    maps.store_mut().fail_next_write = true;
    assert!(apply(&mut r, &want, &mut maps).is_err());
    // Meanwhile someone scribbles over the maps.
    maps.store_mut().chunks.values_mut().for_each(|c| *c = [0; 4]);
    maps.store_mut().backends.values_mut().for_each(|b| b.flags = 0);
    apply(&mut r, &want, &mut maps).unwrap();
    for v in &want {
        assert_eq!(live(&maps)[&v.addr], expected(v), "VIP {}", v.name);
    }
    assert_eq!(backend(&maps, &r, &want[0], 3).unwrap().flags, BACKEND_ACTIVE);
}

#[test]
fn only_a_vip_whose_table_inputs_changed_is_rebuilt() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    let (a, b) = (vip("a", 1, &[(1, 1), (2, 1)]), vip("b", 2, &[(3, 1), (4, 1)]));
    apply(&mut r, &[a.clone(), b.clone()], &mut maps).unwrap();
    // Spoil b's copy of its live table: a rebuild would differ from it
    // and rewrite b.
    let spoiled = vec![NO_BACKEND; G.table_size as usize];
    let state = r.vips.get_mut(&b.addr).unwrap();
    *state.table_mut(state.live) = Some(spoiled.clone());
    let b_entry = maps.store().vips[&VipKey::from(&b.addr)];

    let a2 = vip("a", 1, &[(1, 1), (2, 2)]);
    apply(&mut r, &[a2.clone(), b.clone()], &mut maps).unwrap();
    assert_eq!(live(&maps)[&a.addr], expected(&a2), "the changed VIP is rewritten");
    assert_eq!(r.vips()[&a.addr].generation, 2);
    assert_eq!(maps.store().vips[&VipKey::from(&b.addr)], b_entry, "the unchanged VIP keeps its table");
    assert_eq!(r.vips()[&b.addr].generation, 1);
    assert_eq!(r.vips()[&b.addr].live_table(), Some(&spoiled[..]), "and is not rebuilt");
    assert_eq!(r.vips()[&b.addr].backends.values().map(|s| s.slots).sum::<u32>(), G.table_size);

    // A new idle backend is no table input either; a weight is.
    let mut b2 = vip("b", 2, &[(3, 1), (4, 1), (5, 0)]);
    apply(&mut r, &[a2.clone(), b2.clone()], &mut maps).unwrap();
    assert_eq!(r.vips()[&b.addr].generation, 1);
    b2.backends[1].weight = 3;
    apply(&mut r, &[a2, b2.clone()], &mut maps).unwrap();
    assert_eq!(live(&maps)[&b.addr], expected(&b2));
    assert_eq!(r.vips()[&b.addr].generation, 2);
}

#[test]
fn an_adopted_table_is_compared_once_then_trusted() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 3)])], &mut maps).unwrap();
    // Pinned maps do not record weights: only a build shows that the
    // adopted table is not what the new weights give.
    let mut adopted = Reconciler::adopt(&maps).unwrap();
    let want = [vip("a", 1, &[(1, 1), (2, 1)])];
    apply(&mut adopted, &want, &mut maps).unwrap();
    assert_eq!(live(&maps)[&want[0].addr], expected(&want[0]));
    let writes = maps.store().chunk_writes;
    let mut adopted = Reconciler::adopt(&maps).unwrap();
    apply(&mut adopted, &want, &mut maps).unwrap();
    assert!(adopted.vips()[&want[0].addr].built_from.is_some(), "compared, found equal, trusted");
    apply(&mut adopted, &want, &mut maps).unwrap();
    assert_eq!(maps.store().chunk_writes, writes);
    assert_eq!(adopted.vips()[&want[0].addr].generation, 0);
}

#[test]
fn removed_vips_leave_the_maps_and_ids_are_reused_last() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    apply(&mut r, &[vip("a", 1, &[(1, 1)]), vip("b", 2, &[(2, 1)])], &mut maps).unwrap();
    let a_backend = r.vips()[&vip("a", 1, &[]).addr].backends.values().next().unwrap().id;
    apply(&mut r, &[vip("b", 2, &[(2, 1)])], &mut maps).unwrap();
    assert_eq!(maps.store().vips.len(), 1);
    assert_eq!(maps.store().backends[&a_backend].flags, 0, "its backend no longer takes flows");
    apply(&mut r, &[vip("b", 2, &[(2, 1)]), vip("c", 3, &[(5, 1)])], &mut maps).unwrap();
    let c_backend = r.vips()[&vip("c", 3, &[]).addr].backends.values().next().unwrap().id;
    assert_ne!(c_backend, a_backend, "a just-freed id is not handed out first");
    // A stray entry (not ours, not wanted) is removed too.
    maps.store_mut().vips.insert(VipKey::from(&addr(9)), VipInfo::default());
    apply(&mut r, &[vip("b", 2, &[(2, 1)])], &mut maps).unwrap();
    assert_eq!(maps.store().vips.keys().copied().collect::<Vec<_>>(), vec![VipKey::from(&addr(2))]);
}

#[test]
fn weight_zero_drains_and_removal_drains_until_the_timeout() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    let t0 = Instant::now();
    let timeout = Duration::from_secs(30);
    let at = |r: &mut Reconciler, maps: &mut MemoryMaps, vips: &[DesiredVip], t: Instant| {
        r.apply(&Desired { vips: vips.to_vec(), drain_timeout: timeout }, t, maps).unwrap()
    };
    let all = vip("a", 1, &[(1, 1), (2, 1), (3, 1)]);
    at(&mut r, &mut maps, std::slice::from_ref(&all), t0);

    let drained = vip("a", 1, &[(1, 1), (2, 0), (3, 1)]);
    at(&mut r, &mut maps, std::slice::from_ref(&drained), t0);
    assert_eq!(live(&maps)[&all.addr], expected(&drained), "weight 0: out of the table");
    assert_eq!(backend(&maps, &r, &all, 2).unwrap().flags, BACKEND_DRAINING);

    let removed = vip("a", 1, &[(1, 1), (2, 0)]);
    at(&mut r, &mut maps, std::slice::from_ref(&removed), t0);
    let gone = *backend(&maps, &r, &all, 3).unwrap();
    assert_eq!(gone.flags, BACKEND_DRAINING, "removed: draining");
    assert_eq!(r.next_deadline(), Some(t0 + timeout));

    at(&mut r, &mut maps, std::slice::from_ref(&removed), t0 + timeout);
    assert!(!r.vips()[&all.addr].backends.contains_key(&IpAddr::from([10, 0, 0, 3])));
    let id = maps
        .store()
        .backends
        .iter()
        .find(|(_, b)| b.generation == gone.generation)
        .map(|(id, _)| *id)
        .unwrap();
    assert_eq!(maps.store().backends[&id].flags, 0, "freed after the timeout");
    assert_eq!(r.next_deadline(), None);

    // Coming back before the timeout keeps id and generation (flows stay valid).
    at(&mut r, &mut maps, &[vip("a", 1, &[(1, 1)])], t0);
    let before = *backend(&maps, &r, &all, 2).unwrap();
    at(&mut r, &mut maps, &[vip("a", 1, &[(1, 1), (2, 1)])], t0 + Duration::from_secs(1));
    let after = *backend(&maps, &r, &all, 2).unwrap();
    assert_eq!((before.generation, after.flags), (after.generation, BACKEND_ACTIVE));
}

#[test]
fn a_reused_id_gets_a_new_generation() {
    let mut maps = mem();
    let mut r = Reconciler::new(Capacities { max_backends: 3, ..G });
    apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1)])], &mut maps).unwrap();
    let old: BTreeMap<BackendId, u32> =
        maps.store().backends.iter().map(|(id, b)| (*id, b.generation)).collect();
    apply(&mut r, &[vip("a", 1, &[])], &mut maps).unwrap();
    apply(&mut r, &[vip("a", 1, &[(3, 1), (4, 1)])], &mut maps).unwrap();
    assert_eq!(maps.store().backends.len(), 2, "the same two ids, reused");
    for (id, b) in &maps.store().backends {
        assert_ne!(Some(&b.generation), old.get(id), "id {id} reused with its old generation");
    }
}

#[test]
fn adopting_pinned_state_keeps_ids_generations_tables_and_drains() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    let want = [vip("a", 1, &[(1, 1), (2, 3), (3, 0)]), vip("b", 2, &[(4, 1)])];
    apply(&mut r, &want, &mut maps).unwrap();
    let vips: Vec<(u32, u32)> = maps.store().vips.values().map(|v| (v.id, v.table)).collect();
    let backends = maps.store().backends.clone();
    let writes = maps.store().chunk_writes;

    let mut adopted = Reconciler::adopt(&maps).unwrap();
    apply(&mut adopted, &want, &mut maps).unwrap();
    assert_eq!(maps.store().chunk_writes, writes, "restart with the same config writes no table");
    assert_eq!(maps.store().vips.values().map(|v| (v.id, v.table)).collect::<Vec<_>>(), vips);
    assert_eq!(maps.store().backends, backends, "same ids, generations and flags");
    assert_eq!(adopted.vips()[&want[0].addr].name, "a");
}

#[test]
fn beyond_capacity_is_left_out_and_said_the_rest_applies() {
    let mut maps = mem();
    let small = Capacities { max_vips: 1, max_backends: 3, ..G };
    let mut r = Reconciler::new(small);
    apply(&mut r, &[vip("a", 1, &[(1, 1)]), vip("b", 2, &[])], &mut maps).unwrap();
    assert_eq!(r.shortfalls().len(), 1);
    assert!(
        r.shortfalls()[0].to_string().contains("VIP b") && r.shortfalls()[0].to_string().contains("max_vips"),
        "{:?}",
        r.shortfalls()
    );
    assert_eq!(maps.store().vips.len(), 1, "VIP a applied all the same");
    let mut r = Reconciler::new(small);
    let mut maps = mem();
    apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1), (3, 1)])], &mut maps).unwrap();
    let text = r.shortfalls()[0].to_string();
    assert!(text.contains("10.0.0.3") && text.contains("max_backends"), "{text}");
    assert_eq!(r.vips()[&vip("a", 1, &[]).addr].backends.len(), 2);
}

#[test]
fn listed_backends_get_ids_before_a_discovery_source_that_lists_too_many() {
    let mut maps = mem();
    let mut r = Reconciler::new(Capacities { max_backends: 4, ..G });
    let discovered = |instances: &[(u8, u32)]| DesiredVip {
        claim: Claim::Discovered,
        leave: Leave::AtOnce,
        ..vip("d", 1, instances)
    };
    let left_out =
        |r: &Reconciler| -> Vec<String> { r.shortfalls().iter().map(ToString::to_string).collect() };
    // Three ids for five candidates; the source comes first in the list.
    let want = [discovered(&[(1, 1), (2, 1), (3, 1)]), vip("s", 2, &[(10, 1)])];
    apply(&mut r, &want, &mut maps).unwrap();
    assert_eq!(r.vips()[&want[1].addr].backends.len(), 1, "{:?}", left_out(&r));
    assert_eq!(r.shortfalls().len(), 1, "one instance waits: {:?}", left_out(&r));

    // A listed backend added by a reload waits too, then an instance
    // leaves: its id goes to the listed backend, not to the waiting one.
    let want = [discovered(&[(1, 1), (2, 1), (3, 1)]), vip("s", 2, &[(10, 1), (11, 1)])];
    apply(&mut r, &want, &mut maps).unwrap();
    assert_eq!(r.shortfalls().len(), 2);
    assert!(!r.could_place_more());
    let want = [discovered(&[(2, 1), (3, 1)]), vip("s", 2, &[(10, 1), (11, 1)])];
    apply(&mut r, &want, &mut maps).unwrap();
    assert!(r.could_place_more(), "the freed id is held for 10.0.0.11: {:?}", left_out(&r));
    apply(&mut r, &want, &mut maps).unwrap();
    assert_eq!(r.vips()[&want[1].addr].backends.len(), 2);
    assert_eq!(left_out(&r).len(), 1);
    assert!(left_out(&r)[0].contains("VIP d") && !r.could_place_more(), "{:?}", left_out(&r));
    assert_eq!(live(&maps)[&want[1].addr], expected(&want[1]));
}

#[test]
fn a_swap_with_every_id_in_use_completes_on_the_next_apply() {
    let mut maps = mem();
    let mut r = Reconciler::new(Capacities { max_backends: 3, ..G });
    apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1)])], &mut maps).unwrap();
    let swapped = [vip("a", 1, &[(1, 1), (3, 1)])];
    apply(&mut r, &swapped, &mut maps).unwrap();
    assert_eq!(r.shortfalls().len(), 1, "no id for 10.0.0.3 while 10.0.0.2 still has one");
    apply(&mut r, &swapped, &mut maps).unwrap();
    assert!(r.shortfalls().is_empty());
    assert_eq!(live(&maps)[&swapped[0].addr], expected(&swapped[0]));
}

#[test]
fn an_entry_already_in_the_table_changes_only_after_the_switch() {
    // A DR → TUN change rewrites backends' entries (no MAC needed); a
    // packet still on the old table must not see them early.
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    let dr = vip("a", 1, &[(1, 1)]);
    apply(&mut r, std::slice::from_ref(&dr), &mut maps).unwrap();
    maps.store_mut().log_writes = true;
    let mut tun = dr.clone();
    tun.forward = Forward::Tun;
    tun.backends[0].mac = Some([0; 6]);
    apply(&mut r, std::slice::from_ref(&tun), &mut maps).unwrap();
    let vip_at = maps.store().writes.iter().position(|w| *w == VIPS).unwrap();
    let backend_at = maps.store().writes.iter().position(|w| *w == BACKENDS).unwrap();
    assert!(vip_at < backend_at, "{:?}", maps.store().writes);
    // Established flows read the mode from the backend's entry.
    assert_eq!(backend(&maps, &r, &tun, 1).unwrap().flags, BACKEND_ACTIVE | BACKEND_TUN);

    // Back to DR: the MACs must be in place before packets see DR.
    maps.store_mut().writes.clear();
    apply(&mut r, std::slice::from_ref(&dr), &mut maps).unwrap();
    let vip_at = maps.store().writes.iter().position(|w| *w == VIPS).unwrap();
    let backend_at = maps.store().writes.iter().position(|w| *w == BACKENDS).unwrap();
    assert!(backend_at < vip_at, "{:?}", maps.store().writes);
    assert_eq!(backend(&maps, &r, &dr, 1).unwrap().flags, BACKEND_ACTIVE, "DR once packets see DR");
}

fn tun(v: &DesiredVip) -> DesiredVip {
    let mut t = v.clone();
    t.forward = Forward::Tun;
    t.backends.iter_mut().for_each(|b| b.mac = Some([0; 6]));
    t
}

#[test]
fn a_tun_backend_that_leaves_drains_without_its_next_hop() {
    // Nobody keeps a leaver's hop current: while it drains, its packets
    // ask the FIB.
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    let hop = Some(NextHop { mac: [2, 0xee, 0, 0, 0, 1], mtu: 1500 });
    let mut v = vip("a", 1, &[(1, 1), (2, 1)]);
    v.forward = Forward::Tun;
    v.backends.iter_mut().for_each(|b| (b.mac, b.hop) = (None, hop));
    let desired = |v: &DesiredVip| Desired { vips: vec![v.clone()], drain_timeout: Duration::from_secs(30) };
    r.apply(&desired(&v), Instant::now(), &mut maps).unwrap();
    for last in [1, 2] {
        assert_eq!(backend(&maps, &r, &v, last).unwrap().flags, BACKEND_ACTIVE | BACKEND_TUN | BACKEND_HOP);
    }
    let mut fewer = v.clone();
    fewer.backends.retain(|b| b.addr != IpAddr::from([10, 0, 0, 1]));
    r.apply(&desired(&fewer), Instant::now(), &mut maps).unwrap();
    let leaver = backend(&maps, &r, &v, 1).unwrap();
    assert_eq!(leaver.flags, BACKEND_DRAINING | BACKEND_TUN, "draining, no next hop");
    assert_eq!(backend(&maps, &r, &v, 2).unwrap().flags, BACKEND_ACTIVE | BACKEND_TUN | BACKEND_HOP);
}

#[test]
fn a_change_to_tun_after_a_failed_write_keeps_every_backend_forwarding() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    let dr = vip("a", 1, &[(1, 1), (2, 1)]);
    apply(&mut r, std::slice::from_ref(&dr), &mut maps).unwrap();
    maps.store_mut().fail_next_write = true;
    assert!(apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 2)])], &mut maps).is_err());
    maps.store_mut().log_writes = true;
    apply(&mut r, &[tun(&dr)], &mut maps).unwrap();
    // Every entry is rewritten (resync), each straight to TUN: none
    // stops taking flows on the way.
    assert_eq!(maps.store().backend_writes.len(), 2);
    assert!(maps.store().backend_writes.iter().all(|b| b.flags == BACKEND_ACTIVE | BACKEND_TUN));
}

#[test]
fn a_backend_leaving_a_tun_vip_that_turns_dr_stops_taking_flows() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    let both = tun(&vip("a", 1, &[(1, 1), (2, 1)]));
    let t0 = Instant::now();
    let drain = |vips: &[DesiredVip]| Desired { vips: vips.to_vec(), drain_timeout: Duration::from_secs(30) };
    r.apply(&drain(std::slice::from_ref(&both)), t0, &mut maps).unwrap();
    r.apply(&drain(&[tun(&vip("a", 1, &[(1, 1)]))]), t0, &mut maps).unwrap();
    assert_eq!(backend(&maps, &r, &both, 2).unwrap().flags, BACKEND_DRAINING | BACKEND_TUN);
    r.apply(&drain(&[vip("a", 1, &[(1, 1)])]), t0, &mut maps).unwrap();
    assert_eq!(backend(&maps, &r, &both, 2).unwrap().flags, 0, "no MAC to send its flows to in DR");
    assert_eq!(backend(&maps, &r, &both, 1).unwrap().flags, BACKEND_ACTIVE);
}

#[test]
fn a_removed_vip_frees_its_backends_before_its_entry_goes() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    apply(&mut r, &[vip("a", 1, &[(1, 1), (2, 1)])], &mut maps).unwrap();
    maps.store_mut().log_writes = true;
    apply(&mut r, &[], &mut maps).unwrap();
    assert_eq!(
        maps.store().writes,
        [BACKENDS, BACKENDS, VIPS, lb_common::maps::VIP_FILTER],
        "the filter bit last"
    );
    assert!(maps.store().vips.is_empty() && maps.store().backends.values().all(|b| b.flags == 0));
}

#[test]
fn pinned_backends_that_cannot_be_adopted_stop_taking_flows() {
    // Established flows reach a backend without a VIP lookup, so an
    // entry nobody adopts must not stay active.
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    let want = [vip("a", 1, &[(1, 1)])];
    apply(&mut r, &want, &mut maps).unwrap();
    let stray = BackendInfo { flags: BACKEND_ACTIVE, generation: 77, vip_id: 3, ..maps.store().backends[&1] };
    maps.store_mut().backends.insert(9, stray);
    let mut adopted = Reconciler::adopt(&maps).unwrap();
    apply(&mut adopted, &want, &mut maps).unwrap();
    assert_eq!(maps.store().backends[&9].flags, 0, "no VIP has id 3");
    assert_eq!(
        maps.store().backends[&9].generation,
        77,
        "its generation stays, so it is not handed out again"
    );
    assert_eq!(backend(&maps, &adopted, &want[0], 1).unwrap().flags, BACKEND_ACTIVE);
}

#[test]
fn unresolved_backends_stay_out_of_the_table() {
    let mut maps = mem();
    let mut r = Reconciler::new(G);
    let mut want = vip("a", 1, &[(1, 1), (2, 1)]);
    want.backends[1].mac = None;
    apply(&mut r, std::slice::from_ref(&want), &mut maps).unwrap();
    assert!(live(&maps)[&want.addr].iter().all(|a| *a == IpAddr::from([10, 0, 0, 1])));
    assert_eq!(backend(&maps, &r, &want, 2).unwrap().flags, 0);
    want.backends[1].mac = Some([2, 0, 0, 0, 0, 2]);
    apply(&mut r, std::slice::from_ref(&want), &mut maps).unwrap();
    assert_eq!(live(&maps)[&want.addr], expected(&want));
}

#[test]
fn nodes_with_other_histories_and_orders_build_the_same_tables() {
    // A fleet's nodes pick the same backend for a flow none of them has seen
    // only if their tables name the same backends slot by slot, whatever
    // ids each gave them.
    let want = [vip("a", 1, &[(1, 1), (2, 2), (3, 1)]), vip("b", 2, &[(4, 1), (5, 1)])];
    let (mut one, mut node_one) = (mem(), Reconciler::new(G));
    apply(&mut node_one, &want, &mut one).unwrap();

    let (mut two, mut node_two) = (mem(), Reconciler::new(G));
    apply(&mut node_two, &[vip("z", 3, &[(9, 1), (8, 1), (7, 1)]), vip("b", 2, &[(6, 1)])], &mut two)
        .unwrap();
    let mut reordered: Vec<DesiredVip> = want.iter().rev().cloned().collect();
    reordered.iter_mut().for_each(|v| v.backends.reverse());
    apply(&mut node_two, &reordered, &mut two).unwrap();

    assert_eq!(live(&one), live(&two), "the same backend in every slot");
    let ids =
        |r: &Reconciler| -> Vec<BackendId> { r.vips()[&addr(1)].backends.values().map(|b| b.id).collect() };
    assert_ne!(ids(&node_one), ids(&node_two), "though the ids differ");
}

#[test]
fn a_tun_vip_keeps_its_previous_table_for_the_window_and_forgets_it_before_rewriting_it() {
    let (mut maps, mut r) = (mem(), Reconciler::new(G));
    let window = Duration::from_secs(30);
    let t0 = Instant::now();
    let want = |backends: &[(u8, u32)]| DesiredVip { second_chance: window, ..tun(&vip("a", 1, backends)) };
    let dr = |backends: &[(u8, u32)]| DesiredVip { second_chance: window, ..vip("b", 2, backends) };
    let at = |r: &mut Reconciler, maps: &mut MemoryMaps, vips: Vec<DesiredVip>, when: Instant| {
        r.apply(&Desired { vips, drain_timeout: Duration::ZERO }, when, maps).unwrap();
    };
    let flags = |maps: &MemoryMaps, last: u8| maps.store().vips[&VipKey::from(&addr(last))].flags;
    // (live, other) table of VIP a.
    let tables = |maps: &MemoryMaps| {
        let info = maps.store().vips[&VipKey::from(&addr(1))];
        let (live, other) = if info.table.is_multiple_of(2) {
            (Side::First, Side::Second)
        } else {
            (Side::Second, Side::First)
        };
        (maps.read_table(info.id, live).unwrap(), maps.read_table(info.id, other).unwrap())
    };

    at(&mut r, &mut maps, vec![want(&[(1, 1), (2, 1)]), dr(&[(1, 1)])], t0);
    assert_eq!(flags(&maps, 1), 0, "nothing before the first table");
    let first = tables(&maps).0;
    at(&mut r, &mut maps, vec![want(&[(1, 1), (2, 1), (3, 1)]), dr(&[(1, 1), (2, 1)])], t0);
    assert_eq!((flags(&maps, 1), flags(&maps, 2)), (VIP_PREVIOUS, 0), "kept for TUN only");
    assert_eq!(tables(&maps).1, first, "the other slot holds the table before");
    assert_eq!(r.next_deadline(), Some(t0 + window));

    // The next switch stops packets reading the other slot before writing it.
    maps.store_mut().log_writes = true;
    at(&mut r, &mut maps, vec![want(&[(1, 1), (3, 1)]), dr(&[(1, 1), (2, 1)])], t0 + Duration::from_secs(1));
    let writes = &maps.store().writes;
    let first_chunk = writes.iter().position(|w| *w == lb_common::maps::MAGLEV).unwrap();
    assert_eq!(writes[0], VIPS, "forgotten first: {writes:?}");
    assert!(writes[first_chunk..].contains(&VIPS), "then switched: {writes:?}");
    assert_eq!(flags(&maps, 1), VIP_PREVIOUS);
    assert_eq!(r.next_deadline(), Some(t0 + Duration::from_secs(1) + window));

    // The window over, it is forgotten without a table write.
    maps.store_mut().writes.clear();
    at(&mut r, &mut maps, vec![want(&[(1, 1), (3, 1)]), dr(&[(1, 1), (2, 1)])], t0 + 2 * window);
    assert_eq!(flags(&maps, 1), 0);
    assert!(!maps.store().writes.contains(&lb_common::maps::MAGLEV), "{:?}", maps.store().writes);
    assert_eq!(r.next_deadline(), None);
}

#[test]
fn a_reload_that_shortens_or_ends_the_window_applies_and_a_held_vip_forgets_too() {
    let (mut maps, mut r) = (mem(), Reconciler::new(G));
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let want = |backends: &[(u8, u32)], window: u64| DesiredVip {
        second_chance: s(window),
        ..tun(&vip("a", 1, backends))
    };
    let at = |r: &mut Reconciler, maps: &mut MemoryMaps, v: DesiredVip, when: Instant| {
        r.apply(&Desired { vips: vec![v], drain_timeout: Duration::ZERO }, when, maps).unwrap();
    };
    let kept = |maps: &MemoryMaps| maps.store().vips[&VipKey::from(&addr(1))].flags == VIP_PREVIOUS;
    at(&mut r, &mut maps, want(&[(1, 1)], 30), t0);
    at(&mut r, &mut maps, want(&[(1, 1), (2, 1)], 30), t0);
    assert!(kept(&maps));
    at(&mut r, &mut maps, want(&[(1, 1), (2, 1)], 10), t0 + s(5));
    assert!(kept(&maps) && r.next_deadline() == Some(t0 + s(10)), "shortened to 10 s");
    at(&mut r, &mut maps, want(&[(1, 1), (2, 1)], 10), t0 + s(11));
    assert!(!kept(&maps), "over after 10 s");

    at(&mut r, &mut maps, want(&[(1, 1), (2, 1), (3, 1)], 30), t0 + s(12));
    assert!(kept(&maps));
    at(&mut r, &mut maps, want(&[(1, 1), (2, 1), (3, 1)], 0), t0 + s(13));
    assert!(!kept(&maps), "second_chance = 0 ends it at once");

    at(&mut r, &mut maps, want(&[(1, 1), (2, 1)], 30), t0 + s(14));
    assert!(kept(&maps));
    let held = DesiredVip { hold: true, ..want(&[], 30) };
    at(&mut r, &mut maps, held, t0 + s(45));
    assert!(!kept(&maps) && r.next_deadline().is_none(), "a held VIP's window ends too");
}
