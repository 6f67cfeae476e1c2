//! Per-CPU counters: no atomics needed, userspace sums the CPUs.

use lb_common::{BackendId, Counter, Event, GlobalStats, Reason};

use crate::maps::{BACKEND_STATS, STATS, VIP_STATS};

/// This CPU's global counters. Index 0 of a per-CPU array always exists;
/// the check only satisfies the verifier.
#[inline(always)]
pub fn globals() -> Option<&'static mut GlobalStats> {
    // SAFETY: a per-CPU slot, only this CPU touches it while we run.
    STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn add(counter: &mut Counter, bytes: u64) {
    counter.packets += 1;
    counter.bytes += bytes;
}

#[inline(always)]
pub fn count_reason(stats: &mut GlobalStats, reason: Reason, bytes: u64) {
    if let Some(c) = stats.reasons.get_mut(reason as usize) {
        add(c, bytes);
    }
}

#[inline(always)]
pub fn count_event(stats: &mut GlobalStats, event: Event) {
    if let Some(c) = stats.events.get_mut(event as usize) {
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
