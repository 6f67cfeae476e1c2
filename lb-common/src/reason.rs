//! Why a packet got the verdict it got. Each reason is a slot in `STATS`
//! and a label value in the metrics.

/// Slots reserved in `STATS`, so reasons can be added without resizing a
/// pinned map.
pub const REASON_SLOTS: u32 = 32;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Sent to a backend (XDP_TX).
    Forwarded = 0,
    /// Not IPv4/IPv6 (ARP, LLDP, …): the host's business.
    PassNotIp = 1,
    /// IP, but not addressed to a configured VIP (address, port, protocol).
    PassNotVip = 2,
    /// An IP fragment: it has no ports to match against a VIP.
    PassFragment = 3,
    /// IPv6 with extension headers before the transport header.
    PassIpv6Ext = 4,
    /// Truncated or invalid headers.
    DropMalformed = 5,
    /// Addressed to a VIP that has no usable backend.
    DropNoBackend = 6,
}

/// What the program does with a packet for a given reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
    Tx,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Forwarded,
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassFragment,
        Reason::PassIpv6Ext,
        Reason::DropMalformed,
        Reason::DropNoBackend,
    ];

    #[inline(always)]
    pub const fn action(self) -> Action {
        match self {
            Reason::Forwarded => Action::Tx,
            Reason::PassNotIp | Reason::PassNotVip | Reason::PassFragment | Reason::PassIpv6Ext => {
                Action::Pass
            }
            Reason::DropMalformed | Reason::DropNoBackend => Action::Drop,
        }
    }

    /// Stable snake_case name, used in status output and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Forwarded => "forwarded",
            Reason::PassNotIp => "not_ip",
            Reason::PassNotVip => "not_vip",
            Reason::PassFragment => "fragment",
            Reason::PassIpv6Ext => "ipv6_ext_header",
            Reason::DropMalformed => "malformed",
            Reason::DropNoBackend => "no_backend",
        }
    }
}

const _: () = assert!(Reason::ALL.len() as u32 <= REASON_SLOTS);
