//! `cargo xtask …`: build-and-run helpers. The eBPF build itself lives in
//! lb-user's build script; these tasks only drive cargo and the lab.

mod bench;
mod deb;
mod demo;
mod dist;
mod soak;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build xlb (release) and run it with ARGS, e.g. `cargo xtask run -- status`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build xlb and show it balancing: namespaces with a client, xlb and
    /// three backends; a few hundred requests; who answered; the counters.
    Demo,
    /// Run every test: unit, BPF_PROG_TEST_RUN and namespace end-to-end
    /// tests, then build the Debian package and check it installed into a
    /// scratch root, then fuzz the packet parser and, briefly, the config
    /// parser and the discovery decoders (needs root).
    Test {
        /// Seconds of packet-parser fuzzing after the tests (each
        /// control-plane target gets at most 10); 0 skips fuzzing.
        #[arg(long, default_value_t = 60)]
        fuzz_seconds: u32,
        /// Minutes of `cargo xtask soak` after the tests; 0 skips it.
        #[arg(long, default_value_t = 1.0, value_parser = minutes)]
        soak_minutes: f64,
        /// Extra arguments for `cargo test`, e.g. `--test dr_e2e` or `-- maglev`
        /// (fuzzing is skipped when they are given).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (target/deb/xlb_<version>_<arch>.deb): the
    /// release binary, the systemd unit, an example config, man pages and
    /// completions.
    Deb,
    /// Write xlb's man pages and shell completions, generated from its
    /// command line (so they match `--help`), under target/dist/.
    Dist,
    /// Run xlb under churn (needs root): traffic through DR, TUN and
    /// etcd-fed VIPs while backends come, go, drain and change weight every
    /// 100 ms through the config file, the admin API and etcd, with SIGHUP
    /// every second. Fails on a broken long flow, a failed map write,
    /// leaked backend ids, or growing memory or descriptors.
    Soak {
        /// How long to churn.
        #[arg(long, default_value_t = 10.0, value_parser = minutes)]
        minutes: f64,
    },
    /// Measure xlb: cost per packet, throughput in namespaces, control
    /// plane, Maglev quality (needs root). Prints a table and writes
    /// target/bench/latest.json; reports targets, never fails on them.
    Bench {
        /// Run every part briefly (seconds), as CI does.
        #[arg(long)]
        smoke: bool,
        /// Run only these parts (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<bench::Part>,
    },
}

/// A number of minutes: finite and not negative.
fn minutes(s: &str) -> Result<f64, String> {
    let m: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of minutes"))?;
    if m.is_finite() && m >= 0.0 { Ok(m) } else { Err(format!("{s}: minutes must be 0 or more")) }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Run { args } => {
            let xlb = build_xlb("release")?;
            let status = Command::new(&xlb).args(&args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Deb => {
            let xlb = build_xlb("release")?;
            println!("{}", deb::build(&xlb, &workspace().join("target").join("deb"))?.display());
            Ok(())
        }
        Task::Dist => {
            let dir = workspace().join("target").join("dist");
            for file in dist::write(&dir)? {
                println!("{}", file.display());
            }
            Ok(())
        }
        Task::Demo => {
            prepare_lab("the demo")?;
            let xlb = build_xlb("release")?;
            demo::run(&xlb)
        }
        Task::Test { fuzz_seconds, soak_minutes, args } => {
            prepare_lab("the tests")?;
            // The end-to-end tests run the xlb binary next to their own.
            build_xlb("dev")?;
            cargo(&["test", "--locked"], &args)?;
            if args.is_empty() {
                // The package as operators get it, installed into a scratch root.
                let xlb = build_xlb("release")?;
                let deb = deb::build(&xlb, &workspace().join("target").join("deb"))?;
                let scratch = std::env::temp_dir().join(format!("xlb-deb-{}", std::process::id()));
                let checked = deb::check_installed(&deb, &scratch);
                let _ = std::fs::remove_dir_all(&scratch);
                checked?;
                if soak_minutes > 0.0 {
                    soak::run(&xlb, soak_minutes)?;
                }
            }
            if args.is_empty() && fuzz_seconds > 0 {
                fuzz("parse", fuzz_seconds)?;
                for target in ["config", "consul", "etcd_value"] {
                    fuzz(target, fuzz_seconds.min(CONTROL_FUZZ_SECONDS))?;
                }
            }
            Ok(())
        }
        Task::Soak { minutes } => {
            prepare_lab("the soak")?;
            let xlb = build_xlb("release")?;
            soak::run(&xlb, minutes)
        }
        Task::Bench { smoke, only } => {
            prepare_lab("the benchmark")?;
            let xlb = build_xlb("release")?;
            bench::run(&xlb, smoke, &only)
        }
    }
}

/// Seconds for each control-plane fuzz target in `cargo xtask test`.
const CONTROL_FUZZ_SECONDS: u32 = 10;

/// Runs fuzz target `target` from its corpus (`fuzz/corpus/<target>`).
/// New inputs go to a scratch directory, so the checked-in corpus stays
/// as it is.
fn fuzz(target: &str, seconds: u32) -> anyhow::Result<()> {
    let nightly_cargo = |args: &[&str]| {
        let mut c = Command::new("cargo");
        c.current_dir(workspace()).arg("+nightly").args(args);
        // Cargo's own variables would point the nightly build at this
        // stable toolchain.
        c.env_remove("CARGO").env_remove("RUSTC").env_remove("RUSTUP_TOOLCHAIN");
        c
    };
    let installed = nightly_cargo(&["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !installed {
        bail!("cargo-fuzz is not installed: run scripts/setup.sh (or --fuzz-seconds 0 to skip fuzzing)");
    }
    let artifacts = workspace().join("fuzz/artifacts").join(target);
    let crashes = || std::fs::read_dir(&artifacts).map_or(0, |d| d.count());
    let crashes_before = crashes();
    let scratch = std::env::temp_dir().join(format!("xlb-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let status = nightly_cargo(&["fuzz", "run", target])
        .arg(&scratch)
        .arg(workspace().join("fuzz/corpus").join(target))
        .args(["--", &format!("-max_total_time={seconds}")])
        .status()
        .context("cannot run `cargo +nightly fuzz`");
    let _ = std::fs::remove_dir_all(&scratch);
    if !status?.success() {
        if crashes() > crashes_before {
            bail!("fuzzing {target} found an input that crashes it: see {}", artifacts.display());
        }
        bail!("`cargo fuzz run {target}` failed to build or run (see its output above)");
    }
    Ok(())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_owned()
}

fn cargo(args: &[&str], extra: &[String]) -> anyhow::Result<()> {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // `cargo run` gives xtask its package's variables (CARGO_PKG_NAME,
    // CARGO_MANIFEST_DIR, ...). Build scripts that watch them (ring's does)
    // would see them change between this build and the next `cargo xtask`,
    // and both would rebuild everything above them.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE"].contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    let status =
        command.current_dir(workspace()).args(args).args(extra).status().context("cannot run cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the `xlb` binary with `profile` and returns its path.
fn build_xlb(profile: &str) -> anyhow::Result<PathBuf> {
    cargo(&["build", "--locked", "--package", "lb-user", "--profile", profile], &[])?;
    let dir = if profile == "dev" { "debug" } else { profile };
    Ok(workspace().join("target").join(dir).join("xlb"))
}

/// Checks for root, then removes what a killed earlier run left behind
/// (namespaces, pins, scratch files), so it cannot collect over time.
fn prepare_lab(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} need root (BPF programs, network namespaces): run as root");
    }
    for leftover in xlb_tests::sweep::stale() {
        eprintln!("removed stale {leftover} (its run was killed)");
    }
    Ok(())
}
