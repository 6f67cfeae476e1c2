//! Program `xlb_decap`, for backends of TUN-mode VIPs: strips the outer
//! IPv4 (protocol 4) or IPv6 (next header 41) header from packets whose
//! inner destination is one of this host's VIPs, and passes the inner
//! packet to the kernel. Everything else passes as it came.
//!
//! Only the balancers may tunnel to the VIPs: a packet for one of them
//! whose outer source is not in `DECAP_SOURCES` is dropped and counted, or
//! anyone could reach the service past the balancer with a forged client
//! address.
//!
//! Second chance: a balancer that has no record of a mid-flow TCP packet,
//! after its table changed, wraps it twice: outside, to this host (the
//! current owner); inside, to the previous owner. If this host has a
//! socket for the flow the packet is delivered here; if not, the outer
//! header goes and the rest, a plain tunnel packet from the balancer to
//! the previous owner, is sent on. That packet has one header left, so it
//! can never be passed on again.
#![no_std]
#![no_main]

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2, xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie},
    macros::{map, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::{
    DECAP_DONE, DECAP_NOT_OURS, DECAP_PASSED, DECAP_SECOND_CHANCE_FORWARDED, DECAP_SECOND_CHANCE_KEPT,
    DECAP_SECOND_CHANCE_NO_ROUTE, DECAP_SLOTS, DECAP_UNTRUSTED, DecapKey, DecapSource, FAMILY_V4, FAMILY_V6,
    PROTO_TCP,
};
use lb_ebpf::{
    net::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, words},
    parse::Frame as _,
    ptr::Packet,
};

#[map(name = "DECAP_VIPS")]
static DECAP_VIPS: HashMap<DecapKey, u8> = HashMap::with_max_entries(1024, 0);

#[map(name = "DECAP_SOURCES")]
static DECAP_SOURCES: LpmTrie<DecapSource, u8> = LpmTrie::with_max_entries(256, 0);

#[map(name = "DECAP_STATS")]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_SLOTS, 0);

const TCP_LISTEN: u32 = 10;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[xdp]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    let (slot, action) = decap(&Packet::new(&ctx));
    if let Some(c) = DECAP_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
    action
}

/// A tunnel header: IPv4 with protocol 4 or IPv6 with next header 41.
struct Tunnel {
    len: usize,
    src: [u8; 16],
    dst: [u8; 16],
}

/// The tunnel header of `family` at `off`, if there is one. Our headers
/// never carry IPv4 options and set DF: a fragment (MF or an offset) is
/// not ours, and its inner bytes are partial.
#[inline(always)]
fn tunnel_at(pkt: &Packet, off: usize, family: u8) -> Option<Tunnel> {
    let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
    if family == FAMILY_V4 {
        let ip = pkt.at::<[u8; 20]>(off)?;
        if ip[0] != 0x45 || ip[9] != IPPROTO_IPIP || ip[6] & 0x3f != 0 || ip[7] != 0 {
            return None;
        }
        src[..4].copy_from_slice(&ip[12..16]);
        dst[..4].copy_from_slice(&ip[16..20]);
        Some(Tunnel { len: 20, src, dst })
    } else {
        let ip = pkt.at::<[u8; 40]>(off)?;
        if ip[0] >> 4 != 6 || ip[6] != IPPROTO_IPV6 {
            return None;
        }
        src.copy_from_slice(&ip[8..24]);
        dst.copy_from_slice(&ip[24..40]);
        Some(Tunnel { len: 40, src, dst })
    }
}

/// The destination of the IP packet of `family` at `off`.
#[inline(always)]
fn ip_dst(pkt: &Packet, off: usize, family: u8) -> Option<[u8; 16]> {
    let &[first] = pkt.at::<[u8; 1]>(off)?;
    let mut addr = [0u8; 16];
    if family == FAMILY_V4 {
        if first >> 4 != 4 {
            return None;
        }
        addr[..4].copy_from_slice(pkt.at::<[u8; 4]>(off + 16)?);
    } else {
        if first >> 4 != 6 {
            return None;
        }
        addr = *pkt.at::<[u8; 16]>(off + 24)?;
    }
    Some(addr)
}

#[inline(always)]
fn is_vip(addr: [u8; 16], family: u8) -> bool {
    // SAFETY: read-only lookup.
    unsafe { DECAP_VIPS.get(DecapKey { addr, family, _pad: [0; 3] }) }.is_some()
}

/// Returns the counter slot and the action.
#[inline(always)]
fn decap(pkt: &Packet) -> (u32, u32) {
    const PASS: u32 = xdp_action::XDP_PASS;
    let Some(&[t0, t1]) = pkt.at::<[u8; 2]>(12) else { return (DECAP_PASSED, PASS) };
    let family = match u16::from_be_bytes([t0, t1]) {
        ETH_P_IPV4 => FAMILY_V4,
        ETH_P_IPV6 => FAMILY_V6,
        _ => return (DECAP_PASSED, PASS),
    };
    let Some(outer) = tunnel_at(pkt, ETH_HLEN, family) else { return (DECAP_PASSED, PASS) };
    let inner = ETH_HLEN + outer.len;
    let Some(dst) = ip_dst(pkt, inner, family) else { return (DECAP_PASSED, PASS) };
    // The common case first: the inner packet is for one of our VIPs.
    // Otherwise it may be a second-chance packet: a tunnel to another
    // backend, holding a packet for our VIP.
    let middle = if is_vip(dst, family) {
        None
    } else {
        match tunnel_at(pkt, inner, family) {
            Some(m) if ip_dst(pkt, inner + m.len, family).is_some_and(|d| is_vip(d, family)) => Some(m),
            _ => return (DECAP_NOT_OURS, PASS),
        }
    };
    // Full-length lookup: the trie answers with the longest prefix holding it.
    let source = Key::new(8 + 128, DecapSource { family, addr: outer.src });
    if DECAP_SOURCES.get(&source).is_none() {
        return (DECAP_UNTRUSTED, xdp_action::XDP_DROP);
    }
    let Some(middle) = middle else {
        return (strip(pkt, outer.len, DECAP_DONE), PASS);
    };
    // The balancer writes the same source into both headers. Anything else
    // would make this host a relay for whoever forged the outer one.
    if middle.src != outer.src {
        return (DECAP_UNTRUSTED, xdp_action::XDP_DROP);
    }
    let vip_packet = inner + middle.len;
    if has_socket(pkt, vip_packet, family) != Some(false) {
        return (strip(pkt, outer.len + middle.len, DECAP_SECOND_CHANCE_KEPT), PASS);
    }
    pass_on(pkt, outer.len, &middle, family)
}

/// Moves the Ethernet header up against what follows the first `len`
/// bytes after it, drops those, and returns `slot` (`DECAP_PASSED` if the
/// packet could not be changed).
#[inline(always)]
fn strip(pkt: &Packet, len: usize, slot: u32) -> u32 {
    let Some(eth) = pkt.at::<[u8; ETH_HLEN]>(0).copied() else { return DECAP_PASSED };
    if pkt.write(len, eth).is_err() || pkt.adjust_head(len as i32).is_err() {
        return DECAP_PASSED;
    }
    slot
}

/// Whether this host has a socket for the TCP packet at `off`: an
/// established connection, one in its handshake, or a SYN-cookie ACK its
/// listener accepts. `None` when that cannot be told (not TCP, a SYN,
/// truncated): such packets stay here, as the current table wants.
#[inline(always)]
fn has_socket(pkt: &Packet, off: usize, family: u8) -> Option<bool> {
    let (ip_len, tuple_len) = if family == FAMILY_V4 {
        let ip = pkt.at::<[u8; 20]>(off)?;
        if ip[9] != PROTO_TCP || ip[6] & 0x3f != 0 || ip[7] != 0 {
            return None;
        }
        (usize::from(ip[0] & 0x0f) * 4, 12)
    } else {
        let ip = pkt.at::<[u8; 40]>(off)?;
        if ip[6] != PROTO_TCP {
            return None;
        }
        (40, 36)
    };
    if ip_len < 20 {
        return None;
    }
    let th = pkt.at_mut::<[u8; 20]>(off + ip_len)?;
    // SAFETY: in bounds (checked just above).
    let tcp = unsafe { *th };
    let (syn, ack) = (tcp[13] & 0x02 != 0, tcp[13] & 0x10 != 0);
    if syn {
        return None;
    }
    let (sport, dport) = (u16::from_ne_bytes([tcp[0], tcp[1]]), u16::from_ne_bytes([tcp[2], tcp[3]]));
    let mut tuple = MaybeUninit::<bpf_sock_tuple>::zeroed();
    // SAFETY: one variant of a zeroed tuple, written whole.
    let u = unsafe { &mut (*tuple.as_mut_ptr()).__bindgen_anon_1 };
    if family == FAMILY_V4 {
        let addr = |at: usize| pkt.at::<[u8; 4]>(at).map(|a| u32::from_ne_bytes(*a));
        u.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: addr(off + 12)?,
            daddr: addr(off + 16)?,
            sport,
            dport,
        };
    } else {
        let (saddr, daddr) = (words(pkt.at(off + 8)?), words(pkt.at(off + 24)?));
        u.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 { saddr, daddr, sport, dport };
    }
    // SAFETY: a valid tuple on the stack of the length given; the socket
    // is released on every path below.
    let sk = unsafe {
        bpf_skc_lookup_tcp(pkt.ctx().cast(), tuple.as_mut_ptr(), tuple_len, BPF_F_CURRENT_NETNS as u64, 0)
    };
    if sk.is_null() {
        return Some(false);
    }
    // SAFETY: a socket the helper returned, readable until released.
    let state = unsafe { core::ptr::read_volatile(&(*sk).state) };
    // A listener: only an ACK carrying a SYN cookie it issued is ours.
    let ours = state != TCP_LISTEN || ack && syncookie_ok(pkt, sk.cast(), off, th.cast(), family);
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
    Some(ours)
}

/// Whether listener `sk` issued the SYN cookie the ACK at `th` returns.
#[inline(always)]
fn syncookie_ok(
    pkt: &Packet,
    sk: *mut core::ffi::c_void,
    off: usize,
    th: *mut aya_ebpf::bindings::tcphdr,
    family: u8,
) -> bool {
    // SAFETY (both calls): the header pointers are in bounds of the packet
    // for the lengths given.
    let rc = if family == FAMILY_V4 {
        let Some(iph) = pkt.at_mut::<[u8; 20]>(off) else { return false };
        unsafe { bpf_tcp_check_syncookie(sk, iph.cast(), 20, th, 20) }
    } else {
        let Some(iph) = pkt.at_mut::<[u8; 40]>(off) else { return false };
        unsafe { bpf_tcp_check_syncookie(sk, iph.cast(), 40, th, 20) }
    };
    rc == 0
}

/// Sends the packet on to the previous owner: the outer header (`outer`
/// bytes) goes, the `middle` one stays, toward the next hop the FIB names.
/// Without a resolved neighbour the kernel forwards it. Only out of the
/// interface it came in on, where the backends are: without such a route
/// it is delivered here.
#[inline(always)]
fn pass_on(pkt: &Packet, outer: usize, middle: &Tunnel, family: u8) -> (u32, u32) {
    let total = pkt.len() - outer - ETH_HLEN;
    let mut fib = MaybeUninit::<FibParams>::zeroed();
    // SAFETY: a zeroed parameter block is valid; fields written below.
    let fib = unsafe { fib.assume_init_mut() };
    fib.ifindex = pkt.ingress_ifindex();
    fib.__bindgen_anon_1.tot_len = total as u16;
    if family == FAMILY_V4 {
        fib.family = AF_INET;
        // An IPv4 address is the first word of its 16-byte form.
        fib.__bindgen_anon_3.ipv4_src = words(&middle.src)[0];
        fib.__bindgen_anon_4.ipv4_dst = words(&middle.dst)[0];
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = words(&middle.src);
        fib.__bindgen_anon_4.ipv6_dst = words(&middle.dst);
    }
    // SAFETY: fib is a valid, correctly sized parameter block.
    let rc = unsafe { bpf_fib_lookup(pkt.ctx().cast(), fib, size_of::<FibParams>() as i32, 0) } as u32;
    let ingress = pkt.ingress_ifindex();
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS if fib.ifindex == ingress => {
            let (dmac, smac) = (fib.dmac, fib.smac);
            if strip(pkt, outer, DECAP_DONE) != DECAP_DONE {
                return (DECAP_PASSED, xdp_action::XDP_PASS);
            }
            let pkt = pkt.reload();
            if hop(&pkt, dmac, smac, family).is_none() {
                return (DECAP_SECOND_CHANCE_NO_ROUTE, xdp_action::XDP_DROP);
            }
            (DECAP_SECOND_CHANCE_FORWARDED, xdp_action::XDP_TX)
        }
        // The kernel resolves the neighbour and forwards it.
        BPF_FIB_LKUP_RET_NO_NEIGH if fib.ifindex == ingress => {
            (strip(pkt, outer, DECAP_SECOND_CHANCE_FORWARDED), xdp_action::XDP_PASS)
        }
        _ => (strip(pkt, outer + middle.len, DECAP_SECOND_CHANCE_NO_ROUTE), xdp_action::XDP_PASS),
    }
}

/// One router hop for the frame now led by the middle header: our MACs,
/// TTL / hop limit one less (`None` when it has run out).
#[inline(always)]
fn hop(pkt: &Packet, d: [u8; 6], s: [u8; 6], family: u8) -> Option<()> {
    pkt.write(0, [d[0], d[1], d[2], d[3], d[4], d[5], s[0], s[1], s[2], s[3], s[4], s[5]]).ok()?;
    if family == FAMILY_V4 {
        let ip = pkt.at_mut::<[u8; 20]>(ETH_HLEN)?;
        // SAFETY: in bounds; plain bytes.
        let ip = unsafe { &mut *ip };
        if ip[8] <= 1 {
            return None;
        }
        // RFC 1624 incremental update of the checksum for the TTL word.
        let old = u16::from_be_bytes([ip[8], ip[9]]);
        ip[8] -= 1;
        let new = u16::from_be_bytes([ip[8], ip[9]]);
        let check = u16::from_be_bytes([ip[10], ip[11]]);
        let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    } else {
        let ip = pkt.at_mut::<[u8; 40]>(ETH_HLEN)?;
        // SAFETY: in bounds; plain bytes.
        let ip = unsafe { &mut *ip };
        if ip[7] <= 1 {
            return None;
        }
        ip[7] -= 1;
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
