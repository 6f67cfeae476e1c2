//! Sending the frame on: DR rewrites MACs; TUN wraps the IP packet in an
//! outer header toward the backend, to the next hop the daemon resolved
//! (or, until it has, the one the kernel's FIB names).

use core::mem::{MaybeUninit, align_of, size_of};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup as FibParams,
    },
    helpers::bpf_fib_lookup,
};
use lb_common::{BackendInfo, FAMILY_V4, Reason};
use lb_ebpf::{
    net::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, Mac, eth, words},
    parse::{Frame as _, Parsed},
    ptr::Packet,
};

use crate::{
    encap,
    maps::{IFACE_MAC, TUN_SRC_V4, TUN_SRC_V6},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// DR: same frame, addressed to the backend's MAC from ours.
#[inline(always)]
pub fn to_backend_l2(pkt: &Packet, backend: &BackendInfo) -> Result<(), Reason> {
    let (d, s) = (Mac::from_bytes(&backend.mac), IFACE_MAC.load());
    pkt.write(0, [d.0[0], d.0[1], d.0[2], s.0[0], s.0[1], s.0[2]])
}

/// What became of a packet for a TUN VIP.
pub enum Tun {
    /// Encapsulated, and sent (`Forwarded`) or handed to the kernel, which
    /// resolves the next hop and forwards it (`PassNoNeigh`).
    Sent(Reason),
    /// Too big once encapsulated: `mtu` is the largest inner packet that fits.
    TooBig { mtu: u32 },
    /// Left as it was (`PassNoRoute`, `DropMalformed`).
    Failed(Reason),
}

/// TUN: wraps the IP packet for `backend` and sends it to the next hop.
#[inline(never)]
pub fn to_backend_tun(pkt: &Packet, p: &Parsed, backend: &BackendInfo) -> Tun {
    match encapsulate::<false>(pkt, p, backend, backend) {
        Ok(tun) => tun,
        Err(reason) => Tun::Failed(reason),
    }
}

/// Second chance: the same, wrapped twice. Inside the header to `backend`
/// goes one to `second`, exactly what `second` would get from us, so
/// `backend` can pass it on by dropping the outer header. A function of
/// its own, so the common path's code is what it was without it.
#[inline(never)]
pub fn to_backend_tun_twice(pkt: &Packet, p: &Parsed, backend: &BackendInfo, second: &BackendInfo) -> Tun {
    match encapsulate::<true>(pkt, p, backend, second) {
        Ok(tun) => tun,
        Err(reason) => Tun::Failed(reason),
    }
}

/// `second` is read only when `TWICE`.
#[inline(always)]
fn encapsulate<const TWICE: bool>(
    pkt: &Packet,
    p: &Parsed,
    backend: &BackendInfo,
    second: &BackendInfo,
) -> Result<Tun, Reason> {
    let v4 = p.flow.family == FAMILY_V4;
    let header = if v4 { lb_common::TUN_OVERHEAD_V4 } else { lb_common::TUN_OVERHEAD_V6 } as usize;
    let overhead = if TWICE { 2 * header } else { header };
    let inner_len = p.l3_len;
    let (verdict, dst_mac, src_mac) = if backend.has_hop() {
        // Resolved by the daemon: out of this interface, to this MAC.
        if inner_len + overhead > backend.mtu as usize {
            return Ok(Tun::TooBig { mtu: (backend.mtu as u32).saturating_sub(overhead as u32) });
        }
        (Reason::Forwarded, Mac::from_bytes(&backend.mac), IFACE_MAC.load())
    } else {
        match fib_next_hop(pkt, backend, v4, inner_len + overhead) {
            Ok(hop) => hop,
            Err(FibMiss::TooBig { mtu }) => {
                return Ok(Tun::TooBig { mtu: mtu.saturating_sub(overhead as u32) });
            }
            Err(FibMiss::NoRoute) => return Err(Reason::PassNoRoute),
        }
    };

    // Inner header fields the outer one copies, and some flow entropy.
    let first: [u8; 2] = *pkt.at(p.l3_off).ok_or(Reason::DropMalformed)?;
    let s = &p.flow.src;
    let client =
        u32::from_ne_bytes([s[0], s[1], s[2], s[3]]) ^ u32::from_ne_bytes([s[12], s[13], s[14], s[15]]);
    let entropy = (client ^ (p.flow.sport_be as u32) << 16).wrapping_mul(0x9e37_79b1) >> 12;

    // Room for the outer header; a VLAN tag, if any, is dropped.
    let grow = (ETH_HLEN + overhead) as i32 - p.l3_off as i32;
    let pkt = pkt.adjust_head(-grow)?;
    let eth_type = if v4 { ETH_P_IPV4 } else { ETH_P_IPV6 };
    pkt.write(0, eth(dst_mac, src_mac, eth_type))?;
    let outer_len = (inner_len + overhead - header) as u16;
    if v4 {
        let src = TUN_SRC_V4.load();
        let dst = words(&backend.addr)[0];
        pkt.write(ETH_HLEN, encap::ipv4_outer(src, dst, outer_len, first[1], entropy as u16))?;
        if TWICE {
            let dst = words(&second.addr)[0];
            let middle = encap::ipv4_outer(src, dst, inner_len as u16, first[1], entropy as u16);
            pkt.write(ETH_HLEN + header, middle)?;
        }
    } else {
        let tc = (first[0] << 4) | (first[1] >> 4);
        let src = TUN_SRC_V6.load();
        pkt.write(ETH_HLEN, encap::ipv6_outer(&src, &words(&backend.addr), outer_len, tc, entropy))?;
        if TWICE {
            let middle = encap::ipv6_outer(&src, &words(&second.addr), inner_len as u16, tc, entropy);
            pkt.write(ETH_HLEN + header, middle)?;
        }
    }
    Ok(Tun::Sent(verdict))
}

/// Why the FIB gave no next hop out of this interface.
enum FibMiss {
    /// `mtu` is the largest outer packet that fits.
    TooBig {
        mtu: u32,
    },
    NoRoute,
}

/// The next hop toward `backend` as the kernel's FIB has it: the verdict
/// (sent, or handed to the kernel while the neighbour resolves) and the
/// outer frame's MACs.
#[inline(always)]
fn fib_next_hop(
    pkt: &Packet,
    backend: &BackendInfo,
    v4: bool,
    outer_len: usize,
) -> Result<(Reason, Mac, Mac), FibMiss> {
    let ingress = pkt.ingress_ifindex();
    let mut fib = MaybeUninit::uninit();
    let fib = zeroed_fib_params(&mut fib);
    fib.ifindex = ingress;
    fib.__bindgen_anon_1.tot_len = outer_len as u16;
    if v4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = TUN_SRC_V4.load();
        fib.__bindgen_anon_4.ipv4_dst = words(&backend.addr)[0];
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = TUN_SRC_V6.load();
        fib.__bindgen_anon_4.ipv6_dst = words(&backend.addr);
    }
    // SAFETY: fib is a valid, correctly sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(pkt.ctx().cast(), fib, size_of::<FibParams>() as i32, BPF_FIB_LOOKUP_OUTPUT)
    } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS if fib.ifindex == ingress => {
            Ok((Reason::Forwarded, mac_of(&fib.dmac), mac_of(&fib.smac)))
        }
        // For the kernel: addressed to us, or it would not route the packet.
        BPF_FIB_LKUP_RET_NO_NEIGH if fib.ifindex == ingress => {
            Ok((Reason::PassNoNeigh, IFACE_MAC.load(), IFACE_MAC.load()))
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // SAFETY: the kernel wrote mtu_result for this return code.
            Err(FibMiss::TooBig { mtu: unsafe { fib.__bindgen_anon_1.mtu_result } as u32 })
        }
        _ => Err(FibMiss::NoRoute),
    }
}

/// A MAC of the parameter block, read in halfwords: `dmac` sits at an
/// offset that is not a multiple of 4, and a wider read of the stack there
/// is misaligned, which the verifier rejects.
#[inline(always)]
fn mac_of(mac: &[u8; 6]) -> Mac {
    const _: () = assert!(core::mem::offset_of!(FibParams, smac) % 2 == 0);
    const _: () = assert!(core::mem::offset_of!(FibParams, dmac) % 2 == 0);
    let h = mac.as_ptr().cast::<u16>();
    // SAFETY: three halfwords of the array, 2-aligned (asserted above).
    Mac(unsafe { [0, 1, 2].map(|i| core::ptr::read_volatile(h.add(i))) })
}

/// All zeroes, the parameter block's initial state, stored word by word:
/// `mem::zeroed` compiles to an out-of-line byte-wise memset, and so does
/// any loop of plain stores LLVM recognizes.
/// Zeroed in place: moving a zeroed value is one more memset.
#[inline(always)]
fn zeroed_fib_params(fib: &mut MaybeUninit<FibParams>) -> &mut FibParams {
    const WORDS: usize = size_of::<FibParams>() / 4;
    const _: () = assert!(size_of::<FibParams>().is_multiple_of(4) && align_of::<FibParams>() >= 4);
    let w = fib.as_mut_ptr().cast::<u32>();
    let mut i = 0;
    while i < WORDS {
        // SAFETY: word i of the block, in bounds and aligned (asserted above).
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte is written, and all zeroes is a valid FibParams.
    unsafe { fib.assume_init_mut() }
}
