//! What active health checks cost: xlb's checker probing 1,000 and 10,000
//! backends at a 1 s interval, on one thread, against a local server.

use std::{
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use xlb::{
    config::{
        Check,
        check::{NewBackends, OnAllFailed, OnFail, Probe},
    },
    health::{Checker, State, Target},
};
use xlb_tests::{netns::Netns, unique_id};

use super::{
    Opts,
    report::{Row, Section, Target as Goal},
};

const PORT: u16 = 18080;

pub fn run(opts: &Opts) -> anyhow::Result<Section> {
    let sizes: &[usize] = if opts.smoke { &[1000] } else { &[1000, 10_000] };
    let (warmup, window) = if opts.smoke {
        (Duration::from_secs(2), Duration::from_secs(2))
    } else {
        (Duration::from_secs(3), Duration::from_secs(10))
    };
    let mut section = Section::new(
        "5. Health checks",
        &format!(
            "TCP connect checks at a 1 s interval (500 ms timeout) to N distinct loopback addresses in a \
             namespace of their own, one server thread accepting; the checker runs on one thread (a \
             current-thread runtime). CPU is that thread's CPU time over a {} s window after {} s of \
             warm-up (it includes the kernel's work for both ends of each loopback connection); memory \
             is the process's resident-set growth after the checks started.",
            window.as_secs(),
            warmup.as_secs()
        ),
    );
    let ns = Netns::new(&format!("xb{:06x}-hc", unique_id()))?;
    ns.ip("link set lo up")?;
    for &n in sizes {
        let f = ns.run(|| measure(n, warmup, window))?;
        let label = |what: &str| format!("{n} backends: {what}");
        section.rows.push(
            Row::new(label("checker CPU (one core = 100 %)"), "%", vec![f.cpu_percent])
                .target(Goal::at_most(100.0)),
        );
        section.rows.push(
            Row::new(label("probes per second"), "probes/s", vec![f.probes_per_sec])
                .target(Goal::at_least(n as f64 * 0.95)),
        );
        section.rows.push(Row::new(label("failed probes"), "probes", vec![f.failed as f64]));
        section.rows.push(Row::new(label("memory growth"), "MiB", vec![f.rss_growth_mib]));
    }
    Ok(section)
}

struct Figures {
    cpu_percent: f64,
    probes_per_sec: f64,
    failed: u64,
    rss_growth_mib: f64,
}

fn measure(n: usize, warmup: Duration, window: Duration) -> anyhow::Result<Figures> {
    let listener = TcpListener::bind(("0.0.0.0", PORT))?;
    // The standard library listens with a backlog of 128: at 10,000
    // connects a second, bursts would overflow it and count as the
    // checker's failures.
    // SAFETY: listen on a socket this function owns.
    if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        listener.set_nonblocking(true)?;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if listener.accept().is_err() {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        })
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let figures = runtime.block_on(async {
        let rss_before = rss_bytes();
        let mut checker = Checker::new(Default::default());
        let check = Check {
            probe: Probe::Tcp,
            port: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            on_fail: OnFail::Remove,
            on_all_failed: OnAllFailed::Keep,
            new_backends: NewBackends::Wait,
        };
        let targets = (0..n).map(|i| Target {
            addr: SocketAddr::from(([127, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8], PORT)),
            check: check.clone(),
        });
        checker.follow(targets, |_| State::Up);
        tokio::time::sleep(warmup).await;
        let totals =
            |c: &Checker| c.progress().values().fold((0, 0), |(p, f), x| (p + x.probes, f + x.failures));
        let (probes0, failures0) = totals(&checker);
        let (cpu0, t0) = (thread_cpu(), Instant::now());
        tokio::time::sleep(window).await;
        let (cpu, elapsed) = (thread_cpu() - cpu0, t0.elapsed());
        let (probes1, failures1) = totals(&checker);
        let rss_after = rss_bytes();
        drop(checker);
        Figures {
            cpu_percent: 100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64(),
            probes_per_sec: (probes1 - probes0) as f64 / elapsed.as_secs_f64(),
            failed: failures1 - failures0,
            rss_growth_mib: rss_after.saturating_sub(rss_before) as f64 / (1024.0 * 1024.0),
        }
    });
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    Ok(figures)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}
