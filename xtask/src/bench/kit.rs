//! Pieces every part of the benchmark uses: program `xlb` loaded with its
//! maps written by the real reconciler, single-shot BPF_PROG_TEST_RUN with
//! the kernel's timing, child processes in their own process group, scratch
//! directories, interface facts. Everything is torn down on drop.

use std::{
    net::IpAddr,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{Ebpf, TestRun as _, TestRunOptions, programs::Xdp};
use lb_common::{BackendId, FlowKey, flow_hash};
use xlb::{
    dataplane::KernelMaps,
    loader::{self, Params},
    reconcile::{Desired, DesiredBackend, DesiredVip, Reconciler},
};
use xlb_tests::netns::Netns;

/// Program `xlb`, loaded (attached nowhere unless `attach` is called), its
/// maps written through the real reconciler.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub maps: KernelMaps,
    pub reconciler: Reconciler,
}

impl Loaded {
    /// Loads program `xlb` as attached to an interface with MAC `iface_mac`.
    pub fn new(params: Params, iface_mac: [u8; 6]) -> anyhow::Result<Self> {
        let (ebpf, maps) = loader::load_detached(params, iface_mac).context("cannot load program xlb")?;
        Ok(Loaded { ebpf, maps, reconciler: Reconciler::new(params.geometry) })
    }

    /// Applies `vips` now; removed backends are freed at once.
    pub fn apply(&mut self, vips: &[DesiredVip]) -> anyhow::Result<()> {
        let desired = Desired { vips: vips.to_vec(), drain_timeout: Duration::ZERO };
        self.reconciler.apply(&desired, Instant::now(), &mut self.maps)?;
        Ok(())
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf.program(loader::PROGRAM).expect("program xlb").try_into().expect("an XDP program")
    }

    pub fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf.program_mut(loader::PROGRAM).expect("program xlb").try_into().expect("an XDP program")
    }

    /// Attaches program `xlb` in native mode to `interface` of `ns`; it
    /// stays attached until `self` is dropped.
    pub fn attach(&mut self, ns: &Netns, interface: &str) -> anyhow::Result<()> {
        let program = self.program_mut();
        ns.run(|| program.attach(interface, aya::programs::XdpMode::Driver).map(drop))
            .with_context(|| format!("cannot attach program xlb to {interface} in {}", ns.name))
    }

    /// The backend address the control plane's table gives `flow`.
    pub fn expected_backend(&self, flow: &FlowKey) -> Option<IpAddr> {
        let vip = self.reconciler.vips().get(&flow.vip_key())?;
        let table = vip.live_table()?;
        let id: BackendId = table[(flow_hash(flow) % self.reconciler.geometry().table_size) as usize];
        vip.backends.iter().find(|(_, b)| b.id == id).map(|(a, _)| *a)
    }
}

/// One program run's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    pub frame: Vec<u8>,
}

pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// Runs `program` once (repeat = 1) on `frame`, as received on `ifindex`
/// of the calling thread's namespace (0: none). Writes the output frame to
/// `out` and returns (action, output length, kernel-reported duration).
pub fn test_run(
    program: &Xdp,
    frame: &[u8],
    ifindex: u32,
    out: &mut [u8],
) -> anyhow::Result<(u32, usize, u64)> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let words = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut ctx = [0u8; 24];
    for (c, w) in ctx.chunks_mut(4).zip(words) {
        c.copy_from_slice(&w.to_ne_bytes());
    }
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: (ifindex != 0).then_some(&ctx[..]),
        ..TestRunOptions::default()
    })?;
    Ok((result.return_value, result.data_size_out as usize, result.duration.as_nanos() as u64))
}

/// Runs `program` once on `frame` and returns what came out.
pub fn outcome(program: &Xdp, frame: &[u8], ifindex: u32) -> anyhow::Result<Outcome> {
    let mut out = vec![0u8; frame.len() + 256];
    let (action, len, _) = test_run(program, frame, ifindex, &mut out)?;
    out.truncate(len);
    Ok(Outcome { action, frame: out })
}

/// Pins the calling thread to `cpu`, so timings do not mix CPUs.
pub fn pin_thread(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes within it;
    // sched_setaffinity(0) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The CPU the benchmark pins its timed thread to: the last one.
pub fn bench_cpu() -> usize {
    std::thread::available_parallelism().map(|n| n.get() - 1).unwrap_or(0)
}

/// A child process in its own process group; the whole group gets SIGINT,
/// then SIGKILL, on drop (trafgen forks its workers).
pub struct Group {
    child: Option<Child>,
}

impl Group {
    pub fn spawn(mut command: Command, what: &str, log: Option<&std::path::Path>) -> anyhow::Result<Self> {
        command.stdin(Stdio::null()).process_group(0);
        match log {
            Some(path) => {
                let file = std::fs::File::create(path)?;
                command.stdout(file.try_clone()?).stderr(file);
            }
            None => {
                command.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = command.spawn().with_context(|| format!("cannot start {what}"))?;
        Ok(Group { child: Some(child) })
    }

    /// Whether it has exited already (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGINT to the group, up to 3 s to end, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pgid = child.id() as i32;
        // SAFETY: signalling the process group we created (pgid = our child's pid).
        unsafe { libc::kill(-pgid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above; stragglers of our own group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = child.wait();
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("xlb-bench-{tag}-{:06x}", xlb_tests::unique_id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// RX and TX packet counters of `interface` in `ns`, with when they were
/// read (the middle of the `ip` call).
pub fn counters(ns: &Netns, interface: &str) -> anyhow::Result<(Instant, u64, u64)> {
    let before = Instant::now();
    let text = ns.ip(&format!("-s -j link show {interface}"))?;
    let after = Instant::now();
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let stats = &json[0]["stats64"];
    let rx = stats["rx"]["packets"].as_u64().context("no rx packets")?;
    let tx = stats["tx"]["packets"].as_u64().context("no tx packets")?;
    Ok((before + (after - before) / 2, rx, tx))
}

/// BPF maps open in process `pid` (`self` for ours): (map id, name,
/// memlock bytes from fdinfo).
pub fn map_memory(pid: &str) -> anyhow::Result<Vec<(u32, String, u64)>> {
    let mut maps = Vec::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else { continue };
        let field = |name: &str| {
            text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<u64>().ok()))
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            let name = aya::maps::MapInfo::from_id(id as u32)
                .ok()
                .and_then(|i| i.name_as_str().map(str::to_owned))
                .unwrap_or_default();
            maps.push((id as u32, name, memlock));
        }
    }
    maps.sort();
    maps.dedup_by_key(|m| m.0);
    Ok(maps)
}

/// `addrs` as backends of weight 1 with MACs 02:00:00:00:01:NN (any MAC
/// will do where nothing listens).
pub fn backends(addrs: impl IntoIterator<Item = IpAddr>) -> Vec<DesiredBackend> {
    addrs
        .into_iter()
        .enumerate()
        .map(|(i, addr)| DesiredBackend { addr, weight: 1, mac: Some([2, 0, 0, 0, 1, i as u8 + 1]) })
        .collect()
}

/// Seconds as a `Duration`, for run lengths given as fractions.
pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}
