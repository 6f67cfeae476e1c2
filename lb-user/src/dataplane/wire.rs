//! The maps' `#[repr(C)]` values (lb-common) and the rich types the rest of
//! the daemon speaks, converted both ways. A value read from a map is
//! checked here once: anything that does not decode is an error, never a
//! guess.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_HOP, BACKEND_TUN, BackendInfo, FAMILY_V4, FAMILY_V6, MODE_DR,
    MODE_TUN, PROTO_TCP, PROTO_UDP, VIP_PREVIOUS, VipInfo, VipKey, limits::TABLES_PER_VIP,
};

use crate::model::{Forward, Protocol, VipAddr};

/// A VIP's index into `VIP_STATS` and its pair of tables.
pub type VipId = u32;
pub use lb_common::{BackendId, NO_BACKEND};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown address family {0}")]
    Family(u8),
    #[error("unknown protocol {0}")]
    Protocol(u8),
    #[error("unknown forwarding mode {0}")]
    Mode(u8),
    #[error("VIP {id} points at table {table}, which is not one of its own")]
    Table { id: VipId, table: u32 },
    #[error("unknown backend flags {0:#x}")]
    Flags(u8),
}

/// Which of a VIP's two tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    First,
    Second,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::First => Side::Second,
            Side::Second => Side::First,
        }
    }

    fn offset(self) -> u32 {
        match self {
            Side::First => 0,
            Side::Second => 1,
        }
    }
}

/// The number of a VIP's table in the `MAGLEV` map.
pub fn table_number(vip: VipId, side: Side) -> u32 {
    vip * TABLES_PER_VIP + side.offset()
}

/// `VIPS` value: the VIP's id, the table packets use, its mode, and
/// whether its other table still holds the one before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipEntry {
    pub id: VipId,
    pub live: Side,
    pub forward: Forward,
    pub previous: Previous,
}

/// What the VIP's other table means to packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Previous {
    /// Nothing: being rewritten, or kept past its window.
    #[default]
    Forgotten,
    /// The table in force before the last switch: second chance (TUN).
    Kept,
}

/// What a backend's entry lets packets do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendUse {
    /// Nothing: flows recorded for it rebalance.
    Unused,
    /// In its VIP's table: new and established flows.
    Active,
    /// Out of the table: established flows only.
    Draining,
}

/// `BACKENDS` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    pub addr: IpAddr,
    /// DR: the backend's MAC. TUN: the next hop's, when `hop_mtu` is set.
    pub mac: [u8; 6],
    pub used: BackendUse,
    pub forward: Forward,
    /// Changes whenever the id changes owner (see `BackendInfo`).
    pub generation: u32,
    pub vip: VipId,
    /// TUN: the next hop is resolved (its MAC in `mac`), and this is the
    /// largest outer packet its path takes; `None`: the data plane asks the
    /// kernel's FIB.
    pub hop_mtu: Option<u16>,
}

impl BackendEntry {
    /// An entry that takes no flows, keeping `generation` so that the id's
    /// next owner gets a new one.
    pub fn unused(generation: u32) -> Self {
        BackendEntry {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            mac: [0; 6],
            used: BackendUse::Unused,
            forward: Forward::Dr,
            generation,
            vip: 0,
            hop_mtu: None,
        }
    }
}

pub fn addr_to_wire(addr: IpAddr) -> ([u8; 16], u8) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            (bytes, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

pub fn addr_from_wire(bytes: [u8; 16], family: u8) -> Result<IpAddr, WireError> {
    match family {
        FAMILY_V4 => Ok(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()),
        FAMILY_V6 => Ok(Ipv6Addr::from(bytes).into()),
        other => Err(WireError::Family(other)),
    }
}

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

fn mode(forward: Forward) -> u8 {
    match forward {
        Forward::Dr => MODE_DR,
        Forward::Tun => MODE_TUN,
    }
}

impl From<&VipAddr> for VipKey {
    fn from(v: &VipAddr) -> VipKey {
        let (addr, family) = addr_to_wire(v.ip);
        VipKey { addr, port_be: v.port.to_be(), proto: protocol_number(v.protocol), family }
    }
}

impl TryFrom<&VipKey> for VipAddr {
    type Error = WireError;
    fn try_from(k: &VipKey) -> Result<VipAddr, WireError> {
        let protocol = match k.proto {
            PROTO_TCP => Protocol::Tcp,
            PROTO_UDP => Protocol::Udp,
            other => return Err(WireError::Protocol(other)),
        };
        Ok(VipAddr { ip: addr_from_wire(k.addr, k.family)?, port: u16::from_be(k.port_be), protocol })
    }
}

impl From<&VipEntry> for VipInfo {
    fn from(v: &VipEntry) -> VipInfo {
        let flags = match v.previous {
            Previous::Forgotten => 0,
            Previous::Kept => VIP_PREVIOUS,
        };
        VipInfo { id: v.id, table: table_number(v.id, v.live), mode: mode(v.forward), flags, _pad: [0; 2] }
    }
}

impl TryFrom<&VipInfo> for VipEntry {
    type Error = WireError;
    fn try_from(v: &VipInfo) -> Result<VipEntry, WireError> {
        let live = match v.table.checked_sub(table_number(v.id, Side::First)) {
            Some(0) => Side::First,
            Some(1) => Side::Second,
            _ => return Err(WireError::Table { id: v.id, table: v.table }),
        };
        let forward = match v.mode {
            MODE_DR => Forward::Dr,
            MODE_TUN => Forward::Tun,
            other => return Err(WireError::Mode(other)),
        };
        let previous = if v.flags & VIP_PREVIOUS != 0 { Previous::Kept } else { Previous::Forgotten };
        Ok(VipEntry { id: v.id, live, forward, previous })
    }
}

impl From<&BackendEntry> for BackendInfo {
    fn from(b: &BackendEntry) -> BackendInfo {
        let used = match b.used {
            BackendUse::Unused => return BackendInfo { generation: b.generation, ..BackendInfo::default() },
            BackendUse::Active => BACKEND_ACTIVE,
            BackendUse::Draining => BACKEND_DRAINING,
        };
        // The data plane takes each entry's mode from BACKEND_TUN.
        let mut flags = if b.forward == Forward::Tun { used | BACKEND_TUN } else { used };
        let mtu = match (b.forward, b.hop_mtu) {
            (Forward::Tun, Some(mtu)) => {
                flags |= BACKEND_HOP;
                mtu
            }
            _ => 0,
        };
        let (addr, family) = addr_to_wire(b.addr);
        const { assert!(lb_common::limits::MAX_VIPS <= u16::MAX as u32 + 1, "VIP ids fit vip_id") };
        BackendInfo { addr, mac: b.mac, family, flags, generation: b.generation, vip_id: b.vip as u16, mtu }
    }
}

impl TryFrom<&BackendInfo> for BackendEntry {
    type Error = WireError;
    fn try_from(b: &BackendInfo) -> Result<BackendEntry, WireError> {
        let used = match b.flags & !(BACKEND_TUN | BACKEND_HOP) {
            0 => return Ok(BackendEntry::unused(b.generation)),
            BACKEND_ACTIVE => BackendUse::Active,
            BACKEND_DRAINING => BackendUse::Draining,
            _ => return Err(WireError::Flags(b.flags)),
        };
        let forward = if b.flags & BACKEND_TUN != 0 { Forward::Tun } else { Forward::Dr };
        // A next hop means something only in TUN mode, and only with room
        // for a packet.
        if b.has_hop() && (forward != Forward::Tun || b.mtu == 0) {
            return Err(WireError::Flags(b.flags));
        }
        Ok(BackendEntry {
            addr: addr_from_wire(b.addr, b.family)?,
            mac: b.mac,
            used,
            forward,
            generation: b.generation,
            vip: VipId::from(b.vip_id),
            hop_mtu: b.has_hop().then_some(b.mtu),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rich_values_survive_the_round_trip() {
        let vip = VipAddr { ip: "2001:db8::10".parse().unwrap(), port: 443, protocol: Protocol::Udp };
        assert_eq!(VipAddr::try_from(&VipKey::from(&vip)), Ok(vip));
        for live in [Side::First, Side::Second] {
            let entry = VipEntry { id: 7, live, forward: Forward::Tun, previous: Previous::Kept };
            assert_eq!(VipEntry::try_from(&VipInfo::from(&entry)), Ok(entry));
        }
        for (used, forward, hop_mtu) in [
            (BackendUse::Active, Forward::Dr, None),
            (BackendUse::Draining, Forward::Tun, Some(1480)),
            (BackendUse::Active, Forward::Tun, None),
        ] {
            let b = BackendEntry {
                addr: [10, 0, 0, 1].into(),
                mac: [2, 0, 0, 0, 0, 1],
                used,
                forward,
                generation: 9,
                vip: 3,
                hop_mtu,
            };
            assert_eq!(BackendEntry::try_from(&BackendInfo::from(&b)), Ok(b));
        }
        let unused = BackendInfo::from(&BackendEntry::unused(42));
        assert_eq!((unused.flags, unused.generation), (0, 42));
    }

    #[test]
    fn the_wire_layout_is_what_the_data_plane_reads() {
        let info = VipInfo::from(&VipEntry {
            id: 5,
            live: Side::Second,
            forward: Forward::Tun,
            previous: Previous::Forgotten,
        });
        assert_eq!((info.table, info.mode), (11, MODE_TUN));
        let b = BackendInfo::from(&BackendEntry {
            addr: [10, 0, 0, 1].into(),
            mac: [0; 6],
            used: BackendUse::Draining,
            forward: Forward::Tun,
            generation: 1,
            vip: 5,
            hop_mtu: Some(1480),
        });
        assert_eq!((b.flags, b.mtu, b.vip_id), (BACKEND_DRAINING | BACKEND_TUN | BACKEND_HOP, 1480, 5));
        assert_eq!((&b.addr[..4], b.family), (&[10, 0, 0, 1][..], FAMILY_V4));
    }

    #[test]
    fn values_that_do_not_decode_are_errors() {
        let key = VipKey { proto: 1, family: FAMILY_V4, ..VipKey::default() };
        assert_eq!(VipAddr::try_from(&key), Err(WireError::Protocol(1)));
        let info = VipInfo { id: 2, table: 9, mode: MODE_DR, flags: 0, _pad: [0; 2] };
        assert_eq!(VipEntry::try_from(&info), Err(WireError::Table { id: 2, table: 9 }));
        let info = VipInfo { id: 2, table: 4, mode: 9, flags: 0, _pad: [0; 2] };
        assert_eq!(VipEntry::try_from(&info), Err(WireError::Mode(9)));
        let b = BackendInfo { flags: BACKEND_ACTIVE, family: 0, ..BackendInfo::default() };
        assert_eq!(BackendEntry::try_from(&b), Err(WireError::Family(0)));
        for (flags, mtu) in
            [(BACKEND_ACTIVE | BACKEND_HOP, 1500), (BACKEND_ACTIVE | BACKEND_TUN | BACKEND_HOP, 0)]
        {
            let b = BackendInfo { flags, mtu, family: FAMILY_V4, ..BackendInfo::default() };
            assert_eq!(
                BackendEntry::try_from(&b),
                Err(WireError::Flags(flags)),
                "a next hop without TUN or MTU"
            );
        }
        let b = BackendInfo {
            flags: BACKEND_ACTIVE | BACKEND_DRAINING,
            family: FAMILY_V4,
            ..BackendInfo::default()
        };
        assert_eq!(BackendEntry::try_from(&b), Err(WireError::Flags(3)));
    }
}
