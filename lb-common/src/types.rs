//! Map keys and values.

/// Address families, as stored in `family` fields.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Forwarding modes, as stored in `VipInfo::mode`.
pub const MODE_DR: u8 = 1;
/// IP-in-IP (IPv4 VIPs) or IPv6-in-IPv6 (IPv6 VIPs) to the backend.
pub const MODE_TUN: u8 = 2;

/// Bytes TUN mode adds in front of the inner IP packet.
pub const TUN_OVERHEAD_V4: u16 = 20;
pub const TUN_OVERHEAD_V6: u16 = 40;

/// Backend ids index `BACKENDS`; 0 is never allocated and means "no backend".
pub type BackendId = u16;
pub const NO_BACKEND: BackendId = 0;

/// Backend ids per `MAGLEV` element. Array map elements are padded to 8
/// bytes, so packing four u16 ids per element uses all of them.
pub const MAGLEV_LANES: u32 = 4;
pub type MaglevChunk = [BackendId; MAGLEV_LANES as usize];

/// `VIPS` key: what a packet must be addressed to. IPv4 addresses sit in the
/// first four bytes of `addr`, the rest zero. Aligned to 4 so the data
/// plane builds it in words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<VipKey>() == 20);

/// `VIPS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into `VIP_STATS`.
    pub id: u32,
    /// Live Maglev table, `0..max_vips * TABLES_PER_VIP`. Rewriting this
    /// value is the atomic switch to a freshly built table.
    pub table: u32,
    /// `MODE_*`, for the daemon (adoption, status); packets follow each
    /// backend's `BACKEND_TUN`.
    pub mode: u8,
    /// `VIP_*`. Zero in maps written before it existed, which reads as
    /// "no previous table": the same layout.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<VipInfo>() == 12);

/// `VipInfo::flags`: the VIP's other table is the one in force before the
/// last switch, kept for second chance (TUN): a mid-flow packet with no
/// record whose owner there differs carries that owner's address along.
pub const VIP_PREVIOUS: u8 = 1;

/// `BackendInfo::flags`: in the VIP's table, so it takes new flows.
pub const BACKEND_ACTIVE: u8 = 1;
/// `BackendInfo::flags`: out of the table, but its established flows stay.
pub const BACKEND_DRAINING: u8 = 2;
/// `BackendInfo::flags`: forwarded to in TUN mode (else DR). The data
/// plane takes the mode from here, not from `VipInfo::mode`: established
/// flows find their backend without looking the VIP up, and an entry that
/// carries its own mode is consistent whatever order entries are written
/// in. Set only with one of the flags above.
pub const BACKEND_TUN: u8 = 4;
/// `BackendInfo::flags`, TUN only: `mac` and `mtu` hold the next hop toward
/// the backend as the daemon resolved it (our interface, the gateway's MAC,
/// the path MTU), so the packet path needs no FIB lookup. Without it the
/// packet path asks the kernel's FIB (counted as `tun_fib_lookup`).
pub const BACKEND_HOP: u8 = 8;

/// `BACKENDS` value. One entry per VIP-backend pair, so counters are per pair.
/// An entry with neither flag is unused (or a backend that failed): flows
/// recorded for it are rebalanced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    pub addr: [u8; 16],
    /// DR: the backend's MAC. TUN with `BACKEND_HOP`: the next hop's.
    pub mac: [u8; 6],
    pub family: u8,
    /// `BACKEND_*`.
    pub flags: u8,
    /// Changes whenever the id is given to another backend, so a connection
    /// recorded for the id's previous owner is not sent to the new one.
    pub generation: u32,
    /// The VIP this backend serves (its `VipInfo::id`; VIP ids fit 16 bits).
    pub vip_id: u16,
    /// TUN with `BACKEND_HOP`: the largest outer packet the path takes.
    pub mtu: u16,
}
const _: () = assert!(size_of::<BackendInfo>() == 32);

impl BackendInfo {
    /// Whether flows recorded for this backend may keep using it.
    #[inline(always)]
    pub fn takes_established(&self) -> bool {
        self.flags & (BACKEND_ACTIVE | BACKEND_DRAINING) != 0
    }

    /// `MODE_*` of the backend's VIP.
    #[inline(always)]
    pub fn mode(&self) -> u8 {
        if self.flags & BACKEND_TUN != 0 { MODE_TUN } else { MODE_DR }
    }

    /// Whether `mac` and `mtu` hold a resolved next hop (TUN).
    #[inline(always)]
    pub fn has_hop(&self) -> bool {
        self.flags & BACKEND_HOP != 0
    }
}

/// A connection-table record: the backend a flow was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    pub backend_id: BackendId,
    /// Second chance (TUN): the previous table's owner, when the flow was
    /// first seen mid-flow and that owner differed; its packets carry it.
    /// `NO_BACKEND` otherwise (zero in maps written before it existed).
    pub second: BackendId,
    /// `BackendInfo::generation` when the flow was recorded.
    pub generation: u32,
}
const _: () = assert!(size_of::<ConnEntry>() == 8);

/// `STATS` value (one per CPU): every global counter in one record, so a
/// packet updates them with a single map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalStats {
    /// Indexed by `Reason`.
    pub reasons: [Counter; crate::REASON_SLOTS as usize],
    /// Indexed by `Event`.
    pub events: [u64; crate::EVENT_SLOTS as usize],
    /// Connection-table inserts in the current one-second window (flood guard).
    pub window_start_ns: u64,
    pub window_inserts: u64,
}
const _: () = assert!(size_of::<GlobalStats>() == 16 * 16 + 8 * 16 + 16);

impl Default for GlobalStats {
    fn default() -> Self {
        Self {
            reasons: [Counter::default(); crate::REASON_SLOTS as usize],
            events: [0; crate::EVENT_SLOTS as usize],
            window_start_ns: 0,
            window_inserts: 0,
        }
    }
}

/// Packets and bytes (whole frames, Ethernet header included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

impl core::ops::AddAssign for Counter {
    fn add_assign(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// A parsed flow: the 5-tuple plus family, ports in network order.
/// Aligned to 8 so the data plane reads and writes it in words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

impl FlowKey {
    #[inline(always)]
    pub fn vip_key(&self) -> VipKey {
        VipKey { addr: self.dst, port_be: self.dport_be, proto: self.proto, family: self.family }
    }

    /// The key as five words, for compares that cost five loads.
    #[inline(always)]
    pub fn words(&self) -> &[u64; 5] {
        // SAFETY: 40 bytes aligned to 8 with no implicit padding (`_pad` is a
        // field), so every byte is initialised and any bit pattern is a u64.
        unsafe { &*(self as *const Self).cast::<[u64; 5]>() }
    }
}

/// Layout of the maps this build creates. Bump it whenever a map's key,
/// value, kind or meaning changes, so a daemon never misreads pinned maps
/// left by another version.
pub const LAYOUT_VERSION: u32 = 7;

/// `META` value (a single entry): the version stamp and the capacities the
/// maps were created with. The data plane never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub layout: u32,
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub conntrack_size: u32,
    /// Multiplies the flow hash (made odd) to pick a flow's
    /// connection-table sets (`conn_set_index`): drawn at random when the
    /// table is created, kept with it, so a restart that adopts the table
    /// finds its records.
    pub conntrack_seed: u32,
}
const _: () = assert!(size_of::<Meta>() == 24);

/// `DECAP_VIPS` key (program `xlb_decap`): an address this host serves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecapKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<DecapKey>() == 20);

/// `DECAP_SOURCES` key data (program `xlb_decap`, an LPM trie): a prefix of
/// outer source addresses allowed to tunnel to this host's VIPs. The family
/// comes first so one trie holds both: the key's prefix length is 8 plus
/// the address prefix's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecapSource {
    pub family: u8,
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<DecapSource>() == 17);

/// `DECAP_STATS` slots (per-CPU counters of program `xlb_decap`).
pub const DECAP_DONE: u32 = 0;
pub const DECAP_PASSED: u32 = 1;
/// Tunnelled, but to an address not in `DECAP_VIPS`: left as is.
pub const DECAP_NOT_OURS: u32 = 2;
/// Tunnelled to one of our VIPs from a source not in `DECAP_SOURCES`:
/// dropped (it would bypass the balancer with any client address).
pub const DECAP_UNTRUSTED: u32 = 3;
/// Second chance: a mid-flow packet this host has no socket for, sent on
/// to the previous owner named in it (decapsulated once, never twice).
pub const DECAP_SECOND_CHANCE_FORWARDED: u32 = 4;
/// Second chance: the packet's flow has a socket here; delivered here.
pub const DECAP_SECOND_CHANCE_KEPT: u32 = 5;
/// Second chance: no socket here and no next hop toward the previous
/// owner out of this interface: delivered here (the kernel resets it).
pub const DECAP_SECOND_CHANCE_NO_ROUTE: u32 = 6;
pub const DECAP_SLOTS: u32 = 8;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made of integers and byte arrays,
    // with explicit padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::BackendInfo {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::DecapSource {}
    unsafe impl aya::Pod for super::Meta {}
    unsafe impl aya::Pod for crate::ConnSet {}
    unsafe impl aya::Pod for super::GlobalStats {}
    unsafe impl aya::Pod for super::DecapKey {}
}
