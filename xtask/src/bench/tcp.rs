//! Part 2b: a real TCP load from the lab's client through `xlb run` (DR) to
//! a backend, beside the same load sent to the backend's own address.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use xlb_tests::{
    cmd::which,
    daemon::Daemon,
    lab::{Lab, VIP4},
    netns::Netns,
    servers,
};

use super::{
    Opts,
    kit::Group,
    report::{Row, Section, median},
};

const IPERF_PORT: u16 = 5201;
const NAME_PORT: u16 = 80;

pub fn run(opts: &Opts) -> anyhow::Result<Section> {
    let (runs, iperf_args, conns): (usize, &[&str], usize) =
        if opts.smoke { (5, &["-n", "32M"], 40) } else { (5, &["-t", "2"], 400) };
    let mut section = Section::new(
        "2b. TCP end to end (DR lab: client → xlb → backend; replies direct)",
        &format!(
            "`xlb run` on the lab's load balancer (native XDP on its veth), one backend. {runs} runs each, \
             alternating via xlb and direct: iperf3 ({}; one stream, client → backend data) and {conns} \
             sequential short connections (connect, one line each way, close). Direct = the same load to \
             the backend's own address over the same bridge.",
            iperf_args.join(" ")
        ),
    );
    if which("iperf3").is_none() {
        section.skipped = Some("iperf3 not found (scripts/setup.sh installs it)".into());
        return Ok(section);
    }
    let lab = Lab::new(1)?;
    let backend = &lab.backends[0];
    let _lines = LineServer::start(&backend.ns, &backend.name)?;
    let mut iperf = Command::new("ip");
    iperf.args(["netns", "exec", &backend.ns.name, "iperf3", "-s", "-p", &IPERF_PORT.to_string()]);
    let _server = Group::spawn(iperf, "iperf3 server", None)?;
    let vips = format!(
        "[[vip]]\nname = \"names\"\naddress = \"{VIP4}\"\nport = {NAME_PORT}\nprotocol = \"tcp\"\n{list}\n\n\
         [[vip]]\nname = \"iperf\"\naddress = \"{VIP4}\"\nport = {IPERF_PORT}\nprotocol = \"tcp\"\n{list}\n",
        list = lab.backend_list(false)
    );
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &lab.config(&vips))?;
    wait_listening(&lab, backend.v4.into())?;

    let targets = [("direct", IpAddr::from(backend.v4)), ("xlb", IpAddr::from(VIP4))];
    let (mut gbits, mut rates) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut retransmits = [0u64, 0];
    for _ in 0..runs {
        for (i, (_, addr)) in targets.iter().enumerate() {
            let (bps, retr) = iperf_once(&lab, *addr, iperf_args)?;
            gbits[i].push(bps / 1e9);
            retransmits[i] += retr;
            let target = SocketAddr::new(*addr, NAME_PORT);
            let start = Instant::now();
            let counts =
                lab.client.run(|| servers::tcp_spread(target, conns)).context("short connections")?;
            rates[i].push(conns as f64 / start.elapsed().as_secs_f64());
            if counts.get(&backend.name) != Some(&conns) {
                bail!("short connections to {target} answered by {counts:?}");
            }
        }
    }
    // The VIP counters show the load went through xlb.
    let status = daemon.status()?;
    let vip_packets: u64 =
        status["vips"].as_array().map(|v| v.iter().filter_map(|v| v["packets"].as_u64()).sum()).unwrap_or(0);
    if vip_packets == 0 {
        bail!("xlb counted no packets for its VIPs: the load did not go through it");
    }
    drop(daemon);

    let note = |i: usize| format!("{} retransmitted segments over the runs", retransmits[i]);
    let d = median(&gbits[0]);
    section.push(
        Row::new("iperf3, direct to the backend", "Gbit/s", gbits[0].clone()).vs("direct", d).note(note(0)),
    );
    section.push(
        Row::new("iperf3, through xlb", "Gbit/s", gbits[1].clone())
            .vs("direct", d)
            .note(note(1))
            .extra("xlb_vip_packets", vip_packets),
    );
    let d = median(&rates[0]);
    section.push(
        Row::new("short connections, direct to the backend", "conn/s", rates[0].clone()).vs("direct", d),
    );
    section.push(Row::new("short connections, through xlb", "conn/s", rates[1].clone()).vs("direct", d));
    Ok(section)
}

/// One iperf3 run from the client to `addr`: (bits/s received, retransmits).
fn iperf_once(lab: &Lab, addr: IpAddr, args: &[&str]) -> anyhow::Result<(f64, u64)> {
    let port = IPERF_PORT.to_string();
    let addr = addr.to_string();
    let mut all = vec!["netns", "exec", &lab.client.name, "iperf3", "-c", &addr, "-p", &port, "-J"];
    all.extend_from_slice(args);
    let out = Command::new("ip").args(&all).output().context("cannot run iperf3")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 said: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = json["error"].as_str() {
        bail!("iperf3 to {addr}: {e}");
    }
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3: no result")?;
    let retr = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps, retr))
}

/// Waits until the iperf3 server accepts connections.
fn wait_listening(lab: &Lab, addr: IpAddr) -> anyhow::Result<()> {
    let target = SocketAddr::new(addr, IPERF_PORT);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ok = lab
            .client
            .run(|| std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok());
        if ok {
            // iperf3 expects a cookie first; give the dropped probe a moment.
            std::thread::sleep(Duration::from_millis(100));
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("iperf3 server on {target} not listening");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP server answering one line per connection with its name, then
/// closing; blocking accept, one connection at a time (the client is
/// sequential), so the connection rate measures the network path.
struct LineServer<'a> {
    stop: Arc<AtomicBool>,
    ns: &'a Netns,
    thread: Option<JoinHandle<()>>,
}

impl<'a> LineServer<'a> {
    fn start(ns: &'a Netns, name: &str) -> anyhow::Result<LineServer<'a>> {
        let listener = ns.run(|| TcpListener::bind(("::", NAME_PORT))).context("bind the line server")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let reply = format!("{name}\n");
        let thread = std::thread::spawn(move || {
            while let Ok((conn, _)) = listener.accept() {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_ok() {
                    let _ = (&conn).write_all(reply.as_bytes());
                }
            }
        });
        Ok(LineServer { stop, ns, thread: Some(thread) })
    }
}

impl Drop for LineServer<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept with one last connection from inside its namespace.
        let woke = self.ns.run(|| TcpStream::connect((Ipv4Addr::LOCALHOST, NAME_PORT)).is_ok());
        if woke && let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
