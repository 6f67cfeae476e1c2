//! Program `xlb_decap`, for backends of TUN-mode VIPs: strips the outer
//! IPv4 (protocol 4) or IPv6 (next header 41) header from packets whose
//! inner destination is one of this host's VIPs, and passes the inner
//! packet to the kernel. Everything else passes as it came.
//!
//! Only the balancers may tunnel to the VIPs: a packet for one of them
//! whose outer source is not in `DECAP_SOURCES` is dropped and counted, or
//! anyone could reach the service past the balancer with a forged client
//! address.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::{
    DECAP_DONE, DECAP_NOT_OURS, DECAP_PASSED, DECAP_SLOTS, DECAP_UNTRUSTED, DecapKey, DecapSource, FAMILY_V4,
    FAMILY_V6,
};
use lb_ebpf::{
    net::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6},
    parse::Frame as _,
    ptr::Packet,
};

#[map(name = "DECAP_VIPS")]
static DECAP_VIPS: HashMap<DecapKey, u8> = HashMap::with_max_entries(1024, 0);

#[map(name = "DECAP_SOURCES")]
static DECAP_SOURCES: LpmTrie<DecapSource, u8> = LpmTrie::with_max_entries(256, 0);

#[map(name = "DECAP_STATS")]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_SLOTS, 0);

#[xdp]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    let slot = decap(&Packet::new(&ctx));
    if let Some(c) = DECAP_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
    if slot == DECAP_UNTRUSTED { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS }
}

/// Decapsulates if the packet is ours; returns the counter slot.
#[inline(always)]
fn decap(pkt: &Packet) -> u32 {
    let Some(&[t0, t1]) = pkt.at::<[u8; 2]>(12) else { return DECAP_PASSED };
    let (outer_len, outer_src, inner_dst, family) = match u16::from_be_bytes([t0, t1]) {
        ETH_P_IPV4 => {
            let Some(ip) = pkt.at::<[u8; 20]>(ETH_HLEN) else { return DECAP_PASSED };
            // Our outer headers never carry options, and set DF: a fragment
            // (MF or an offset) is not ours, and its inner bytes are partial.
            if ip[0] != 0x45 || ip[9] != IPPROTO_IPIP || ip[6] & 0x3f != 0 || ip[7] != 0 {
                return DECAP_PASSED;
            }
            let Some(&[inner_version]) = pkt.at::<[u8; 1]>(ETH_HLEN + 20) else { return DECAP_PASSED };
            let Some(dst) = pkt.at::<[u8; 4]>(ETH_HLEN + 20 + 16) else { return DECAP_PASSED };
            if inner_version >> 4 != 4 {
                return DECAP_PASSED;
            }
            let (mut src, mut addr) = ([0u8; 16], [0u8; 16]);
            src[..4].copy_from_slice(&ip[12..16]);
            addr[..4].copy_from_slice(dst);
            (20, src, addr, FAMILY_V4)
        }
        ETH_P_IPV6 => {
            let Some(ip) = pkt.at::<[u8; 40]>(ETH_HLEN) else { return DECAP_PASSED };
            if ip[0] >> 4 != 6 || ip[6] != IPPROTO_IPV6 {
                return DECAP_PASSED;
            }
            let Some(&[inner_version]) = pkt.at::<[u8; 1]>(ETH_HLEN + 40) else { return DECAP_PASSED };
            let Some(dst) = pkt.at::<[u8; 16]>(ETH_HLEN + 40 + 24) else { return DECAP_PASSED };
            if inner_version >> 4 != 6 {
                return DECAP_PASSED;
            }
            let mut src = [0u8; 16];
            src.copy_from_slice(&ip[8..24]);
            (40, src, *dst, FAMILY_V6)
        }
        _ => return DECAP_PASSED,
    };
    let key = DecapKey { addr: inner_dst, family, _pad: [0; 3] };
    // SAFETY: read-only lookup.
    if unsafe { DECAP_VIPS.get(key) }.is_none() {
        return DECAP_NOT_OURS;
    }
    // Full-length lookup: the trie answers with the longest prefix holding it.
    let source = Key::new(8 + 128, DecapSource { family, addr: outer_src });
    if DECAP_SOURCES.get(&source).is_none() {
        return DECAP_UNTRUSTED;
    }
    // Move the Ethernet header up against the inner packet, then drop the
    // bytes in front of it.
    let Some(eth) = pkt.at::<[u8; ETH_HLEN]>(0).copied() else { return DECAP_PASSED };
    if pkt.write(outer_len, eth).is_err() || pkt.adjust_head(outer_len as i32).is_err() {
        return DECAP_PASSED;
    }
    DECAP_DONE
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
