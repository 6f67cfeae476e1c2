//! One VIP's part of an apply: who is leaving, weights and MACs taken in,
//! the backends' entries and the new table written around the switch.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use tracing::{info, warn};

use super::{BackendState, IdPool, Kept, MaglevInput, Role, VipState};
use crate::{
    config::Capacities,
    control::{
        desired::{DesiredBackend, DesiredVip},
        maglev,
    },
    dataplane::{BackendEntry, BackendId, DataplaneError, Maps, Previous, Store, VipEntry, VipId},
    model::{Forward, format_mac},
};

/// Marks backends of `vip` that `want` no longer lists as leaving: after
/// `drain_timeout`, or at once for those that failed their health check.
pub(super) fn mark_leavers(vip: &mut VipState, want: &DesiredVip, now: Instant, drain_timeout: Duration) {
    let wanted: BTreeSet<IpAddr> = want.backends.iter().map(|b| b.addr).collect();
    for (addr, state) in vip.backends.iter_mut() {
        if !wanted.contains(addr) && !matches!(state.role, Role::Leaving { .. }) {
            let drain = if want.failed.contains(addr) { Duration::ZERO } else { drain_timeout };
            if want.failed.contains(addr) {
                info!(vip = %vip.name, backend = %addr, "backend failed its health check: removed");
            } else if drain.is_zero() {
                info!(vip = %vip.name, backend = %addr, "backend removed");
            } else {
                info!(vip = %vip.name, backend = %addr, timeout = ?drain, "backend removed; draining");
            }
            state.role = Role::Leaving { until: now + drain };
            // No longer resolved: a cached hop could go stale during the
            // drain, the FIB cannot.
            state.hop = None;
        }
    }
}

/// Takes in a wanted backend's weight, MAC and next hop, and the role
/// they give it under a VIP forwarding by `forward`.
pub(super) fn update_backend(vip: &str, forward: Forward, want: &DesiredBackend, state: &mut BackendState) {
    let (addr, weight, mac) = (want.addr, want.weight, want.mac);
    if state.weight != weight {
        if state.weight_known {
            info!(vip = %vip, backend = %addr, from = state.weight, to = weight, "backend weight changed");
        }
        state.weight = weight;
    }
    state.weight_known = true;
    if state.mac != mac {
        match mac {
            _ if forward == Forward::Tun => {}
            Some(mac) => info!(vip = %vip, backend = %addr, mac = %format_mac(&mac), "backend MAC resolved"),
            None => {
                warn!(vip = %vip, backend = %addr, "backend MAC unresolved: out of the table until it resolves")
            }
        }
        state.mac = mac;
    }
    if state.hop != want.hop {
        match want.hop {
            Some(hop) => info!(
                vip = %vip,
                backend = %addr,
                mac = %format_mac(&hop.mac),
                mtu = hop.mtu,
                "backend next hop resolved"
            ),
            None if forward == Forward::Tun => {
                info!(vip = %vip, backend = %addr, "backend next hop unknown: packets ask the kernel's FIB")
            }
            None => {}
        }
        state.hop = want.hop;
    }
    let addressed = forward == Forward::Tun || mac.is_some();
    let role = if weight > 0 && addressed { Role::Active } else { Role::Idle };
    if role != state.role {
        if matches!(state.role, Role::Leaving { .. }) {
            info!(vip = %vip, backend = %addr, "backend back before its drain ended");
        } else if state.role == Role::Active && weight == 0 {
            info!(vip = %vip, backend = %addr, "backend draining (weight 0)");
        }
        state.role = role;
    }
}

/// Writes the backends' entries and, if its inputs changed, the VIP's new
/// table, then switches to it.
///
/// Backends joining the table are written before a table names them;
/// those already in it only after the switch, so a change of use (say,
/// draining) comes with the table that drops them. Each entry carries its
/// mode and the MAC that mode needs, so it is consistent on its own
/// whichever side of the switch it is written. While the VIP is TUN every
/// entry goes first all the same: on a change to DR the backends turn DR
/// (with their MACs) no later than the table.
pub(super) fn switch_table(
    vip: &mut VipState,
    want: &DesiredVip,
    now: Instant,
    caps: Capacities,
    maps: &mut Maps<impl Store>,
) -> Result<(), DataplaneError> {
    let forward = want.forward;
    let was_tun = vip.forward == Forward::Tun;
    for (addr, state) in vip.backends.iter_mut() {
        if state.role == Role::Active && (state.slots == 0 || state.written.is_none() || was_tun) {
            write_backend(maps, (vip.id, forward), *addr, state)?;
        }
    }
    let inputs: Vec<MaglevInput> = vip
        .backends
        .iter()
        .filter(|(_, b)| b.role == Role::Active)
        .map(|(a, b)| (*a, b.id, b.weight))
        .collect();
    let live = vip.live_table();
    // Building dominates an apply: skip it when the live table was built
    // from these very inputs. Its slot counts then stand too (a backend
    // new to the VIP has an id from the pool, which no table names).
    let known = live.is_some() && vip.built_from.as_ref() == Some(&inputs);
    if !known || vip.forward != forward {
        let table = match live {
            Some(live) if known => live.to_vec(),
            _ => build_table(&inputs, caps.table_size),
        };
        if vip.forward != forward || live != Some(&table[..]) {
            // The table in force now stays readable for second chance
            // (TUN to TUN, when it is known whole).
            let keep = live.is_some()
                && vip.forward == Forward::Tun
                && forward == Forward::Tun
                && !want.second_chance.is_zero();
            let target = vip.live.other();
            if vip.previous.is_some() {
                // Packets stop reading the other table before it is
                // overwritten, and those that read the flag just before
                // finish first: an XDP run is bounded and not preempted,
                // so a millisecond is far past the longest.
                forget(vip, want, maps)?;
                std::thread::sleep(PREVIOUS_GRACE);
            }
            let before = vip.table_mut(target).take();
            maps.write_table(vip.id, target, &table, before.as_deref())?;
            let previous = if keep { Previous::Kept } else { Previous::Forgotten };
            maps.put_vip(&want.addr, &VipEntry { id: vip.id, live: target, forward, previous })?;
            *vip.table_mut(target) = Some(table);
            vip.live = target;
            vip.forward = forward;
            vip.generation += 1;
            vip.swapped_at = Some(SystemTime::now());
            vip.previous = keep.then_some(Kept { since: now, until: now + want.second_chance });
        }
        vip.built_from = Some(inputs);
        count_slots(vip, caps.max_backends);
    }
    // After the switch: everyone else's entry (draining, changed MACs),
    // except leavers whose time is up: they lose their id next.
    for (addr, state) in vip.backends.iter_mut() {
        if !matches!(state.role, Role::Leaving { until } if until <= now) {
            write_backend(maps, (vip.id, forward), *addr, state)?;
        }
    }
    Ok(())
}

/// How long a packet that read the previous-table flag may still be
/// reading that table after the flag is cleared.
const PREVIOUS_GRACE: Duration = Duration::from_millis(1);

/// Stops packets reading the previous table once its window is over (the
/// window as the config says now: a reload can shorten it or turn it
/// off), or when the VIP no longer tunnels.
pub(super) fn forget_previous(
    vip: &mut VipState,
    want: &DesiredVip,
    now: Instant,
    maps: &mut Maps<impl Store>,
) -> Result<(), DataplaneError> {
    let Some(kept) = &mut vip.previous else { return Ok(()) };
    kept.until = kept.since + want.second_chance;
    if kept.until > now && vip.forward == Forward::Tun {
        return Ok(());
    }
    forget(vip, want, maps)
}

/// Writes the VIP entry without the previous-table flag.
fn forget(vip: &mut VipState, want: &DesiredVip, maps: &mut Maps<impl Store>) -> Result<(), DataplaneError> {
    let entry = VipEntry { id: vip.id, live: vip.live, forward: vip.forward, previous: Previous::Forgotten };
    maps.put_vip(&want.addr, &entry)?;
    vip.previous = None;
    Ok(())
}

/// The Maglev table of `inputs`.
fn build_table(inputs: &[MaglevInput], m: u32) -> Vec<BackendId> {
    let names: Vec<String> = inputs.iter().map(|(addr, _, _)| addr.to_string()).collect();
    let entries: Vec<maglev::Entry<'_>> = inputs
        .iter()
        .zip(&names)
        .map(|(&(_, id, weight), identity)| maglev::Entry { identity, id, weight })
        .collect();
    maglev::build(&entries, m)
}

/// Sets each backend's `slots` from the live table.
fn count_slots(vip: &mut VipState, max_backends: u32) {
    let mut by_id = vec![0u32; max_backends as usize];
    for id in vip.live_table().unwrap_or_default() {
        if let Some(n) = by_id.get_mut(*id as usize) {
            *n += 1;
        }
    }
    for state in vip.backends.values_mut() {
        state.slots = by_id.get(state.id as usize).copied().unwrap_or(0);
    }
}

/// Frees the backends of `vip` that are leaving with their time up and
/// match `ready`: marks their entries unused, then forgets them and
/// releases their ids.
pub(super) fn free_expired(
    vip: &mut VipState,
    now: Instant,
    maps: &mut Maps<impl Store>,
    ids: &mut IdPool,
    ready: impl Fn(&BackendState) -> bool,
) -> Result<(), DataplaneError> {
    let expired: Vec<IpAddr> = vip
        .backends
        .iter()
        .filter(|(_, b)| matches!(b.role, Role::Leaving { until } if until <= now) && ready(b))
        .map(|(a, _)| *a)
        .collect();
    for addr in expired {
        maps.put_backend(vip.backends[&addr].id, &BackendEntry::unused(vip.backends[&addr].generation))?;
        let state = vip.backends.remove(&addr).expect("present");
        info!(vip = %vip.name, backend = %addr, "backend gone; its recorded flows move to the others");
        ids.release(state.id as u32);
    }
    Ok(())
}

/// Writes `BACKENDS[id]` if it does not hold this backend's current state
/// under its VIP (id and mode).
fn write_backend(
    maps: &mut Maps<impl Store>,
    (vip, forward): (VipId, Forward),
    addr: IpAddr,
    state: &mut BackendState,
) -> Result<(), DataplaneError> {
    let entry = state.entry(addr, vip, forward);
    if state.written != Some(entry) {
        state.written = None;
        maps.put_backend(state.id, &entry)?;
        state.written = Some(entry);
    }
    Ok(())
}
