//! The DR lab: one L2 segment (a bridge in its own namespace) joining a
//! client, the load balancer and N backends, each in its own namespace.
//!
//! ```text
//!   client 10.0.0.1 fd00::1 ─┐
//!   lb     10.0.0.2 fd00::2 ─┤ bridge
//!   be1    10.0.0.11 fd00::11─┤   (VIPs on lo, arp_ignore/arp_announce)
//!   …                        ─┘
//! ```
//! The client routes the VIPs via the load balancer; backends answer the
//! client directly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::aux;

use crate::{netns::Netns, unique_id};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const LB4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

pub struct Backend {
    pub ns: Netns,
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Backend {
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { self.v6.into() } else { self.v4.into() }
    }
}

/// Fields drop in order: helper program, backends, lb, client, bridge.
pub struct Lab {
    _pass: aux::Attached,
    pub backends: Vec<Backend>,
    pub lb: Netns,
    pub client: Netns,
    pub bridge: Netns,
    /// The load balancer's interface (unique across labs: pins are global).
    pub lb_if: String,
}

const NO_DAD: &[&str] = &["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"];

pub(crate) fn host(name: &str) -> anyhow::Result<Netns> {
    let ns = Netns::new(name)?;
    ns.sysctl(NO_DAD)?;
    Ok(ns)
}

/// A namespace holding bridge br0: one L2 segment.
pub(crate) fn segment(name: &str) -> anyhow::Result<Netns> {
    let bridge = host(name)?;
    bridge.ip("link add br0 type bridge stp_state 0 mcast_snooping 0")?;
    bridge.ip("link set br0 up")?;
    // A switch forwards frames as they are; with br_netfilter (on in this
    // kernel) the bridge would check and reassemble IP first, and frames
    // with bad headers or fragments would never reach the balancer.
    // (Without the module loaded the keys do not exist, and nothing checks.)
    if std::path::Path::new("/proc/sys/net/bridge").exists() {
        bridge.sysctl(&[
            "net.bridge.bridge-nf-call-iptables=0",
            "net.bridge.bridge-nf-call-ip6tables=0",
            "net.bridge.bridge-nf-call-arptables=0",
        ])?;
    }
    Ok(bridge)
}

/// Adds interface `ifname` in `ns`, its peer `peer` on the bridge, with addresses.
pub(crate) fn plug(
    bridge: &Netns,
    ns: &Netns,
    ifname: &str,
    peer: &str,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
) -> anyhow::Result<()> {
    crate::cmd::ip(&format!(
        "link add {ifname} netns {} type veth peer name {peer} netns {}",
        ns.name, bridge.name
    ))?;
    bridge.ip(&format!("link set {peer} master br0 up"))?;
    ns.ip(&format!("addr add {v4}/24 dev {ifname}"))?;
    ns.ip(&format!("-6 addr add {v6}/64 dev {ifname} nodad"))?;
    ns.ip(&format!("link set {ifname} up"))?;
    // veth leaves checksums to "offload" and flags the skb; XDP drops that
    // flag, so a frame bounced by XDP_TX would reach its receiver with a
    // bad checksum. Real NICs put finished checksums on the wire.
    ns.exec("ethtool", &["-K", ifname, "tx", "off"])?;
    Ok(())
}

/// DR backend `be<i + 1>` on the bridge's segment: the VIPs on its
/// loopback, and quiet about them in ARP.
pub(crate) fn dr_backend(
    bridge: &Netns,
    prefix: &str,
    i: usize,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
) -> anyhow::Result<Backend> {
    let name = format!("be{}", i + 1);
    let ns = host(&format!("{prefix}-{name}"))?;
    ns.sysctl(&["net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"])?;
    plug(bridge, &ns, "eth0", &name, v4, v6)?;
    ns.ip(&format!("addr add {VIP4}/32 dev lo"))?;
    ns.ip(&format!("-6 addr add {VIP6}/128 dev lo nodad"))?;
    Ok(Backend { ns, name, v4, v6 })
}

impl Lab {
    pub fn new(backends: usize) -> anyhow::Result<Lab> {
        crate::require_root();
        let id = unique_id();
        let prefix = format!("xt{id:06x}");
        let bridge = segment(&format!("{prefix}-br"))?;

        let client = host(&format!("{prefix}-cl"))?;
        plug(&bridge, &client, "eth0", "cl", CLIENT4, "fd00::1".parse()?)?;
        client.ip(&format!("route add {VIP4}/32 via {LB4}"))?;
        client.ip(&format!("-6 route add {VIP6}/128 via {LB6}"))?;

        let lb_if = format!("xl{id:06x}");
        let lb = host(&format!("{prefix}-lb"))?;
        plug(&bridge, &lb, &lb_if, "lb", LB4, LB6)?;

        let mut list = Vec::new();
        for i in 0..backends {
            let v4 = Ipv4Addr::new(10, 0, 0, 11 + i as u8);
            let v6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11 + i as u16);
            list.push(dr_backend(&bridge, &prefix, i, v4, v6)?);
        }
        // A veth delivers XDP_TX frames only to a peer running XDP.
        let pass = aux::attach("xdp_pass", "lb", &bridge)?;
        Ok(Lab { _pass: pass, backends: list, lb, client, bridge, lb_if })
    }

    /// The backends that answer `n` TCP connections to VIP4:80 from the
    /// client (every connection must complete).
    pub fn spread(&self, n: usize) -> Vec<String> {
        let vip = std::net::SocketAddr::from((VIP4, 80));
        let counts = self.client.run(|| crate::servers::tcp_spread(vip, n)).expect("requests succeed");
        counts.into_keys().collect()
    }

    /// A config for this lab: `vips` is the TOML of the [[vip]] tables.
    pub fn config(&self, vips: &str) -> String {
        format!("interface = \"{}\"\n\n{vips}", self.lb_if)
    }

    /// `backends = [ … ]` listing every backend of the given family.
    pub fn backend_list(&self, v6: bool) -> String {
        let items: Vec<String> =
            self.backends.iter().map(|b| format!("{{ address = \"{}\" }}", b.addr(v6))).collect();
        format!("backends = [ {} ]", items.join(", "))
    }
}
