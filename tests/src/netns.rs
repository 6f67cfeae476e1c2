//! Network namespace guards.

use std::{fs::File, os::fd::AsRawFd as _, path::PathBuf};

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

    pub fn sysctl(&self, settings: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["-qw"];
        args.extend_from_slice(settings);
        self.exec("sysctl", &args).map(drop)
    }

    /// Runs `f` on a thread inside the namespace. Sockets it creates stay in
    /// the namespace wherever they are used later.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let file = File::open(self.path())
            .with_context(|| format!("open {}", self.path().display()))
            .expect("namespace exists");
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = cmd::ip(&format!("netns del {}", self.name)) {
            eprintln!("teardown: {e}");
        }
    }
}
