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
    config::Config,
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
    let params = loader::params(&config);
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

    let mut neighbours = neigh::Neighbours::new(handle, iface.index);
    let mut macs = neighbours
        .resolve(&backend_addrs(&config), INITIAL_RESOLVE)
        .await?;
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
        if reload && let Some(new) = daemon.reload(&config) {
            config = new;
            daemon.pending = true;
            reloaded = true;
        }
        // After a reload, give new backends a moment to resolve so they
        // join with the change rather than a tick later.
        let patience = if reloaded { RELOAD_RESOLVE } else { Duration::ZERO };
        match neighbours.resolve(&backend_addrs(&config), patience).await {
            Ok(now) if now != macs => {
                macs = now;
                daemon.pending = true;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %format_error(&e), "neighbour refresh failed"),
        }
        if daemon
            .reconciler
            .next_deadline()
            .is_some_and(|d| d <= Instant::now())
        {
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
        match self
            .reconciler
            .apply(&desired(config, macs), Instant::now(), self.maps)
        {
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
    fn reload(&self, current: &Config) -> Option<Config> {
        let new = match Config::load(&self.args.config) {
            Ok(new) => new,
            Err(e) => {
                error!(error = %format_error(&e), "config rejected; the running config stays in force");
                return None;
            }
        };
        let fixed = |c: &Config| (c.interface.clone(), c.pin_dir(), c.xdp_mode, loader::params(c));
        if fixed(&new) != fixed(current) {
            error!(
                "config rejected: interface, pin_dir, xdp_mode, table_size, max_vips, max_backends, \
                 conntrack_size and conntrack_insert_limit apply only at start; restart xlb to change \
                 them (the running config stays in force)"
            );
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
        .map(|v| DesiredVip {
            name: v.name.clone(),
            key: addr::vip_key(v.address, v.port, v.protocol.number()),
            mode: lb_common::MODE_DR,
            backends: v
                .backends
                .iter()
                .map(|b| DesiredBackend {
                    addr: b.address,
                    weight: b.weight,
                    mac: macs.get(&b.address).copied(),
                })
                .collect(),
        })
        .collect();
    Desired {
        vips,
        drain_timeout: Duration::from_secs(config.drain_timeout),
    }
}

fn backend_addrs(config: &Config) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = config
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.address))
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
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
