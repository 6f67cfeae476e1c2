//! Frame → flow key. Ethernet, one 802.1Q/802.1ad tag, IPv4 (any IHL) or
//! IPv6, then the TCP or UDP ports.
//!
//! Policy, decided here once: fragments carry no (or not all) ports, so
//! they pass to the host; IPv6 extension headers pass for now; anything
//! truncated or inconsistent is malformed and dropped (the kernel would
//! drop it too).

use core::mem::size_of;

use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Reason};

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// What the balancer needs from a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub flow: FlowKey,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    /// Where the IP header starts (after Ethernet and any VLAN tag).
    pub l3_off: usize,
    /// Length of the IP packet (header included), from the IP header.
    pub l3_len: usize,
}

impl Parsed {
    /// A TCP SYN without ACK: a client opening a new connection.
    #[inline(always)]
    pub fn opens_connection(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// Read access to a frame. Every read is bounds-checked by the implementor
/// against the end of the frame; this is the only way the parser touches
/// packet memory.
pub trait Frame {
    /// The `T` at byte offset `off`, if all of it lies inside the frame.
    fn at<T>(&self, off: usize) -> Option<&T>;
    /// Frame length in bytes.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The start of TCP and UDP headers: ports, and for TCP the flags at 13.
#[repr(C)]
struct Ports {
    src: [u8; 2],
    dst: [u8; 2],
}

#[repr(C)]
struct TcpStart {
    ports: Ports,
    seq_ack: [u8; 8],
    offset: u8,
    flags: u8,
}

#[inline(always)]
fn load<T, F: Frame>(f: &F, off: usize) -> Result<&T, Reason> {
    f.at::<T>(off).ok_or(Reason::DropMalformed)
}

/// Parses the frame into its flow, or says why it is not balanceable.
#[inline(always)]
pub fn parse<F: Frame>(f: &F) -> Result<Parsed, Reason> {
    let eth: &EthHdr = load(f, 0)?;
    let mut off = size_of::<EthHdr>();
    let mut ether_type = u16::from_be(eth.ether_type);
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: &VlanHdr = load(f, off)?;
        ether_type = u16::from_be(vlan.ether_type);
        off += size_of::<VlanHdr>();
    }
    match ether_type {
        ETH_P_IPV4 => parse_v4(f, off),
        ETH_P_IPV6 => parse_v6(f, off),
        _ => Err(Reason::PassNotIp),
    }
}

#[inline(always)]
fn parse_v4<F: Frame>(f: &F, off: usize) -> Result<Parsed, Reason> {
    let ip: &Ipv4Hdr = load(f, off)?;
    if ip.vihl >> 4 != 4 {
        return Err(Reason::DropMalformed);
    }
    // Masked, so the verifier sees a bounded offset.
    let hdr_len = ((ip.vihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if hdr_len < size_of::<Ipv4Hdr>() || tot_len < hdr_len || off + tot_len > f.len() {
        return Err(Reason::DropMalformed);
    }
    // More-fragments flag or a non-zero offset: a fragment.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(Reason::PassFragment);
    }
    let mut flow = FlowKey { proto: ip.proto, family: FAMILY_V4, ..FlowKey::default() };
    flow.src[..4].copy_from_slice(&ip.src_addr);
    flow.dst[..4].copy_from_slice(&ip.dst_addr);
    ports(f, off, off + hdr_len, off + tot_len, flow)
}

#[inline(always)]
fn parse_v6<F: Frame>(f: &F, off: usize) -> Result<Parsed, Reason> {
    let ip: &Ipv6Hdr = load(f, off)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Reason::DropMalformed);
    }
    let l4 = off + size_of::<Ipv6Hdr>();
    let end = l4 + u16::from_be_bytes(ip.payload_len) as usize;
    if end > f.len() {
        return Err(Reason::DropMalformed);
    }
    let flow = FlowKey {
        src: ip.src_addr,
        dst: ip.dst_addr,
        proto: ip.next_hdr,
        family: FAMILY_V6,
        ..FlowKey::default()
    };
    match ip.next_hdr {
        // Hop-by-hop, routing, destination options, AH, mobility, HIP, shim6.
        0 | 43 | 60 | 51 | 135 | 139 | 140 => Err(Reason::PassIpv6Ext),
        44 => Err(Reason::PassFragment),
        _ => ports(f, off, l4, end, flow),
    }
}

/// Fills in the ports (and TCP flags) of a TCP or UDP flow whose IP packet
/// spans `l3_off..end` and whose transport header starts at `l4`.
#[inline(always)]
fn ports<F: Frame>(f: &F, l3_off: usize, l4: usize, end: usize, mut flow: FlowKey) -> Result<Parsed, Reason> {
    let (ports, tcp_flags) = match flow.proto {
        PROTO_TCP => {
            let tcp: &TcpStart = load(f, l4)?;
            // Data offset in 32-bit words; less than 5 is no TCP header.
            let hdr_len = (tcp.offset >> 4) as usize * 4;
            if hdr_len < 20 || l4 + hdr_len > end {
                return Err(Reason::DropMalformed);
            }
            (&tcp.ports, tcp.flags)
        }
        PROTO_UDP => {
            if l4 + 8 > end {
                return Err(Reason::DropMalformed);
            }
            (load::<Ports, F>(f, l4)?, 0)
        }
        _ => return Err(Reason::PassNotVip),
    };
    flow.sport_be = u16::from_ne_bytes(ports.src);
    flow.dport_be = u16::from_ne_bytes(ports.dst);
    Ok(Parsed { flow, tcp_flags, l3_off, l3_len: end - l3_off })
}
