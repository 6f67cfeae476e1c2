//! Putting the real daemon together: the interface and its addresses over
//! netlink, the host checks, the admin listener, program `xlb` loaded (or
//! adopted) and attached, and the tasks that feed the daemon events.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tracing::info;

use super::{Daemon, Event, NetHost, Parts, checks, discovery_watch, sources, watchers};
use crate::{
    config::Config,
    control::reconcile::Reconciler,
    dataplane::{
        KernelStore,
        loader::{self, Loaded, Params},
    },
    files::RunFiles,
    net,
    observe::admin::{self, Api},
};

/// Events waiting for the daemon; senders wait beyond it.
const EVENT_QUEUE: usize = 256;
/// Admin API commands waiting to become events.
const COMMAND_QUEUE: usize = 16;

/// A started daemon with what feeds it.
pub struct Running {
    daemon: Daemon<KernelStore, NetHost>,
    events: mpsc::Receiver<Event>,
    tasks: Vec<JoinHandle<()>>,
    program: Loaded,
    handle: rtnetlink::Handle,
    /// Held while this daemon owns its announce table.
    _announce_lock: Option<std::fs::File>,
}

/// Starts the daemon for the config at `path`: everything that can fail
/// on a bad config or host fails before the data plane is touched.
pub async fn start(path: &Path) -> anyhow::Result<Running> {
    let (sender, events) = mpsc::channel(EVENT_QUEUE);
    let mut tasks = vec![sources::signals(sender.clone())?];
    let config = Config::load(path)?;
    let start = &config.start;
    let handle = net::connect()?;
    // Before the first resolve, so no change after it goes unnoticed.
    let changes = net::watch::subscribe()?;
    let iface = net::interface(&handle, &start.interface)
        .await
        .with_context(|| format!("{}: field `interface`", path.display()))?;
    let (iface_v4, iface_v6) = net::addresses(&handle, iface.index).await?;
    let params = Params::new(start, iface_v4, iface_v6);
    checks::check_tun(&start.interface, &config.live, &params)?;
    let files = RunFiles::new(&iface.name);
    let announce_lock = checks::prepare_announcing(&handle, &files, &config).await?;
    let start_announce = start.announce.clone();
    let lo =
        net::interface(&handle, "lo").await.context("the loopback interface (VIP routes point at it)")?;
    watchers::clients(&config.live)?;
    let token = start.admin.token()?;
    // Bound before the data plane is touched: a busy port fails the start.
    let listener = TcpListener::bind(start.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot listen on {}", start.admin.listen))?;

    let dataplane = loader::load(&iface, &start.pin_dir, params, start.xdp_mode)?;
    let reconciler = if dataplane.adopted {
        Reconciler::adopt(&dataplane.maps).context("cannot read the pinned state")?
    } else {
        Reconciler::new(start.capacities)
    };
    info!(
        interface = %iface.name,
        attach = %dataplane.attachment,
        pin_dir = %start.pin_dir.display(),
        adopted = dataplane.adopted,
        "program xlb attached"
    );
    let (mut daemon, published) = Daemon::new(Parts {
        config_path: path.to_owned(),
        files,
        config,
        params,
        maps: dataplane.maps,
        reconciler,
        host: NetHost::new(
            handle.clone(),
            iface.index,
            lo.index,
            (params.tun_source_v4, params.tun_source_v6),
        ),
        attachment: dataplane.attachment,
        events: sender.clone(),
        watch: discovery_watch,
    })?;
    daemon.begin().await;
    let (commands, command_queue) = mpsc::channel(COMMAND_QUEUE);
    let api = Arc::new(Api::new(token, published, Arc::new(dataplane.counters), commands));
    tasks.push(tokio::spawn(admin::serve(listener, api)));
    tasks.push(sources::commands(command_queue, sender.clone()));
    if let Some(announce) = &start_announce {
        tasks.push(sources::bird(announce.bird_socket.clone(), sender.clone()));
    }
    tasks.push(sources::netlink(changes, iface.index, sender.clone()));
    tasks.push(sources::ticks(sender));
    Ok(Running { daemon, events, tasks, program: dataplane.program, handle, _announce_lock: announce_lock })
}

impl Running {
    /// Waits `wait`, or until a second signal to stop. Health changes and
    /// ticks are still handled (flows are still arriving); changes asked
    /// for through the API are refused.
    async fn linger(&mut self, wait: std::time::Duration) {
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return,
                event = self.events.recv() => match event {
                    None | Some(Event::Stop) => return,
                    Some(Event::Api(cmd)) => {
                        let _ = cmd.reply.send(Err(admin::ApiError::new(503, "the daemon is shutting down")));
                    }
                    Some(event) => {
                        self.daemon.handle(event).await;
                    }
                },
            }
        }
    }

    /// Runs the daemon until a signal stops it. Announced VIPs are
    /// withdrawn first, and routers given `withdraw_wait` to move flows
    /// away while the program goes on forwarding. Then the program stays
    /// attached with the last tables, or with `detach` is removed.
    pub async fn run(mut self, detach: bool) -> anyhow::Result<()> {
        self.daemon.run(&mut self.events).await;
        self.daemon.stopping();
        if let Some(wait) = self.daemon.withdraw_for_stop().await
            && !wait.is_zero()
        {
            info!(
                wait = ?wait,
                "VIP routes withdrawn; waiting for routers to move flows away (forwarding goes on; \
                 SIGTERM again to stop at once)"
            );
            self.linger(wait).await;
        }
        self.tasks.iter().for_each(JoinHandle::abort);
        let (maps, start, files) = self.daemon.finish();
        if detach {
            drop((maps, self.program));
            // No route may announce a data plane that is gone.
            if let Some(announce) = &start.announce {
                net::table::delete_all_ours(&self.handle, announce.table).await?;
            }
            loader::detach(&start.pin_dir)?;
            files.forget();
            info!(interface = %start.interface, "detached");
        } else {
            info!(interface = %start.interface, "exiting; program xlb stays attached with the last tables");
        }
        Ok(())
    }
}
