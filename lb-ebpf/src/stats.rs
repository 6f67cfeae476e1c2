//! Per-CPU counters: no atomics needed, userspace sums the CPUs.

use lb_common::{BackendId, Counter, Reason};

use crate::maps::{BACKEND_STATS, STATS, VIP_STATS};

#[inline(always)]
fn add(counter: Option<*mut Counter>, bytes: u64) {
    if let Some(c) = counter {
        // SAFETY: a per-CPU slot, only this CPU writes it while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_reason(reason: Reason, bytes: u64) {
    add(STATS.get_ptr_mut(reason as u32), bytes);
}

#[inline(always)]
pub fn count_vip(vip_id: u32, bytes: u64) {
    add(VIP_STATS.get_ptr_mut(vip_id), bytes);
}

#[inline(always)]
pub fn count_backend(backend_id: BackendId, bytes: u64) {
    add(BACKEND_STATS.get_ptr_mut(backend_id as u32), bytes);
}
