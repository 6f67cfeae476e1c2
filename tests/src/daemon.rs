//! `xlb run` as a child process inside the lab's load-balancer namespace.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cmd, netns::Netns, unique_id};

/// Runs `xlb run --config CONFIG` in `ns` to its end, for runs expected to
/// be refused: (exit code, stderr).
pub fn run_refused(ns: &Netns, config: &Path) -> anyhow::Result<(Option<i32>, String)> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(cmd::xlb_bin())
        .args(["run", "--config"])
        .arg(config)
        .output()
        .context("cannot run xlb")?;
    Ok((out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// The backend id of `addr` if it has entries in the first VIP's live
/// table, from a status as `Daemon::status` returns it.
pub fn table_id(status: &serde_json::Value, addr: std::net::IpAddr) -> Option<u16> {
    status["vips"][0]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == addr.to_string() && b["slots"].as_u64().unwrap_or(0) > 0)
        .map(|b| b["id"].as_u64().unwrap_or(0) as u16)
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    pub interface: String,
    /// The namespace it runs in (/run/netns/NAME).
    netns: PathBuf,
    /// Extra `xlb run` arguments, kept for restarts.
    args: Vec<String>,
    /// Extra environment variables, kept for restarts.
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Writes `config` to a scratch file and starts `xlb run` in `ns`,
    /// waiting until it reports ready.
    pub fn start(ns: &Netns, interface: &str, config: &str) -> anyhow::Result<Daemon> {
        Self::start_with(ns, interface, config, &[])
    }

    /// As `start`, with extra `xlb run` arguments.
    pub fn start_with(ns: &Netns, interface: &str, config: &str, args: &[&str]) -> anyhow::Result<Daemon> {
        Self::start_env(ns, interface, config, args, &[])
    }

    /// As `start_with`, with extra environment variables.
    pub fn start_env(
        ns: &Netns,
        interface: &str,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Daemon> {
        let dir = std::env::temp_dir().join(format!("xlb-test-{:06x}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        let mut d = Daemon {
            child: None,
            config: dir.join("xlb.toml"),
            log: dir.join("xlb.log"),
            dir,
            interface: interface.to_owned(),
            netns: ns.path(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        std::fs::write(&d.config, config)?;
        d.spawn(ns)?;
        d.wait_for_log("xlb ready", Duration::from_secs(20))?;
        Ok(d)
    }

    fn spawn(&mut self, ns: &Netns) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg(cmd::xlb_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start xlb")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `needle` to appear in the log after what is there already
    /// (or at all, for a fresh daemon).
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("xlb exited ({status}) before {needle:?}:\n{}", self.log());
            }
            if Instant::now() >= deadline {
                bail!("no {needle:?} from xlb within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Polls `done` for up to five seconds (changes apply within a
    /// second); fails with the log.
    pub fn eventually(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "{what}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `xlb ARGS…` in the daemon's namespace (with the host's bpffs,
    /// unlike `ip netns exec`).
    pub fn xlb(&self, args: &[&str]) -> anyhow::Result<String> {
        let net = format!("--net={}", self.netns.display());
        let bin = cmd::xlb_bin();
        let mut all = vec![net.as_str(), bin.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        cmd::run("nsenter", &all)
    }

    /// `xlb status --json` for this daemon's interface.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let bin = cmd::xlb_bin();
        let out = cmd::run(
            bin.to_str().expect("utf-8 path"),
            &["status", "--json", "--interface", &self.interface],
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    /// The data plane's global counters as they are now, read from the
    /// pinned maps (the admin API reuses its counters for up to a second).
    pub fn globals(&self) -> anyhow::Result<lb_common::GlobalStats> {
        use xlb::dataplane::Counters as _;
        let status = self.status()?;
        let pin_dir = status["pin_dir"].as_str().context("status names no pin_dir")?;
        Ok(xlb::dataplane::KernelCounters::open(Path::new(pin_dir))?.global()?)
    }

    /// Replaces the config file (the daemon picks it up by itself).
    pub fn rewrite_config(&self, config: &str) -> anyhow::Result<()> {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, config)?;
        std::fs::rename(tmp, &self.config)?;
        Ok(())
    }

    /// Replaces the config and sends SIGHUP; returns once the daemon says
    /// it applied it.
    pub fn apply_config(&mut self, config: &str) -> anyhow::Result<()> {
        let applied = self.log().matches("config applied").count();
        let rejected = self.log().matches("config rejected").count();
        self.rewrite_config(config)?;
        let pid = self.child.as_ref().context("daemon not running")?.id();
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches("config applied").count() == applied {
            if self.log().matches("config rejected").count() > rejected {
                bail!("config rejected:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("config not applied within 10 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Sends SIGHUP.
    pub fn hangup(&self) -> anyhow::Result<()> {
        let pid = self.child.as_ref().context("daemon not running")?.id();
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        Ok(())
    }

    /// Waits until `needle` appears `count` times in the log.
    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.log().matches(needle).count() < count {
            if Instant::now() > deadline {
                bail!("{needle:?} not seen {count} times within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGTERM, then wait; the program stays attached.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                    bail!("xlb ignored SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts it again in `ns` with the current config (stopping it first
    /// with SIGTERM if it runs).
    pub fn restart(&mut self, ns: &Netns) -> anyhow::Result<()> {
        self.stop()?;
        let mark = self.log().matches("xlb ready").count();
        self.spawn(ns)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches("xlb ready").count() == mark {
            if Instant::now() > deadline {
                bail!("restarted xlb not ready:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- xlb log ---\n{}--- end of xlb log ---", self.log());
        }
        if let Err(e) = self.xlb(&["detach", "--interface", &self.interface]) {
            eprintln!("teardown: {e}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
