//! What the host must provide for the config: TUN mode's outer source
//! addresses and forwarding sysctls, and a routing table of xlb's own for
//! announcements.

use std::{collections::BTreeSet, net::IpAddr};

use tracing::warn;

use crate::{
    config::LiveConfig,
    dataplane::loader::Params,
    model::Forward,
    net::{
        sysctl::Sysctl,
        table::{self, RTPROT_XLB},
    },
};

/// The announce table must be xlb's alone: BIRD's kernel protocol learns
/// every route in it and would announce someone else's too. A foreign host
/// route for a VIP's address is let be (xlb leaves it alone and says so).
pub(super) async fn check_announce_table(
    handle: &rtnetlink::Handle,
    table: u32,
    live: &LiveConfig,
) -> anyhow::Result<()> {
    let vips: BTreeSet<IpAddr> = live.vips.iter().map(|v| v.addr.ip).collect();
    let routes = table::list(handle, table).await?;
    let mut foreign: Vec<String> =
        routes.others.iter().map(|r| format!("{} (proto {})", r.destination, r.proto)).collect();
    foreign.extend(
        routes
            .hosts
            .iter()
            .filter(|r| r.proto != RTPROT_XLB && !vips.contains(&r.ip))
            .map(|r| format!("{} (proto {})", r.ip, r.proto)),
    );
    if !foreign.is_empty() {
        foreign.truncate(3);
        anyhow::bail!(
            "announce.table: table {table} is in use by something else (it holds {}, not added by xlb); \
             give xlb a table of its own: BIRD announces every route in it",
            foreign.join(", ")
        );
    }
    Ok(())
}

/// TUN VIPs need an outer source address of their family, and IP
/// forwarding on the interface: the kernel's FIB helper answers only for
/// interfaces that forward, and the kernel forwards what xlb hands it while
/// a next hop resolves.
pub(super) fn check_tun(interface: &str, live: &LiveConfig, params: &Params) -> anyhow::Result<()> {
    for v in live.vips.iter().filter(|v| v.forward == Forward::Tun) {
        let ip = v.addr.ip;
        if params.tun_source_for(ip).is_none() {
            let field = if ip.is_ipv4() { "tun_source_v4" } else { "tun_source_v6" };
            anyhow::bail!(
                "VIP {:?} uses forward = \"tun\" but {interface} has no global address of its family; set {field}",
                v.name
            );
        }
        let forwarding = Sysctl::forwarding(interface, ip);
        if !forwarding.is_on() {
            anyhow::bail!(
                "VIP {:?} uses forward = \"tun\", which needs IP forwarding on {interface}: `sysctl -w {forwarding}=1`",
                v.name
            );
        }
        // While a next hop resolves, xlb hands tunnelled packets to the
        // kernel, which forwards them only with these settings.
        let delivery =
            if ip.is_ipv4() { Sysctl::accept_local(interface) } else { Sysctl::ipv6_forwarding_all() };
        if !delivery.is_on() {
            warn!(
                vip = %v.name,
                "{delivery} is off: packets to a next hop without a neighbour entry are lost until xlb \
                 resolves it (about a second); set {delivery}=1 to let the kernel deliver them"
            );
        }
    }
    Ok(())
}
