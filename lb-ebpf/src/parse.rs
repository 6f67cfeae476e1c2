//! Frame → flow key: Ethernet, one 802.1Q/802.1ad tag, IPv4 (any IHL) or
//! IPv6 (up to `MAX_EXT_HEADERS` extension headers), then the TCP or UDP
//! ports. An ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6)
//! quoting a packet a VIP sent yields the flow of the connection it is
//! about, so the error reaches the backend that owns that connection.
//!
//! Policy, decided here once and counted under a reason each:
//! - fragments (IPv4 MF or offset, IPv6 fragment header) pass to the host:
//!   later fragments have no ports, and a flow's fragments must not be
//!   split between backends;
//! - IPv6 extension headers are skipped (hop-by-hop, routing, destination
//!   options); a longer chain passes as `PassIpv6Ext`, AH, ESP and other
//!   protocols as `PassNotVip`;
//! - a second VLAN tag is not IP to us (`PassNotIp`);
//! - anything truncated or inconsistent is malformed and dropped (the
//!   kernel would drop it too). Program `xlb` parses only frames that may
//!   be for a VIP: an untagged one to another address passes unparsed.
//!
//! Header types here are byte arrays only (alignment 1), so a frame may
//! sit at any address: the same code runs on packets and on host slices.

use core::mem::size_of;

use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Reason};

use crate::net::{ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6};

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension headers walked before giving up.
pub const MAX_EXT_HEADERS: usize = 4;

/// What the balancer needs from a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub flow: FlowKey,
    /// TCP flags; 0 for UDP and ICMP errors.
    pub tcp_flags: u8,
    /// Where the IP header starts (after Ethernet and any VLAN tag).
    pub l3_off: usize,
    /// Length of the IP packet (header included), from the IP header.
    pub l3_len: usize,
    /// An ICMP error about `flow` (which is the connection it quotes, as
    /// the client sees it), not a packet of the flow itself.
    pub icmp_error: bool,
}

impl Parsed {
    /// A TCP SYN without ACK: a client opening a new connection.
    #[inline(always)]
    pub fn opens_connection(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Read access to a frame. Every read is bounds-checked by the implementor
/// against the end of the frame; this is the only way the parser touches
/// packet memory.
pub trait Frame {
    /// The `T` at byte offset `off`, if all of it lies inside the frame.
    /// Only called with alignment-1 types.
    fn at<T>(&self, off: usize) -> Option<&T>;
    /// Frame length in bytes.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[repr(C)]
struct Eth {
    _dst: [u8; 6],
    _src: [u8; 6],
    ether_type: [u8; 2],
}

#[repr(C)]
struct Vlan {
    _tci: [u8; 2],
    ether_type: [u8; 2],
}

#[repr(C)]
struct Ipv4 {
    vihl: u8,
    _tos: u8,
    tot_len: [u8; 2],
    _id: [u8; 2],
    frags: [u8; 2],
    _ttl: u8,
    proto: u8,
    _check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
struct Ipv6 {
    vcf: [u8; 4],
    payload_len: [u8; 2],
    next: u8,
    _hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// The start of TCP and UDP headers.
#[repr(C)]
struct Ports {
    src: [u8; 2],
    dst: [u8; 2],
}

#[repr(C)]
struct TcpStart {
    ports: Ports,
    _seq_ack: [u8; 8],
    offset: u8,
    flags: u8,
}

#[repr(C)]
struct Udp {
    ports: Ports,
    len: [u8; 2],
    _check: [u8; 2],
}

/// ICMP and ICMPv6 share the first bytes.
#[repr(C)]
struct IcmpStart {
    kind: u8,
    code: u8,
    _check: [u8; 2],
    _rest: [u8; 4],
}

/// An IPv6 extension header's first two bytes.
#[repr(C)]
struct ExtStart {
    next: u8,
    len: u8,
}

#[inline(always)]
fn load<T, F: Frame + ?Sized>(f: &F, off: usize) -> Result<&T, Reason> {
    f.at::<T>(off).ok_or(Reason::DropMalformed)
}

/// Parses the frame into its flow, or says why it is not balanceable.
#[inline(always)]
pub fn parse<F: Frame + ?Sized>(f: &F) -> Result<Parsed, Reason> {
    let eth: &Eth = load(f, 0)?;
    let mut off = size_of::<Eth>();
    let mut ether_type = u16::from_be_bytes(eth.ether_type);
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: &Vlan = load(f, off)?;
        ether_type = u16::from_be_bytes(vlan.ether_type);
        off += size_of::<Vlan>();
    }
    match ether_type {
        ETH_P_IPV4 => parse_v4(f, off),
        ETH_P_IPV6 => parse_v6(f, off),
        _ => Err(Reason::PassNotIp),
    }
}

/// An IPv4 header at `off`, checked: its header length, and its end (no
/// further than `limit`).
#[inline(always)]
fn ipv4_at<F: Frame + ?Sized>(f: &F, off: usize, limit: usize) -> Result<(&Ipv4, usize, usize), Reason> {
    let ip: &Ipv4 = load(f, off)?;
    // Masked, so the verifier sees a bounded offset.
    let hdr_len = ((ip.vihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if ip.vihl >> 4 != 4 || hdr_len < size_of::<Ipv4>() || tot_len < hdr_len || off + tot_len > limit {
        return Err(Reason::DropMalformed);
    }
    Ok((ip, hdr_len, tot_len))
}

#[inline(always)]
fn parse_v4<F: Frame + ?Sized>(f: &F, off: usize) -> Result<Parsed, Reason> {
    let (ip, hdr_len, tot_len) = ipv4_at(f, off, f.len())?;
    // More-fragments flag or a non-zero offset: a fragment.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(Reason::PassFragment);
    }
    let (l4, end) = (off + hdr_len, off + tot_len);
    let mut flow = FlowKey { proto: ip.proto, family: FAMILY_V4, ..FlowKey::default() };
    flow.src[..4].copy_from_slice(&ip.src);
    flow.dst[..4].copy_from_slice(&ip.dst);
    if ip.proto == IPPROTO_ICMP {
        return icmp_v4(f, off, l4, end);
    }
    let (flow, tcp_flags) = ports(f, l4, end, flow)?;
    Ok(Parsed { flow, tcp_flags, l3_off: off, l3_len: tot_len, icmp_error: false })
}

/// Fragmentation needed (type 3, code 4) quoting a TCP or UDP packet from
/// a VIP: the flow it is about. Other ICMP is not for a VIP.
#[inline(always)]
fn icmp_v4<F: Frame + ?Sized>(f: &F, l3: usize, l4: usize, end: usize) -> Result<Parsed, Reason> {
    let icmp: &IcmpStart = load(f, l4)?;
    if icmp.kind != 3 || icmp.code != 4 {
        return Err(Reason::PassNotVip);
    }
    let quoted = l4 + size_of::<IcmpStart>();
    // The quote may be cut short after 8 bytes of the original payload.
    let (inner, hdr_len, _) = ipv4_at(f, quoted, usize::MAX)?;
    let inner_l4 = quoted + hdr_len;
    if u16::from_be_bytes(inner.frags) & 0x1fff != 0 {
        // About a later fragment: no ports to find the connection by.
        return Err(Reason::PassFragment);
    }
    if inner_l4 + 8 > end {
        return Err(Reason::DropMalformed);
    }
    let mut flow = FlowKey { proto: inner.proto, family: FAMILY_V4, ..FlowKey::default() };
    // The quoted packet went VIP → client: the connection is the reverse.
    flow.src[..4].copy_from_slice(&inner.dst);
    flow.dst[..4].copy_from_slice(&inner.src);
    let flow = quoted_ports(f, inner_l4, flow)?;
    Ok(Parsed { flow, tcp_flags: 0, l3_off: l3, l3_len: end - l3, icmp_error: true })
}

#[inline(always)]
fn parse_v6<F: Frame + ?Sized>(f: &F, off: usize) -> Result<Parsed, Reason> {
    let ip: &Ipv6 = load(f, off)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Reason::DropMalformed);
    }
    let end = off + size_of::<Ipv6>() + u16::from_be_bytes(ip.payload_len) as usize;
    if end > f.len() {
        return Err(Reason::DropMalformed);
    }
    let (next, l4) = skip_ext_headers(f, ip.next, off + size_of::<Ipv6>(), end)?;
    let flow = FlowKey { src: ip.src, dst: ip.dst, proto: next, family: FAMILY_V6, ..FlowKey::default() };
    if next == IPPROTO_ICMPV6 {
        return icmp_v6(f, off, l4, end);
    }
    let (flow, tcp_flags) = ports(f, l4, end, flow)?;
    Ok(Parsed { flow, tcp_flags, l3_off: off, l3_len: end - off, icmp_error: false })
}

/// Walks hop-by-hop, routing and destination-options headers from `off`;
/// returns the next header after them and where it starts.
#[inline(always)]
fn skip_ext_headers<F: Frame + ?Sized>(
    f: &F,
    mut next: u8,
    mut off: usize,
    end: usize,
) -> Result<(u8, usize), Reason> {
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            0 | 43 | 60 => {
                let ext: &ExtStart = load(f, off)?;
                next = ext.next;
                off += (ext.len as usize + 1) * 8;
                if off > end {
                    return Err(Reason::DropMalformed);
                }
            }
            44 => return Err(Reason::PassFragment),
            _ => return Ok((next, off)),
        }
    }
    match next {
        0 | 43 | 60 | 44 => Err(Reason::PassIpv6Ext),
        _ => Ok((next, off)),
    }
}

/// Packet too big (type 2) quoting a TCP or UDP packet from a VIP.
#[inline(always)]
fn icmp_v6<F: Frame + ?Sized>(f: &F, l3: usize, l4: usize, end: usize) -> Result<Parsed, Reason> {
    let icmp: &IcmpStart = load(f, l4)?;
    if icmp.kind != 2 {
        return Err(Reason::PassNotVip);
    }
    let quoted = l4 + size_of::<IcmpStart>();
    let inner: &Ipv6 = load(f, quoted)?;
    let inner_l4 = quoted + size_of::<Ipv6>();
    if inner.vcf[0] >> 4 != 6 || inner_l4 + 8 > end {
        return Err(Reason::DropMalformed);
    }
    // The quoted packet went VIP → client: the connection is the reverse.
    let flow = FlowKey {
        src: inner.dst,
        dst: inner.src,
        proto: inner.next,
        family: FAMILY_V6,
        ..FlowKey::default()
    };
    let flow = quoted_ports(f, inner_l4, flow)?;
    Ok(Parsed { flow, tcp_flags: 0, l3_off: l3, l3_len: end - l3, icmp_error: true })
}

/// The ports of a quoted TCP or UDP header at `l4`, swapped like its
/// addresses.
#[inline(always)]
fn quoted_ports<F: Frame + ?Sized>(f: &F, l4: usize, mut flow: FlowKey) -> Result<FlowKey, Reason> {
    if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
        return Err(Reason::PassNotVip);
    }
    let p: &Ports = load(f, l4)?;
    flow.sport_be = u16::from_ne_bytes(p.dst);
    flow.dport_be = u16::from_ne_bytes(p.src);
    Ok(flow)
}

/// The ports (and TCP flags) of a TCP or UDP header at `l4`, the IP packet
/// ending at `end`.
#[inline(always)]
fn ports<F: Frame + ?Sized>(
    f: &F,
    l4: usize,
    end: usize,
    mut flow: FlowKey,
) -> Result<(FlowKey, u8), Reason> {
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
            let udp: &Udp = load(f, l4)?;
            let len = u16::from_be_bytes(udp.len) as usize;
            if len < size_of::<Udp>() || l4 + len > end {
                return Err(Reason::DropMalformed);
            }
            (&udp.ports, 0)
        }
        _ => return Err(Reason::PassNotVip),
    };
    flow.sport_be = u16::from_ne_bytes(ports.src);
    flow.dport_be = u16::from_ne_bytes(ports.dst);
    Ok((flow, tcp_flags))
}

/// Host builds (tests, fuzzing) parse plain byte slices.
#[cfg(not(target_arch = "bpf"))]
impl Frame for [u8] {
    fn at<T>(&self, off: usize) -> Option<&T> {
        debug_assert_eq!(core::mem::align_of::<T>(), 1, "parser header types are byte arrays");
        let end = off.checked_add(size_of::<T>())?;
        let bytes = self.get(off..end)?;
        // SAFETY: in bounds, alignment 1, and T is plain bytes.
        Some(unsafe { &*bytes.as_ptr().cast::<T>() })
    }

    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}
