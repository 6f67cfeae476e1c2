//! Running commands, failing with their stderr.

use std::process::Command;

use anyhow::{Context as _, bail};

/// The path of `program` on $PATH (or /usr/sbin, where Debian puts trafgen).
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Runs `program args…`, returning stdout; fails with stderr on a non-zero exit.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS…` (split on whitespace).
pub fn ip(args: &str) -> anyhow::Result<String> {
    run("ip", &args.split_whitespace().collect::<Vec<_>>())
}

/// The `xlb` binary built next to the test executable
/// (target/<profile>/xlb), or $XLB_BIN.
pub fn xlb_bin() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("XLB_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/xlb
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("xlb"))
        .expect("test executable lives in target/<profile>/deps");
    assert!(bin.exists(), "{} not found: build it first (`cargo xtask test` does)", bin.display());
    bin
}
