//! Part 2a: packets per second through a veth pair between two network
//! namespaces, with the program under test bouncing frames back (XDP_TX).
//!
//! ```text
//!   gen namespace                         xlb namespace
//!   generator ──> g0 ═══════ veth ═══════ x0 ──> program under test
//!                 xdp_drop <──────────────────── XDP_TX
//!                 (counts what returns)
//! ```
//! x0's TX packet counter is what g0's XDP received (veth reports the
//! peer's XDP receive count as its own TX), and its RX counter what the
//! program under test was offered, so one `ip -s link` read gives both.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use lb_common::{Event, GlobalStats, Reason, limits};
use xlb::{
    config::Capacities,
    control::desired::{DesiredVip, NextHop},
    dataplane::Counters as _,
    model::{Forward, Protocol, format_mac},
};
use xlb_tests::{
    aux,
    netns::Netns,
    plane::{Params, Plane, backends, dr_vip},
    unique_id,
};

use super::{
    Opts,
    kit::{self, Group, TempDir},
    report::{Row, Section, Target, median},
};

const VIP_DR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const VIP_TUN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
/// Distinct flows of the established-traffic cases.
const FLOWS: u32 = 1024;

/// The two namespaces and the veth between them; torn down on drop
/// (helper programs first).
struct Pair {
    _drop_on_g0: aux::Attached,
    lb: Netns,
    gen_ns: Netns,
    g0_mac: [u8; 6],
    x0_mac: [u8; 6],
}

impl Pair {
    fn new() -> anyhow::Result<Pair> {
        let id = unique_id();
        let gen_ns = Netns::new(&format!("xb{id:06x}-gen"))?;
        let lb = Netns::new(&format!("xb{id:06x}-xlb"))?;
        // No IPv6 chatter (router solicitations, MLD) in the counters.
        for ns in [&gen_ns, &lb] {
            ns.sysctl(&["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])?;
        }
        xlb_tests::cmd::ip(&format!(
            "link add g0 netns {} type veth peer name x0 netns {}",
            gen_ns.name, lb.name
        ))?;
        gen_ns.ip("addr add 10.1.0.1/24 dev g0")?;
        gen_ns.ip("link set g0 up")?;
        lb.ip("addr add 10.1.0.2/24 dev x0")?;
        lb.ip("link set x0 up")?;
        let (_, g0_mac) = gen_ns.link("g0")?;
        let (_, x0_mac) = lb.link("x0")?;
        // TUN: the backends' network is routed back toward the generator.
        lb.ip("route add 10.2.0.0/24 via 10.1.0.254")?;
        lb.ip(&format!("neigh add 10.1.0.254 lladdr {} nud permanent dev x0", format_mac(&g0_mac)))?;
        lb.sysctl(&["net.ipv4.conf.x0.forwarding=1"])?;
        // veth delivers XDP_TX frames only to a peer running XDP.
        let drop = aux::attach("xdp_drop", "g0", &gen_ns)?;
        Ok(Pair { _drop_on_g0: drop, lb, gen_ns, g0_mac, x0_mac })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Traffic {
    /// TCP ACKs of `FLOWS` flows, round robin.
    Established(Ipv4Addr),
    /// TCP SYNs from random source addresses (16 bits) and ports.
    SynFlood(Ipv4Addr),
}

/// A running packet generator.
enum Generator {
    Trafgen(Group, PathBuf),
    Pktgen(#[expect(dead_code, reason = "held for its Drop, which stops pktgen")] Pktgen),
}

impl Generator {
    fn start(pair: &Pair, traffic: Traffic, dir: &Path, use_pktgen: bool) -> anyhow::Result<Generator> {
        if use_pktgen && let Traffic::Established(vip) = traffic {
            match Pktgen::start(pair, vip) {
                Ok(p) => return Ok(Generator::Pktgen(p)),
                Err(e) => eprintln!("bench: pktgen failed ({e:#}); using trafgen"),
            }
        }
        let conf = dir.join(format!("{}.cfg", unique_id()));
        std::fs::write(&conf, trafgen_config(pair, traffic))?;
        let log = conf.with_extension("log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pair.gen_ns.name, "trafgen", "--dev", "g0", "--conf"])
            .arg(&conf)
            // One process, which trafgen pins to CPU 0: the kernel runs both
            // veth ends' receive work on the sender's CPU, so the whole path
            // stays on that CPU in every window. Leave the host's socket
            // memory and IRQ affinity alone.
            .args(["--cpus", "1", "--no-sock-mem", "--notouch-irq", "--no-cpu-stats"]);
        Ok(Generator::Trafgen(Group::spawn(cmd, "trafgen", Some(&log))?, log))
    }

    fn name(&self) -> &'static str {
        match self {
            Generator::Trafgen(..) => "trafgen",
            Generator::Pktgen(_) => "pktgen",
        }
    }

    /// Fails if the generator is gone.
    fn check(&mut self) -> anyhow::Result<()> {
        if let Generator::Trafgen(group, log) = self
            && let Some(status) = group.exited()
        {
            bail!("trafgen exited ({status}): {}", std::fs::read_to_string(log).unwrap_or_default().trim());
        }
        Ok(())
    }
}

/// trafgen's packet configuration: 60-byte frames to x0.
fn trafgen_config(pair: &Pair, traffic: Traffic) -> String {
    let eth = format!("eth(da={}, sa={})", format_mac(&pair.x0_mac), format_mac(&pair.g0_mac));
    let mut conf = String::new();
    match traffic {
        Traffic::Established(vip) => {
            for i in 0..FLOWS {
                let _ = writeln!(
                    conf,
                    "{{ {eth}, ipv4(sa=198.51.100.{}, da={vip}), tcp(sp={}, dp=80, ack), fill(0x00, 6) }}",
                    1 + i / 256,
                    10_000 + i
                );
            }
        }
        Traffic::SynFlood(vip) => {
            let _ = writeln!(
                conf,
                "{{ {eth}, ipv4(sa=198.18.0.0, sa[2]=drnd(), sa[3]=drnd(), da={vip}), \
                 tcp(sp=drnd(), dp=80, syn), fill(0x00, 6) }}"
            );
        }
    }
    conf
}

/// The kernel's packet generator (UDP only), driven through
/// /proc/net/pktgen of the generator namespace. Used where the kernel has
/// it; this path falls back to trafgen on any error.
struct Pktgen {
    gen_ns_path: PathBuf,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Pktgen {
    fn available() -> bool {
        Path::new("/proc/net/pktgen").exists()
    }

    fn start(pair: &Pair, vip: Ipv4Addr) -> anyhow::Result<Pktgen> {
        let dst_mac = format_mac(&pair.x0_mac);
        pair.gen_ns.run(|| -> anyhow::Result<()> {
            // /proc/thread-self/net: this thread's namespace, not the process's.
            let pg = Path::new("/proc/thread-self/net/pktgen");
            let write = |file: &str, line: &str| -> anyhow::Result<()> {
                let path = pg.join(file);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("open {}", path.display()))?;
                f.write_all(line.as_bytes()).with_context(|| format!("{} < {line}", path.display()))
            };
            write("kpktgend_0", "rem_device_all")?;
            write("kpktgend_0", "add_device g0")?;
            for line in [
                "count 0".to_owned(),
                "pkt_size 60".to_owned(),
                format!("dst {vip}"),
                format!("dst_mac {dst_mac}"),
                "src_min 198.51.100.1".to_owned(),
                "src_max 198.51.100.4".to_owned(),
                "udp_src_min 10000".to_owned(),
                format!("udp_src_max {}", 10_000 + FLOWS / 4 - 1),
                "udp_dst_min 53".to_owned(),
                "udp_dst_max 53".to_owned(),
            ] {
                write("g0", &line)?;
            }
            Ok(())
        })?;
        let gen_ns_path = pair.gen_ns.path();
        // "start" blocks until "stop".
        let thread = pair.gen_ns.spawn(|| std::fs::write("/proc/thread-self/net/pktgen/pgctrl", "start"));
        Ok(Pktgen { gen_ns_path, thread: Some(thread) })
    }
}

impl Drop for Pktgen {
    fn drop(&mut self) {
        let path = self.gen_ns_path.clone();
        let stop = std::thread::spawn(move || -> anyhow::Result<()> {
            xlb_tests::netns::enter(&path)?;
            Ok(std::fs::write("/proc/thread-self/net/pktgen/pgctrl", "stop")?)
        });
        let _ = stop.join();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the program under test is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Under {
    Helper(&'static str),
    /// `xdp_line` over as many lines as xlb's connection table has slots.
    Line,
    Xlb,
}

struct Case {
    name: &'static str,
    under: Under,
    traffic: Traffic,
    /// Counts what x0 was offered (XDP_DROP) instead of what returned.
    offered: bool,
}

/// What a case gave over its windows.
#[derive(Default)]
struct Measured {
    rates: Vec<f64>,
    offered: Vec<f64>,
    generator: &'static str,
    /// Packets offered and returned over every window.
    totals: (u64, u64),
    /// xlb's counters before and after each window.
    stats: Vec<(GlobalStats, GlobalStats)>,
}

impl Measured {
    fn add(&mut self, w: Window, case: &Case) {
        self.rates.push(if case.offered { w.offered } else { w.returned });
        self.offered.push(w.offered);
        self.generator = w.generator;
        self.totals.0 += w.totals.0;
        self.totals.1 += w.totals.1;
        self.stats.extend(w.stats);
    }
}

fn xlb_params() -> Params {
    Params {
        capacities: Capacities { table_size: 65_537, max_vips: 8, max_backends: 64, conntrack_size: 262_144 },
        conn_insert_limit: limits::DEFAULT_CONN_INSERT_LIMIT,
        tun_source_v4: Ipv4Addr::new(10, 1, 0, 2),
        tun_source_v6: std::net::Ipv6Addr::UNSPECIFIED,
    }
}

/// xlb's VIPs; TUN backends carry the next hop as the daemon resolves it
/// (the generator's side, as the router).
fn xlb_vips(router_mac: [u8; 6]) -> Vec<DesiredVip> {
    let vip = |name: &str, addr: Ipv4Addr, port, protocol, forward, net: u8| {
        let mut list = backends((11..21).map(|i| [10, net, 0, i].into()));
        if forward == Forward::Tun {
            let hop = Some(NextHop { mac: router_mac, mtu: 1500 });
            list.iter_mut().for_each(|b| (b.mac, b.hop) = (None, hop));
        }
        DesiredVip { forward, ..dr_vip(name, addr.into(), port, protocol, list) }
    };
    vec![
        vip("dr", VIP_DR, 80, Protocol::Tcp, Forward::Dr, 0),
        vip("dr-udp", VIP_DR, 53, Protocol::Udp, Forward::Dr, 0),
        vip("tun", VIP_TUN, 80, Protocol::Tcp, Forward::Tun, 2),
        vip("tun-udp", VIP_TUN, 53, Protocol::Udp, Forward::Tun, 2),
    ]
}

pub fn run(opts: &Opts) -> anyhow::Result<Section> {
    let (warmup, window, runs) = if opts.smoke { (0.2, 0.2, 5) } else { (0.5, 1.0, 5) };
    let use_pktgen = Pktgen::available();
    let mut section = Section::new(
        "2a. Throughput in namespaces (generator → veth → XDP_TX back)",
        &format!(
            "{runs} rounds of one {window} s window per case, cases interleaved so that other load on the \
             host weighs on all alike; each window after {warmup} s of a fresh generator's warm-up; \
             generator: {} (one process, \
             60-byte frames; pktgen would send UDP to the UDP VIPs, SYN floods always use trafgen). Figure = \
             frames returned to the generator side per second (XDP_DROP: frames offered). Generator, veth and \
             XDP share a CPU: compare by ratio to the MAC-swap bounce with the same traffic. Established: \
             {FLOWS} TCP flows, round robin. SYN flood: random source address (16 bits) and port. xlb with \
             10 backends per VIP, M = 65537, flood guard at its default ({} new flows/s per CPU).",
            if use_pktgen { "pktgen" } else { "trafgen (no /proc/net/pktgen)" },
            limits::DEFAULT_CONN_INSERT_LIMIT
        ),
    );
    if xlb_tests::cmd::which("trafgen").is_none() {
        section.skipped =
            Some("trafgen not found (Debian package netsniff-ng; scripts/setup.sh installs it)".into());
        return Ok(section);
    }
    let pair = Pair::new()?;
    let dir = TempDir::new("tput")?;
    let cases = [
        Case {
            name: "XDP_DROP (generator ceiling)",
            under: Under::Helper("xdp_drop"),
            traffic: Traffic::Established(VIP_DR),
            offered: true,
        },
        Case {
            name: "MAC-swap bounce (forwarding ceiling)",
            under: Under::Helper("xdp_macswap"),
            traffic: Traffic::Established(VIP_DR),
            offered: false,
        },
        Case {
            name: "MAC-swap bounce, SYN-flood traffic",
            under: Under::Helper("xdp_macswap"),
            traffic: Traffic::SynFlood(VIP_DR),
            offered: false,
        },
        Case {
            name: "memory floor bounce (a line of an array as big as the connection table read per frame)",
            under: Under::Line,
            traffic: Traffic::Established(VIP_DR),
            offered: false,
        },
        Case {
            name: "memory floor bounce, SYN-flood traffic",
            under: Under::Line,
            traffic: Traffic::SynFlood(VIP_DR),
            offered: false,
        },
        Case {
            name: "xlb DR, established flows",
            under: Under::Xlb,
            traffic: Traffic::Established(VIP_DR),
            offered: false,
        },
        Case {
            name: "xlb TUN, established flows",
            under: Under::Xlb,
            traffic: Traffic::Established(VIP_TUN),
            offered: false,
        },
        Case {
            name: "xlb DR, SYN flood",
            under: Under::Xlb,
            traffic: Traffic::SynFlood(VIP_DR),
            offered: false,
        },
        Case {
            name: "xlb TUN, SYN flood",
            under: Under::Xlb,
            traffic: Traffic::SynFlood(VIP_TUN),
            offered: false,
        },
    ];
    // Rounds of one window per case, so that whatever else loads the host
    // in a round weighs on every case alike.
    let mut results: Vec<Measured> = cases.iter().map(|_| Measured::default()).collect();
    let mut xlb = Plane::with_mac(xlb_params(), pair.x0_mac)?;
    xlb.apply(&xlb_vips(pair.g0_mac))?;
    let mut on_x0: Option<OnX0> = None;
    for _ in 0..runs {
        for (case, m) in cases.iter().zip(&mut results) {
            if on_x0.as_ref().map(|o| o.under) != Some(case.under) {
                // One XDP program per interface: detach the previous one first.
                if let Some(OnX0 { under: Under::Xlb, .. }) = on_x0.take() {
                    xlb.detach()?;
                }
                let helper = match case.under {
                    Under::Helper(name) => Some(aux::attach(name, "x0", &pair.lb)?),
                    Under::Line => {
                        let ebpf = aux::load_line(xlb_params().capacities.conntrack_size)?;
                        Some(aux::attach_loaded(ebpf, "xdp_line", "x0", &pair.lb)?)
                    }
                    Under::Xlb => {
                        xlb.attach(&pair.lb, "x0")?;
                        None
                    }
                };
                on_x0 = Some(OnX0 { under: case.under, _helper: helper });
            }
            let under_xlb = matches!(case.under, Under::Xlb).then_some(&xlb);
            let w = measure(&pair, case, under_xlb, &dir.0, use_pktgen, warmup, window)
                .with_context(|| format!("throughput: {}", case.name))?;
            m.add(w, case);
        }
    }
    drop(on_x0);
    drop(xlb);

    // A baseline's median, by what runs and the traffic it gets.
    let baseline = |under: Under, syn_flood: bool| {
        let found = cases.iter().zip(&results).find(|(c, _)| {
            c.under == under && !c.offered && matches!(c.traffic, Traffic::SynFlood(_)) == syn_flood
        });
        found.map_or(f64::NAN, |(_, m)| median(&m.rates))
    };
    let macswap = Under::Helper("xdp_macswap");
    let (est_base, syn_base) = (baseline(macswap, false), baseline(macswap, true));
    let (est_floor, syn_floor) = (baseline(Under::Line, false), baseline(Under::Line, true));
    for (case, m) in cases.iter().zip(&results) {
        let samples: Vec<f64> = m.rates.iter().map(|r| r / 1e6).collect();
        let (base_name, base) = match case.traffic {
            Traffic::SynFlood(_) => ("MAC-swap, SYN-flood traffic", syn_base),
            Traffic::Established(_) => ("MAC-swap bounce", est_base),
        };
        let mut row = Row::new(case.name, "Mpps", samples)
            .vs(base_name, base / 1e6)
            .extra("offered_mpps", m.offered.iter().map(|r| r / 1e6).collect::<Vec<_>>())
            .extra("generator", m.generator)
            .extra("offered_total", m.totals.0)
            .extra("returned_total", m.totals.1);
        if case.offered {
            row = row.note("Frames offered to x0 and dropped there: the most the generator can push.");
        }
        if case.under == Under::Line {
            row = row.note(
                "The frame bounced unchanged after reading the line of an array as big as xlb's connection table that \
                 the frame's flow picks: the least any program keeping state per flow costs.",
            );
        }
        if !m.stats.is_empty() {
            let d = |r: Reason| -> u64 {
                m.stats
                    .iter()
                    .map(|(b, a)| a.reasons[r as usize].packets - b.reasons[r as usize].packets)
                    .sum()
            };
            let e = |ev: Event| -> u64 {
                m.stats.iter().map(|(b, a)| a.events[ev as usize] - b.events[ev as usize]).sum()
            };
            let (fwd, hit, new, skipped) =
                (d(Reason::Forwarded), e(Event::ConnHit), e(Event::ConnNew), e(Event::ConnInsertSkipped));
            // Every frame the program saw got exactly one reason.
            let seen: u64 = Reason::ALL.iter().map(|r| d(*r)).sum();
            row = row
                .extra("xlb_frames_seen", seen)
                .extra("xlb_forwarded", fwd)
                .extra("xlb_conntrack_hit", hit)
                .extra("xlb_conntrack_new", new)
                .extra("xlb_conntrack_insert_skipped", skipped);
            let pct = |a: u64, b: u64| if b == 0 { 0.0 } else { 100.0 * a as f64 / b as f64 };
            row = match case.traffic {
                Traffic::Established(_) => row.target(Target::ratio_at_least(0.95)).note(format!(
                    "{:.3}× the memory floor bounce. xlb forwarded {:.2}% of the frames it saw; {:.2}% \
                     followed the connection table.",
                    median(&m.rates) / est_floor,
                    pct(fwd, seen),
                    pct(hit, hit + new)
                )),
                Traffic::SynFlood(_) => row.target(Target::ratio_at_least(0.90)).note(format!(
                    "{:.3}× the memory floor bounce. xlb forwarded {:.2}% of the frames it saw; {new} new \
                     flows, {:.1}% of them not recorded by the flood guard.",
                    median(&m.rates) / syn_floor,
                    pct(fwd, seen),
                    pct(skipped, new)
                )),
            };
        }
        section.push(row);
    }
    Ok(section)
}

/// What x0 runs.
struct OnX0 {
    under: Under,
    /// Held for its Drop, which detaches the helper.
    _helper: Option<aux::Attached>,
}

/// One window of the counters while the generator sends `case`'s traffic.
struct Window {
    returned: f64,
    offered: f64,
    generator: &'static str,
    totals: (u64, u64),
    stats: Option<(GlobalStats, GlobalStats)>,
}

fn measure(
    pair: &Pair,
    case: &Case,
    xlb: Option<&Plane>,
    dir: &Path,
    use_pktgen: bool,
    warmup: f64,
    window: f64,
) -> anyhow::Result<Window> {
    let mut generator = Generator::start(pair, case.traffic, dir, use_pktgen)?;
    std::thread::sleep(kit::secs(warmup));
    generator.check()?;
    if matches!(generator, Generator::Pktgen(_)) {
        let a = kit::counters(&pair.lb, "x0")?;
        std::thread::sleep(Duration::from_millis(100));
        if kit::counters(&pair.lb, "x0")?.1 == a.1 {
            eprintln!("bench: pktgen sends nothing; using trafgen");
            drop(generator);
            generator = Generator::start(pair, case.traffic, dir, false)?;
            std::thread::sleep(kit::secs(warmup));
            generator.check()?;
        }
    }
    let stats_before = xlb.map(|x| x.counters.global()).transpose()?;
    let first = kit::counters(&pair.lb, "x0")?;
    std::thread::sleep(kit::secs(window));
    let last = kit::counters(&pair.lb, "x0")?;
    generator.check()?;
    let stats_after = xlb.map(|x| x.counters.global()).transpose()?;
    let name = generator.name();
    drop(generator);
    let dt = (last.0 - first.0).as_secs_f64();
    let (offered, returned) = (last.1 - first.1, last.2 - first.2);
    if (if case.offered { offered } else { returned }) == 0 {
        bail!("nothing came back: is the XDP program bouncing frames?");
    }
    // Let the last frames drain before the next window.
    std::thread::sleep(Duration::from_millis(50));
    Ok(Window {
        returned: returned as f64 / dt,
        offered: offered as f64 / dt,
        generator: name,
        totals: (offered, returned),
        stats: stats_before.zip(stats_after),
    })
}
