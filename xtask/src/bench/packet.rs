//! Part 1: what one packet costs in program `xlb`, through
//! BPF_PROG_TEST_RUN, against the trivial XDP_TX and MAC-swap programs run
//! the same way in the same run. Every program is attached to an interface
//! of its own, as in production: the kernel then calls it directly, not
//! through a retpoline. Each case is measured hot (the same frame every
//! call) and cold (a distinct flow every call).
//!
//! Every run is single-shot (repeat = 1): the kernel does not restore the
//! packet between repeats, so a repeated run would feed the program its own
//! output. The figure of a run is the mean of the kernel-reported durations
//! of its packets. Every measured output is compared with the output a
//! second, identically configured program instance gives for the same
//! frame (action and every byte), and the counters must show the path the
//! case claims (new flow, connection-table hit, not a VIP).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};
use lb_common::{ConnSlot, Event, FlowKey, PROTO_TCP, PROTO_UDP, Reason};
use xlb::{
    config::Capacities,
    control::desired::{DesiredVip, NextHop},
    dataplane::Counters as _,
    model::{Forward, Protocol},
};
use xlb_tests::{
    aux,
    frames::*,
    netns::Netns,
    plane::{self, Outcome, Params, Plane, XDP_PASS, XDP_TX, backends},
    unique_id,
};

use super::{
    Opts, kit,
    report::{Row, Section, Target, median},
};

const VIP4_DR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const VIP4_TUN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
const VIP6_DR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const VIP6_TUN: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);
const VIP4_TUN_FIB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 21);
const VIP6_TUN_FIB: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x21);
/// A TUN VIP whose every backend changed, the old ones still draining:
/// every flow has a previous owner elsewhere (second chance).
const VIP4_TUN_SC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 22);
/// How long the second-chance VIP's old backends drain and its previous
/// table is kept: past the benchmark.
const SECOND_CHANCE: Duration = Duration::from_secs(3600);
const NOT_VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 254);
const LB4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 2);
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xfe, 0xfe];
/// Source ports per client address before the address changes.
const PORTS: u32 = 60_000;
/// Flow numbers for filling the connection table, away from measured ones.
const FILL_BASE: u32 = 10_000_000;
const BASELINE: &str = "xdp_tx";
/// The baseline that reads one line of its own array, as big as the
/// connection table, per frame: with a distinct flow per call, the memory
/// floor under every cold figure.
const FLOOR: &str = "xdp_line";
/// Connection-table slots (but in the eviction case).
const CONNTRACK_SLOTS: u32 = 262_144;
/// Capacity of the small table the eviction case runs with.
const SMALL_CONNTRACK: u32 = 8192;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Dr,
    /// TUN with the next hop the daemon resolved in the backend entry.
    Tun,
    /// TUN to backends without one: a FIB lookup per packet.
    TunFib,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A TCP SYN of a flow never seen: Maglev, then a connection-table insert.
    Syn,
    /// The same with the connection table full: every insert evicts.
    SynEvict,
    /// A TCP ACK of an established flow: connection-table hit.
    Ack,
    UdpNew,
    UdpEst,
    /// TCP to an address that is no VIP.
    NotVip,
    /// ICMP "fragmentation needed" quoting an established flow of a VIP:
    /// sent on to the flow's backend.
    IcmpSteered,
    /// A TCP ACK of a flow first seen mid-flow after a table change, its
    /// record naming the previous owner: wrapped twice (second chance).
    SecondChance,
}

#[derive(Clone, Copy)]
struct Case {
    mode: Mode,
    v6: bool,
    kind: Kind,
}

impl Case {
    fn name(&self) -> String {
        let mode = match self.mode {
            Mode::Dr => "DR ",
            Mode::Tun => "TUN",
            Mode::TunFib => "TUN, FIB per packet,",
        };
        let fam = if self.v6 { "IPv6" } else { "IPv4" };
        match self.kind {
            Kind::Syn => format!("{mode} {fam} TCP SYN, new flow"),
            Kind::SynEvict => format!("{mode} {fam} TCP SYN, new flow, table full (evicts)"),
            Kind::Ack => format!("{mode} {fam} TCP ACK, established"),
            Kind::UdpNew => format!("{mode} {fam} UDP, new flow"),
            Kind::UdpEst => format!("{mode} {fam} UDP, established"),
            Kind::NotVip => format!("{fam} TCP to a non-VIP address"),
            Kind::IcmpSteered => format!("{mode} {fam} ICMP frag-needed to a VIP, to the flow's backend"),
            Kind::SecondChance => format!("{mode} {fam} TCP ACK, established, second chance (wrapped twice)"),
        }
    }

    /// Whether each run needs flows never seen before.
    fn new_flows(&self) -> bool {
        matches!(self.kind, Kind::Syn | Kind::SynEvict | Kind::UdpNew)
    }

    fn vip(&self) -> IpAddr {
        if self.kind == Kind::SecondChance {
            return VIP4_TUN_SC.into();
        }
        match (self.mode, self.v6) {
            (Mode::Dr, false) => VIP4_DR.into(),
            (Mode::Tun, false) => VIP4_TUN.into(),
            (Mode::Dr, true) => VIP6_DR.into(),
            (Mode::Tun, true) => VIP6_TUN.into(),
            (Mode::TunFib, false) => VIP4_TUN_FIB.into(),
            (Mode::TunFib, true) => VIP6_TUN_FIB.into(),
        }
    }

    fn client(&self, k: u32) -> IpAddr {
        if self.v6 {
            IpAddr::from(Ipv6Addr::new(
                0x2001,
                0xdb8,
                0xc,
                0,
                0,
                0,
                ((k / PORTS) >> 16) as u16,
                (k / PORTS) as u16 + 1,
            ))
        } else {
            IpAddr::from(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + k / PORTS))
        }
    }

    fn sport(k: u32) -> u16 {
        1024 + (k % PORTS) as u16
    }

    /// Flow number `k` of this case as a frame.
    fn frame(&self, k: u32) -> Vec<u8> {
        let sport = Self::sport(k);
        let (proto, l4) = match self.kind {
            Kind::Syn | Kind::SynEvict => (PROTO_TCP, tcp(sport, 80, TCP_SYN, b"")),
            Kind::Ack | Kind::NotVip | Kind::SecondChance => (PROTO_TCP, tcp(sport, 80, TCP_ACK, b"")),
            Kind::UdpNew | Kind::UdpEst => (PROTO_UDP, udp(sport, 53, &[0x61; 18])),
            Kind::IcmpSteered => {
                return icmp_frag_needed(self.vip(), self.client(k), sport);
            }
        };
        let dst = if self.kind == Kind::NotVip { IpAddr::from(NOT_VIP4) } else { self.vip() };
        match (self.client(k), dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => v4_frame(s, d, proto, &l4),
            (IpAddr::V6(s), IpAddr::V6(d)) => v6_frame(s, d, proto, &l4),
            _ => unreachable!("one family per case"),
        }
    }

    fn flow(&self, k: u32) -> FlowKey {
        let (proto, dport) = if matches!(self.kind, Kind::UdpNew | Kind::UdpEst) {
            (PROTO_UDP, 53u16)
        } else {
            (PROTO_TCP, 80)
        };
        plane::flow_key(proto, self.client(k), Self::sport(k), self.vip(), dport)
    }

    /// The events every measured packet must add, those it must not, and
    /// its reason.
    fn expect(&self) -> (Vec<Event>, Vec<Event>, Reason) {
        let (mut events, reason) = match self.kind {
            Kind::Syn | Kind::UdpNew => (vec![Event::ConnNew], Reason::Forwarded),
            // The table is full (checked in `prepare`): every insert replaces a record.
            Kind::SynEvict => (vec![Event::ConnNew, Event::ConnEvicted], Reason::Forwarded),
            Kind::Ack | Kind::UdpEst => (vec![Event::ConnHit], Reason::Forwarded),
            Kind::IcmpSteered => (vec![Event::IcmpSteered, Event::ConnHit], Reason::Forwarded),
            Kind::SecondChance => (vec![Event::ConnHit, Event::SecondChance], Reason::Forwarded),
            Kind::NotVip => (vec![], Reason::PassNotVip),
        };
        let mut never = vec![];
        match self.mode {
            Mode::TunFib if self.kind != Kind::IcmpSteered => events.push(Event::TunFibLookup),
            _ => never.push(Event::TunFibLookup),
        }
        (events, never, reason)
    }

    /// Hot targets: at most 0.8× Katran's cost in TUN mode and 0.6× in DR
    /// (Katran measured beside xlb on this machine); cold ones: what xlb
    /// reached before.
    fn target(&self, cache: Cache) -> Option<Target> {
        if self.mode == Mode::TunFib || matches!(self.kind, Kind::IcmpSteered | Kind::SecondChance) {
            return None;
        }
        let new = matches!(self.kind, Kind::Syn | Kind::SynEvict | Kind::UdpNew);
        let ratio = match (cache, self.kind, self.mode, self.v6) {
            (_, Kind::NotVip, ..) => 1.5,
            (Cache::Cold, ..) if new => 4.5,
            (Cache::Cold, ..) => 2.5,
            (Cache::Hot, _, Mode::Tun, false) if new => 5.4,
            (Cache::Hot, _, Mode::Tun, true) if new => 5.5,
            (Cache::Hot, _, Mode::Tun, _) => 3.0,
            (Cache::Hot, _, _, false) if new => 4.0,
            (Cache::Hot, _, _, true) if new => 4.1,
            (Cache::Hot, ..) => 2.3,
        };
        Some(Target::ratio_at_most(ratio))
    }

    /// Whether the case means anything with one flow repeated: a repeated
    /// UDP "new" flow is established after its first packet, and a repeated
    /// SYN evicts nothing.
    fn has_hot(&self) -> bool {
        !matches!(self.kind, Kind::SynEvict | Kind::UdpNew)
    }
}

/// Which frames a run sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cache {
    /// The same frame every call: what the per-packet targets are set on.
    Hot,
    /// A distinct flow every call (new-flow cases: never seen before).
    Cold,
}

impl Cache {
    fn label(self) -> &'static str {
        match self {
            Cache::Hot => "hot",
            Cache::Cold => "cold",
        }
    }
}

/// An ICMP "fragmentation needed" from a router to `vip` about a packet
/// the VIP (its backend) sent to `client`: what path-MTU discovery sends.
fn icmp_frag_needed(vip: IpAddr, client: IpAddr, client_port: u16) -> Vec<u8> {
    let (IpAddr::V4(vip), IpAddr::V4(client)) = (vip, client) else { unreachable!("IPv4 only") };
    let quoted_l4 = tcp(80, client_port, TCP_ACK, b"");
    let mut quote = ipv4(vip, client, PROTO_TCP, &[], 1400, 0x4000);
    quote.extend_from_slice(&quoted_l4[..8]);
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0xa0];
    icmp.extend(quote);
    let c = checksum(&icmp).to_be_bytes();
    icmp[2..4].copy_from_slice(&c);
    let mut f = eth(ETH_P_IP);
    f.extend(ipv4(ROUTER4, vip, 1, &[], icmp.len(), 0));
    f.extend(icmp);
    f
}

fn all_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for mode in [Mode::Dr, Mode::Tun] {
        for kind in [Kind::Syn, Kind::Ack, Kind::UdpNew, Kind::UdpEst] {
            cases.push(Case { mode, v6: false, kind });
        }
        for kind in [Kind::Syn, Kind::Ack] {
            cases.push(Case { mode, v6: true, kind });
        }
    }
    for v6 in [false, true] {
        cases.push(Case { mode: Mode::TunFib, v6, kind: Kind::Ack });
    }
    cases.push(Case { mode: Mode::Dr, v6: false, kind: Kind::SynEvict });
    cases.push(Case { mode: Mode::Dr, v6: false, kind: Kind::NotVip });
    for mode in [Mode::Dr, Mode::Tun] {
        cases.push(Case { mode, v6: false, kind: Kind::IcmpSteered });
    }
    cases.push(Case { mode: Mode::Tun, v6: false, kind: Kind::SecondChance });
    cases
}

fn params(conntrack_size: u32) -> Params {
    Params {
        capacities: Capacities { table_size: 65_537, max_vips: 16, max_backends: 256, conntrack_size },
        // No flood guard: every new flow takes the insert path.
        conn_insert_limit: 0,
        tun_source_v4: LB4,
        tun_source_v6: LB6,
    }
}

/// Every VIP as the benchmark has it: the second-chance VIP's backends
/// replaced by others (the old ones draining), the rest as `vips` says.
fn apply_vips(plane: &mut Plane) -> anyhow::Result<()> {
    let now = Instant::now();
    let old = (11..21).map(|i| IpAddr::from([10, 5, 0, i])).collect();
    plane.apply_at(&[vips(), vec![second_chance_vip(old)]].concat(), SECOND_CHANCE, now)?;
    let new = (21..31).map(|i| IpAddr::from([10, 5, 0, i])).collect();
    plane.apply_at(&[vips(), vec![second_chance_vip(new)]].concat(), SECOND_CHANCE, now)
}

fn second_chance_vip(addrs: Vec<IpAddr>) -> DesiredVip {
    let mut list = backends(addrs);
    let hop = Some(NextHop { mac: ROUTER_MAC, mtu: 1500 });
    list.iter_mut().for_each(|b| (b.mac, b.hop) = (None, hop));
    let vip = plane::dr_vip("tun4-sc", VIP4_TUN_SC.into(), 80, Protocol::Tcp, list);
    DesiredVip { forward: Forward::Tun, second_chance: SECOND_CHANCE, ..vip }
}

fn vips() -> Vec<DesiredVip> {
    let v4 = |net: u8| (11..21).map(move |i| IpAddr::from([10, net, 0, i]));
    let v6 = |net: u16| (0x11..0x1b).map(move |i| IpAddr::from(Ipv6Addr::new(net, 0, 0, 0, 0, 0, 0, i)));
    let vip = |name: &str, ip: IpAddr, port: u16, protocol, mode, addrs: Vec<IpAddr>| {
        let mut list = backends(addrs);
        if mode != Mode::Dr {
            // As the daemon resolves them: the router, on t0's 1500 bytes.
            let hop = (mode == Mode::Tun).then_some(NextHop { mac: ROUTER_MAC, mtu: 1500 });
            list.iter_mut().for_each(|b| (b.mac, b.hop) = (None, hop));
        }
        let forward = if mode == Mode::Dr { Forward::Dr } else { Forward::Tun };
        DesiredVip { forward, ..plane::dr_vip(name, ip, port, protocol, list) }
    };
    vec![
        vip("dr4", VIP4_DR.into(), 80, Protocol::Tcp, Mode::Dr, v4(0).collect()),
        vip("dr4-udp", VIP4_DR.into(), 53, Protocol::Udp, Mode::Dr, v4(0).collect()),
        vip("dr6", VIP6_DR.into(), 80, Protocol::Tcp, Mode::Dr, v6(0xfd00).collect()),
        vip("tun4", VIP4_TUN.into(), 80, Protocol::Tcp, Mode::Tun, v4(2).collect()),
        vip("tun4-udp", VIP4_TUN.into(), 53, Protocol::Udp, Mode::Tun, v4(2).collect()),
        vip("tun6", VIP6_TUN.into(), 80, Protocol::Tcp, Mode::Tun, v6(0xfd02).collect()),
        vip("tun4-fib", VIP4_TUN_FIB.into(), 80, Protocol::Tcp, Mode::TunFib, v4(2).collect()),
        vip("tun6-fib", VIP6_TUN_FIB.into(), 80, Protocol::Tcp, Mode::TunFib, v6(0xfd02).collect()),
    ]
}

/// Per run: mean kernel ns and mean wall ns per packet.
#[derive(Default)]
struct Series {
    kernel: Vec<f64>,
    wall: Vec<f64>,
}

impl Series {
    fn push(&mut self, (kernel, wall): (f64, f64)) {
        self.kernel.push(kernel);
        self.wall.push(wall);
    }
}

struct Measured {
    case: Case,
    plane: Plane,
    hot: Series,
    cold: Series,
    events: u64,
}

struct Baseline {
    name: &'static str,
    ebpf: Ebpf,
    hot: Series,
    cold: Series,
}

impl Baseline {
    fn series(&self, cache: Cache) -> &Series {
        match cache {
            Cache::Hot => &self.hot,
            Cache::Cold => &self.cold,
        }
    }

    fn program(&self) -> &Xdp {
        self.ebpf.program(self.name).expect("loaded").try_into().expect("XDP")
    }

    /// What the baseline must output for `frame`.
    fn expected(&self, frame: &[u8]) -> Outcome {
        let mut out = frame.to_vec();
        if self.name == "xdp_macswap" {
            out[..6].copy_from_slice(&frame[6..12]);
            out[6..12].copy_from_slice(&frame[..6]);
        }
        Outcome { action: XDP_TX, frame: out }
    }
}

pub fn run(opts: &Opts) -> anyhow::Result<Section> {
    let (runs, packets) = if opts.smoke { (5, 1000) } else { (7, 10_000) };
    let mut section = Section::new(
        "1. Cost per packet (BPF_PROG_TEST_RUN)",
        &format!(
            "{runs} runs × {packets} single-shot test runs per case and cache state (repeat = 1), interleaved \
             case by case; figure = mean kernel-reported duration per packet, pinned to one CPU, every \
             program attached to an interface of its own (called directly, as in production). Hot: the \
             same frame every call; cold: a distinct flow every call (new-flow cases: a flow never seen; \
             established cases: {packets} pre-established flows). Every output checked byte for byte \
             against a second program instance, and the counters against the path the case claims. \
             Maglev M = 65537, 10 backends per VIP, connection table 262144 (eviction case: \
             {SMALL_CONNTRACK}), flood guard off. TUN backends carry the next hop as the daemon resolves \
             it, except the \"FIB per packet\" cases. Ratio: to the trivial XDP_TX program, hot to hot and \
             cold to cold. Instruction counts: as the kernel reports them after loading."
        ),
    );
    // TUN cases without a resolved next hop need FIB lookups that succeed:
    // routes to the backends via a router whose MAC is known.
    let (ns, ifindex, t0_mac) = Netns::fib(&format!("xb{:06x}-fib", unique_id()), &[])?;
    let rows = ns.run(|| measure_all(&ns, runs, packets, ifindex, t0_mac))?;
    for row in rows {
        section.push(row);
    }
    Ok(section)
}

/// A veth interface of `ns` for program `i` to be attached to.
fn attach_point(ns: &Netns, i: usize) -> anyhow::Result<String> {
    let name = format!("xa{i}");
    ns.ip(&format!("link add {name} type veth peer name xz{i}"))?;
    // Nothing but the measured frames reaches the program: no IPv6
    // neighbour discovery or MLD from the pair's own addresses, which
    // would add to the counters each case checks.
    let no_v6 =
        [format!("net.ipv6.conf.{name}.disable_ipv6=1"), format!("net.ipv6.conf.xz{i}.disable_ipv6=1")];
    ns.sysctl(&no_v6.each_ref().map(String::as_str))?;
    ns.ip(&format!("link set {name} up"))?;
    ns.ip(&format!("link set xz{i} up"))?;
    Ok(name)
}

/// Rows with what the kernel reports of `program` once loaded.
fn instruction_rows(name: &str, program: &Xdp) -> anyhow::Result<Vec<Row>> {
    let info = program.info()?;
    let mut rows = Vec::new();
    if let Some(n) = info.verified_instruction_count() {
        rows.push(Row::new(
            format!("program {name}: instructions the verifier processed"),
            "insns",
            vec![n as f64],
        ));
    }
    if let Some(bytes) = info.size_translated() {
        let row = Row::new(
            format!("program {name}: instructions after translation"),
            "insns",
            vec![(bytes / 8) as f64],
        )
        .extra("jited_bytes", info.size_jitted());
        rows.push(row);
    }
    Ok(rows)
}

fn measure_all(
    ns: &Netns,
    runs: usize,
    packets: u32,
    ifindex: u32,
    t0_mac: [u8; 6],
) -> anyhow::Result<Vec<Row>> {
    let pinned = kit::pin_thread(kit::bench_cpu());
    let mut reference = Plane::new(params(CONNTRACK_SLOTS))?;
    apply_vips(&mut reference)?;
    let mut attached = 0;
    let mut baselines = Vec::new();
    for name in [BASELINE, "xdp_macswap", FLOOR] {
        let ebpf = if name == FLOOR { aux::load_line(CONNTRACK_SLOTS) } else { aux::load(name) };
        let mut ebpf = ebpf.with_context(|| format!("cannot load {name}"))?;
        let point = attach_point(ns, attached)?;
        attached += 1;
        aux::program_mut(&mut ebpf, name)?.attach(&point, XdpMode::Driver)?;
        baselines.push(Baseline { name, ebpf, hot: Series::default(), cold: Series::default() });
    }
    let mut measured = Vec::new();
    for case in all_cases() {
        let conntrack = if case.kind == Kind::SynEvict { SMALL_CONNTRACK } else { CONNTRACK_SLOTS };
        let mut plane = Plane::new(params(conntrack))?;
        apply_vips(&mut plane)?;
        plane.attach(ns, &attach_point(ns, attached)?)?;
        attached += 1;
        prepare(&case, &plane, &reference, packets, ifindex, t0_mac)
            .with_context(|| format!("preparing {}", case.name()))?;
        measured.push(Measured { case, plane, hot: Series::default(), cold: Series::default(), events: 0 });
    }

    let baseline_case = Case { mode: Mode::Dr, v6: false, kind: Kind::Syn };
    for r in 0..runs as u32 {
        for cache in [Cache::Hot, Cache::Cold] {
            let frames: Vec<Vec<u8>> = match cache {
                Cache::Hot => vec![baseline_case.frame(FILL_BASE * 2); packets as usize],
                Cache::Cold => (0..packets).map(|i| baseline_case.frame(FILL_BASE * 2 + i)).collect(),
            };
            for b in &mut baselines {
                let expected: Vec<Outcome> = frames.iter().map(|f| b.expected(f)).collect();
                let figure = timed(b.program(), &frames, &expected, ifindex).context(b.name)?;
                match cache {
                    Cache::Hot => b.hot.push(figure),
                    Cache::Cold => b.cold.push(figure),
                }
            }
        }
        for m in &mut measured {
            let case = m.case;
            for cache in [Cache::Hot, Cache::Cold] {
                if cache == Cache::Hot && !case.has_hot() {
                    continue;
                }
                let frames: Vec<Vec<u8>> = match cache {
                    Cache::Hot => vec![case.frame(0); packets as usize],
                    Cache::Cold if case.new_flows() => {
                        (r * packets..(r + 1) * packets).map(|k| case.frame(k)).collect()
                    }
                    Cache::Cold => (0..packets).map(|k| case.frame(k)).collect(),
                };
                let expected = match cache {
                    Cache::Hot => {
                        vec![plane::outcome(reference.program(), &frames[0], ifindex)?; frames.len()]
                    }
                    Cache::Cold => frames
                        .iter()
                        .map(|f| plane::outcome(reference.program(), f, ifindex))
                        .collect::<anyhow::Result<Vec<_>>>()?,
                };
                let (events, never, reason) = case.expect();
                let name = format!("{} ({})", case.name(), cache.label());
                let before = m.plane.counters.global()?;
                let figure = timed(m.plane.program(), &frames, &expected, ifindex).context(name.clone())?;
                let after = m.plane.counters.global()?;
                let got = after.reasons[reason as usize].packets - before.reasons[reason as usize].packets;
                ensure!(got == packets as u64, "{name}: {got} of {packets} packets counted as {reason:?}");
                for event in events {
                    let got = after.events[event as usize] - before.events[event as usize];
                    ensure!(got == packets as u64, "{name}: {got} of {packets} packets counted {event:?}");
                    m.events += got;
                }
                for event in never {
                    let got = after.events[event as usize] - before.events[event as usize];
                    ensure!(got == 0, "{name}: {got} packets counted {event:?}");
                }
                match cache {
                    Cache::Hot => m.hot.push(figure),
                    Cache::Cold => m.cold.push(figure),
                }
            }
        }
    }

    let mut rows = Vec::new();
    for cache in [Cache::Hot, Cache::Cold] {
        let base = median(&baselines[0].series(cache).kernel);
        let floor =
            baselines.iter().find(|b| b.name == FLOOR).map_or(0.0, |b| median(&b.series(cache).kernel));
        for b in &baselines {
            let label = match b.name {
                BASELINE => "baseline: XDP_TX, nothing else (trivial)".to_owned(),
                FLOOR => format!(
                    "baseline: one line of a {} MiB array read + XDP_TX (memory floor)",
                    (CONNTRACK_SLOTS as usize * size_of::<ConnSlot>()) >> 20
                ),
                _ => "baseline: MAC swap + XDP_TX".to_owned(),
            };
            let s = b.series(cache);
            rows.push(
                Row::new(format!("{label} ({})", cache.label()), "ns/pkt", s.kernel.clone())
                    .vs(BASELINE, base)
                    .extra("wall_ns_per_pkt", &s.wall)
                    .extra("packets_per_run", packets),
            );
        }
        for m in &measured {
            let s = match cache {
                Cache::Hot => &m.hot,
                Cache::Cold => &m.cold,
            };
            if s.kernel.is_empty() {
                continue;
            }
            let mut row =
                Row::new(format!("{} ({})", m.case.name(), cache.label()), "ns/pkt", s.kernel.clone())
                    .vs(BASELINE, base)
                    .extra("ns_above_trivial", median(&s.kernel) - base)
                    .extra("ns_above_floor", median(&s.kernel) - floor)
                    .extra("wall_ns_per_pkt", &s.wall)
                    .extra("packets_per_run", packets)
                    .extra("connection_table_events_checked", m.events);
            if let Some(t) = m.case.target(cache) {
                row = row.target(t);
            }
            match m.case.kind {
                Kind::IcmpSteered if cache == Cache::Cold => {
                    row = row.note(
                        "Quotes a packet of an established flow (VIP → client); the data plane reverses it, \
                         finds the flow's backend in the connection table and forwards the error there.",
                    )
                }
                Kind::SynEvict => {
                    row = row.note(format!(
                        "Connection table of {SMALL_CONNTRACK} slots filled first: every insert replaces \
                         another flow's record (steady state of a busy balancer)."
                    ))
                }
                _ => {}
            }
            rows.push(row);
        }
    }
    rows.extend(instruction_rows("xlb", reference.program())?);
    for b in &baselines {
        rows.extend(instruction_rows(b.name, b.program())?);
    }
    if !pinned {
        rows.iter_mut().for_each(|r| r.note = Some("could not pin the thread to one CPU".into()));
    }
    Ok(rows)
}

/// Untimed set-up: established flows recorded, the small table filled;
/// checks the reference against the control plane's model on a flow.
fn prepare(
    case: &Case,
    plane: &Plane,
    reference: &Plane,
    packets: u32,
    ifindex: u32,
    t0_mac: [u8; 6],
) -> anyhow::Result<()> {
    check_model(case, reference, ifindex, t0_mac)?;
    let establish = |frame: Vec<u8>| -> anyhow::Result<()> {
        let out = plane::outcome(plane.program(), &frame, ifindex)?;
        ensure!(out.action == XDP_TX, "set-up packet not forwarded: action {}", out.action);
        Ok(())
    };
    match case.kind {
        Kind::Ack | Kind::IcmpSteered => {
            let syn = Case { kind: Kind::Syn, ..*case };
            (0..packets).try_for_each(|k| establish(syn.frame(k)))?;
        }
        // The first packet of each finds no record: it leaves one naming
        // the previous owner.
        Kind::UdpEst | Kind::SecondChance => (0..packets).try_for_each(|k| establish(case.frame(k)))?,
        Kind::SynEvict => {
            // Flows until every slot is taken (twice the slots fill nearly
            // all; a set that both choices of few flows pick fills last).
            let mut k = 0;
            while plane.counters.conntrack().entries()? < SMALL_CONNTRACK as usize {
                ensure!(k < SMALL_CONNTRACK * 16, "the small table does not fill");
                (k..k + SMALL_CONNTRACK).try_for_each(|k| establish(case.frame(FILL_BASE + k)))?;
                k += SMALL_CONNTRACK;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The reference instance's output for flow 0 against what the control
/// plane's model says it must be.
fn check_model(case: &Case, reference: &Plane, ifindex: u32, t0_mac: [u8; 6]) -> anyhow::Result<()> {
    let frame = case.frame(0);
    let out = plane::outcome(reference.program(), &frame, ifindex)?;
    if case.kind == Kind::NotVip {
        ensure!(out == Outcome { action: XDP_PASS, frame }, "{}: not passed untouched", case.name());
        return Ok(());
    }
    ensure!(out.action == XDP_TX, "{}: action {}", case.name(), out.action);
    let flow = case.flow(0);
    let backend = reference.expected_backend(&flow).context("no backend in the model")?;
    let f = &out.frame;
    match (case.mode, backend.addr) {
        (Mode::Dr, _) => {
            let mut want = backend.mac.context("a DR backend without MAC")?.to_vec();
            want.extend(LB_MAC);
            want.extend(&frame[12..]);
            ensure!(*f == want, "{}: DR frame differs from the model", case.name());
        }
        (Mode::Tun, IpAddr::V4(b)) if case.kind == Kind::SecondChance => {
            let old = |a: &[u8]| a[..3] == [10, 5, 0] && (11..21).contains(&a[3]);
            ensure!(
                f[23] == 4 && f[30..34] == b.octets() && f[43] == 4 && old(&f[50..54]),
                "{}: outer header to the owner, inner one to a previous owner",
                case.name()
            );
            ensure!(f[54..] == frame[14..], "{}: inner packet changed", case.name());
        }
        (Mode::Tun | Mode::TunFib, IpAddr::V4(b)) => {
            ensure!(f[..12] == tun_macs(case.mode, t0_mac), "{}: TUN MACs", case.name());
            ensure!(
                f[23] == 4 && f[26..30] == LB4.octets() && f[30..34] == b.octets(),
                "{}: outer header",
                case.name()
            );
            ensure!(f[34..] == frame[14..], "{}: inner packet changed", case.name());
        }
        (Mode::Tun | Mode::TunFib, IpAddr::V6(b)) => {
            ensure!(f[..12] == tun_macs(case.mode, t0_mac), "{}: TUN MACs", case.name());
            ensure!(
                f[20] == 41 && f[22..38] == LB6.octets() && f[38..54] == b.octets(),
                "{}: outer header",
                case.name()
            );
            ensure!(f[54..] == frame[14..], "{}: inner packet changed", case.name());
        }
    }
    Ok(())
}

/// The outer frame's MACs: to the router from the MAC the program was
/// loaded for (a resolved hop) or from t0's (the FIB's answer).
fn tun_macs(mode: Mode, t0_mac: [u8; 6]) -> [u8; 12] {
    let src = if mode == Mode::TunFib { t0_mac } else { LB_MAC };
    let mut macs = [0; 12];
    macs[..6].copy_from_slice(&ROUTER_MAC);
    macs[6..].copy_from_slice(&src);
    macs
}

/// Runs every frame once; each output must equal its expected outcome.
/// Returns (mean kernel ns, mean wall ns) per packet.
fn timed(
    program: &Xdp,
    frames: &[Vec<u8>],
    expected: &[Outcome],
    ifindex: u32,
) -> anyhow::Result<(f64, f64)> {
    let mut out = vec![0u8; 4096];
    let mut kernel_ns = 0u64;
    let start = std::time::Instant::now();
    for (i, (frame, want)) in frames.iter().zip(expected).enumerate() {
        let (action, len, ns) = plane::test_run(program, frame, ifindex, &mut out)?;
        if action != want.action || out[..len] != want.frame[..] {
            bail!(
                "packet {i}: got action {action} and {} bytes, expected action {} and {} bytes{}",
                len,
                want.action,
                want.frame.len(),
                if action == want.action && len == want.frame.len() { " (bytes differ)" } else { "" }
            );
        }
        kernel_ns += ns;
    }
    let n = frames.len().max(1) as f64;
    Ok((kernel_ns as f64 / n, start.elapsed().as_nanos() as f64 / n))
}
