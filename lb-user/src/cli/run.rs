//! `xlb run`: the daemon.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    addr,
    cli::args::RunArgs,
    config::{Config, Forward},
    dataplane::KernelMaps,
    loader, neigh,
    reconcile::{Desired, DesiredBackend, DesiredVip, Reconciler},
    state::DaemonState,
};

/// How long start-up waits for backends' MACs before going on without the
/// missing ones (they join the table as soon as they resolve).
const INITIAL_RESOLVE: Duration = Duration::from_secs(3);
/// How long a reload waits for new backends' MACs.
const RELOAD_RESOLVE: Duration = Duration::from_secs(1);
/// Config file and neighbour table polling interval.
const TICK: Duration = Duration::from_secs(1);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    let handle = neigh::connect()?;
    let iface = neigh::interface(&handle, &config.interface)
        .await
        .with_context(|| format!("{}: field `interface`", args.config.display()))?;
    let pin_dir = config.pin_dir();
    let (iface_v4, iface_v6) = neigh::addresses(&handle, iface.index).await?;
    let params = loader::Params::new(&config, iface_v4, iface_v6);
    check_tun(&config, &params)?;
    let mut dataplane = loader::load(&iface, &pin_dir, params, config.xdp_mode)?;
    let mut reconciler = if dataplane.adopted {
        Reconciler::adopt(params.geometry, &dataplane.maps).context("cannot read the pinned state")?
    } else {
        Reconciler::new(params.geometry)
    };
    info!(
        interface = %iface.name,
        attach = dataplane.mode,
        pin_dir = %pin_dir.display(),
        adopted = dataplane.adopted,
        "program xlb attached"
    );

    let mut neighbours = neigh::Neighbours::new(handle.clone(), iface.index);
    let mut targets = neighbour_targets(&handle, &config, iface.index).await?;
    let mut macs = neighbours.resolve(&targets, INITIAL_RESOLVE).await?;
    let mut daemon = Daemon {
        args: &args,
        attach: dataplane.mode,
        maps: &mut dataplane.maps,
        reconciler: &mut reconciler,
        pending: true,
    };
    daemon.apply(&config, &macs);
    info!(vips = config.vips.len(), "xlb ready");

    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(TICK);
    let mut config_mtime = mtime(&args.config);
    loop {
        let mut reload = false;
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => reload = true,
            _ = tick.tick() => {
                let now = mtime(&args.config);
                if now != config_mtime {
                    config_mtime = now;
                    reload = true;
                }
            }
        }
        let mut reloaded = false;
        if reload && let Some(new) = daemon.reload(&config, &params) {
            config = new;
            daemon.pending = true;
            reloaded = true;
        }
        // After a reload, give new backends a moment to resolve so they
        // join with the change rather than a tick later.
        let patience = if reloaded { RELOAD_RESOLVE } else { Duration::ZERO };
        match neighbour_targets(&handle, &config, iface.index).await {
            Ok(t) => targets = t,
            Err(e) => warn!(error = %format_error(&e), "route lookup failed"),
        }
        match neighbours.resolve(&targets, patience).await {
            Ok(now) if now != macs => {
                macs = now;
                daemon.pending = true;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %format_error(&e), "neighbour refresh failed"),
        }
        if daemon.reconciler.next_deadline().is_some_and(|d| d <= Instant::now()) {
            daemon.pending = true;
        }
        if daemon.pending {
            daemon.apply(&config, &macs);
        }
        if reloaded && !daemon.pending {
            info!(vips = config.vips.len(), "config applied");
        }
    }

    if args.detach_on_exit {
        drop(dataplane);
        loader::detach(&pin_dir)?;
        DaemonState::remove(&iface.name);
        info!(interface = %iface.name, "detached");
    } else {
        info!(interface = %iface.name, "exiting; program xlb stays attached with the last tables");
    }
    Ok(())
}

struct Daemon<'a> {
    args: &'a RunArgs,
    attach: &'static str,
    maps: &'a mut KernelMaps,
    reconciler: &'a mut Reconciler,
    /// The maps may differ from what is wanted (a change, or a failed write).
    pending: bool,
}

impl Daemon<'_> {
    fn apply(&mut self, config: &Config, macs: &HashMap<IpAddr, [u8; 6]>) {
        match self.reconciler.apply(&desired(config, macs), Instant::now(), self.maps) {
            Ok(()) => self.pending = false,
            Err(e) => error!(error = %format_error(&e), "map update failed; retrying with a full resync"),
        }
        let state = DaemonState {
            pid: std::process::id(),
            config: self.args.config.clone(),
            interface: config.interface.clone(),
            pin_dir: config.pin_dir(),
            attach: self.attach.to_owned(),
            vips: DaemonState::labels(self.reconciler),
        };
        if let Err(e) = state.write() {
            warn!(error = %e, "cannot write the state file for `xlb status`");
        }
    }

    /// The new config, if it is valid and can be applied live.
    fn reload(&self, current: &Config, params: &loader::Params) -> Option<Config> {
        let new = match Config::load(&self.args.config) {
            Ok(new) => new,
            Err(e) => {
                error!(error = %format_error(&e), "config rejected; the running config stays in force");
                return None;
            }
        };
        let fixed = |c: &Config| {
            let limits = (loader::geometry(c), c.conntrack_insert_limit);
            (c.interface.clone(), c.pin_dir(), c.xdp_mode, limits, c.tun_source_v4, c.tun_source_v6)
        };
        if fixed(&new) != fixed(current) {
            error!(
                "config rejected: interface, pin_dir, xdp_mode, table_size, max_vips, max_backends, \
                 conntrack_size, conntrack_insert_limit and tun_source_* apply only at start; restart \
                 xlb to change them (the running config stays in force)"
            );
            return None;
        }
        if let Err(e) = check_tun(&new, params) {
            error!(error = %e, "config rejected; the running config stays in force");
            return None;
        }
        if new != *current {
            info!(config = %self.args.config.display(), "config reloaded");
        }
        Some(new)
    }
}

fn desired(config: &Config, macs: &HashMap<IpAddr, [u8; 6]>) -> Desired {
    let vips = config
        .vips
        .iter()
        .map(|v| {
            let tun = v.forward == Forward::Tun;
            DesiredVip {
                name: v.name.clone(),
                key: addr::vip_key(v.address, v.port, v.protocol.number()),
                mode: if tun { lb_common::MODE_TUN } else { lb_common::MODE_DR },
                backends: v
                    .backends
                    .iter()
                    .map(|b| DesiredBackend {
                        addr: b.address,
                        weight: b.weight,
                        // TUN packets go to the next hop the data plane's
                        // FIB lookup finds: nothing to resolve per backend.
                        mac: if tun { Some([0; 6]) } else { macs.get(&b.address).copied() },
                    })
                    .collect(),
            }
        })
        .collect();
    Desired { vips, drain_timeout: Duration::from_secs(config.drain_timeout) }
}

/// Addresses whose neighbour entries xlb keeps fresh: DR backends, and the
/// next hops toward TUN backends (so the data plane's FIB lookups find
/// them resolved).
async fn neighbour_targets(
    handle: &rtnetlink::Handle,
    config: &Config,
    ifindex: u32,
) -> Result<Vec<IpAddr>, neigh::NetError> {
    let mut targets = Vec::new();
    for vip in &config.vips {
        for b in &vip.backends {
            if vip.forward == Forward::Dr {
                targets.push(b.address);
            } else if let Some((hop, oif)) = neigh::next_hop(handle, b.address).await?
                && oif == ifindex
            {
                targets.push(hop);
            }
        }
    }
    targets.sort();
    targets.dedup();
    Ok(targets)
}

/// TUN VIPs need an outer source address of their family, and IP
/// forwarding on the interface: the kernel's FIB helper answers only for
/// interfaces that forward, and the kernel forwards what xlb hands it while
/// a next hop resolves.
fn check_tun(config: &Config, params: &loader::Params) -> anyhow::Result<()> {
    for v in config.vips.iter().filter(|v| v.forward == Forward::Tun) {
        let (missing, family) = match v.address {
            IpAddr::V4(_) => (params.tun_source_v4.is_unspecified().then_some("tun_source_v4"), "ipv4"),
            IpAddr::V6(_) => (params.tun_source_v6.is_unspecified().then_some("tun_source_v6"), "ipv6"),
        };
        if let Some(field) = missing {
            anyhow::bail!(
                "VIP {:?} uses forward = \"tun\" but {} has no global address of its family; set {field}",
                v.name,
                config.interface
            );
        }
        let key = format!("net.{family}.conf.{}.forwarding", config.interface);
        let path = format!("/proc/sys/net/{family}/conf/{}/forwarding", config.interface);
        if std::fs::read_to_string(&path).map(|s| s.trim() == "1").ok() != Some(true) {
            anyhow::bail!(
                "VIP {:?} uses forward = \"tun\", which needs IP forwarding on {}: `sysctl -w {key}=1`",
                v.name,
                config.interface
            );
        }
        // While a next hop resolves, xlb hands tunnelled packets to the
        // kernel, which forwards them only with these settings.
        let (key, path) = match family {
            "ipv4" => (
                format!("net.ipv4.conf.{}.accept_local", config.interface),
                format!("/proc/sys/net/ipv4/conf/{}/accept_local", config.interface),
            ),
            _ => ("net.ipv6.conf.all.forwarding".to_owned(), "/proc/sys/net/ipv6/conf/all/forwarding".to_owned()),
        };
        if std::fs::read_to_string(&path).map(|s| s.trim() == "1").ok() != Some(true) {
            warn!(
                vip = %v.name,
                "{key} is off: packets to a next hop without a neighbour entry are lost until xlb \
                 resolves it (about a second); set {key}=1 to let the kernel deliver them"
            );
        }
    }
    Ok(())
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// An error with its chain of causes on one line.
pub fn format_error(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
