//! TUN mode's outer headers, built on the stack: pure functions of their
//! inputs, written into the packet by `xmit`.

use lb_ebpf::net::{IPPROTO_IPIP, IPPROTO_IPV6};

use crate::csum;

const TTL: u8 = 64;

/// Outer IPv4 header for an IPv4 packet of `inner_len` bytes: protocol 4,
/// DF set (too-big packets get an ICMP error instead of fragments), the
/// inner TOS, and `entropy` in the ID field.
#[inline(always)]
pub fn ipv4_outer(src: [u8; 4], dst: [u8; 4], inner_len: u16, tos: u8, entropy: u16) -> [u8; 20] {
    let total = (inner_len + 20).to_be_bytes();
    let id = entropy.to_be_bytes();
    let h = [
        0x45,
        tos,
        total[0],
        total[1],
        id[0],
        id[1],
        0x40,
        0,
        TTL,
        IPPROTO_IPIP,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
    ];
    csum::ipv4_header(h)
}

/// Outer IPv6 header for an IPv6 packet of `inner_len` bytes: next header
/// 41, the inner traffic class, and 20 bits of flow entropy in the flow
/// label (receivers' RSS and ECMP hash on it).
#[inline(always)]
pub fn ipv6_outer(
    src: &[u8; 16],
    dst: &[u8; 16],
    inner_len: u16,
    traffic_class: u8,
    entropy: u32,
) -> [u8; 40] {
    let label = entropy & 0x000f_ffff;
    let len = inner_len.to_be_bytes();
    let mut h = [0u8; 40];
    h[0] = 0x60 | (traffic_class >> 4);
    h[1] = (traffic_class << 4) | (label >> 16) as u8;
    h[2] = (label >> 8) as u8;
    h[3] = label as u8;
    h[4] = len[0];
    h[5] = len[1];
    h[6] = IPPROTO_IPV6;
    h[7] = TTL;
    h[8..24].copy_from_slice(src);
    h[24..40].copy_from_slice(dst);
    h
}
