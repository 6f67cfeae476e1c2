//! BIRD 2 (Debian's bird2) as a child process in a namespace: a node's
//! speaker or the router's. Killed and its files removed on drop.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cmd, netns::Netns, unique_id};

pub struct Bird {
    child: Option<Child>,
    dir: PathBuf,
    /// Its control socket (for birdc, and xlb's `announce.bird_socket`).
    pub socket: PathBuf,
}

impl Bird {
    /// Starts `bird` in `ns` with `config`, in the foreground (so it is our
    /// child), with its control socket in a scratch directory.
    pub fn start(ns: &Netns, config: &str) -> anyhow::Result<Bird> {
        let dir = std::env::temp_dir().join(format!("xlb-bird-{:06x}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        let (conf, socket, log) = (dir.join("bird.conf"), dir.join("bird.ctl"), dir.join("bird.log"));
        std::fs::write(&conf, config)?;
        let log = std::fs::File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(["bird", "-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start bird (Debian package bird2; scripts/setup.sh installs it)")?;
        let mut bird = Bird { child: Some(child), dir, socket };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !bird.socket.exists() {
            if let Some(status) = bird.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("bird exited ({status}): {}", bird.log());
            }
            if Instant::now() > deadline {
                bail!("bird opened no control socket within 5 s: {}", bird.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(bird)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default()
    }

    /// `birdc -s SOCKET ARGS…`
    pub fn birdc(&self, args: &str) -> anyhow::Result<String> {
        let socket = self.socket.to_str().context("socket path")?;
        let mut all = vec!["-s", socket];
        all.extend(args.split_whitespace());
        cmd::run("birdc", &all)
    }

    /// Waits until every BGP protocol is Established.
    pub fn wait_established(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let shown = self.birdc("show protocols")?;
            let bgp: Vec<&str> =
                shown.lines().filter(|l| l.split_whitespace().nth(1) == Some("BGP")).collect();
            if !bgp.is_empty() && bgp.iter().all(|l| l.contains("Established")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("BGP sessions not established within {timeout:?}:\n{shown}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- bird log ({}) ---\n{}", self.dir.display(), self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node's BIRD: learns the VIP routes xlb keeps in `table` and exports
/// them to the router over BGP (IPv4 and IPv6 sessions), with BFD.
pub fn node_config(me: (Ipv4Addr, Ipv6Addr), router: (Ipv4Addr, Ipv6Addr), table: u32) -> String {
    let ((v4, v6), (r4, r6)) = (me, router);
    format!(
        "router id {v4};\n\
         protocol device {{ scan time 1; }}\n\
         protocol kernel kxlb4 {{ kernel table {table}; learn; scan time 1; ipv4 {{ import all; export none; }}; }}\n\
         protocol kernel kxlb6 {{ kernel table {table}; learn; scan time 1; ipv6 {{ import all; export none; }}; }}\n\
         {BFD}\n\
         protocol bgp up4 {{ local {v4} as 65001; neighbor {r4} as 65000; {TIMERS} ipv4 {{ import none; export all; next hop self; }}; }}\n\
         protocol bgp up6 {{ local {v6} as 65001; neighbor {r6} as 65000; {TIMERS} ipv6 {{ import none; export all; next hop self; }}; }}\n"
    )
}

/// The router's BIRD: a session to each node (IPv4 and IPv6), the routes
/// it learns merged into ECMP routes in the kernel.
pub fn router_config(me: (Ipv4Addr, Ipv6Addr), nodes: &[(Ipv4Addr, Ipv6Addr)]) -> String {
    let (v4, v6) = me;
    let mut c = format!(
        "router id {v4};\n\
         protocol device {{ scan time 1; }}\n\
         protocol kernel {{ merge paths on; ipv4 {{ import none; export all; }}; }}\n\
         protocol kernel {{ merge paths on; ipv6 {{ import none; export all; }}; }}\n\
         {BFD}\n"
    );
    for (i, (n4, n6)) in nodes.iter().enumerate() {
        c.push_str(&format!(
            "protocol bgp n{i}v4 {{ local {v4} as 65000; neighbor {n4} as 65001; {TIMERS} ipv4 {{ import all; export none; }}; }}\n\
             protocol bgp n{i}v6 {{ local {v6} as 65000; neighbor {n6} as 65001; {TIMERS} ipv6 {{ import all; export none; }}; }}\n"
        ));
    }
    c
}

/// BFD at 100 ms × 3: a dead peer is noticed in about 300 ms.
const BFD: &str =
    "protocol bfd { interface \"*\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }";
/// Short BGP timers (BFD does the fast detection) and quick (re)connects.
const TIMERS: &str = "hold time 3; keepalive time 1; connect delay time 1; connect retry time 1; bfd on;";
