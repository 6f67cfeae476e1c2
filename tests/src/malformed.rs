//! Malformed and unusual frames, each with what xlb does with it: the
//! table `bad_input` checks one frame at a time through BPF_PROG_TEST_RUN
//! and `flood_e2e` sends at the generator's full rate. Addressed to the
//! VIPs of [`crate::lab`] (TCP and UDP on VIP4, TCP on VIP6; ports 80 and
//! 53), from clients outside the lab.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};

pub use crate::lab::{VIP4, VIP6};
use crate::{
    frames::*,
    plane::{XDP_DROP, XDP_PASS, XDP_TX},
};

pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// One frame and its expected fate.
pub struct Case {
    pub name: &'static str,
    pub frame: Vec<u8>,
    /// XDP action.
    pub action: u32,
    /// The one reason counter it moves.
    pub reason: Reason,
}

pub fn tcp4(sport: u16) -> Vec<u8> {
    v4_frame(CLIENT4, VIP4, PROTO_TCP, &tcp(sport, 80, TCP_ACK, b""))
}

pub fn tcp6(sport: u16) -> Vec<u8> {
    v6_frame(CLIENT6, VIP6, PROTO_TCP, &tcp(sport, 80, TCP_ACK, b""))
}

pub fn udp4(sport: u16, payload: &[u8]) -> Vec<u8> {
    v4_frame(CLIENT4, VIP4, PROTO_UDP, &udp(sport, 53, payload))
}

/// IPv6 with extension headers (`next`, 8 bytes each) before TCP.
pub fn v6_with_ext(chain: &[u8], sport: u16) -> Vec<u8> {
    let seg = tcp(sport, 80, TCP_ACK, b"");
    let first = *chain.first().unwrap_or(&PROTO_TCP);
    let mut payload = Vec::new();
    for (i, _) in chain.iter().enumerate() {
        let next = *chain.get(i + 1).unwrap_or(&PROTO_TCP);
        payload.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    payload.extend(seg);
    let mut f = eth(ETH_P_IPV6);
    f.extend(ipv6(CLIENT6, VIP6, first, payload.len()));
    f.extend(payload);
    f
}

/// ICMP fragmentation needed from `from` about a TCP packet the VIP sent
/// the client (VIP:80 → client:`cport`), quoting `quote` bytes of it.
pub fn frag_needed(cport: u16, quote: usize) -> Vec<u8> {
    let mut inner = ipv4(VIP4, CLIENT4, PROTO_TCP, &[], 20, 0x4000);
    inner.extend(tcp(80, cport, TCP_ACK, b""));
    inner.truncate(quote);
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0xc8];
    icmp.extend(inner);
    let c = checksum(&icmp).to_be_bytes();
    icmp[2..4].copy_from_slice(&c);
    v4_frame(Ipv4Addr::new(203, 0, 113, 1), VIP4, PROTO_ICMP, &icmp)
}

pub fn packet_too_big(cport: u16) -> Vec<u8> {
    let mut inner = ipv6(VIP6, CLIENT6, PROTO_TCP, 20);
    inner.extend(tcp(80, cport, TCP_ACK, b""));
    inner.truncate(48);
    let mut icmp = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
    icmp.extend(inner);
    v6_frame(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1), VIP6, PROTO_ICMPV6, &icmp)
}

/// Every class of bad or unusual header: lengths that lie, fragments,
/// extension chains, stacked tags, other protocols, ICMP errors that quote
/// too little. Frames xlb forwards are here too (options, padding, short
/// extension chains): unusual is not malformed.
pub fn cases() -> Vec<Case> {
    let set = |mut f: Vec<u8>, at: usize, bytes: &[u8]| {
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    let with_ihl = |ihl: u8| set(tcp4(2000), 14, &[0x40 | ihl]);
    let frag = |flags: u16| set(tcp4(2001), 20, &flags.to_be_bytes());
    let mut padded = tcp4(2002);
    padded.extend([0; 10]);
    let mut v4_opts = eth(ETH_P_IP);
    let seg = tcp(2003, 80, TCP_ACK, b"");
    v4_opts.extend(ipv4(CLIENT4, VIP4, PROTO_TCP, &[1, 1, 1, 1, 1, 1, 1, 0], seg.len(), 0));
    v4_opts.extend(seg);
    let frag6 = {
        let mut f = v6_with_ext(&[], 2004);
        // Next header 44 with a fragment header in front of the TCP header.
        f[20] = 44;
        f.splice(54..54, [PROTO_TCP, 0, 0, 1, 0, 0, 0, 1]);
        let len = u16::from_be_bytes([f[18], f[19]]) + 8;
        f[18..20].copy_from_slice(&len.to_be_bytes());
        f
    };
    let mut qinq = vlan(vlan(tcp4(2005), 5), 6);
    qinq[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
    let ext_too_long = {
        let mut f = v6_with_ext(&[0], 2006);
        f[54 + 1] = 200; // hdr_ext_len: 1608 bytes, past the packet
        f
    };
    let cases: Vec<(&'static str, Vec<u8>, u32, Reason)> = vec![
        ("ihl 4", with_ihl(4), XDP_DROP, Reason::DropMalformed),
        ("ihl 0", with_ihl(0), XDP_DROP, Reason::DropMalformed),
        ("ihl larger than the packet", with_ihl(15), XDP_DROP, Reason::DropMalformed),
        ("version 5", set(tcp4(2000), 14, &[0x55]), XDP_DROP, Reason::DropMalformed),
        ("ipv4 options (ihl 7)", v4_opts, XDP_TX, Reason::Forwarded),
        (
            "total length below the header",
            set(tcp4(2000), 16, &19u16.to_be_bytes()),
            XDP_DROP,
            Reason::DropMalformed,
        ),
        (
            "total length past the frame",
            set(tcp4(2000), 16, &41u16.to_be_bytes()),
            XDP_DROP,
            Reason::DropMalformed,
        ),
        ("frame padded past the total length", padded, XDP_TX, Reason::Forwarded),
        ("first ipv4 fragment", frag(0x2000), XDP_PASS, Reason::PassFragment),
        ("later ipv4 fragment", frag(0x00b9), XDP_PASS, Reason::PassFragment),
        ("last ipv4 fragment", frag(0x0001), XDP_PASS, Reason::PassFragment),
        ("ipv4 DF only", frag(0x4000), XDP_TX, Reason::Forwarded),
        ("ipv6 fragment header", frag6, XDP_PASS, Reason::PassFragment),
        ("ipv6 hop-by-hop", v6_with_ext(&[0], 2007), XDP_TX, Reason::Forwarded),
        ("ipv6 routing", v6_with_ext(&[43], 2008), XDP_TX, Reason::Forwarded),
        ("ipv6 destination options", v6_with_ext(&[60], 2009), XDP_TX, Reason::Forwarded),
        ("ipv6 chain of four", v6_with_ext(&[0, 43, 60, 60], 2010), XDP_TX, Reason::Forwarded),
        ("ipv6 chain past the cap", v6_with_ext(&[0, 43, 60, 60, 60], 2011), XDP_PASS, Reason::PassIpv6Ext),
        ("ipv6 extension past the packet", ext_too_long, XDP_DROP, Reason::DropMalformed),
        (
            "ipv6 payload length past the frame",
            set(tcp6(2012), 18, &100u16.to_be_bytes()),
            XDP_DROP,
            Reason::DropMalformed,
        ),
        ("stacked vlan tags", qinq, XDP_PASS, Reason::PassNotIp),
        ("tcp data offset 4", set(tcp4(2013), 14 + 20 + 12, &[0x40]), XDP_DROP, Reason::DropMalformed),
        (
            "tcp data offset past the packet",
            set(tcp4(2014), 14 + 20 + 12, &[0x60]),
            XDP_DROP,
            Reason::DropMalformed,
        ),
        ("udp without payload", udp4(2015, b""), XDP_TX, Reason::Forwarded),
        ("udp length 0", set(udp4(2016, b"x"), 14 + 20 + 4, &[0, 0]), XDP_DROP, Reason::DropMalformed),
        (
            "udp length past the packet",
            set(udp4(2017, b"x"), 14 + 20 + 4, &[0, 10]),
            XDP_DROP,
            Reason::DropMalformed,
        ),
        (
            "lldp",
            {
                let mut f = eth(0x88cc);
                f.extend([0; 46]);
                f
            },
            XDP_PASS,
            Reason::PassNotIp,
        ),
        (
            "arp",
            {
                let mut f = eth(ETH_P_ARP);
                f.extend([0; 28]);
                f
            },
            XDP_PASS,
            Reason::PassNotIp,
        ),
        (
            "icmp echo to the vip",
            v4_frame(CLIENT4, VIP4, PROTO_ICMP, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        ("frag needed, quote cut in the ip header", frag_needed(3000, 12), XDP_DROP, Reason::DropMalformed),
        ("frag needed, quote cut in the ports", frag_needed(3000, 22), XDP_DROP, Reason::DropMalformed),
        (
            "frag needed quoting another port",
            set(frag_needed(3000, 28), 14 + 20 + 8 + 20, &81u16.to_be_bytes()),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        ("sctp to the vip", v4_frame(CLIENT4, VIP4, 132, &[0; 12]), XDP_PASS, Reason::PassNotVip),
    ];
    cases.into_iter().map(|(name, frame, action, reason)| Case { name, frame, action, reason }).collect()
}
