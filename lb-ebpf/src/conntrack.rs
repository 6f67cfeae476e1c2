//! The connection table (layout in `lb_common::ConnSet`): find a flow's
//! slot in its two sets, record a flow, keep the sets' clock.

use core::{
    ptr::{addr_of_mut, write_volatile},
    sync::atomic::{Ordering, compiler_fence},
};

use lb_common::{
    CONN_WAYS, ConnEntry, ConnSet, ConnSlot, FlowKey, conn_seal, conn_set_index, conn_set_index2,
};

use crate::maps::{CONNTRACK, CONNTRACK_SETS};

/// What a set holds for a flow.
enum InSet {
    Slot(*mut ConnSlot),
    /// Not there, and the set has a free slot: not in the second set either.
    NotWithFree,
    /// Not there, every slot taken.
    NotAndFull,
}

#[inline(always)]
fn first_set(hash: u32) -> Option<*mut ConnSet> {
    CONNTRACK.get_ptr_mut(conn_set_index(hash, CONNTRACK_SETS.load()))
}

#[inline(always)]
fn second_set(hash: u32) -> Option<*mut ConnSet> {
    CONNTRACK.get_ptr_mut(conn_set_index2(hash, CONNTRACK_SETS.load()))
}

#[inline(always)]
fn way(set: *mut ConnSet, way: usize) -> *mut ConnSlot {
    // SAFETY: a map value pointer from this program's lookup, `way` below
    // CONN_WAYS; no reference is made.
    unsafe { addr_of_mut!((*set).slots[way]) }
}

#[inline(always)]
fn search(set: *mut ConnSet, flow: &FlowKey) -> InSet {
    for w in 0..CONN_WAYS {
        let slot = way(set, w);
        // SAFETY: a valid slot of a map value; plain data.
        let slot_ref = unsafe { &*slot };
        if slot_ref.holds(flow) {
            return InSet::Slot(slot);
        }
        // Slots fill in order: nothing lies beyond a free one.
        if slot_ref.is_free() {
            return InSet::NotWithFree;
        }
    }
    InSet::NotAndFull
}

/// The slot holding `flow` (hash `hash`), sealed or not.
#[inline(always)]
pub fn find(hash: u32, flow: &FlowKey) -> Option<*mut ConnSlot> {
    match search(first_set(hash)?, flow) {
        InSet::Slot(slot) => Some(slot),
        InSet::NotWithFree => None,
        InSet::NotAndFull => match search(second_set(hash)?, flow) {
            InSet::Slot(slot) => Some(slot),
            _ => None,
        },
    }
}

/// Marks a found record as used, writing only when the mark is clear (a
/// store dirties a line other CPUs may be reading).
#[inline(always)]
pub fn touch(slot: *mut ConnSlot) {
    // SAFETY: a valid slot of a map value; plain data.
    unsafe {
        if (*slot).used == 0 {
            (*slot).used = 1;
        }
    }
}

/// Writes `entry` for `flow` into `slot`. The seal goes last, after a
/// zero seal first: a reader on another CPU sees the old record, no
/// record, or the new one, never the new key with the old entry.
#[inline(always)]
pub fn write(slot: *mut ConnSlot, flow: &FlowKey, hash: u32, entry: ConnEntry) {
    // SAFETY: a valid slot of a map value; plain data.
    unsafe {
        write_volatile(addr_of_mut!((*slot).seal), 0);
        compiler_fence(Ordering::Release);
        (*slot).key = *flow;
        (*slot).entry = entry;
        (*slot).used = 0;
        compiler_fence(Ordering::Release);
        write_volatile(addr_of_mut!((*slot).seal), conn_seal(hash, &entry));
    }
}

#[inline(always)]
fn first_free(set: *mut ConnSet) -> Option<*mut ConnSlot> {
    // SAFETY: valid slots of a map value; plain data.
    (0..CONN_WAYS).map(|w| way(set, w)).find(|&slot| unsafe { (*slot).is_free() })
}

/// The clock's pass over `set`: the first slot not used since the last
/// pass, clearing the marks it passes.
#[inline(always)]
fn unused(set: *mut ConnSet) -> Option<*mut ConnSlot> {
    for w in 0..CONN_WAYS {
        let slot = way(set, w);
        // SAFETY: a valid slot of a map value; plain data.
        unsafe {
            if (*slot).used == 0 {
                return Some(slot);
            }
            (*slot).used = 0;
        }
    }
    None
}

/// The slot a new flow takes, and whether it held another flow: a free
/// slot of the first set, else of the second, else the first slot either
/// set's clock finds unused, else (every slot used since the last pass)
/// the first set's slot the hash's low bits pick.
#[inline(always)]
pub fn victim(hash: u32) -> Option<(*mut ConnSlot, bool)> {
    let first = first_set(hash)?;
    if let Some(slot) = first_free(first) {
        return Some((slot, false));
    }
    let second = second_set(hash)?;
    if let Some(slot) = first_free(second) {
        return Some((slot, false));
    }
    let slot =
        unused(first).or_else(|| unused(second)).unwrap_or_else(|| way(first, hash as usize % CONN_WAYS));
    Some((slot, true))
}
