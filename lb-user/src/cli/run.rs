//! `xlb run`: the daemon.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    admin::{self, ApiError},
    cli::args::RunArgs,
    config::{Config, Forward},
    consul::{self, ServiceQuery, Update},
    dataplane::KernelMaps,
    desired,
    discovery::Discovery,
    errors::error_chain,
    loader, neigh,
    overrides::Overrides,
    reconcile::{Desired, Reconciler},
    state::DaemonState,
};

/// How long start-up waits for backends' MACs before going on without the
/// missing ones (they join the table as soon as they resolve).
const INITIAL_RESOLVE: Duration = Duration::from_secs(3);
/// How long a change waits for new backends' MACs.
const CHANGE_RESOLVE: Duration = Duration::from_secs(1);
/// Config file and neighbour table polling interval.
const TICK: Duration = Duration::from_secs(1);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Before anything slow: SIGHUP's default action would end the process.
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut config = Config::load(&args.config)?;
    let handle = neigh::connect()?;
    let iface = neigh::interface(&handle, &config.interface)
        .await
        .with_context(|| format!("{}: field `interface`", args.config.display()))?;
    let pin_dir = config.pin_dir();
    let (iface_v4, iface_v6) = neigh::addresses(&handle, iface.index).await?;
    let params = loader::Params::new(&config, iface_v4, iface_v6);
    check_tun(&config, &params)?;
    let mut watchers = Watchers::new();
    let mut discovery = Discovery::new(consul_settings(&config).on_empty);
    watchers.follow(&config, &mut discovery)?;
    let overrides_path = Overrides::path(&iface.name);
    let overrides = Overrides::load(&overrides_path).unwrap_or_else(|e| {
        warn!(error = %e, path = %overrides_path.display(), "ignoring unreadable drain/weight overrides");
        Overrides::default()
    });
    // Bound before the data plane is touched: a busy port fails the start.
    let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot listen on {}", config.admin.listen))?;
    let (commands_tx, mut commands) = mpsc::channel(16);
    let admin = Arc::new(admin::Shared {
        pin_dir: pin_dir.clone(),
        interface: iface.name.clone(),
        token: config.admin.token()?,
        ready: AtomicBool::new(false),
        commands: commands_tx,
        cache: Default::default(),
        changes: Default::default(),
    });

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
    let mut next_hops = neigh::NextHops::new(handle.clone());
    // After a restart, DR backends keep the MACs their pinned entries hold
    // while the neighbour table catches up.
    neighbours.seed(
        reconciler
            .vips()
            .values()
            .filter(|v| v.mode != lb_common::MODE_TUN)
            .flat_map(|v| v.backends.iter().filter_map(|(a, b)| Some((*a, b.mac?)))),
    );
    let mut daemon = Daemon {
        args: &args,
        attach: dataplane.mode,
        maps: &mut dataplane.maps,
        reconciler: &mut reconciler,
        pending: true,
        macs: HashMap::new(),
        notes: Vec::new(),
        shortfalls: Vec::new(),
        overrides,
        overrides_path,
        admin: admin.clone(),
    };
    let targets =
        neighbour_targets(&mut next_hops, &daemon.desired(&config, &discovery), iface.index).await?;
    daemon.macs = neighbours.resolve(&targets, INITIAL_RESOLVE).await?;
    daemon.apply(&config, &discovery);
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin));
    info!(vips = config.vips.len(), admin = %config.admin.listen, "xlb ready");

    let mut tick = tokio::time::interval(TICK);
    let mut config_mtime = mtime(&args.config);
    loop {
        let mut reload = false;
        let mut discovered = false;
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => reload = true,
            Some(cmd) = commands.recv() => {
                let result = daemon.command(&config, &discovery, &cmd);
                let _ = cmd.reply.send(result);
            }
            Some(update) = watchers.updates.recv() => {
                discovered = discovery.update(update, Instant::now());
                daemon.publish(&config, &discovery);
            }
            _ = tick.tick() => reload = mtime(&args.config) != config_mtime,
        }
        // A reload applies a config that differs from the running one.
        let mut reloaded = false;
        if reload {
            // Noted before reading, so a write during the read is seen next tick.
            config_mtime = mtime(&args.config);
        }
        if reload
            && let Some(new) = daemon.reload(&config, &params)
            && new != config
        {
            match watchers.follow(&new, &mut discovery) {
                Ok(()) => {
                    info!(config = %args.config.display(), "config reloaded");
                    discovery.set_policy(consul_settings(&new).on_empty);
                    config = new;
                    daemon.pending = true;
                    reloaded = true;
                }
                Err(e) => {
                    error!(error = %error_chain(e.as_ref()), "config rejected; the running config stays in force")
                }
            }
        }
        // A health change applies at once, before anything waits on the
        // neighbour table: a failed backend must not wait for a new one.
        if discovered {
            daemon.pending = true;
            daemon.apply(&config, &discovery);
        }
        let desired = daemon.desired(&config, &discovery);
        match neighbour_targets(&mut next_hops, &desired, iface.index).await {
            Ok(targets) => {
                // After a change, give new backends a moment to resolve so
                // they join with it rather than a tick later.
                let patience = if reloaded || discovered { CHANGE_RESOLVE } else { Duration::ZERO };
                match neighbours.resolve(&targets, patience).await {
                    Ok(now) if now != daemon.macs => {
                        daemon.macs = now;
                        daemon.pending = true;
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %error_chain(&e), "neighbour refresh failed"),
                }
            }
            Err(e) => warn!(error = %error_chain(&e), "route lookup failed"),
        }
        if daemon.reconciler.next_deadline().is_some_and(|d| d <= Instant::now()) {
            daemon.pending = true;
        }
        if daemon.pending {
            daemon.apply(&config, &discovery);
        }
        if reloaded && !daemon.pending {
            info!(vips = config.vips.len(), "config applied");
        }
    }
    watchers.stop_all();
    admin_task.abort();

    if args.detach_on_exit {
        drop(dataplane);
        loader::detach(&pin_dir)?;
        DaemonState::forget(&iface.name);
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
    /// Resolved MACs of DR backends (and TUN next hops).
    macs: HashMap<IpAddr, [u8; 6]>,
    /// Discovered instances left out, and what found no id, as last logged.
    notes: Vec<String>,
    shortfalls: Vec<String>,
    /// Drains and weights set through the admin API, and where they are saved.
    overrides: Overrides,
    overrides_path: PathBuf,
    admin: Arc<admin::Shared>,
}

impl Daemon<'_> {
    fn desired(&mut self, config: &Config, discovery: &Discovery) -> Desired {
        let (desired, notes) = desired::build(config, discovery, &self.overrides, &self.macs);
        for note in notes.iter().filter(|n| !self.notes.contains(n)) {
            warn!("{note}");
        }
        self.notes = notes;
        desired
    }

    fn apply(&mut self, config: &Config, discovery: &Discovery) {
        let desired = self.desired(config, discovery);
        match self.reconciler.apply(&desired, Instant::now(), self.maps) {
            // What found no id is retried on the next tick (ids free up as
            // backends leave).
            Ok(()) => self.pending = !self.reconciler.shortfalls().is_empty(),
            Err(e) => error!(error = %error_chain(&e), "map update failed; retrying with a full resync"),
        }
        let shortfalls = self.reconciler.shortfalls().to_vec();
        for s in shortfalls.iter().filter(|s| !self.shortfalls.contains(s)) {
            warn!("{s}");
        }
        self.shortfalls = shortfalls;
        self.admin.ready.store(!self.pending, Ordering::Relaxed);
        self.publish(config, discovery);
    }

    /// Writes what `xlb status` shows beside the maps.
    fn publish(&self, config: &Config, discovery: &Discovery) {
        let state = DaemonState {
            pid: std::process::id(),
            config: self.args.config.clone(),
            interface: config.interface.clone(),
            pin_dir: config.pin_dir(),
            attach: self.attach.to_owned(),
            vips: DaemonState::labels(self.reconciler, config),
            discovery: DaemonState::discovery(discovery, Instant::now()),
        };
        if let Err(e) = state.write() {
            warn!(error = %e, "cannot write the state file for `xlb status`");
        }
    }

    /// An operator's drain, undrain or weight change from the admin API,
    /// applied before the answer goes back.
    fn command(
        &mut self,
        config: &Config,
        discovery: &Discovery,
        cmd: &admin::Command,
    ) -> Result<(), ApiError> {
        let Some(vip) = config.vips.iter().find(|v| v.name == cmd.vip) else {
            return Err(ApiError::new(404, format!("no VIP named {:?}", cmd.vip)));
        };
        let known = match &vip.consul {
            None => vip.backends.iter().any(|b| b.address == cmd.backend),
            Some(q) => discovery.view(q).and_then(|v| v.instances.as_ref()).is_some_and(|i| {
                i.iter().any(|i| desired::instance_address(i, vip.address) == Some(cmd.backend))
            }),
        };
        if !known {
            return Err(ApiError::new(404, format!("VIP {:?} has no backend {}", cmd.vip, cmd.backend)));
        }
        let mut value = self.overrides.get(&cmd.vip, cmd.backend);
        match cmd.change {
            admin::Change::Drain => value.drained = true,
            admin::Change::Undrain => value.drained = false,
            admin::Change::Weight(_) if vip.consul.is_some() => {
                return Err(ApiError::new(
                    409,
                    format!(
                        "backends of VIP {:?} come from Consul: set weights there (Weights or meta xlb-weight)",
                        cmd.vip
                    ),
                ));
            }
            admin::Change::Weight(w) => value.weight = Some(w),
        }
        self.overrides.set(&cmd.vip, cmd.backend, value);
        if let Err(e) = self.overrides.save(&self.overrides_path) {
            warn!(error = %e, "cannot save drain/weight overrides; they will not survive a restart");
        }
        info!(vip = %cmd.vip, backend = %cmd.backend, change = ?cmd.change, "operator change");
        self.pending = true;
        self.apply(config, discovery);
        if self.pending {
            return Err(ApiError::new(500, "the change is recorded but the map update failed; retrying"));
        }
        Ok(())
    }

    /// The new config, if it is valid and can be applied live.
    fn reload(&self, current: &Config, params: &loader::Params) -> Option<Config> {
        let new = match Config::load(&self.args.config) {
            Ok(new) => new,
            Err(e) => {
                error!(error = %error_chain(&e), "config rejected; the running config stays in force");
                return None;
            }
        };
        let fixed = |c: &Config| {
            let limits = (loader::geometry(c), c.conntrack_insert_limit);
            let tun = (c.tun_source_v4, c.tun_source_v6);
            (c.interface.clone(), c.pin_dir(), c.xdp_mode, limits, tun, c.admin.clone())
        };
        if fixed(&new) != fixed(current) {
            error!(
                "config rejected: interface, pin_dir, xdp_mode, table_size, max_vips, max_backends, \
                 conntrack_size, conntrack_insert_limit, tun_source_* and admin apply only at start; \
                 restart xlb to change them (the running config stays in force)"
            );
            return None;
        }
        if let Err(e) = check_tun(&new, params) {
            error!(error = %e, "config rejected; the running config stays in force");
            return None;
        }
        Some(new)
    }
}

/// The `[consul]` section, with Consul's environment variables filling in.
fn consul_settings(config: &Config) -> consul::ConsulSettings {
    let mut settings = config.consul.clone().unwrap_or_default();
    settings.apply_env();
    settings
}

/// One watcher task per Consul service the config's VIPs follow.
struct Watchers {
    settings: Option<consul::ConsulSettings>,
    tasks: BTreeMap<ServiceQuery, JoinHandle<()>>,
    /// What the tasks report. A new channel with every start-over, so
    /// answers the old tasks left queued are never taken for new ones.
    updates: mpsc::Receiver<Update>,
    sender: mpsc::Sender<Update>,
}

impl Watchers {
    fn new() -> Self {
        let (sender, updates) = mpsc::channel(64);
        Watchers { settings: None, tasks: BTreeMap::new(), updates, sender }
    }

    /// Watches exactly the services `config` names, with its settings.
    fn follow(&mut self, config: &Config, discovery: &mut Discovery) -> anyhow::Result<()> {
        let mut queries: Vec<ServiceQuery> = config.vips.iter().filter_map(|v| v.consul.clone()).collect();
        queries.sort();
        queries.dedup();
        let settings = consul_settings(config);
        if queries.is_empty() {
            self.stop_all();
            discovery.watch_only(&[]);
            return Ok(());
        }
        // The client first: settings it cannot use change nothing.
        let client = consul::Client::new(&settings).context("field `consul`")?;
        if self.settings.as_ref() != Some(&settings) {
            // Another agent, datacenter or token: every service starts over.
            self.stop_all();
            discovery.watch_only(&[]);
        }
        self.settings = Some(settings);
        self.tasks.retain(|q, task| {
            let keep = queries.contains(q);
            if !keep {
                task.abort();
            }
            keep
        });
        for q in &queries {
            if !self.tasks.contains_key(q) {
                info!(service = %q, "watching Consul service");
                let task = tokio::spawn(consul::watch(client.clone(), q.clone(), self.sender.clone()));
                self.tasks.insert(q.clone(), task);
            }
        }
        discovery.watch_only(&queries);
        Ok(())
    }

    fn stop_all(&mut self) {
        self.tasks.values().for_each(JoinHandle::abort);
        self.tasks.clear();
        self.settings = None;
        (self.sender, self.updates) = mpsc::channel(64);
    }
}

/// Addresses whose neighbour entries xlb keeps fresh: DR backends, and the
/// next hops toward TUN backends (so the data plane's FIB lookups find
/// them resolved).
async fn neighbour_targets(
    hops: &mut neigh::NextHops,
    desired: &Desired,
    ifindex: u32,
) -> Result<Vec<IpAddr>, neigh::NetError> {
    let mut targets = Vec::new();
    let mut tunnelled = Vec::new();
    for vip in &desired.vips {
        let addrs = vip.backends.iter().map(|b| b.addr);
        if vip.mode == lb_common::MODE_TUN { tunnelled.extend(addrs) } else { targets.extend(addrs) }
    }
    let hops = hops.lookup(&tunnelled).await?;
    targets.extend(hops.into_iter().filter(|(_, oif)| *oif == ifindex).map(|(hop, _)| hop));
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
            _ => (
                "net.ipv6.conf.all.forwarding".to_owned(),
                "/proc/sys/net/ipv6/conf/all/forwarding".to_owned(),
            ),
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
