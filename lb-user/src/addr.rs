//! Conversions between `IpAddr` and the maps' (bytes, family) form.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{FAMILY_V4, FAMILY_V6, VipKey};

/// IPv4 in the first four bytes, the rest zero; IPv6 as is.
pub fn to_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            (bytes, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// The inverse of `to_bytes`; `None` for an unknown family.
pub fn from_bytes(bytes: [u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()),
        FAMILY_V6 => Some(Ipv6Addr::from(bytes).into()),
        _ => None,
    }
}

pub fn vip_key(addr: IpAddr, port: u16, proto: u8) -> VipKey {
    let (addr, family) = to_bytes(addr);
    VipKey { addr, port_be: port.to_be(), proto, family }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
