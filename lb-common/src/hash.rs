//! Hashes both sides must compute alike. The flow hash indexes Maglev
//! tables, and userspace uses it to predict where a flow lands: changing it
//! moves flows between backends. The VIP filter bit places VIP addresses in
//! a bitmap the data plane checks before its VIP lookup.

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

/// Words (u64) in `VIP_FILTER`: 65536 bits, so a few hundred VIP addresses
/// leave almost every non-VIP address on a clear bit.
pub const VIP_FILTER_WORDS: u32 = 1024;

/// The `VIP_FILTER` bit of an address (`0..VIP_FILTER_WORDS * 64`): a
/// multiplicative hash of its words, top 16 bits.
#[inline(always)]
pub fn vip_filter_bit(addr: &[u8; 16], family: u8) -> u32 {
    let mut w = word(addr, 0);
    if family != crate::FAMILY_V4 {
        w ^= word(addr, 4).rotate_left(8) ^ word(addr, 8).rotate_left(16) ^ word(addr, 12).rotate_left(24);
    }
    filter_bit(w)
}

/// [`vip_filter_bit`] of an IPv4 address given as its four bytes.
#[inline(always)]
pub fn vip_filter_bit_v4(addr: [u8; 4]) -> u32 {
    filter_bit(u32::from_le_bytes(addr))
}

#[inline(always)]
fn filter_bit(w: u32) -> u32 {
    w.wrapping_mul(0x9e37_79b1) >> 16
}
