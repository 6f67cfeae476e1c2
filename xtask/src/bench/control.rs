//! Part 3: the control plane. Maglev builds, writing tables to the kernel's
//! maps, the reconciler's apply for a change, map memory per VIP, backend
//! and connection, and the daemon's resident memory with 100 VIPs × 100
//! backends.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    hint::black_box,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lb_common::{BackendId, BackendInfo, MAGLEV_LANES, MaglevChunk, VipInfo, VipKey, limits};
use xlb::{
    config::Capacities,
    control::{
        desired::{Desired, DesiredBackend, DesiredVip},
        maglev,
        reconcile::Reconciler,
    },
    dataplane::{
        DataplaneError, KernelStore, Maps, Side, StatsOf, Store,
        loader::{self, Params},
        maps::table_chunks,
    },
    model::Protocol,
};
use xlb_tests::{daemon::Daemon, netns::Netns, plane::dr_vip, unique_id};

use super::{
    Opts, kit,
    quality::{M, entries, names},
    report::{Row, Section, Target},
};

pub fn run(opts: &Opts) -> anyhow::Result<Section> {
    let runs = if opts.smoke { 5 } else { 11 };
    let mut section = Section::new(
        "3. Control plane",
        &format!(
            "Wall-clock time in this process (release build), {runs} runs each. Table writes go to the \
             kernel's MAGLEV map of a loaded, unattached program (one bpf() call per 4-entry chunk). \
             reconcile+apply is `Reconciler::apply` on kernel maps: Maglev builds, diff, backend and \
             chunk writes, the switch: the config/discovery change → map update latency inside the \
             daemon. Memory: kernel `memlock` of each map (/proc/<pid>/fdinfo); per-unit figures are the \
             difference between two loads differing only in that capacity. Daemon: `xlb run` with 100 \
             TUN VIPs × 100 backends in a namespace."
        ),
    );
    maglev_builds(&mut section, runs);
    table_writes(&mut section, runs)?;
    reconcile(&mut section, runs)?;
    memory(&mut section)?;
    daemon(&mut section, opts.smoke).context("daemon with 100 VIPs × 100 backends")?;
    super::etcd::run(&mut section, opts.smoke).context("daemon with 10,000 instances from etcd")?;
    Ok(section)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn maglev_builds(section: &mut Section, runs: usize) {
    for n in [10usize, 100, 1000] {
        let names = names(n, 0);
        let entries = entries(&names);
        let samples: Vec<f64> = (0..runs)
            .map(|_| {
                let start = Instant::now();
                black_box(maglev::build(black_box(&entries), M));
                ms(start.elapsed())
            })
            .collect();
        let mut row = Row::new(format!("Maglev build, N = {n}, M = {M}"), "ms", samples);
        if n == 1000 {
            row = row.target(Target::at_most(2.0));
        }
        section.push(row);
    }
}

fn capacities(max_vips: u32, max_backends: u32) -> Capacities {
    Capacities { table_size: M, max_vips, max_backends, conntrack_size: 4096 }
}

/// Program `xlb` loaded (attached nowhere) with its maps behind a
/// write-counting store, and a reconciler for them.
struct Loaded {
    _ebpf: aya::Ebpf,
    maps: Maps<Counting>,
    reconciler: Reconciler,
}

impl Loaded {
    fn new(caps: Capacities) -> anyhow::Result<Self> {
        let (ebpf, maps, _) = loader::load_detached(Params::plain(caps), [2, 0, 0, 0, 0, 2])?;
        let store = Counting { store: maps.into_store(), chunks: 0, backends: 0 };
        Ok(Loaded { _ebpf: ebpf, maps: Maps::new(store, caps), reconciler: Reconciler::new(caps) })
    }

    /// Applies `vips` now; removed backends are freed at once.
    fn apply(&mut self, vips: &[DesiredVip]) -> anyhow::Result<()> {
        let desired = Desired { vips: vips.to_vec(), drain_timeout: Duration::ZERO };
        self.reconciler.apply(&desired, Instant::now(), &mut self.maps)?;
        Ok(())
    }

    /// Writes `table` to table `side` of VIP 1, diffed against `previous`;
    /// returns how many chunks it wrote.
    fn write_table(&mut self, table: &[BackendId], previous: Option<&[BackendId]>) -> anyhow::Result<usize> {
        let before = self.maps.store().chunks;
        self.maps.write_table(1, Side::Second, table, previous)?;
        Ok(self.maps.store().chunks - before)
    }
}

fn table_writes(section: &mut Section, runs: usize) -> anyhow::Result<()> {
    let g = capacities(4, 512);
    let mut loaded = Loaded::new(g)?;
    let names = names(100, 0);
    let all = entries(&names);
    let a = maglev::build(&all, M);
    let rest: Vec<_> = all.iter().copied().filter(|e| e.id != 50).collect();
    let b = maglev::build(&rest, M);
    let lanes = MAGLEV_LANES as usize;
    let differs = |c: usize| {
        a[c * lanes..(c * lanes + lanes).min(a.len())] != b[c * lanes..(c * lanes + lanes).min(b.len())]
    };
    let diff_chunks = (0..table_chunks(&g) as usize).filter(|&c| differs(c)).count();

    let mut full = Vec::new();
    let mut diff = Vec::new();
    for r in 0..runs {
        let table = if r % 2 == 0 { &a } else { &b };
        let start = Instant::now();
        let n = loaded.write_table(table, None)?;
        full.push(ms(start.elapsed()));
        ensure!(n == table_chunks(&g) as usize);
        // The table holds `table`; write the other table's differing chunks.
        let other = if r % 2 == 0 { &b } else { &a };
        let start = Instant::now();
        let n = loaded.write_table(other, Some(table))?;
        diff.push(ms(start.elapsed()));
        ensure!(n == diff_chunks);
    }
    section.push(
        Row::new(
            format!("table write, whole ({} chunks of {MAGLEV_LANES} ids)", table_chunks(&g)),
            "ms",
            full,
        )
        .extra("chunks", table_chunks(&g)),
    );
    section.push(
        Row::new(format!("table write, 1 of 100 backends removed ({diff_chunks} chunks)"), "ms", diff)
            .extra("chunks", diff_chunks),
    );
    Ok(())
}

/// The kernel's maps, counting chunk and backend writes on their way.
struct Counting {
    store: KernelStore,
    chunks: usize,
    backends: usize,
}

impl Store for Counting {
    fn vip_put(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        self.store.vip_put(key, info)
    }
    fn vip_delete(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        self.store.vip_delete(key)
    }
    fn vip_entries(&self) -> Result<Vec<(VipKey, VipInfo)>, DataplaneError> {
        self.store.vip_entries()
    }
    fn backend_put(&mut self, id: BackendId, info: &BackendInfo) -> Result<(), DataplaneError> {
        self.backends += 1;
        self.store.backend_put(id, info)
    }
    fn backend_get(&self, id: BackendId) -> Result<BackendInfo, DataplaneError> {
        self.store.backend_get(id)
    }
    fn backend_entries(&self) -> Result<Vec<(BackendId, BackendInfo)>, DataplaneError> {
        self.store.backend_entries()
    }
    fn chunk_put(&mut self, index: u32, chunk: &MaglevChunk) -> Result<(), DataplaneError> {
        self.chunks += 1;
        self.store.chunk_put(index, chunk)
    }
    fn chunk_get(&self, index: u32) -> Result<MaglevChunk, DataplaneError> {
        self.store.chunk_get(index)
    }
    fn filter_put(&mut self, word: u32, bits: u64) -> Result<(), DataplaneError> {
        self.store.filter_put(word, bits)
    }
    fn stats_reset(&mut self, of: StatsOf, id: u32) -> Result<(), DataplaneError> {
        self.store.stats_reset(of, id)
    }
}

fn vip(i: usize, backends: impl IntoIterator<Item = usize>) -> DesiredVip {
    let list = backends
        .into_iter()
        .map(|j| DesiredBackend {
            addr: IpAddr::from([10, 64 + (i / 256) as u8, (i % 256) as u8, j as u8 + 1]),
            weight: 1,
            mac: Some([2, 0, 0, 0, i as u8, j as u8]),
            hop: None,
        })
        .collect();
    dr_vip(&format!("v{i}"), IpAddr::from([192, 0, 2, i as u8 + 1]), 80, Protocol::Tcp, list)
}

/// Times `apply(desired)` on `loaded`, counting chunk and backend writes.
fn timed_apply(loaded: &mut Loaded, vips: Vec<DesiredVip>) -> anyhow::Result<(f64, usize, usize)> {
    let desired = Desired { vips, drain_timeout: Duration::ZERO };
    let (chunks, backends) = (loaded.maps.store().chunks, loaded.maps.store().backends);
    let start = Instant::now();
    loaded.reconciler.apply(&desired, Instant::now(), &mut loaded.maps)?;
    let t = ms(start.elapsed());
    Ok((t, loaded.maps.store().chunks - chunks, loaded.maps.store().backends - backends))
}

fn reconcile(section: &mut Section, runs: usize) -> anyhow::Result<()> {
    // A new VIP: the whole table is written.
    let mut loaded = Loaded::new(capacities(4, 512))?;
    let (mut samples, mut chunks) = (Vec::new(), Vec::new());
    for r in 0..runs {
        loaded.apply(&[])?;
        let (t, c, _) = timed_apply(&mut loaded, vec![vip(r % 4, 0..100)])?;
        samples.push(t);
        chunks.push(c);
    }
    section.push(
        Row::new("reconcile+apply: new VIP, 100 backends", "ms", samples).extra("chunks_written", chunks),
    );

    // One backend removed, for 1 VIP and for 100 VIPs of 100 backends each.
    for vips in [1, 100] {
        let mut loaded = Loaded::new(capacities(128, 16_384))?;
        let full = |_: usize| (0..vips).map(|i| vip(i, 0..100)).collect::<Vec<_>>();
        loaded.apply(&full(0))?;
        // Once untimed, so both table slots hold a table (the first change
        // into an empty slot writes it whole).
        let mut change = full(0);
        change[0] = vip(0, 0..99);
        loaded.apply(&change)?;
        loaded.apply(&full(0))?;
        let (mut samples, mut chunks) = (Vec::new(), Vec::new());
        for r in 0..runs {
            // Backend r of VIP 0 goes; then it comes back (untimed).
            let mut change = full(0);
            change[0] = vip(0, (0..100).filter(|&j| j != r * 7 % 100));
            let (t, c, _) = timed_apply(&mut loaded, change)?;
            samples.push(t);
            chunks.push(c);
            loaded.apply(&full(0))?;
        }
        let note = if vips > 1 {
            "Only the changed VIP's table is rebuilt; the others' inputs are unchanged, so their tables \
             are neither rebuilt nor compared."
        } else {
            "Chunks are diffed against what the inactive slot holds (the table before the previous change), \
             so a change writes up to twice the chunks that differ from the live table."
        };
        section.push(
            Row::new(
                format!("reconcile+apply: 1 backend removed, {vips} VIP(s) × 100 backends"),
                "ms",
                samples,
            )
            .extra("chunks_written", chunks)
            .note(note),
        );
    }
    Ok(())
}

/// Total `memlock` of the maps a load with `geometry` creates, per map.
fn map_memory(caps: Capacities) -> anyhow::Result<BTreeMap<String, u64>> {
    let before: Vec<u32> = kit::map_memory("self")?.into_iter().map(|m| m.0).collect();
    let loaded = Loaded::new(caps)?;
    let mut maps = BTreeMap::new();
    for (id, name, memlock) in kit::map_memory("self")? {
        if !before.contains(&id) {
            *maps.entry(name).or_default() += memlock;
        }
    }
    drop(loaded);
    Ok(maps)
}

fn memory(section: &mut Section) -> anyhow::Result<()> {
    let base = Capacities {
        table_size: M,
        max_vips: limits::DEFAULT_MAX_VIPS,
        max_backends: limits::DEFAULT_MAX_BACKENDS,
        conntrack_size: limits::DEFAULT_CONNTRACK_SIZE,
    };
    let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>() as f64;
    let at_base = map_memory(base)?;
    let b = total(&at_base);
    section.push(
        Row::new(
            format!(
                "map memory, default capacities ({} VIPs, {} backends, {} connections)",
                base.max_vips, base.max_backends, base.conntrack_size
            ),
            "MiB",
            vec![b / (1 << 20) as f64],
        )
        .extra("per_map_bytes", &at_base),
    );
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let slope = |g: Capacities, units: u32, case: &str, note: String| -> anyhow::Result<Row> {
        let m = map_memory(g)?;
        let per = (total(&m) - b) / units as f64;
        Ok(Row::new(case, "bytes", vec![per]).note(note).extra("per_map_bytes", &m))
    };
    let chunks = table_chunks(&base) as u64;
    section.push(slope(
        Capacities { max_vips: base.max_vips * 2, ..base },
        base.max_vips,
        "map memory per VIP",
        format!(
            "Two Maglev tables of M = {M} ({} bytes: 2 × {chunks} chunks × 8), a VIPS entry and per-CPU \
             VIP counters (possible CPUs: {}).",
            2 * chunks * 8,
            cpus.trim()
        ),
    )?);
    section.push(slope(
        Capacities { max_backends: base.max_backends * 2, ..base },
        base.max_backends,
        "map memory per backend (VIP–backend pair)",
        "A BACKENDS entry (32 bytes) and per-CPU backend counters.".into(),
    )?);
    section.push(slope(
        Capacities { conntrack_size: base.conntrack_size * 2, ..base },
        base.conntrack_size,
        "map memory per connection-table entry",
        "One 64-byte slot: 40-byte key, 8-byte entry, its seal and its mark of use.".into(),
    )?);
    Ok(())
}

/// A namespace with an interface for a daemon whose TUN backends are in
/// 10.64.0.0/16, behind one gateway with a permanent neighbour entry.
pub(super) fn tun_namespace(tag: &str) -> anyhow::Result<(Netns, String)> {
    let id = unique_id();
    let ns = Netns::new(&format!("xb{id:06x}-{tag}"))?;
    let iface = format!("xr{id:06x}");
    ns.ip(&format!("link add {iface} type veth peer name xq{id:06x}"))?;
    ns.ip(&format!("link set xq{id:06x} up"))?;
    ns.ip(&format!("link set {iface} up"))?;
    ns.ip(&format!("addr add 10.1.0.2/24 dev {iface}"))?;
    // TUN backends need no MACs: one route and one neighbour serve them all.
    ns.ip("route add 10.64.0.0/16 via 10.1.0.254")?;
    ns.ip(&format!("neigh add 10.1.0.254 lladdr 02:00:00:00:fe:fe nud permanent dev {iface}"))?;
    ns.sysctl(&[&format!("net.ipv4.conf.{iface}.forwarding=1")])?;
    Ok((ns, iface))
}

/// The daemon with 100 TUN VIPs × 100 backends: start time, resident
/// memory, CPU while idle, map memory, and reload latency.
fn daemon(section: &mut Section, smoke: bool) -> anyhow::Result<()> {
    const VIPS: usize = 100;
    const BACKENDS: usize = 100;
    let (ns, iface) = tun_namespace("rss")?;

    let config = |weight: u32| {
        let mut c = format!("interface = \"{iface}\"\nmax_vips = 128\nmax_backends = 10240\n");
        for i in 0..VIPS {
            let _ = write!(
                c,
                "\n[[vip]]\nname = \"v{i}\"\naddress = \"192.0.2.{}\"\nport = 80\nprotocol = \"tcp\"\nforward = \"tun\"\nbackends = [",
                i + 1
            );
            for j in 0..BACKENDS {
                let w = if i == 0 && j == 0 { weight } else { 1 };
                let _ = write!(
                    c,
                    "{}{{ address = \"10.64.{i}.{}\", weight = {w} }}",
                    if j > 0 { ", " } else { "" },
                    j + 1
                );
            }
            c.push_str("]\n");
        }
        c
    };
    // Fresh starts (each run detaches, so nothing is adopted); the last daemon stays.
    let starts = if smoke { 1 } else { 5 };
    let mut ready = Vec::new();
    let mut daemon = None;
    for _ in 0..starts {
        drop(daemon.take());
        let start = Instant::now();
        daemon = Some(Daemon::start(&ns, &iface, &config(1))?);
        ready.push(ms(start.elapsed()));
    }
    let mut daemon = daemon.context("no daemon started")?;
    // `xlb status --json` reads every table and counter from the maps.
    let mut status_ms = Vec::new();
    let mut status = serde_json::Value::Null;
    for _ in 0..if smoke { 1 } else { 5 } {
        let start = Instant::now();
        status = daemon.status()?;
        status_ms.push(ms(start.elapsed()));
    }
    let pid = status["daemon_pid"].as_u64().context("no daemon pid in `xlb status`")?;
    let backends: usize = status["vips"]
        .as_array()
        .map(|v| v.iter().map(|v| v["backends"].as_array().map_or(0, Vec::len)).sum())
        .unwrap_or(0);
    ensure!(backends == VIPS * BACKENDS, "the daemon lists {backends} backends, not {}", VIPS * BACKENDS);

    // Settle, then sample resident memory and CPU time.
    std::thread::sleep(Duration::from_millis(if smoke { 300 } else { 1000 }));
    let proc_status = |field: &str| kit::proc_mib(pid, field);
    let cpu_ticks = || -> anyhow::Result<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let after = &text[text.rfind(')').context("stat")? + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // CPU time over the whole sampling period: the kernel hands out
    // utime+stime in uneven steps, so shorter windows would mislead.
    let (t0, c0) = (Instant::now(), cpu_ticks()?);
    // 30 s covers a whole cycle of TUN route refreshes (15-30 s apart).
    let mut rss = Vec::new();
    for _ in 0..6 {
        rss.push(proc_status("VmRSS:")?);
        std::thread::sleep(Duration::from_millis(if smoke { 200 } else { 5000 }));
    }
    let idle = t0.elapsed().as_secs_f64();
    let cpu = 100.0 * (cpu_ticks()? - c0) as f64 / hz / idle;
    let hwm = proc_status("VmHWM:")?;
    let map_bytes: u64 = kit::map_memory(&pid.to_string())?.iter().map(|m| m.2).sum();

    let mut reload = Vec::new();
    for r in 0..5 {
        let start = Instant::now();
        daemon.apply_config(&config(if r % 2 == 0 { 2 } else { 1 }))?;
        reload.push(ms(start.elapsed()));
    }
    drop(daemon);

    section.push(
        Row::new("daemon resident memory (VmRSS), 100 VIPs × 100 backends", "MiB", rss)
            .note(format!(
                "Peak (VmHWM) {hwm:.1} MiB. Kernel map memory of its maps: {:.1} MiB (memlock, not in RSS).",
                map_bytes as f64 / (1 << 20) as f64
            ))
            .extra("vm_hwm_mib", hwm)
            .extra("map_memlock_bytes", map_bytes),
    );
    section.push(Row::new("daemon CPU while idle, 100 VIPs × 100 backends", "% of a CPU", vec![cpu]).note(
        format!(
            "utime+stime over one {idle:.1} s window (one figure: the kernel hands CPU time out in uneven \
             steps). The daemon's 1 s tick checks the config's mtime and refreshes neighbours; the route \
             to each TUN backend is looked up again every 15-30 s."
        ),
    ));
    section.push(
        Row::new("daemon start → ready, 100 VIPs × 100 backends", "ms", ready)
            .note("Fresh start (nothing pinned to adopt) until its \"xlb ready\" line (25 ms polling)."),
    );
    section.push(Row::new("`xlb status --json`, 100 VIPs × 100 backends", "ms", status_ms).note(format!(
        "The CLI as a separate process. Its source: {}.",
        status["source"].as_str().unwrap_or("?")
    )));
    section
        .push(Row::new("daemon reload: SIGHUP → \"config applied\", 1 weight changed", "ms", reload).note(
            "100 VIPs × 100 backends; includes re-reading and validating the file; 10 ms log polling.",
        ));
    Ok(())
}
