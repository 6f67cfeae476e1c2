//! What the host must provide for the config: TUN mode's outer source
//! addresses and forwarding sysctls, and a routing table of xlb's own for
//! announcements.

use std::{collections::BTreeSet, fs::File, net::IpAddr};

use anyhow::Context as _;
use tracing::{info, warn};

use crate::{
    config::{Config, LiveConfig},
    dataplane::loader::Params,
    files::RunFiles,
    model::Forward,
    net::{
        sysctl::Sysctl,
        table::{self, RTPROT_XLB},
    },
    observe::pinned::published,
};

/// Gets announcing ready before the data plane is touched: withdraws what
/// the previous run announced in a table this config no longer uses, takes
/// this table's lock (one table, one daemon), and checks that the table is
/// xlb's alone: BIRD's kernel protocol learns every route in it and would
/// announce someone else's too. A foreign host route for a VIP's address
/// is let be (xlb leaves it alone and says so).
pub(super) async fn prepare_announcing(
    handle: &rtnetlink::Handle,
    files: &RunFiles,
    config: &Config,
) -> anyhow::Result<Option<File>> {
    let table = config.start.announce.as_ref().map(|a| a.table);
    if let Some(previous) = previous_table(files).filter(|p| Some(*p) != table) {
        let n = table::delete_all_ours(handle, previous).await?;
        info!(
            table = previous,
            routes = n,
            "withdrew what the previous run announced in a table no longer used"
        );
    }
    let Some(table) = table else { return Ok(None) };
    let netns =
        std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap_or(0);
    let lock_path = files.announce_lock(netns, table);
    let lock = lock_file(&lock_path).with_context(|| {
        format!(
            "announce.table: table {table} is used by another xlb (it holds {}); give each daemon a table of its own",
            lock_path.display()
        )
    })?;
    let vips: BTreeSet<IpAddr> = config.live.vips.iter().map(|v| v.addr.ip).collect();
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
    Ok(Some(lock))
}

/// The announce table the previous run published in the state file.
fn previous_table(files: &RunFiles) -> Option<u32> {
    published(files)?.announce.map(|a| a.table)
}

/// An exclusive lock on `path` (flock: released however the process ends).
fn lock_file(path: &std::path::Path) -> std::io::Result<File> {
    use std::os::fd::AsRawFd as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = File::create(path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
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
