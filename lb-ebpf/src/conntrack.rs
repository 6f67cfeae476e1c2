//! The connection table (layout in `lb_common::ConnSet`): find a flow's
//! slot in its two sets, record a flow, mark records in use.

use core::{
    ptr::{addr_of_mut, write_volatile},
    sync::atomic::{Ordering, compiler_fence},
};

use lb_common::{
    CONN_WAYS, ConnEntry, ConnSet, ConnSlot, FlowKey, conn_seal, conn_set_index, conn_set_index2,
};

use crate::maps::{CONNTRACK, CONNTRACK_SEED, CONNTRACK_SETS};

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
    CONNTRACK.get_ptr_mut(conn_set_index(hash, CONNTRACK_SEED.load(), CONNTRACK_SETS.load()))
}

#[inline(always)]
fn second_set(hash: u32) -> Option<*mut ConnSet> {
    CONNTRACK.get_ptr_mut(conn_set_index2(hash, CONNTRACK_SEED.load(), CONNTRACK_SETS.load()))
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

/// The first slot of `set` not used since the marks were last cleared.
#[inline(always)]
fn unused(set: *mut ConnSet) -> Option<*mut ConnSlot> {
    // SAFETY: valid slots of a map value; plain data.
    (0..CONN_WAYS).map(|w| way(set, w)).find(|&slot| unsafe { (*slot).used == 0 })
}

#[inline(always)]
fn clear_marks(set: *mut ConnSet) {
    for w in 0..CONN_WAYS {
        // SAFETY: a valid slot of a map value; plain data.
        unsafe { (*way(set, w)).used = 0 };
    }
}

/// The slot a new flow takes, and whether it held another flow: a free
/// slot of the first set, else of the second; else the first slot of
/// either not used since the marks were cleared (a flow that only ever
/// sent its SYN goes before one that is talking); else, every slot used,
/// both sets' marks are cleared and the first set's slot the hash's low
/// bits pick is taken.
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
    let slot = unused(first).or_else(|| unused(second)).unwrap_or_else(|| {
        clear_marks(first);
        clear_marks(second);
        way(first, hash as usize % CONN_WAYS)
    });
    Some((slot, true))
}
