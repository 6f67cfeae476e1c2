//! `cargo xtask bench`: what xlb costs, measured on this machine.
//!
//! A tool, not a test: it prints a table and writes every raw figure to
//! `target/bench/bench-<UTC time>.json` and `target/bench/latest.json`,
//! and it never fails on a timing. Each figure is the min/median/max over
//! at least five runs and, where it has one, a ratio to a baseline measured
//! in the same invocation; targets are reported as pass/MISS. `--smoke`
//! runs every part briefly (CI calls it); `--only` picks parts.
//!
#![doc = include_str!("method.md")]

mod control;
mod etcd;
mod health;
pub(crate) mod kit;
mod packet;
mod quality;
mod report;
mod tcp;
mod throughput;

use std::path::Path;

use clap::ValueEnum;

/// Parts of the benchmark, for `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// Cost per packet through BPF_PROG_TEST_RUN.
    Packet,
    /// Packets per second through a veth pair.
    Throughput,
    /// TCP end to end through `xlb run`.
    Tcp,
    /// Maglev builds, map writes, reconcile, memory, the daemon.
    Control,
    /// Maglev balance and disruption.
    Maglev,
    /// Active health checks: CPU and memory for many backends.
    Health,
}

pub struct Opts {
    pub smoke: bool,
}

/// How the figures are measured: the module's documentation, printed
/// under the table and stored in the JSON.
const METHOD: &str = include_str!("method.md");

pub fn run(xlb: &Path, smoke: bool, only: &[Part]) -> anyhow::Result<()> {
    // SAFETY: set before any thread starts; the daemon harness reads it.
    unsafe { std::env::set_var("XLB_BIN", xlb) };
    let started = std::time::Instant::now();
    let opts = Opts { smoke };
    let wanted = |p: Part| only.is_empty() || only.contains(&p);
    let mut report = report::Report::new(smoke, METHOD);
    let parts: [(Part, &str, PartFn); 6] = [
        (Part::Packet, "1. Cost per packet", packet::run),
        (Part::Throughput, "2a. Throughput in namespaces", throughput::run),
        (Part::Tcp, "2b. TCP end to end", tcp::run),
        (Part::Control, "3. Control plane", control::run),
        (Part::Maglev, "4. Maglev quality", quality::run),
        (Part::Health, "5. Health checks", health::run),
    ];
    let mut failed = Vec::new();
    for (part, title, run) in parts {
        if !wanted(part) {
            continue;
        }
        eprintln!("bench: {title}…");
        let t = std::time::Instant::now();
        match run(&opts) {
            Ok(section) => report.sections.push(section),
            Err(e) => {
                eprintln!("bench: {title} failed: {e:#}");
                let mut section = report::Section::new(title, "");
                section.skipped = Some(format!("FAILED: {e:#}"));
                report.sections.push(section);
                failed.push(title);
            }
        }
        eprintln!("bench: {title} took {:.1} s", t.elapsed().as_secs_f64());
    }
    report.seconds = started.elapsed().as_secs_f64();
    println!("{}", report.table());
    println!("\n{}", METHOD.trim_end());
    let dir = super::workspace().join("target").join("bench");
    let path = report.write_json(&dir)?;
    println!("Raw figures: {} (and latest.json); {:.0} s.", path.display(), report.seconds);
    if !failed.is_empty() {
        anyhow::bail!("benchmark parts failed: {}", failed.join(", "));
    }
    Ok(())
}

type PartFn = fn(&Opts) -> anyhow::Result<report::Section>;
