//! The TUN lab: backends on another subnet, behind a router.
//!
//! ```text
//!   segment 1 (10.1.0.0/24, fd01::/64)      segment 2 (10.2.0.0/24, fd02::/64)
//!   client .1  ─┐                        ┌─ be1 .11  (VIPs on lo, xlb_decap)
//!   lb     .2  ─┤── router .254 / .254 ──┤  …
//!                                         └─
//! ```
//! The client routes the VIPs via the load balancer; the load balancer
//! reaches segment 2 via the router; backends answer the client directly
//! through the router, never through the load balancer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::aux;

use crate::{
    cmd,
    lab::{VIP4, VIP6, host, plug, segment},
    netns::Netns,
    unique_id,
};

pub const LB4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 2);

pub struct TunBackend {
    /// On its port of the segment: frames its xlb_decap sends back out
    /// (second chance) are delivered only to a veth peer running XDP.
    _pass: aux::Attached,
    pub ns: Netns,
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// Unique: every backend's interface is called eth0, but pins are global.
    pin_dir: String,
}

impl TunBackend {
    /// `xlb decap status --json` of this backend.
    pub fn decap_status(&self) -> anyhow::Result<serde_json::Value> {
        let out =
            self.xlb(&["decap", "status", "--interface", "eth0", "--pin-dir", &self.pin_dir, "--json"])?;
        Ok(serde_json::from_str(&out)?)
    }

    fn xlb(&self, args: &[&str]) -> anyhow::Result<String> {
        let bin = cmd::xlb_bin();
        let mut all = vec![format!("--net={}", self.ns.path().display()), bin.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        cmd::run("nsenter", &all)
    }
}

/// Fields drop in order: helper program, backends (detaching xlb_decap),
/// then the namespaces.
pub struct TunLab {
    _pass: aux::Attached,
    pub backends: Vec<TunBackend>,
    pub lb: Netns,
    pub client: Netns,
    pub router: Netns,
    pub seg1: Netns,
    pub seg2: Netns,
    pub lb_if: String,
}

/// TUN backend `be<i + 1>` on segment 2 (10.2.0.11 + i, fd02::11 + i,
/// default route via the router at .254): `vips` on its loopback, and
/// xlb_decap attached for them, trusting tunnels `from` these prefixes.
pub(crate) fn tun_backend(
    seg2: &Netns,
    prefix: &str,
    i: usize,
    vips: &[IpAddr],
    from: &[&str],
) -> anyhow::Result<TunBackend> {
    let name = format!("be{}", i + 1);
    let ns = host(&format!("{prefix}-{name}"))?;
    let v4 = Ipv4Addr::new(10, 2, 0, 11 + i as u8);
    let v6 = Ipv6Addr::new(0xfd02, 0, 0, 0, 0, 0, 0, 0x11 + i as u16);
    plug(seg2, &ns, "eth0", &name, v4, v6)?;
    ns.ip("route add default via 10.2.0.254")?;
    ns.ip("-6 route add default via fd02::fe")?;
    // Second chance sends packets on to another backend: the FIB helper
    // answers only where the interface forwards.
    ns.sysctl(&["net.ipv4.conf.eth0.forwarding=1", "net.ipv6.conf.all.forwarding=1"])?;
    let pass = aux::attach("xdp_pass", &name, seg2)?;
    let mut args = vec!["decap".to_owned(), "attach".into(), "-i".into(), "eth0".into(), "--pin-dir".into()];
    let pin_dir = format!("/sys/fs/bpf/xlb-decap/{}", ns.name);
    args.push(pin_dir.clone());
    for vip in vips {
        match vip {
            IpAddr::V4(a) => ns.ip(&format!("addr add {a}/32 dev lo"))?,
            IpAddr::V6(a) => ns.ip(&format!("-6 addr add {a}/128 dev lo nodad"))?,
        };
        args.extend(["--vip".to_owned(), vip.to_string()]);
    }
    for source in from {
        args.extend(["--from".to_owned(), source.to_string()]);
    }
    let backend = TunBackend { _pass: pass, ns, name, v4, v6, pin_dir };
    backend.xlb(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(backend)
}

impl TunLab {
    pub fn new(backends: usize) -> anyhow::Result<TunLab> {
        crate::require_root();
        let prefix = format!("xt{:06x}", unique_id());
        let seg1 = segment(&format!("{prefix}-s1"))?;
        let seg2 = segment(&format!("{prefix}-s2"))?;

        let router = host(&format!("{prefix}-rt"))?;
        plug(&seg1, &router, "lan1", "rt", Ipv4Addr::new(10, 1, 0, 254), "fd01::fe".parse()?)?;
        plug(&seg2, &router, "lan2", "rt", Ipv4Addr::new(10, 2, 0, 254), "fd02::fe".parse()?)?;
        router.sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;

        let client = host(&format!("{prefix}-cl"))?;
        plug(&seg1, &client, "eth0", "cl", Ipv4Addr::new(10, 1, 0, 1), "fd01::1".parse()?)?;
        client.ip(&format!("route add {VIP4}/32 via {LB4}"))?;
        client.ip(&format!("-6 route add {VIP6}/128 via {LB6}"))?;
        client.ip("route add 10.2.0.0/24 via 10.1.0.254")?;
        client.ip("-6 route add fd02::/64 via fd01::fe")?;

        let lb_if = format!("xl{:06x}", unique_id());
        let lb = host(&format!("{prefix}-lb"))?;
        plug(&seg1, &lb, &lb_if, "lb", LB4, LB6)?;
        lb.ip("route add 10.2.0.0/24 via 10.1.0.254")?;
        lb.ip("-6 route add fd02::/64 via fd01::fe")?;
        // TUN mode's FIB lookups need forwarding on the interface; the
        // kernel forwards what xlb hands it while a next hop resolves only
        // with IPv6 forwarding on and IPv4 accepting its own source address.
        lb.sysctl(&[
            &format!("net.ipv4.conf.{lb_if}.forwarding=1"),
            &format!("net.ipv4.conf.{lb_if}.accept_local=1"),
            "net.ipv6.conf.all.forwarding=1",
        ])?;

        let mut list = Vec::new();
        for i in 0..backends {
            let from: &[&str] = &[&LB4.to_string(), &LB6.to_string()];
            list.push(tun_backend(&seg2, &prefix, i, &[VIP4.into(), VIP6.into()], from)?);
        }
        let pass = aux::attach("xdp_pass", "lb", &seg1)?;
        Ok(TunLab { _pass: pass, backends: list, lb, client, router, seg1, seg2, lb_if })
    }

    /// A second router between the segments (10.1.0.253 / fd01::fd and
    /// 10.2.0.253 / fd02::fd): nobody routes through it until told to.
    pub fn second_router(&self) -> anyhow::Result<Netns> {
        let r2 = host(&format!("{}-r2", self.seg1.name.trim_end_matches("-s1")))?;
        plug(&self.seg1, &r2, "lan1", "r2", Ipv4Addr::new(10, 1, 0, 253), "fd01::fd".parse()?)?;
        plug(&self.seg2, &r2, "lan2", "r2", Ipv4Addr::new(10, 2, 0, 253), "fd02::fd".parse()?)?;
        r2.sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        Ok(r2)
    }

    pub fn backend_list(&self, v6: bool) -> String {
        self.list_of(v6, self.backends.len())
    }

    /// [`TunLab::backend_list`] of the first `n` backends.
    pub fn list_of(&self, v6: bool, n: usize) -> String {
        let items: Vec<String> = self
            .backends
            .iter()
            .take(n)
            .map(|b| {
                let a: IpAddr = if v6 { b.v6.into() } else { b.v4.into() };
                format!("{{ address = \"{a}\" }}")
            })
            .collect();
        format!("backends = [ {} ]", items.join(", "))
    }
}

impl Drop for TunBackend {
    fn drop(&mut self) {
        if let Err(e) = self.xlb(&["decap", "detach", "--interface", "eth0", "--pin-dir", &self.pin_dir]) {
            eprintln!("teardown: {e}");
        }
    }
}
