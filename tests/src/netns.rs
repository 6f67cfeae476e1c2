//! Network namespace guards.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    thread::JoinHandle,
};

use anyhow::Context as _;

use crate::cmd;

/// A named network namespace (`ip netns`), deleted on drop with all its
/// interfaces.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        cmd::ip(&format!("netns add {name}"))?;
        let ns = Netns { name: name.to_owned() };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &str) -> anyhow::Result<String> {
        cmd::ip(&format!("-n {} {args}", self.name))
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        cmd::run("ip", &all)
    }

    /// Index and MAC of an interface in the namespace.
    pub fn link(&self, interface: &str) -> anyhow::Result<(u32, [u8; 6])> {
        let json: serde_json::Value = serde_json::from_str(&self.ip(&format!("-j link show {interface}"))?)?;
        let ifindex = json[0]["ifindex"].as_u64().context("no ifindex")? as u32;
        let text = json[0]["address"].as_str().context("no MAC")?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = text.split(':').collect();
        anyhow::ensure!(parts.len() == 6, "not a MAC: {text}");
        for (m, p) in mac.iter_mut().zip(parts) {
            *m = u8::from_str_radix(p, 16)?;
        }
        Ok((ifindex, mac))
    }

    /// A namespace whose interface t0 (10.1.0.2/24, fd01::2/64, MTU 1500)
    /// forwards and routes 10.2.0.0/24 and fd02::/64 via a router with a
    /// permanent neighbour entry (MAC 02:00:00:00:fe:fe), so BPF FIB lookups
    /// run in it succeed; `extra` are further `ip` commands. Returns it with
    /// t0's index and MAC.
    pub fn fib(name: &str, extra: &[&str]) -> anyhow::Result<(Netns, u32, [u8; 6])> {
        let ns = Netns::new(name)?;
        ns.sysctl(&["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])?;
        let base = [
            "link add t0 mtu 1500 type veth peer name t1",
            "link set t0 up",
            "link set t1 up",
            "addr add 10.1.0.2/24 dev t0",
            "-6 addr add fd01::2/64 dev t0 nodad",
            "route add 10.2.0.0/24 via 10.1.0.254",
            "-6 route add fd02::/64 via fd01::fe",
            "neigh add 10.1.0.254 lladdr 02:00:00:00:fe:fe nud permanent dev t0",
            "-6 neigh add fd01::fe lladdr 02:00:00:00:fe:fe nud permanent dev t0",
        ];
        for cmd in base.iter().chain(extra) {
            ns.ip(cmd)?;
        }
        // The FIB helper answers only for interfaces that forward.
        ns.sysctl(&["net.ipv4.conf.t0.forwarding=1", "net.ipv6.conf.t0.forwarding=1"])?;
        let (ifindex, mac) = ns.link("t0")?;
        Ok((ns, ifindex, mac))
    }

    pub fn sysctl(&self, settings: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["-qw"];
        args.extend_from_slice(settings);
        self.exec("sysctl", &args).map(drop)
    }

    /// Runs `f` on a thread inside the namespace. Sockets it creates stay in
    /// the namespace wherever they are used later.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&path).expect("enter the namespace");
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }

    /// Starts a thread that lives inside the namespace.
    pub fn spawn<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> JoinHandle<R> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path).expect("enter the namespace");
            f()
        })
    }
}

/// Moves the calling thread into the network namespace bound at `path`
/// (e.g. /run/netns/NAME); other threads stay where they are.
pub fn enter(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: setns on a valid namespace fd affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!("setns {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = cmd::ip(&format!("netns del {}", self.name)) {
            eprintln!("teardown: {e}");
        }
    }
}
