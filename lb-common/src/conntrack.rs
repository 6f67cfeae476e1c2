//! The connection table's layout, shared by the data plane that writes it
//! and the daemon that reads it: an array of sets of `CONN_WAYS` slots,
//! one cache line per slot. A flow has two sets, both from its flow hash
//! multiplied by the table's seed: it is recorded in its first set while
//! that has a free slot, else in its second. Slots fill in order and are
//! never emptied, so a first set with a free slot ends the search at that
//! slot: at low load a lookup reads one set, and a miss stops at the first
//! free line.
//!
//! An array, not a kernel LRU hash map: an array lookup is inlined by the
//! verifier (no helper call, no second hash), a lookup reads the lines of
//! one set and nothing else (an LRU hash reads a bucket, then an element,
//! and an insert takes a lock and list nodes), and a set is replaced by
//! marks of use in the slots instead of a global LRU list.

use crate::{ConnEntry, FlowKey};

/// Slots per set: four lines in one 256-byte block, never across a page.
pub const CONN_WAYS: usize = 4;

/// One flow's record. `seal` ties `entry` to `key`: slots are written by
/// any CPU without a lock, and a reader that catches a slot mid-write
/// (one flow's key with another's entry) finds a seal that does not match
/// and treats the slot as empty.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnSlot {
    /// All zero for a slot never written (no flow has family 0).
    pub key: FlowKey,
    pub entry: ConnEntry,
    pub seal: u64,
    /// In use: set by a packet that finds the record; a new flow replaces
    /// an unmarked record first, and clears its sets' marks when every
    /// slot is marked.
    pub used: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ConnSlot>() == 64);

/// `CONNTRACK` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnSet {
    pub slots: [ConnSlot; CONN_WAYS],
}
const _: () = assert!(size_of::<ConnSet>() == 64 * CONN_WAYS);

/// Sets for a table of `slots` slots (rounded up to whole sets).
pub const fn conn_sets(slots: u32) -> u32 {
    slots.div_ceil(CONN_WAYS as u32)
}

/// The flow hash multiplied by the table's seed (made odd, should it not
/// be). The flow hash has no secret (every node of a fleet must compute
/// it alike for Maglev), so sets taken from it straight would let anyone
/// who picks source ports aim new flows at another flow's sets.
/// Multiplied by a random odd seed, the top bits that pick a set are
/// multiply-shift hashing: two distinct flow hashes share them with odds
/// of at most 2 in 2^bits over the seeds. Equal flow hashes still share
/// them (see the README's connection-table note). One multiply per lookup.
#[inline(always)]
fn seeded(hash: u32, seed: u32) -> u32 {
    hash.wrapping_mul(seed | 1)
}

/// Scales `h` to `0..sets` (a multiply, not a division).
#[inline(always)]
fn scaled(h: u32, sets: u32) -> u32 {
    ((h as u64 * sets as u64) >> 32) as u32
}

/// The first set, in `0..sets`, of a flow whose `flow_hash` is `hash` in a
/// table whose seed is `seed`.
#[inline(always)]
pub fn conn_set_index(hash: u32, seed: u32, sets: u32) -> u32 {
    scaled(seeded(hash, seed), sets)
}

/// The second set: the seeded hash's halves swapped and multiplied, so its
/// top bits depend on every bit, then scaled alike.
#[inline(always)]
pub fn conn_set_index2(hash: u32, seed: u32, sets: u32) -> u32 {
    scaled(seeded(hash, seed).rotate_left(16).wrapping_mul(0x9e37_79b1), sets)
}

/// The seal of `entry` recorded for a flow whose hash is `hash`. Never 0
/// for a real flow but with odds of 2^-64; multiplying by an odd constant
/// is a bijection, so two entries of one flow never share a seal.
#[inline(always)]
pub fn conn_seal(hash: u32, entry: &ConnEntry) -> u64 {
    let bits = entry.backend_id as u64 | (entry.second as u64) << 16 | (entry.generation as u64) << 32;
    (hash as u64) << 32 ^ hash as u64 ^ bits.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl ConnSlot {
    /// Whether the slot holds `key` (sealed or not).
    #[inline(always)]
    pub fn holds(&self, key: &FlowKey) -> bool {
        let (a, b) = (self.key.words(), key.words());
        a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4]
    }

    /// The entry, if its seal matches (`hash`: the flow's hash).
    #[inline(always)]
    pub fn sealed_entry(&self, hash: u32) -> Option<ConnEntry> {
        // Each read once: other CPUs write the slot, and the entry returned
        // must be the one checked.
        // SAFETY: plain data behind a reference.
        let (entry, seal) =
            unsafe { (core::ptr::read_volatile(&self.entry), core::ptr::read_volatile(&self.seal)) };
        (seal == conn_seal(hash, &entry)).then_some(entry)
    }

    /// Whether the slot was ever written.
    #[inline(always)]
    pub fn is_free(&self) -> bool {
        self.key.family == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, flow_hash};

    #[test]
    fn set_index_spans_the_range() {
        assert_eq!(scaled(0, 1000), 0);
        assert_eq!(scaled(u32::MAX, 1000), 999);
        assert_eq!(scaled(u32::MAX / 2, 1000), 499);
        assert_eq!(conn_sets(1025), 257);
        for index in [conn_set_index, conn_set_index2] {
            let mut covered = [false; 64];
            (0..1000u32)
                .for_each(|k| covered[index(k.wrapping_mul(0x0100_0193), 0x2545_f491, 64) as usize] = true);
            assert!(covered.iter().all(|&c| c), "every set is used");
        }
    }

    #[test]
    fn the_seed_decides_which_flows_share_a_set() {
        // 64 flow hashes that share their first set in a table of 65,536
        // sets with one seed are spread out with another.
        let (sets, one, another) = (65_536, 0x2545_f491, 0x9e37_79b9);
        let home = conn_set_index(1, one, sets);
        let mut crowd = (1..).filter(|&h| conn_set_index(h, one, sets) == home);
        let mut elsewhere: [u32; 64] =
            core::array::from_fn(|_| conn_set_index(crowd.next().unwrap(), another, sets));
        elsewhere.sort_unstable();
        let distinct = 1 + elsewhere.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(distinct >= 60, "another seed puts one seed's crowd in {distinct} sets");
    }

    #[test]
    fn seal_binds_entry_to_flow() {
        let key = FlowKey { family: FAMILY_V4, proto: 6, sport_be: 1, dport_be: 80, ..FlowKey::default() };
        let hash = flow_hash(&key);
        let entry = ConnEntry { backend_id: 3, second: 0, generation: 7 };
        let slot = ConnSlot { key, entry, seal: conn_seal(hash, &entry), ..ConnSlot::default() };
        assert!(slot.holds(&key));
        assert_eq!(slot.sealed_entry(hash), Some(entry));
        // Another flow's entry under this key, or this entry under another hash: no match.
        let torn = ConnSlot { entry: ConnEntry { backend_id: 4, ..entry }, ..slot };
        assert_eq!(torn.sealed_entry(hash), None);
        assert_eq!(slot.sealed_entry(hash ^ 1), None);
        assert!(ConnSlot::default().is_free() && !ConnSlot::default().holds(&key));
    }
}
