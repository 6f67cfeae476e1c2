//! TUN mode's outer headers: pure functions of their inputs, as 32-bit
//! words in memory order, which `xmit` stores into the packet a word at a
//! time. Addresses come in memory order too (`u32::from_ne_bytes` of the
//! octets), as the loader and the backend entries hold them.

use lb_ebpf::net::{IPPROTO_IPIP, IPPROTO_IPV6};

use crate::csum;

const TTL: u8 = 64;

/// Outer IPv4 header for an IPv4 packet of `inner_len` bytes: protocol 4,
/// DF set (too-big packets get an ICMP error instead of fragments), the
/// inner TOS, and `entropy` in the ID field. The checksum is summed from
/// the fields, not from the built header.
#[inline(always)]
pub fn ipv4_outer(src: u32, dst: u32, inner_len: u16, tos: u8, entropy: u16) -> [u32; 5] {
    // Header words 0 to 2 as big-endian values, the checksum field zero.
    let w0 = 0x4500_0000 | (tos as u32) << 16 | (inner_len as u32 + 20);
    let w1 = (entropy as u32) << 16 | 0x4000;
    let w2 = (TTL as u32) << 24 | (IPPROTO_IPIP as u32) << 16;
    let (s, d) = (u32::from_be(src), u32::from_be(dst));
    let sum = halves(w0) + halves(w1) + halves(w2) + halves(s) + halves(d);
    let check = csum::finish(sum);
    [w0.to_be(), w1.to_be(), (w2 | check as u32).to_be(), src, dst]
}

/// Sum of a word's two 16-bit halves.
#[inline(always)]
fn halves(w: u32) -> u32 {
    (w >> 16) + (w & 0xffff)
}

/// Outer IPv6 header for an IPv6 packet of `inner_len` bytes: next header
/// 41, the inner traffic class, and 20 bits of flow entropy in the flow
/// label (receivers' RSS and ECMP hash on it).
#[inline(always)]
pub fn ipv6_outer(
    src: &[u32; 4],
    dst: &[u32; 4],
    inner_len: u16,
    traffic_class: u8,
    entropy: u32,
) -> [u32; 10] {
    let w0 = 0x6000_0000 | (traffic_class as u32) << 20 | (entropy & 0x000f_ffff);
    let w1 = (inner_len as u32) << 16 | (IPPROTO_IPV6 as u32) << 8 | TTL as u32;
    [w0.to_be(), w1.to_be(), src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3]]
}
