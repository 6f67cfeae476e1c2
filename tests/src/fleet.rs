//! The fleet lab: three xlb nodes behind a router that learns the VIPs
//! from each node's BIRD over BGP (with BFD) and spreads flows by ECMP.
//!
//! ```text
//!   client 10.9.0.2 ── router 10.9.0.1 │ 10.8.0.1 ─┐
//!                                                   ├ bridge (one L2 segment)
//!   n1 10.8.0.11, n2 .12, n3 .13 (xlb + BIRD) ──────┤
//!   be1 10.8.0.21, be2 .22, be3 .23 (VIPs on lo) ───┘
//! ```
//! Each node runs `xlb run` on its segment interface and its own BIRD; the
//! router's BIRD merges the three paths into one ECMP route per VIP, hashed
//! on the 5-tuple. DR backends share the segment; TUN backends sit behind a
//! second router (10.8.0.254 on the segment, 10.2.0.254 on theirs) and run
//! xlb_decap. Backends answer the client through the routers. Every address
//! has an IPv6 twin (fd08::…, fd09::…, fd02::…).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    aux,
    bird::{self, Bird},
    daemon::Daemon,
    lab::{Backend, dr_backend, host, plug, segment},
    netns::Netns,
    tun_lab::{TunBackend, tun_backend},
    unique_id,
};

/// The VIPs of the TUN backends.
pub const TUN_VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
pub const TUN_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);

/// The announce table every node uses.
pub const TABLE: u32 = 200;
pub const ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 8, 0, 1);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd08, 0, 0, 0, 0, 0, 0, 1);

/// Fields drop in order: xlb, BIRD, then the namespace.
pub struct Node {
    pub xlb: Option<Daemon>,
    pub bird: Option<Bird>,
    pub ns: Netns,
    pub name: String,
    /// Its segment interface (unique: pins are global).
    pub interface: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Node {
    pub fn xlb(&self) -> &Daemon {
        self.xlb.as_ref().expect("xlb runs on the node")
    }

    pub fn xlb_mut(&mut self) -> &mut Daemon {
        self.xlb.as_mut().expect("xlb runs on the node")
    }

    /// Packets the node's data plane forwarded for VIP `vip`.
    pub fn forwarded(&self, vip: &str) -> anyhow::Result<u64> {
        let status = self.xlb().status()?;
        let vips = status["vips"].as_array().context("no vips")?;
        let v = vips.iter().find(|v| v["name"] == vip).with_context(|| format!("no VIP {vip}"))?;
        v["packets"].as_u64().context("no packets")
    }

    /// Kills the node outright: its link goes (the program with it), then
    /// every process of it, BIRD included, without a chance to clean up.
    pub fn die(&mut self) -> anyhow::Result<()> {
        self.ns.ip(&format!("link del {}", self.interface))?;
        if let Some(bird) = self.bird.as_mut() {
            bird.kill();
        }
        if let Some(xlb) = self.xlb.as_mut() {
            xlb.kill9()?;
        }
        Ok(())
    }
}

/// Fields drop in order: helper programs, nodes (xlb, BIRD), backends,
/// routers, client, segments.
pub struct Fleet {
    _pass: Vec<aux::Attached>,
    pub nodes: Vec<Node>,
    pub backends: Vec<Backend>,
    pub tun_backends: Vec<TunBackend>,
    pub router_bird: Bird,
    pub router: Netns,
    /// Between the segment and the TUN backends' one.
    _tun_router: Option<Netns>,
    pub client: Netns,
    pub bridge: Netns,
    _tun_segment: Option<Netns>,
}

impl Fleet {
    /// The topology with BIRD running everywhere, `backends` DR and
    /// `tun_backends` TUN backends; xlb not started yet.
    pub fn new(nodes: usize, backends: usize, tun_backends: usize) -> anyhow::Result<Fleet> {
        crate::require_root();
        let id = unique_id();
        let prefix = format!("xf{id:06x}");
        let bridge = segment(&format!("{prefix}-br"))?;

        let router = host(&format!("{prefix}-rt"))?;
        plug(&bridge, &router, "eth0", "rt", ROUTER4, ROUTER6)?;
        router.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            // Flows, not packets, spread over the nodes: hash on the 5-tuple.
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv6.fib_multipath_hash_policy=1",
        ])?;
        let client = host(&format!("{prefix}-cl"))?;
        crate::cmd::ip(&format!(
            "link add eth1 netns {} type veth peer name eth0 netns {}",
            router.name, client.name
        ))?;
        router.ip("addr add 10.9.0.1/24 dev eth1")?;
        router.ip("-6 addr add fd09::1/64 dev eth1 nodad")?;
        router.ip("link set eth1 up")?;
        client.ip("addr add 10.9.0.2/24 dev eth0")?;
        client.ip("-6 addr add fd09::2/64 dev eth0 nodad")?;
        client.ip("link set eth0 up")?;
        client.ip("route add default via 10.9.0.1")?;
        client.ip("-6 route add default via fd09::1")?;

        let mut pass = Vec::new();
        let mut list = Vec::new();
        for i in 0..nodes {
            let name = format!("n{}", i + 1);
            let ns = host(&format!("{prefix}-{name}"))?;
            let interface = format!("xn{id:06x}-{i}");
            let (v4, v6) = (
                Ipv4Addr::new(10, 8, 0, 11 + i as u8),
                Ipv6Addr::new(0xfd08, 0, 0, 0, 0, 0, 0, 0x11 + i as u16),
            );
            plug(&bridge, &ns, &interface, &name, v4, v6)?;
            // TUN: the backends' segment is behind the second router; the
            // FIB helper answers only where the interface forwards.
            ns.ip("route add 10.2.0.0/24 via 10.8.0.254")?;
            ns.ip("-6 route add fd02::/64 via fd08::fe")?;
            ns.sysctl(&[
                &format!("net.ipv4.conf.{interface}.forwarding=1"),
                &format!("net.ipv4.conf.{interface}.accept_local=1"),
                "net.ipv6.conf.all.forwarding=1",
            ])?;
            // XDP sees frames for any MAC: a frame flooded to every port
            // (its destination unknown, a dead node's say) would be
            // balanced by every node. A switch floods too, but only until
            // it learns; here it must not hide a node's death.
            bridge.exec("bridge", &["link", "set", "dev", &name, "flood", "off"])?;
            // veth delivers XDP_TX frames only to a peer running XDP.
            pass.push(aux::attach("xdp_pass", &name, &bridge)?);
            let bird = Bird::start(&ns, &bird::node_config((v4, v6), (ROUTER4, ROUTER6), TABLE))?;
            list.push(Node { ns, name, interface, v4, v6, bird: Some(bird), xlb: None });
        }
        let peers: Vec<(Ipv4Addr, Ipv6Addr)> = list.iter().map(|n| (n.v4, n.v6)).collect();
        let router_bird = Bird::start(&router, &bird::router_config((ROUTER4, ROUTER6), &peers))?;

        let mut be = Vec::new();
        for i in 0..backends {
            let v4 = Ipv4Addr::new(10, 8, 0, 21 + i as u8);
            let v6 = Ipv6Addr::new(0xfd08, 0, 0, 0, 0, 0, 0, 0x21 + i as u16);
            let backend = dr_backend(&bridge, &prefix, i, v4, v6)?;
            // Replies go to the client through the router, not the nodes.
            backend.ns.ip(&format!("route add default via {ROUTER4}"))?;
            backend.ns.ip(&format!("-6 route add default via {ROUTER6}"))?;
            be.push(backend);
        }
        let (tun_segment, tun_router, tun_backends) = match tun_backends {
            0 => (None, None, Vec::new()),
            n => {
                let seg2 = segment(&format!("{prefix}-s2"))?;
                let r2 = host(&format!("{prefix}-r2"))?;
                plug(&bridge, &r2, "lan1", "r2", Ipv4Addr::new(10, 8, 0, 254), "fd08::fe".parse()?)?;
                plug(&seg2, &r2, "lan2", "r2", Ipv4Addr::new(10, 2, 0, 254), "fd02::fe".parse()?)?;
                r2.sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
                r2.ip(&format!("route add 10.9.0.0/24 via {ROUTER4}"))?;
                r2.ip(&format!("-6 route add fd09::/64 via {ROUTER6}"))?;
                let vips = [TUN_VIP4.into(), TUN_VIP6.into()];
                let list = (0..n)
                    // Every node's segment address may tunnel to them.
                    .map(|i| {
                        tun_backend(&seg2, &format!("{prefix}-t"), i, &vips, &["10.8.0.0/24", "fd08::/64"])
                    })
                    .collect::<anyhow::Result<_>>()?;
                (Some(seg2), Some(r2), list)
            }
        };
        Ok(Fleet {
            _pass: pass,
            nodes: list,
            backends: be,
            tun_backends,
            router_bird,
            router,
            _tun_router: tun_router,
            client,
            bridge,
            _tun_segment: tun_segment,
        })
    }

    /// Node `i`'s config: the VIPs of `vips` (TOML `[[vip]]` tables) with
    /// announcing into [`TABLE`], `withdraw_wait` seconds of grace.
    pub fn config(&self, i: usize, withdraw_wait: u64, vips: &str) -> String {
        let node = &self.nodes[i];
        let socket = node.bird.as_ref().map(|b| b.socket.display().to_string()).unwrap_or_default();
        format!(
            "interface = \"{}\"\ndrain_timeout = 5\n\n[announce]\ntable = {TABLE}\nwithdraw_wait = {withdraw_wait}\n\
             bird_socket = \"{socket}\"\n\n{vips}",
            node.interface
        )
    }

    /// `backends = [ … ]` with every DR backend of the family, in `order`.
    pub fn backend_list(&self, v6: bool, order: &[usize]) -> String {
        list(order.iter().map(|&i| self.backends[i].addr(v6)))
    }

    /// The same for the TUN backends (those `order` names that exist).
    pub fn tun_backend_list(&self, v6: bool, order: &[usize]) -> String {
        let addr = |b: &TunBackend| -> IpAddr { if v6 { b.v6.into() } else { b.v4.into() } };
        list(order.iter().filter_map(|&i| self.tun_backends.get(i)).map(addr))
    }

    /// Starts xlb on node `i` with `config`.
    pub fn start_xlb(&mut self, i: usize, config: &str) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        node.xlb = Some(Daemon::start(&node.ns, &node.interface, config)?);
        Ok(())
    }

    /// Waits until every BGP session of the router is up.
    pub fn wait_sessions(&self) -> anyhow::Result<()> {
        self.router_bird.wait_established(Duration::from_secs(20))
    }

    /// The next hops the router's kernel has for `vip`.
    pub fn paths(&self, vip: IpAddr) -> anyhow::Result<Vec<IpAddr>> {
        let family = if vip.is_ipv4() { "-4" } else { "-6" };
        let text = self.router.ip(&format!("{family} -j route show {vip}"))?;
        let json: serde_json::Value =
            serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text })?;
        let mut hops = Vec::new();
        for route in json.as_array().into_iter().flatten() {
            let gateways = match route["nexthops"].as_array() {
                Some(list) => list.iter().map(|h| &h["gateway"]).collect(),
                None => vec![&route["gateway"]],
            };
            hops.extend(gateways.iter().filter_map(|g| g.as_str()?.parse::<IpAddr>().ok()));
        }
        hops.sort();
        Ok(hops)
    }

    /// Waits until the router has exactly `count` paths for `vip`; how long it took.
    pub fn wait_paths(&self, vip: IpAddr, count: usize, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let paths = self.paths(vip)?;
            if paths.len() == count {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "router has {} paths for {vip}, not {count}, after {timeout:?}: {paths:?}\n{}",
                    paths.len(),
                    self.router_bird.birdc("show route all").unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn list(addrs: impl Iterator<Item = IpAddr>) -> String {
    let items: Vec<String> = addrs.map(|a| format!("{{ address = \"{a}\" }}")).collect();
    format!("backends = [ {} ]", items.join(", "))
}
