//! Pieces the benchmark's parts share beyond the test kit (`xlb_tests`,
//! which loads the program and runs frames): a pinned thread, child
//! processes in their own process group, scratch directories, interface
//! facts. Everything is torn down on drop.

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use xlb_tests::netns::Netns;

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

/// A `/proc/<pid>/status` figure given in kB (`VmRSS:`, `VmHWM:`), in MiB.
pub fn proc_mib(pid: u64, field: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no {field} for pid {pid}"))?;
    Ok(kb / 1024.0)
}

/// Seconds as a `Duration`, for run lengths given as fractions.
pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}
