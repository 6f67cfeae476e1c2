//! Protocol numbers the programs share, and addresses and the Ethernet
//! header as words and halfwords in memory order.

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An address field (IPv4 in the first word) as four words in memory order.
#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// A MAC address as three halfwords in memory order: copied with three
/// 2-byte accesses rather than six 1-byte ones.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Mac(pub [u16; 3]);

impl Mac {
    #[inline(always)]
    pub fn from_bytes(b: &[u8; 6]) -> Self {
        Mac([
            u16::from_ne_bytes([b[0], b[1]]),
            u16::from_ne_bytes([b[2], b[3]]),
            u16::from_ne_bytes([b[4], b[5]]),
        ])
    }
}

/// An Ethernet header as halfwords in memory order.
#[inline(always)]
pub fn eth(dst: Mac, src: Mac, ether_type: u16) -> [u16; 7] {
    let (d, s) = (dst.0, src.0);
    [d[0], d[1], d[2], s[0], s[1], s[2], ether_type.to_be()]
}
