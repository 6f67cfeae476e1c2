//! Three xlb nodes behind a router that learns the VIPs over BGP from each
//! node's BIRD and spreads flows by ECMP: flows spread, every node picks the
//! same backend for a flow, and a node's death or drain breaks no flow.
//! Needs root and BIRD (Debian's bird2).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use xlb_tests::{
    cmd,
    fleet::{Fleet, TABLE, TUN_VIP4, TUN_VIP6},
    lab::{VIP4, VIP6},
    servers::{self, tcp_spread},
    traffic::{Arrivals, Conversation},
};

/// The VIPs of a test besides web (TCP, IPv4) and web6 (TCP, IPv6).
#[derive(Clone, Copy, Default)]
struct Vips {
    /// dns: UDP on web's address.
    dns: bool,
    /// tun and tun6: TCP to the TUN backends.
    tun: bool,
    /// web without backends.
    web_empty: bool,
}

/// VIP tables for node `i`: the same VIPs and backends on every node, but
/// listed in another order on each, so nothing node-local decides a table.
fn vips(fleet: &Fleet, i: usize, which: Vips) -> String {
    let order = [[0, 1, 2], [2, 1, 0], [1, 2, 0]][i % 3];
    let vip = |name: &str, addr: IpAddr, port: u16, protocol: &str| {
        let backends = match name {
            "web" if which.web_empty => "backends = []".to_owned(),
            "tun" | "tun6" => {
                format!("forward = \"tun\"\n{}", fleet.tun_backend_list(addr.is_ipv6(), &order))
            }
            _ => fleet.backend_list(addr.is_ipv6(), &order),
        };
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{addr}\"\nport = {port}\nprotocol = \"{protocol}\"\n{backends}\n"
        )
    };
    let mut all = vec![vip("web", VIP4.into(), 80, "tcp"), vip("web6", VIP6.into(), 80, "tcp")];
    if which.dns {
        all.push(vip("dns", VIP4.into(), 53, "udp"));
    }
    if which.tun {
        all.push(vip("tun", TUN_VIP4.into(), 80, "tcp"));
        all.push(vip("tun6", TUN_VIP6.into(), 80, "tcp"));
    }
    if i % 2 == 1 {
        all.reverse();
    }
    all.concat()
}

/// Starts xlb on every node and waits until the router has a path to each.
fn start(fleet: &mut Fleet, withdraw_wait: u64, which: Vips) {
    for i in 0..fleet.nodes.len() {
        let config = fleet.config(i, withdraw_wait, &vips(fleet, i, which));
        fleet.start_xlb(i, &config).unwrap();
    }
    fleet.wait_sessions().unwrap();
    let n = fleet.nodes.len();
    let tun = [IpAddr::from(TUN_VIP4), IpAddr::from(TUN_VIP6)];
    for vip in
        [IpAddr::from(VIP4), IpAddr::from(VIP6)].into_iter().chain(tun.into_iter().filter(|_| which.tun))
    {
        let took = fleet.wait_paths(vip, n, Duration::from_secs(15)).unwrap();
        eprintln!("router: {n} paths to {vip} after {took:?}");
    }
}

/// Name servers on the TUN backends.
fn tun_servers(fleet: &Fleet) -> servers::NameServers {
    let hosts: Vec<_> = fleet.tun_backends.iter().map(|b| (&b.ns, b.name.as_str())).collect();
    servers::start_in(&hosts, 80, 53)
}

fn forwarded(fleet: &Fleet, vip: &str) -> Vec<u64> {
    fleet.nodes.iter().map(|n| n.forwarded(vip).unwrap()).collect()
}

#[test]
fn connections_spread_over_every_node_and_every_node_picks_the_same_backend() {
    let mut fleet = Fleet::new(3, 3, 2).unwrap();
    let _servers = servers::start(&fleet.backends, 80, 53);
    let _tun_servers = tun_servers(&fleet);
    start(&mut fleet, 1, Vips { dns: true, tun: true, ..Vips::default() });
    for (vip, name, n, backends) in [
        (IpAddr::from(VIP4), "web", 300, 3),
        (IpAddr::from(VIP6), "web6", 300, 3),
        (IpAddr::from(TUN_VIP4), "tun", 150, 2),
        (IpAddr::from(TUN_VIP6), "tun6", 150, 2),
    ] {
        let before = forwarded(&fleet, name);
        let answers =
            fleet.client.run(|| tcp_spread(SocketAddr::new(vip, 80), n)).expect("every connection completes");
        let after = forwarded(&fleet, name);
        let per_node: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        eprintln!(
            "{vip} ({name}): {n} connections; packets per node {per_node:?}; answers per backend {answers:?}"
        );
        assert!(per_node.iter().all(|&p| p > 0), "every node carries flows: {per_node:?}");
        assert_eq!(answers.len(), backends, "every backend answers: {answers:?}");
    }

    // The same 5-tuples through each node in turn: the router sends the
    // client's DNS queries through one chosen node (a table of their own).
    fleet.router.ip("rule add from 10.9.0.2 ipproto udp dport 53 lookup 100 pref 100").unwrap();
    let mut chosen: Vec<BTreeMap<u16, String>> = Vec::new();
    for node in 0..fleet.nodes.len() {
        fleet.router.ip(&format!("route replace {VIP4}/32 via {} table 100", fleet.nodes[node].v4)).unwrap();
        let before = fleet.nodes[node].forwarded("dns").unwrap();
        let answers = fleet.client.run(|| {
            (30_000..30_100u16)
                .map(|port| {
                    let socket = UdpSocket::bind(("10.9.0.2", port)).unwrap();
                    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    socket.send_to(b"who", (VIP4, 53)).unwrap();
                    let mut buf = [0u8; 64];
                    let n = socket.recv(&mut buf).expect("an answer");
                    (port, String::from_utf8_lossy(&buf[..n]).trim().to_owned())
                })
                .collect::<BTreeMap<_, _>>()
        });
        let through = fleet.nodes[node].forwarded("dns").unwrap() - before;
        assert_eq!(through, 100, "node {node} carried the 100 queries");
        chosen.push(answers);
    }
    let spread: BTreeMap<&String, usize> = chosen[0].values().fold(BTreeMap::new(), |mut m, b| {
        *m.entry(b).or_default() += 1;
        m
    });
    eprintln!("100 UDP 5-tuples through each of 3 nodes: backends {spread:?}");
    assert!(spread.len() > 1, "the flows spread over backends");
    for (node, answers) in chosen.iter().enumerate().skip(1) {
        let differ = answers.iter().filter(|(port, b)| chosen[0][port] != **b).count();
        assert_eq!(differ, 0, "node {node} picked another backend for {differ} of 100 flows");
    }
}

#[test]
fn a_node_dies_under_load_and_no_long_flow_breaks() {
    let mut fleet = Fleet::new(3, 3, 2).unwrap();
    let _servers = servers::start(&fleet.backends, 80, 53);
    let _tun_servers = tun_servers(&fleet);
    start(&mut fleet, 1, Vips { tun: true, ..Vips::default() });
    let vip = SocketAddr::from((VIP4, 80));
    let stop = Arc::new(AtomicBool::new(false));
    let mut talks: Vec<Conversation> =
        (0..40).map(|_| Conversation::start(&fleet.client, vip, &stop)).collect();
    // And 20 through the TUN backends.
    let tun = SocketAddr::from((TUN_VIP4, 80));
    talks.extend((0..20).map(|_| Conversation::start(&fleet.client, tun, &stop)));
    let arrivals = Arrivals::start(&fleet.client, vip, Duration::from_millis(20), &stop);
    std::thread::sleep(Duration::from_secs(1));
    let carried = fleet.nodes[1].forwarded("web").unwrap();
    assert!(carried > 0, "the node that dies carries flows");

    let died = Instant::now();
    fleet.nodes[1].die().unwrap();
    let withdrawn = fleet.wait_paths(VIP4.into(), 2, Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let broken: Vec<String> = talks.into_iter().filter_map(|t| t.finish().err()).collect();
    let arrived = arrivals.finish();
    eprintln!(
        "node n2 died: router withdrew it after {withdrawn:?} (BFD 100 ms x 3); 40 DR + 20 TUN long flows, {} broke; \
         {} new connections, {} failed, {} slow; new connections were delayed or failing for {} ms; \
         {:?} since the death",
        broken.len(),
        arrived.ok,
        arrived.failed,
        arrived.troubles.len(),
        arrived.gap().as_millis(),
        died.elapsed()
    );
    assert!(broken.is_empty(), "long flows broke: {broken:#?}");
    assert!(arrived.gap() < Duration::from_secs(3), "{:?}", arrived.troubles);
    assert!(arrived.ok > 100, "the arrival stream kept going ({})", arrived.ok);
}

#[test]
fn a_drained_node_and_a_gracefully_stopped_one_lose_no_flow() {
    let mut fleet = Fleet::new(3, 3, 0).unwrap();
    let _servers = servers::start(&fleet.backends, 80, 53);
    start(&mut fleet, 2, Vips::default());
    let vip = SocketAddr::from((VIP4, 80));
    let stop = Arc::new(AtomicBool::new(false));
    let talks: Vec<Conversation> = (0..30).map(|_| Conversation::start(&fleet.client, vip, &stop)).collect();
    let arrivals = Arrivals::start(&fleet.client, vip, Duration::from_millis(20), &stop);
    std::thread::sleep(Duration::from_millis(500));

    // Maintenance: `xlb announce off` returns after withdraw_wait.
    let xlb = cmd::xlb_bin();
    let n1 = &fleet.nodes[0];
    let started = Instant::now();
    let out = n1.ns.exec(xlb.to_str().unwrap(), &["announce", "off", "-i", &n1.interface]).unwrap();
    let returned = started.elapsed();
    assert!(out.contains("withdrawn") && returned >= Duration::from_secs(2), "{out} after {returned:?}");
    assert_eq!(fleet.paths(VIP4.into()).unwrap().len(), 2, "n1 withdrawn");
    assert_eq!(fleet.paths(VIP6.into()).unwrap().len(), 2, "n1 withdrawn (IPv6)");
    let status = fleet.nodes[0].xlb().status().unwrap();
    assert_eq!(status["vips"][0]["announce"]["state"], "withdrawn", "{status}");

    // A graceful stop of n3: withdraw, wait, exit; the program forwards on.
    let started = Instant::now();
    fleet.nodes[2].xlb_mut().stop().unwrap();
    let stopped = started.elapsed();
    assert!(stopped >= Duration::from_secs(2), "the stop waited withdraw_wait: {stopped:?}");
    assert_eq!(fleet.paths(VIP4.into()).unwrap().len(), 1, "only n2 left");
    assert_eq!(fleet.paths(VIP6.into()).unwrap().len(), 1, "only n2 left (IPv6)");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let broken: Vec<String> = talks.into_iter().filter_map(|t| t.finish().err()).collect();
    let arrived = arrivals.finish();
    eprintln!(
        "n1 drained (announce off returned after {returned:?}), n3 stopped gracefully ({stopped:?}): \
         30 long flows, {} broke; {} new connections, {} failed, {} slow",
        broken.len(),
        arrived.ok,
        arrived.failed,
        arrived.troubles.len()
    );
    assert!(broken.is_empty(), "long flows broke: {broken:#?}");
    assert_eq!(arrived.failed, 0, "new connections failed: {:?}", arrived.errors());

    // Back in service.
    let n1 = &fleet.nodes[0];
    n1.ns.exec(xlb.to_str().unwrap(), &["announce", "on", "-i", &n1.interface]).unwrap();
    fleet.wait_paths(VIP4.into(), 2, Duration::from_secs(10)).unwrap();
}

#[test]
fn a_vip_without_backends_is_withdrawn_everywhere_and_a_killed_daemon_stays_announced() {
    let mut fleet = Fleet::new(3, 3, 0).unwrap();
    let _servers = servers::start(&fleet.backends, 80, 53);
    start(&mut fleet, 0, Vips::default());
    for i in 0..3 {
        let config = fleet.config(i, 0, &vips(&fleet, i, Vips { web_empty: true, ..Vips::default() }));
        fleet.nodes[i].xlb_mut().apply_config(&config).unwrap();
    }
    let gone = fleet.wait_paths(VIP4.into(), 0, Duration::from_secs(10)).unwrap();
    assert_eq!(fleet.paths(VIP6.into()).unwrap().len(), 3, "the IPv6 VIP still has its backends");
    let status = fleet.nodes[0].xlb().status().unwrap();
    let web = status["vips"].as_array().unwrap().iter().find(|v| v["name"] == "web").unwrap().clone();
    assert_eq!(web["announce"]["reason"], "no_usable_backend", "{web}");
    for i in 0..3 {
        let config = fleet.config(i, 0, &vips(&fleet, i, Vips::default()));
        fleet.nodes[i].xlb_mut().apply_config(&config).unwrap();
    }
    let back = fleet.wait_paths(VIP4.into(), 3, Duration::from_secs(10)).unwrap();
    eprintln!("all backends gone: withdrawn by every node within {gone:?}; back within {back:?}");

    // SIGKILL n1's daemon: the route stays, BIRD keeps announcing, the
    // program keeps forwarding.
    fleet.nodes[0].xlb_mut().kill9().unwrap();
    let before = fleet.nodes[0].forwarded("web").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.paths(VIP4.into()).unwrap().len(), 3, "still announced");
    let answers = fleet
        .client
        .run(|| tcp_spread(SocketAddr::from((VIP4, 80)), 150))
        .expect("every connection completes");
    let after = fleet.nodes[0].forwarded("web").unwrap();
    eprintln!(
        "n1's daemon killed: 3 paths stay; 150 connections {answers:?}; n1 forwarded {} packets",
        after - before
    );
    assert!(after > before, "the killed daemon's node keeps forwarding");
    let routes = fleet.nodes[0].ns.ip(&format!("route show table {TABLE}")).unwrap();
    assert!(routes.contains(&VIP4.to_string()), "{routes}");
}

#[test]
fn announcing_copes_with_no_bird_a_table_in_use_and_someone_elses_route() {
    use xlb_tests::{
        daemon::{Daemon, run_refused},
        lab::Lab,
    };
    let lab = Lab::new(1).unwrap();
    let web = format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nprotocol = \"tcp\"\n{}\n\n\
         [[vip]]\nname = \"web6\"\naddress = \"{VIP6}\"\nport = 80\nprotocol = \"tcp\"\n{}\n",
        lab.backend_list(false),
        lab.backend_list(true)
    );
    let config = |extra: &str| {
        lab.config(&format!(
            "[announce]\ntable = {TABLE}\nbird_socket = \"/nonexistent/bird.ctl\"\n{extra}\n{web}"
        ))
    };

    // A table someone else uses is refused, naming the field.
    lab.lb.ip(&format!("route add 10.77.0.0/16 dev lo table {TABLE}")).unwrap();
    let path = std::env::temp_dir().join(format!("xlb-announce-{:06x}.toml", xlb_tests::unique_id()));
    std::fs::write(&path, config("")).unwrap();
    let (code, err) = run_refused(&lab.lb, &path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("announce.table") && err.contains("10.77.0.0/16"), "{err}");
    lab.lb.ip(&format!("route del 10.77.0.0/16 dev lo table {TABLE}")).unwrap();

    // A host route for a VIP put there by someone else is left alone; BIRD
    // not running is said, and announcing goes on without it.
    lab.lb.ip(&format!("-6 route add {VIP6}/128 dev lo table {TABLE} proto static")).unwrap();
    let daemon = Daemon::start(&lab.lb, &lab.lb_if, &config("")).unwrap();
    let routes = lab.lb.ip(&format!("route show table {TABLE}")).unwrap();
    let routes6 = lab.lb.ip(&format!("-6 route show table {TABLE}")).unwrap();
    assert!(routes.contains(&format!("{VIP4} dev lo proto 247")), "{routes}");
    assert!(routes6.contains("proto static"), "untouched: {routes6}");
    let status = daemon.status().unwrap();
    let announce = |name: &str| {
        let vips = status["vips"].as_array().unwrap();
        vips.iter().find(|v| v["name"] == name).unwrap()["announce"].clone()
    };
    assert_eq!(announce("web")["state"], "announced", "{status}");
    assert_eq!(announce("web6")["state"], "foreign", "{status}");
    let bird = status["announce"]["bird"]["error"].as_str().unwrap_or_default().to_owned();
    assert!(bird.contains("cannot reach BIRD at /nonexistent/bird.ctl"), "{status}");
    let text = cmd::run(cmd::xlb_bin().to_str().unwrap(), &["status", "--interface", &lab.lb_if]).unwrap();
    assert!(text.contains("announced") && text.contains("did not add (proto 4)"), "{text}");

    // A second daemon (another interface) on the same table is refused.
    let other = format!("xv{:06x}", xlb_tests::unique_id());
    lab.lb.ip(&format!("link add {other} type veth peer name {other}p")).unwrap();
    let second =
        config("").replace(&format!("interface = \"{}\"", lab.lb_if), &format!("interface = \"{other}\""));
    std::fs::write(&path, second).unwrap();
    let (code, err) = run_refused(&lab.lb, &path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(code == Some(1) && err.contains("table 200 is used by another xlb"), "{err}");

    // A killed daemon leaves its routes (the program forwards on); `xlb
    // detach` removes the data plane, and the routes first.
    let mut daemon = daemon;
    daemon.kill9().unwrap();
    let out = daemon.xlb(&["detach", "--interface", &lab.lb_if]).unwrap();
    let routes = lab.lb.ip(&format!("route show table {TABLE}")).unwrap();
    assert!(
        out.contains("withdrew 1 VIP route(s) from table 200") && !routes.contains("proto 247"),
        "{out}\n{routes}"
    );
    let routes6 = lab.lb.ip(&format!("-6 route show table {TABLE}")).unwrap();
    assert!(routes6.contains("proto static"), "someone else's stays: {routes6}");
    drop(daemon);
    lab.lb.ip(&format!("-6 route del {VIP6}/128 dev lo table {TABLE} proto static")).unwrap();
}

/// The TUN VIPs only, with the TUN backends of `order` (every node the
/// same), and a 20 s drain and second-chance window.
fn tun_config(fleet: &Fleet, i: usize, order: &[usize]) -> String {
    let vip = |name: &str, addr: IpAddr| {
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{addr}\"\nport = 80\nprotocol = \"tcp\"\nforward = \"tun\"\n{}\n",
            fleet.tun_backend_list(addr.is_ipv6(), order)
        )
    };
    let vips = vip("tun", TUN_VIP4.into()) + &vip("tun6", TUN_VIP6.into());
    fleet.config(i, 1, &vips).replace("drain_timeout = 5", "drain_timeout = 20")
}

/// 20 conversations to each TUN VIP.
fn tun_talks(fleet: &Fleet, stop: &Arc<AtomicBool>) -> Vec<Conversation> {
    [SocketAddr::from((TUN_VIP4, 80)), SocketAddr::from((TUN_VIP6, 80))]
        .iter()
        .flat_map(|&vip| (0..20).map(move |_| vip).collect::<Vec<_>>())
        .map(|vip| Conversation::start(&fleet.client, vip, stop))
        .collect()
}

/// The live node that forwarded the most TUN packets over a second.
fn busiest(fleet: &Fleet, alive: &[usize]) -> usize {
    let count =
        |i: usize| fleet.nodes[i].forwarded("tun").unwrap() + fleet.nodes[i].forwarded("tun6").unwrap();
    let before: Vec<u64> = alive.iter().map(|&i| count(i)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let (i, _) = alive.iter().zip(before).map(|(&i, b)| (i, count(i) - b)).max_by_key(|&(_, n)| n).unwrap();
    i
}

/// Applies `order` on the `alive` nodes, kills the busiest, and lets the
/// conversations talk on; those that broke.
fn change_then_kill(
    fleet: &mut Fleet,
    alive: &mut Vec<usize>,
    order: &[usize],
    talks: Vec<Conversation>,
    stop: &Arc<AtomicBool>,
) -> (usize, Vec<String>) {
    for &i in alive.iter() {
        let config = tun_config(fleet, i, order);
        fleet.nodes[i].xlb_mut().apply_config(&config).unwrap();
    }
    let victim = busiest(fleet, alive);
    alive.retain(|&i| i != victim);
    fleet.nodes[victim].die().unwrap();
    fleet.wait_paths(TUN_VIP4.into(), alive.len(), Duration::from_secs(10)).unwrap();
    fleet.wait_paths(TUN_VIP6.into(), alive.len(), Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (victim, talks.into_iter().filter_map(|t| t.finish().err()).collect())
}

fn passed_on(fleet: &Fleet) -> u64 {
    let count = |b: &xlb_tests::tun_lab::TunBackend| {
        b.decap_status().unwrap()["second_chance_forwarded"].as_u64().unwrap()
    };
    fleet.tun_backends.iter().map(count).sum()
}

#[test]
fn a_node_dies_after_the_backends_changed_and_no_tun_flow_breaks() {
    let mut fleet = Fleet::new(3, 0, 4).unwrap();
    let _servers = tun_servers(&fleet);
    for i in 0..3 {
        let config = tun_config(&fleet, i, &[0, 1, 2]);
        fleet.start_xlb(i, &config).unwrap();
    }
    fleet.wait_sessions().unwrap();
    for vip in [IpAddr::from(TUN_VIP4), IpAddr::from(TUN_VIP6)] {
        fleet.wait_paths(vip, 3, Duration::from_secs(15)).unwrap();
    }
    let mut alive = vec![0, 1, 2];

    // A fourth backend joins (a quarter of each table moves), then the
    // node carrying most flows dies: the others never saw its flows.
    let stop = Arc::new(AtomicBool::new(false));
    let talks = tun_talks(&fleet, &stop);
    let (victim, broken) = change_then_kill(&mut fleet, &mut alive, &[0, 1, 2, 3], talks, &stop);
    let after_join = passed_on(&fleet);
    eprintln!(
        "backend joined, node {victim} died: 40 TUN flows, {} broke; {after_join} packets passed on",
        broken.len()
    );
    assert!(broken.is_empty(), "long flows broke: {broken:#?}");
    assert!(after_join > 0, "the moved flows were passed on to their previous owner");

    // A backend drains out (its slots move), then the busier of the two
    // nodes left dies.
    let stop = Arc::new(AtomicBool::new(false));
    let talks = tun_talks(&fleet, &stop);
    let (victim, broken) = change_then_kill(&mut fleet, &mut alive, &[0, 2, 3], talks, &stop);
    let after_drain = passed_on(&fleet) - after_join;
    eprintln!(
        "backend drained, node {victim} died: 40 TUN flows, {} broke; {after_drain} packets passed on",
        broken.len()
    );
    assert!(broken.is_empty(), "long flows broke: {broken:#?}");
    assert!(after_drain > 0, "the drained backend's flows were passed on to it");
}
