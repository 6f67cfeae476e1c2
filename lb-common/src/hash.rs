//! The flow hash. The data plane indexes Maglev tables with it; userspace
//! uses the same function to predict where a flow lands. Changing it moves
//! flows between backends, so it is part of the contract.

use crate::FlowKey;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// One MurmurHash3 (x86_32) block round.
#[inline(always)]
fn round(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// MurmurHash3-style hash of the 5-tuple. IPv4 flows hash only the words
/// that can be non-zero.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = round(0, word(&k.src, 0));
    h = round(h, word(&k.dst, 0));
    if k.family != crate::FAMILY_V4 {
        h = round(h, word(&k.src, 4));
        h = round(h, word(&k.src, 8));
        h = round(h, word(&k.src, 12));
        h = round(h, word(&k.dst, 4));
        h = round(h, word(&k.dst, 8));
        h = round(h, word(&k.dst, 12));
    }
    h = round(h, (k.sport_be as u32) << 16 | k.dport_be as u32);
    h = round(h, k.proto as u32);
    // fmix32: every input bit affects every output bit.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
