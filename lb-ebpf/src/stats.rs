//! Per-CPU counters: no atomics needed, userspace sums the CPUs.

use lb_common::{BackendId, Counter, EVENT_SLOTS, Event, GlobalStats, REASON_SLOTS, Reason};

use crate::maps::{BACKEND_STATS, STATS, VIP_STATS};

/// This CPU's global counters. Index 0 of a per-CPU array always exists;
/// the check only satisfies the verifier.
#[inline(always)]
pub fn globals() -> Option<&'static mut GlobalStats> {
    // SAFETY: a per-CPU slot, only this CPU touches it while we run.
    STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// `index` masked into `0..slots` (a power of two) in a way the compiler
/// cannot drop: it knows an enum's range, but the verifier does not (a
/// reason returned by another BPF function is any u32 to it).
#[inline(always)]
fn slot(index: u32, slots: u32) -> usize {
    // SAFETY: a read of a local.
    (unsafe { core::ptr::read_volatile(&index) } & (slots - 1)) as usize
}

#[inline(always)]
fn add(counter: &mut Counter, bytes: u64) {
    counter.packets += 1;
    counter.bytes += bytes;
}

#[inline(always)]
pub fn count_reason(stats: &mut GlobalStats, reason: Reason, bytes: u64) {
    if let Some(c) = stats.reasons.get_mut(slot(reason as u32, REASON_SLOTS)) {
        add(c, bytes);
    }
}

#[inline(always)]
pub fn count_event(stats: &mut GlobalStats, event: Event) {
    if let Some(c) = stats.events.get_mut(slot(event as u32, EVENT_SLOTS)) {
        *c += 1;
    }
}

#[inline(always)]
pub fn count_vip(vip_id: u32, bytes: u64) {
    if let Some(c) = VIP_STATS.get_ptr_mut(vip_id) {
        // SAFETY: per-CPU slot, as above.
        add(unsafe { &mut *c }, bytes);
    }
}

#[inline(always)]
pub fn count_backend(backend_id: BackendId, bytes: u64) {
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id as u32) {
        // SAFETY: per-CPU slot, as above.
        add(unsafe { &mut *c }, bytes);
    }
}
