//! ICMP "fragmentation needed" (IPv4) and "packet too big" (IPv6) back to
//! a client whose packet would exceed the MTU once encapsulated. The frame
//! is rewritten in place into the error message and bounced (XDP_TX),
//! keeping its VLAN tag; checksums are summed straight from the packet.

use lb_common::{FAMILY_V4, Reason};
use lb_ebpf::{
    net::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, Mac, eth},
    parse::{Frame as _, Parsed},
    ptr::Packet,
};

use crate::{csum, maps::IFACE_MAC};

/// IPv4 header plus 8 bytes of the original datagram (RFC 792).
const QUOTE_V4: usize = 28;
/// IPv6 header plus 8 bytes; RFC 4443 allows more, the ports are enough.
const QUOTE_V6: usize = 48;
const IPV6_MIN_MTU: usize = 1280;
/// Ethernet header with one 802.1Q / 802.1ad tag.
const TAGGED: usize = ETH_HLEN + 4;

/// The reply's L2 header at the start of the rewritten frame: back to the
/// client's MAC from ours, under the client's tag if it had one.
#[inline(always)]
fn write_l2<const L2: usize>(pkt: &Packet, client_mac: [u8; 6], tag: [u8; 4], ether_type: u16) -> Option<()> {
    if L2 == ETH_HLEN {
        return pkt.write(0, eth(Mac::from_bytes(&client_mac), IFACE_MAC.load(), ether_type)).ok();
    }
    let tpid = u16::from_be_bytes([tag[0], tag[1]]);
    pkt.write(0, eth(Mac::from_bytes(&client_mac), IFACE_MAC.load(), tpid)).ok()?;
    let t = ether_type.to_be_bytes();
    pkt.write(ETH_HLEN, [tag[2], tag[3], t[0], t[1]]).ok()
}

/// Turns the packet into an ICMP error reporting `mtu` as the largest
/// inner packet that fits; `Reason::DropTooBig` where that is not allowed.
#[inline(never)]
pub fn too_big(pkt: &Packet, p: &Parsed, mtu: usize) -> Reason {
    // Offsets stay constants for the verifier: one copy per L2 length.
    let built = match (p.flow.family == FAMILY_V4, p.l3_off) {
        (true, ETH_HLEN) => v4::<ETH_HLEN>(pkt, p, mtu),
        (true, TAGGED) => v4::<TAGGED>(pkt, p, mtu),
        (false, ETH_HLEN) => v6::<ETH_HLEN>(pkt, p, mtu),
        (false, TAGGED) => v6::<TAGGED>(pkt, p, mtu),
        _ => None,
    };
    match built {
        Some(()) => Reason::IcmpTooBig,
        None => Reason::DropTooBig,
    }
}

#[inline(always)]
fn v4<const L2: usize>(pkt: &Packet, p: &Parsed, mtu: usize) -> Option<()> {
    let l3 = L2;
    let icmp = l3 + 20;
    let client_mac: [u8; 6] = *pkt.at(6)?;
    let tag: [u8; 4] = *pkt.at(12)?;
    let head: [u8; 8] = *pkt.at(p.l3_off)?;
    // Only for DF packets (others the client lets routers fragment), and
    // without IP options so the quoted header is a fixed size.
    if head[0] != 0x45 || head[6] & 0x40 == 0 || p.l3_len < QUOTE_V4 {
        return None;
    }
    let pkt = pkt.adjust_head(-((icmp + 8) as i32 - p.l3_off as i32)).ok()?;
    let pkt = pkt.adjust_tail((icmp + 8 + QUOTE_V4) as i32 - pkt.len() as i32).ok()?;
    // The quoted header's addresses, swapped, address the reply.
    let quoted = icmp + 8;
    let client: [u8; 4] = *pkt.at(quoted + 12)?;
    let vip: [u8; 4] = *pkt.at(quoted + 16)?;

    write_l2::<L2>(&pkt, client_mac, tag, ETH_P_IPV4)?;
    let total = ((20 + 8 + QUOTE_V4) as u16).to_be_bytes();
    let ip = [
        0x45,
        0,
        total[0],
        total[1],
        0,
        0,
        0,
        0,
        64,
        IPPROTO_ICMP,
        0,
        0,
        vip[0],
        vip[1],
        vip[2],
        vip[3],
        client[0],
        client[1],
        client[2],
        client[3],
    ];
    pkt.write(l3, csum::ipv4_header(ip)).ok()?;
    let mtu = (mtu.min(0xffff) as u16).to_be_bytes();
    pkt.write(icmp, [3u8, 4, 0, 0, 0, 0, mtu[0], mtu[1]]).ok()?;
    let sum = csum::packet_sum::<{ 8 + QUOTE_V4 }>(&pkt, icmp)?;
    pkt.write(icmp + 2, csum::fold_native(sum)).ok()
}

#[inline(always)]
fn v6<const L2: usize>(pkt: &Packet, p: &Parsed, mtu: usize) -> Option<()> {
    let l3 = L2;
    let icmp = l3 + 40;
    let client_mac: [u8; 6] = *pkt.at(6)?;
    let tag: [u8; 4] = *pkt.at(12)?;
    if p.l3_len < QUOTE_V6 {
        return None;
    }
    let pkt = pkt.adjust_head(-((icmp + 8) as i32 - p.l3_off as i32)).ok()?;
    let pkt = pkt.adjust_tail((icmp + 8 + QUOTE_V6) as i32 - pkt.len() as i32).ok()?;
    let quoted = icmp + 8;
    let client: [u8; 16] = *pkt.at(quoted + 8)?;
    let vip: [u8; 16] = *pkt.at(quoted + 24)?;

    write_l2::<L2>(&pkt, client_mac, tag, ETH_P_IPV6)?;
    let len = ((8 + QUOTE_V6) as u16).to_be_bytes();
    pkt.write(l3, [0x60u8, 0, 0, 0, len[0], len[1], IPPROTO_ICMPV6, 64]).ok()?;
    pkt.write(l3 + 8, vip).ok()?;
    pkt.write(l3 + 24, client).ok()?;
    let mtu = (mtu.max(IPV6_MIN_MTU) as u32).to_be_bytes();
    pkt.write(icmp, [2u8, 0, 0, 0, mtu[0], mtu[1], mtu[2], mtu[3]]).ok()?;
    // Pseudo-header: both addresses (already in place), then the
    // upper-layer length and next header as 32-bit big-endian words.
    let pseudo = csum::packet_sum::<32>(&pkt, l3 + 8)?
        + u32::from_ne_bytes([0, 0, len[0], len[1]]) as u64
        + u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]) as u64;
    let sum = csum::packet_sum::<{ 8 + QUOTE_V6 }>(&pkt, icmp)? + pseudo;
    pkt.write(icmp + 2, csum::fold_native(sum)).ok()
}
