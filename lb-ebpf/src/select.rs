//! Which backend gets a flow: the connection table for an established
//! one, else the VIP's live Maglev table; and, for second chance (TUN),
//! which backend owned a mid-flow packet's flow before the last switch.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    BackendId, BackendInfo, ConnEntry, ConnSlot, Event, FAMILY_V6, FlowKey, GlobalStats, MAGLEV_LANES,
    MODE_TUN, NO_BACKEND, PROTO_TCP, Reason, VIP_PREVIOUS, VipInfo, flow_hash, vip_filter_bit,
    vip_filter_bit_v4,
};
use lb_ebpf::{
    net::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6},
    parse::{Frame as _, Parsed},
    ptr::Packet,
};

use crate::{
    conntrack,
    maps::{BACKENDS, CONN_INSERT_LIMIT, MAGLEV, TABLE_CHUNKS, TABLE_SIZE, VIP_FILTER, VIPS},
    stats::count_event,
};

/// The chosen backend; its entry names its VIP (`vip_id`) and the mode.
pub struct Target {
    pub backend_id: BackendId,
    /// Second chance: the flow's owner in the previous table, whose
    /// address the packet carries to `backend` (TUN, TCP, mid-flow only);
    /// `NO_BACKEND` for none. An id, not a reference: a second pointer in
    /// the returned value changes its layout into one the verifier rejects
    /// (a 4-byte read of a spilled pointer).
    pub second: BackendId,
    pub backend: &'static BackendInfo,
}

/// The backend for a flow that passed `may_be_vip`.
///
/// Every packet but a SYN looks its flow up first. Only flows to a VIP
/// are recorded, and a valid entry's backend names the VIP and its mode,
/// so an established flow costs one set of the connection table, not a
/// VIP lookup too. That path is inlined into the caller, which saves a
/// BPF-to-BPF call and return per established packet (about 15 ns on a
/// CPU whose kernel sends every return through a thunk, as with AMD's
/// safe-return mitigation); anything else calls `choose`.
#[inline(always)]
pub fn backend(p: &Parsed, stats: &mut GlobalStats) -> Result<Target, Reason> {
    let hash = flow_hash(&p.flow);
    // A SYN chooses afresh whatever its record says: its set is read in
    // `choose`, after the Maglev table.
    if !p.opens_connection()
        && let Some(slot) = conntrack::find(hash, &p.flow)
        // SAFETY: a map value pointer is valid while the program runs.
        && let Some(recorded_entry) = unsafe { (*slot).sealed_entry(hash) }
        && let Some(backend) = recorded(&recorded_entry)
    {
        conntrack::touch(slot);
        count_event(stats, Event::ConnHit);
        if p.icmp_error {
            count_event(stats, Event::IcmpSteered);
            return Ok(Target { backend_id: recorded_entry.backend_id, backend, second: NO_BACKEND });
        }
        let second = second_chance(recorded_entry.second, backend);
        return Ok(Target { backend_id: recorded_entry.backend_id, backend, second });
    }
    choose(p, hash, stats)
}

/// A fresh choice (VIP lookup, Maglev) for a flow with no valid record,
/// or a SYN (`hash`: its flow hash). A flow that has a slot (stale, a
/// retransmitted SYN, a reused port, caught mid-write) has it rewritten in
/// place, which is not an insert the flood guard needs to hold back.
///
/// The slot is looked for after the Maglev table is read: for a SYN,
/// whose set nothing has read yet, the CPU then fetches both lines at
/// once instead of one after the other (a set of a large table is most
/// often in memory, not cache). Other packets found their slot in
/// `backend` (it is in cache): one more argument would not fit BPF's
/// five registers beside the returned value's pointer.
#[inline(never)]
fn choose(p: &Parsed, hash: u32, stats: &mut GlobalStats) -> Result<Target, Reason> {
    // SAFETY: the value is only read, and VIPS entries are replaced whole.
    let vip = unsafe { VIPS.get(p.flow.vip_key()) }.ok_or(Reason::PassNotVip)?;
    if p.icmp_error {
        count_event(stats, Event::IcmpSteered);
    }
    let (backend_id, backend) = maglev(vip, hash)?;
    // An ICMP error is about a flow, not part of it: it records nothing.
    if p.icmp_error {
        return Ok(Target { backend_id, backend, second: NO_BACKEND });
    }
    let slot = conntrack::find(hash, &p.flow);
    // A record `backend` did not follow, whole (not caught mid-write):
    // its backend is gone.
    if !p.opens_connection()
        // SAFETY: a map value pointer is valid while the program runs.
        && slot.is_some_and(|slot| unsafe { (*slot).sealed_entry(hash) }.is_some())
    {
        count_event(stats, Event::ConnRebalanced);
    }
    // A SYN stays where the current table sends it; a mid-flow packet this
    // node has no record of may belong to the previous table's owner.
    let mut second_id = NO_BACKEND;
    if vip.flags & VIP_PREVIOUS != 0 && !p.opens_connection() && p.flow.proto == PROTO_TCP {
        second_id = previous_owner(vip, hash, backend_id);
    }
    let second = second_chance(second_id, backend);
    let chosen = ConnEntry { backend_id, second, generation: backend.generation };
    match slot {
        Some(slot) => rewrite(slot, &p.flow, hash, chosen),
        None => insert(&p.flow, hash, chosen, stats),
    }
    count_event(stats, Event::ConnNew);
    Ok(Target { backend_id, backend, second })
}

/// The previous table's owner of the flow whose hash is `hash`, if another
/// backend. The slot is computed again rather than kept from `maglev`:
/// one more live value there costs every new flow, this only the rare
/// packet that gets here.
#[inline(always)]
fn previous_owner(vip: &VipInfo, hash: u32, current: BackendId) -> BackendId {
    let Some(slot) = hash.checked_rem(TABLE_SIZE.load()) else { return NO_BACKEND };
    // A VIP's two tables are neighbours: the other is `table ^ 1`.
    let chunk = (vip.table ^ 1) * TABLE_CHUNKS.load() + slot / MAGLEV_LANES;
    match MAGLEV.get(chunk) {
        Some(lanes) if lanes[(slot % MAGLEV_LANES) as usize] != current => {
            lanes[(slot % MAGLEV_LANES) as usize]
        }
        _ => NO_BACKEND,
    }
}

/// The second-chance backend of a target, if it has one.
#[inline(always)]
pub fn second(target: &Target) -> Option<&'static BackendInfo> {
    if target.second == NO_BACKEND { None } else { BACKENDS.get(target.second as u32) }
}

/// `id` if backend `id` can be a second chance for `owner`'s packet:
/// another TUN backend of the same VIP that still takes established flows;
/// else `NO_BACKEND`. A hint, not a record: an id handed on since at worst
/// reaches a backend without the flow, which resets it as the owner would.
#[inline(always)]
fn second_chance(id: BackendId, owner: &BackendInfo) -> BackendId {
    if id == NO_BACKEND || owner.mode() != MODE_TUN {
        return NO_BACKEND;
    }
    match BACKENDS.get(id as u32) {
        Some(b) if b.vip_id == owner.vip_id && b.mode() == MODE_TUN && b.takes_established() => id,
        _ => NO_BACKEND,
    }
}

/// Points an existing record at `chosen`, writing only when it differs
/// or its seal does not match (a store dirties a cache line other CPUs
/// may be reading). The record is read here again rather than kept from
/// `choose`'s rebalance check: kept alive across the second-chance
/// branches, it took the verifier from 199,248 processed instructions
/// to 324,512.
#[inline(always)]
fn rewrite(slot: *mut ConnSlot, flow: &FlowKey, hash: u32, chosen: ConnEntry) {
    // SAFETY: a map value pointer from this program's lookup; plain data.
    if unsafe { (*slot).sealed_entry(hash) } != Some(chosen) {
        conntrack::write(slot, flow, hash, chosen);
    }
}

/// False when no VIP has the flow's destination address: one array word
/// instead of hashing the VIP key (and a BPF call), for the host's own
/// traffic.
#[inline(always)]
pub fn may_be_vip(flow: &FlowKey) -> bool {
    filter_has(vip_filter_bit(&flow.dst, flow.family))
}

/// [`may_be_vip`] before any parsing, for an untagged IPv4 or IPv6 frame
/// (the destination address sits at a fixed offset whatever the options):
/// host traffic leaves without a parse. `None` for anything else (tagged,
/// not IP, too short to hold the address): the parse decides.
#[inline(always)]
pub fn may_be_vip_frame(pkt: &Packet) -> Option<bool> {
    let ether_type: &[u8; 2] = pkt.at(12)?;
    let bit = match u16::from_be_bytes(*ether_type) {
        ETH_P_IPV4 => vip_filter_bit_v4(*pkt.at::<[u8; 4]>(ETH_HLEN + 16)?),
        ETH_P_IPV6 => vip_filter_bit(pkt.at::<[u8; 16]>(ETH_HLEN + 24)?, FAMILY_V6),
        _ => return None,
    };
    Some(filter_has(bit))
}

#[inline(always)]
fn filter_has(bit: u32) -> bool {
    VIP_FILTER.get(bit / 64).is_some_and(|word| word >> (bit % 64) & 1 != 0)
}

/// The recorded backend, if it still takes established flows (active or
/// draining). Ids get a new generation whenever they change hands, only
/// a backend of the VIP is ever recorded (see `maglev`), and a VIP's
/// backends are marked unused before the VIP goes, so a matching
/// generation means the same backend of the same, still existing VIP.
#[inline(always)]
fn recorded(entry: &ConnEntry) -> Option<&'static BackendInfo> {
    let backend = BACKENDS.get(entry.backend_id as u32)?;
    (backend.generation == entry.generation && backend.takes_established()).then_some(backend)
}

#[inline(always)]
fn maglev(vip: &VipInfo, hash: u32) -> Result<(BackendId, &'static BackendInfo), Reason> {
    let slot = hash.checked_rem(TABLE_SIZE.load()).ok_or(Reason::DropNoBackend)?;
    let chunk = vip.table * TABLE_CHUNKS.load() + slot / MAGLEV_LANES;
    let lanes = MAGLEV.get(chunk).ok_or(Reason::DropNoBackend)?;
    let backend_id = lanes[(slot % MAGLEV_LANES) as usize];
    if backend_id == NO_BACKEND {
        return Err(Reason::DropNoBackend);
    }
    let backend = BACKENDS.get(backend_id as u32).ok_or(Reason::DropNoBackend)?;
    // A packet that read the table just before a switch may find the id
    // freed or handed on; recording it would tie the flow to the id's
    // next owner, maybe another VIP's backend.
    if u32::from(backend.vip_id) != vip.id || !backend.takes_established() {
        return Err(Reason::DropNoBackend);
    }
    Ok((backend_id, backend))
}

/// Records a flow that has no entry yet, unless new flows arrive on this
/// CPU faster than the configured limit: a flood of new flows must not
/// push established ones out of the table. Unrecorded flows still land on
/// the same backend while the table does not change.
#[inline(always)]
fn insert(flow: &FlowKey, hash: u32, entry: ConnEntry, stats: &mut GlobalStats) {
    let limit = CONN_INSERT_LIMIT.load();
    if limit != 0 {
        // The coarse clock (one tick's resolution) is plenty for a one-second
        // window, and it reads no clock source, which costs every new flow.
        // SAFETY: no preconditions.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        if now.wrapping_sub(stats.window_start_ns) >= 1_000_000_000 {
            stats.window_start_ns = now;
            stats.window_inserts = 0;
        }
        if stats.window_inserts >= limit {
            count_event(stats, Event::ConnInsertSkipped);
            return;
        }
        stats.window_inserts += 1;
    }
    let Some((slot, evicted)) = conntrack::victim(hash) else { return };
    if evicted {
        count_event(stats, Event::ConnEvicted);
    }
    conntrack::write(slot, flow, hash, entry);
}
