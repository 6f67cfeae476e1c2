//! Internet checksums (RFC 1071).

use aya_ebpf::helpers::bpf_csum_diff;

use lb_ebpf::ptr::Packet;

/// An IPv4 header (without options) with its checksum field filled in.
#[inline(always)]
pub fn ipv4_header(mut h: [u8; 20]) -> [u8; 20] {
    h[10] = 0;
    h[11] = 0;
    let c = finish(add(0, &h)).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    h
}

/// Adds big-endian 16-bit words of `bytes` to a running sum (constant bound).
#[inline(always)]
fn add<const N: usize>(mut sum: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Folds a running sum of big-endian words into the checksum.
#[inline(always)]
pub fn finish(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Sum of the `N` bytes (a multiple of 4) at `off` in the packet, as native
/// 32-bit words; combine with `fold_native`.
#[inline(always)]
pub fn packet_sum<const N: usize>(pkt: &Packet, off: usize) -> Option<u64> {
    let p = pkt.at_mut::<[u8; N]>(off)?;
    // SAFETY: N bytes at p are inside the packet (checked above).
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p.cast(), N as u32, 0) };
    (sum >= 0).then_some(sum as u32 as u64)
}

/// The checksum, in memory order, of a sum of native-order 32-bit words.
#[inline(always)]
pub fn fold_native(mut sum: u64) -> [u8; 2] {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    let mut s = (sum & 0xffff) + (sum >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_ne_bytes()
}
