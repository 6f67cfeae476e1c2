//! Why a packet got the verdict it got. Each reason is a slot in `STATS`
//! and a label value in the metrics.

/// Reason and event slots reserved in `GlobalStats`, so new ones do not
/// change the map layout.
pub const REASON_SLOTS: u32 = 16;
pub const EVENT_SLOTS: u32 = 16;

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
    /// TUN: the next hop toward the backend has no neighbour entry yet. The
    /// encapsulated packet goes to the kernel, which resolves and forwards it.
    PassNoNeigh = 7,
    /// TUN: no route to the backend (or one out of another interface); the
    /// original packet goes to the kernel.
    PassNoRoute = 8,
    /// TUN: too big once encapsulated; an ICMP "fragmentation needed" /
    /// "packet too big" went back to the client.
    IcmpTooBig = 9,
    /// TUN: too big once encapsulated, and no ICMP error is due: IPv4
    /// without DF (the client allows fragmenting, which xlb does not do),
    /// IPv4 options, or an ICMP error itself.
    DropTooBig = 10,
}

/// What the program does with a packet for a given reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
    Tx,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::Forwarded,
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassFragment,
        Reason::PassIpv6Ext,
        Reason::DropMalformed,
        Reason::DropNoBackend,
        Reason::PassNoNeigh,
        Reason::PassNoRoute,
        Reason::IcmpTooBig,
        Reason::DropTooBig,
    ];

    #[inline(always)]
    pub const fn action(self) -> Action {
        match self {
            Reason::Forwarded | Reason::IcmpTooBig => Action::Tx,
            Reason::PassNotIp
            | Reason::PassNotVip
            | Reason::PassFragment
            | Reason::PassIpv6Ext
            | Reason::PassNoNeigh
            | Reason::PassNoRoute => Action::Pass,
            Reason::DropMalformed | Reason::DropNoBackend | Reason::DropTooBig => Action::Drop,
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
            Reason::PassNoNeigh => "tun_no_neighbour",
            Reason::PassNoRoute => "tun_no_route",
            Reason::IcmpTooBig => "tun_icmp_too_big",
            Reason::DropTooBig => "tun_too_big",
        }
    }
}

const _: () = assert!(Reason::ALL.len() as u32 <= REASON_SLOTS);
// Powers of two, so the data plane can mask an index into range.
const _: () = assert!(REASON_SLOTS.is_power_of_two() && EVENT_SLOTS.is_power_of_two());

/// Things that happen on the way to a verdict, counted beside the reasons.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A packet followed the backend recorded for its flow.
    ConnHit = 0,
    /// A flow got a backend from the Maglev table (new flow, or TCP SYN).
    ConnNew = 1,
    /// A recorded backend was gone (failed or removed); the flow was rebalanced.
    ConnRebalanced = 2,
    /// The connection table was not written because new flows arrived
    /// faster than `conntrack_insert_limit` (flood guard).
    ConnInsertSkipped = 3,
    /// An ICMP "fragmentation needed" / "packet too big" about a VIP's
    /// connection, sent on to the backend that owns the connection.
    IcmpSteered = 4,
    /// A TUN packet whose backend had no resolved next hop asked the
    /// kernel's FIB instead.
    TunFibLookup = 5,
    /// A TUN packet carried a second-chance address (the previous table's
    /// owner of its flow) to its backend.
    SecondChance = 6,
    /// A new flow's record replaced another flow's, its set being full of
    /// records in use: a sign the table is too small for the flows.
    ConnEvicted = 7,
}

impl Event {
    pub const ALL: [Event; 8] = [
        Event::ConnHit,
        Event::ConnNew,
        Event::ConnRebalanced,
        Event::ConnInsertSkipped,
        Event::IcmpSteered,
        Event::TunFibLookup,
        Event::SecondChance,
        Event::ConnEvicted,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Event::ConnHit => "conntrack_hit",
            Event::ConnNew => "conntrack_new",
            Event::ConnRebalanced => "conntrack_rebalanced",
            Event::ConnInsertSkipped => "conntrack_insert_skipped",
            Event::IcmpSteered => "icmp_to_backend",
            Event::TunFibLookup => "tun_fib_lookup",
            Event::SecondChance => "second_chance",
            Event::ConnEvicted => "conntrack_evicted",
        }
    }
}

const _: () = assert!(Event::ALL.len() as u32 <= EVENT_SLOTS);
