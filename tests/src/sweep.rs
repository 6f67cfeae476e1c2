//! Removes what a killed test or bench run left behind. Guards tear down on
//! drop, but SIGKILL (or a machine cut off mid-run) skips every drop, and
//! CI reuses this machine. Names carry the creator's `unique_id`, whose top
//! bits are its pid: a resource is swept only when no live process has
//! that pid, so a run in progress is never touched.

use std::{collections::HashSet, fs, path::Path};

/// Sweeps namespaces, pins and scratch files of dead runs; returns what it
/// removed, for the caller to report.
pub fn stale() -> Vec<String> {
    let live = live_pid_tags();
    let dead = |id: u32| !live.contains(&(id >> 8));
    let mut removed = Vec::new();

    // BIRD first: it would outlive its namespace.
    for (pid, id) in birds() {
        if dead(id) {
            // SAFETY: kill on a pid read from /proc; at worst it is gone.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            removed.push(format!("bird process {pid}"));
        }
    }
    for name in entries(Path::new("/run/netns")) {
        if owner(&name, &["xt", "xb", "xf"]).is_some_and(dead)
            && crate::cmd::ip(&format!("netns del {name}")).is_ok()
        {
            removed.push(format!("namespace {name}"));
        }
    }
    for (dir, prefixes) in [("/sys/fs/bpf/xlb", &["xl", "xn"][..]), ("/sys/fs/bpf/xlb-decap", &["xt"][..])] {
        for name in entries(Path::new(dir)) {
            let path = Path::new(dir).join(&name);
            if owner(&name, prefixes).is_some_and(dead) && fs::remove_dir_all(&path).is_ok() {
                removed.push(format!("pins {}", path.display()));
            }
        }
    }
    // State files of killed daemons: /run/xlb/<interface>.json and friends.
    for name in entries(Path::new("/run/xlb")) {
        let interface = name.split('.').next().unwrap_or_default();
        let path = Path::new("/run/xlb").join(&name);
        if owner(interface, &["xl", "xn", "xr"]).is_some_and(dead) && fs::remove_file(&path).is_ok() {
            removed.push(format!("state file {}", path.display()));
        }
    }
    let tmp = std::env::temp_dir();
    for name in entries(&tmp) {
        let id = ["xlb-test-", "xlb-capture-", "xlb-bench-", "xlb-bird-"]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .and_then(|rest| trailing_id(rest.trim_end_matches(".pcap")));
        if id.is_some_and(dead) {
            let path = tmp.join(&name);
            let gone = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            if gone.is_ok() {
                removed.push(format!("scratch {}", path.display()));
            }
        }
    }
    removed
}

/// BIRD processes the test kit started: (pid, the id in their socket's
/// scratch directory, `…/xlb-bird-<id>/bird.ctl`).
fn birds() -> Vec<(u32, u32)> {
    entries(Path::new("/proc"))
        .iter()
        .filter_map(|n| n.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline);
            let dir = text.split('\0').find_map(|arg| arg.strip_suffix("/bird.ctl"))?;
            let id = dir.rsplit('/').next()?.strip_prefix("xlb-bird-")?;
            Some((pid, parse_id(id)?))
        })
        .collect()
}

/// `pid & 0xffff` of every live process: the tag `unique_id` embeds.
fn live_pid_tags() -> HashSet<u32> {
    entries(Path::new("/proc")).iter().filter_map(|n| n.parse::<u32>().ok()).map(|pid| pid & 0xffff).collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect()
}

/// The id in `<prefix><6 hex>[-…]`, for one of `prefixes`.
fn owner(name: &str, prefixes: &[&str]) -> Option<u32> {
    let rest = prefixes.iter().find_map(|p| name.strip_prefix(p))?;
    let hex = rest.get(..6)?;
    if rest.len() > 6 && !rest[6..].starts_with('-') {
        return None;
    }
    parse_id(hex)
}

/// The id at the end of `…-<6 hex>` or a bare `<6 hex>`.
fn trailing_id(s: &str) -> Option<u32> {
    parse_id(s.rsplit('-').next()?)
}

fn parse_id(hex: &str) -> Option<u32> {
    (hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(hex, 16).ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_only_from_our_names() {
        assert_eq!(owner("xt085901-gen", &["xt", "xb"]), Some(0x085901));
        assert_eq!(owner("xb0a0b0c", &["xt", "xb"]), Some(0x0a0b0c));
        assert_eq!(owner("xn0a0b0c-1", &["xl", "xn"]), Some(0x0a0b0c), "a fleet node's pins");
        assert_eq!(owner("xtra-netns", &["xt"]), None);
        assert_eq!(owner("xt0859012", &["xt"]), None);
        assert_eq!(owner("eth0", &["xl"]), None);
        assert_eq!(trailing_id("tput-085902"), Some(0x085902));
        assert_eq!(trailing_id("085902"), Some(0x085902));
        assert_eq!(trailing_id("notes"), None);
    }

    #[test]
    fn the_running_process_is_live() {
        let id = crate::unique_id();
        assert!(live_pid_tags().contains(&(id >> 8)));
    }

    #[test]
    fn scratch_of_a_dead_run_is_removed_and_ours_kept() {
        let live = live_pid_tags();
        let dead_tag = (1..0xffff).find(|t| !live.contains(t)).expect("some pid is free");
        let tmp = std::env::temp_dir();
        let dead = tmp.join(format!("xlb-test-{:06x}", dead_tag << 8));
        let ours = tmp.join(format!("xlb-test-{:06x}", crate::unique_id()));
        for dir in [&dead, &ours] {
            fs::create_dir_all(dir).unwrap();
        }
        let removed = stale();
        let kept = ours.exists();
        let _ = fs::remove_dir_all(&ours);
        assert!(!dead.exists() && removed.iter().any(|r| r.ends_with(&*dead.to_string_lossy())));
        assert!(kept, "a live run's scratch directory was swept");
    }
}
