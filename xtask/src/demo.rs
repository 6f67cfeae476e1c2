//! `cargo xtask demo`: xlb balancing real TCP connections between network
//! namespaces, start to finish in a few seconds.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    time::Instant,
};

use xlb_tests::{
    daemon::Daemon,
    lab::{LB4, Lab, VIP4, VIP6},
    servers,
};

const REQUESTS: usize = 300;

pub fn run(xlb: &Path) -> anyhow::Result<()> {
    // SAFETY: set before any thread starts; the lab's helpers read it.
    unsafe { std::env::set_var("XLB_BIN", xlb) };
    let started = Instant::now();
    println!("\nxlb demo: a client, a load balancer and three backends on one L2 segment,");
    println!("each in its own network namespace. The backends hold the VIP on their");
    println!("loopback and answer the client directly (DR mode).\n");

    let lab = Lab::new(3)?;
    let _servers = servers::start(&lab.backends, 80, 53);
    println!("  client  10.0.0.1  fd00::1   routes the VIPs via the load balancer");
    println!("  xlb     {LB4}  fd00::2   XDP program on {}", lab.lb_if);
    for b in &lab.backends {
        println!("  {}     {} {}  answers every request with its name", b.name, b.v4, b.v6);
    }

    let config = lab.config(&format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\n{}\n\n\
         [[vip]]\nname = \"web6\"\naddress = \"{VIP6}\"\nport = 80\nprotocol = \"tcp\"\n{}\n",
        lab.backend_list(false),
        lab.backend_list(true)
    ));
    println!("\nxlb config:\n\n{}", indent(&config));
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config)?;

    for addr in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
        let target = SocketAddr::new(addr, 80);
        println!("{REQUESTS} TCP connections from the client to {target}:");
        let counts = lab.client.run(|| servers::tcp_spread(target, REQUESTS))?;
        for (name, n) in &counts {
            let bar = "█".repeat(n * 40 / REQUESTS);
            println!("  {name}  {n:>4}  {bar}");
        }
        println!();
    }

    println!("`xlb status` (read from the pinned maps):\n");
    let status = Command::new(xlb).args(["status", "--interface", &daemon.interface]).output()?;
    println!("{}", indent(&String::from_utf8_lossy(&status.stdout)));
    drop(daemon);
    drop(lab);
    println!("Done in {:.1} s; namespaces and pinned maps removed.", started.elapsed().as_secs_f64());
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
