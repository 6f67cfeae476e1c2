//! The daemon's event handling, against in-memory maps and a host
//! that knows every MAC.

use std::{
    collections::BTreeMap, future::Future, net::IpAddr, os::unix::ffi::OsStrExt as _, path::PathBuf,
    pin::Pin, time::Duration,
};

use lb_common::{BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_HOP, BACKEND_TUN};
use tokio::sync::{mpsc, oneshot, watch};

use super::*;
use crate::{
    config::{ServiceQuery, Source, SourceKind},
    control::desired::NextHop,
    dataplane::{MemoryStore, loader::Params},
    discovery::{Instance, InstanceId},
    model::{Protocol, VipAddr},
    net::{
        bird,
        table::{HostRoute, RTPROT_XLB, TableRoutes},
        watch::Changes,
    },
    observe::{
        admin::{Action, ApiError, Change, Command},
        status::{HopStatus, Shortfalls},
    },
};

/// A host where every DR backend resolves, to 02:00:<its IPv4 address>,
/// every TUN backend is behind next hop `hop`, with routing tables in
/// memory.
#[derive(Default)]
struct FakeHost {
    /// (table, address) → routing protocol number.
    routes: BTreeMap<(u32, IpAddr), u8>,
    hop: Option<NextHop>,
    /// How many times the daemon said routes changed.
    route_changes: usize,
}

impl Host for FakeHost {
    async fn resolve(
        &mut self,
        dr: &[IpAddr],
        tun: &[IpAddr],
        _patience: Duration,
    ) -> Result<Resolved, crate::net::NetError> {
        Ok(Resolved {
            macs: dr.iter().map(|a| (*a, mac(*a))).collect(),
            hops: tun.iter().filter_map(|a| Some((*a, self.hop?))).collect(),
        })
    }

    fn routes_changed(&mut self) {
        self.route_changes += 1;
    }

    fn seed(&mut self, _: Vec<(IpAddr, [u8; 6])>) {}

    async fn routes(&mut self, table: u32) -> Result<TableRoutes, crate::net::NetError> {
        let hosts = self
            .routes
            .iter()
            .filter(|((t, _), _)| *t == table)
            .map(|((_, ip), proto)| HostRoute { ip: *ip, proto: *proto })
            .collect();
        Ok(TableRoutes { hosts, others: vec![] })
    }

    async fn add_route(&mut self, table: u32, ip: IpAddr) -> Result<(), crate::net::NetError> {
        assert!(self.routes.insert((table, ip), RTPROT_XLB).is_none(), "{ip} was routed already");
        Ok(())
    }

    async fn delete_route(&mut self, table: u32, ip: IpAddr) -> Result<(), crate::net::NetError> {
        if self.routes.get(&(table, ip)) == Some(&RTPROT_XLB) {
            self.routes.remove(&(table, ip));
        }
        Ok(())
    }
}

fn mac(addr: IpAddr) -> [u8; 6] {
    let IpAddr::V4(a) = addr else { panic!("IPv4 backends only here") };
    let o = a.octets();
    [2, 0, o[0], o[1], o[2], o[3]]
}

/// A watcher that reports nothing: the tests send discovery's reports.
fn quiet(_: Watch, updates: mpsc::Sender<Update>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move { updates.closed().await })
}

struct Lab {
    dir: PathBuf,
    config: PathBuf,
    daemon: Daemon<MemoryStore, FakeHost>,
    status: watch::Receiver<admin::Published>,
    _events: mpsc::Receiver<Event>,
}

impl Lab {
    async fn new(config: &str) -> Lab {
        let dir = std::env::temp_dir().join(format!(
            "xlb-daemon-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self::in_dir(dir, config).await
    }

    async fn in_dir(dir: PathBuf, text: &str) -> Lab {
        Self::with_host(dir, text, FakeHost::default()).await
    }

    async fn with_host(dir: PathBuf, text: &str, host: FakeHost) -> Lab {
        let path = dir.join("xlb.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).unwrap();
        let caps = config.start.capacities;
        let (events, receiver) = mpsc::channel(64);
        let (mut daemon, status) = Daemon::new(Parts {
            config_path: path.clone(),
            params: Params::plain(caps),
            config,
            maps: Maps::new(MemoryStore::default(), caps),
            reconciler: Reconciler::new(caps),
            host,
            files: RunFiles::in_dir(&dir, "eth0"),
            attachment: Attachment::Native,
            events,
            watch: quiet,
        })
        .unwrap();
        daemon.begin().await;
        Lab { dir, config: path, daemon, status, _events: receiver }
    }

    /// Rewrites the config file and sends SIGHUP's event.
    async fn reload(&mut self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
        assert_eq!(self.daemon.handle(Event::Reload).await, Flow::Continue);
    }

    async fn command(&mut self, vip: &str, backend: [u8; 4], change: Change) -> Result<(), ApiError> {
        let (reply, answer) = oneshot::channel();
        let action = Action::Backend { vip: vip.into(), backend: backend.into(), change };
        let cmd = Command { action, reply };
        self.daemon.handle(Event::Api(cmd)).await;
        answer.await.unwrap()
    }

    /// The flags of `backend`'s entry under VIP 192.0.2.10:80.
    fn flags(&self, backend: [u8; 4]) -> Option<u8> {
        let state = self.daemon.reconciler.vips().get(&web())?.backends.get(&backend.into())?;
        Some(self.daemon.maps.store().backends[&state.id].flags)
    }

    /// The backends the live table names.
    fn table(&self) -> Vec<IpAddr> {
        let table = self.daemon.maps.live_table(&web()).unwrap().unwrap();
        let mut addrs: Vec<IpAddr> =
            table.iter().map(|id| self.daemon.maps.backend(*id).unwrap().unwrap().addr).collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// Consul's answer for `service`, as the current watchers report it.
    async fn discover(&mut self, service: &str, backends: &[u8]) {
        let event = answer_at(self.daemon.watchers.epoch(SourceKind::Consul), service, backends);
        self.daemon.handle(event).await;
    }

    fn published(&self) -> std::sync::Arc<crate::observe::status::Status> {
        self.status.borrow().1.clone()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The state writer must not recreate the directory afterwards.
        self.daemon.publisher.finish();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn web() -> VipAddr {
    VipAddr { ip: [192, 0, 2, 10].into(), port: 80, protocol: Protocol::Tcp }
}

fn config(head: &str, backends: &[u8]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("{{ address = \"10.0.0.{b}\" }}")).collect();
    format!(
        "interface = \"eth0\"\n{head}\n[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\nbackends = [ {} ]\n",
        list.join(", ")
    )
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

#[tokio::test]
async fn a_drain_during_a_shortfall_answers_200_and_readiness_says_why() {
    // Two backend ids: while 10.0.0.2 drains, 10.0.0.3 has none.
    let head = "max_backends = 3\ndrain_timeout = 30";
    let mut lab = Lab::new(&config(head, &[1, 2])).await;
    assert_eq!(lab.daemon.sync, Sync::InSync);
    lab.reload(&config(head, &[1, 3])).await;
    let Sync::Short(short) = &lab.daemon.sync else { panic!("{:?}", lab.daemon.sync) };
    let (shortfalls, text) = (&short.named, short.named[0].to_string());
    assert!(text.contains("10.0.0.3") && text.contains("max_backends"), "{shortfalls:?}");

    assert_eq!(
        lab.command("web", [10, 0, 0, 1], Change::Drain).await,
        Ok(()),
        "the drain itself was applied"
    );
    assert_eq!(lab.flags([10, 0, 0, 1]), Some(BACKEND_DRAINING));
    let sync = &lab.published().daemon.clone().unwrap().sync;
    assert!(matches!(sync, Sync::Short(_)) && sync.describe().contains("10.0.0.3"), "{sync:?}");
}

#[tokio::test]
async fn a_failed_write_answers_500_and_the_next_tick_retries() {
    let mut lab = Lab::new(&config("", &[1, 2])).await;
    lab.daemon.maps.store_mut().fail_writes = true;
    let answer = lab.command("web", [10, 0, 0, 2], Change::Drain).await;
    assert_eq!(answer.map_err(|e| e.status), Err(500));
    assert!(matches!(lab.daemon.sync, Sync::Retrying { .. }));
    lab.daemon.maps.store_mut().fail_writes = false;
    lab.daemon.handle(Event::Tick).await;
    assert_eq!(lab.daemon.sync, Sync::InSync);
    assert_eq!(lab.flags([10, 0, 0, 2]), Some(BACKEND_DRAINING), "the recorded drain is in the maps");
}

#[tokio::test]
async fn commands_for_what_does_not_exist_are_404_and_weights_of_discovered_backends_409() {
    let mut lab = Lab::new(&config("", &[1])).await;
    assert_eq!(lab.command("nope", [10, 0, 0, 1], Change::Drain).await.map_err(|e| e.status), Err(404));
    assert_eq!(lab.command("web", [10, 0, 0, 9], Change::Drain).await.map_err(|e| e.status), Err(404));
    let consul = "[[vip]]\nname = \"api\"\naddress = \"192.0.2.11\"\nport = 80\nprotocol = \"tcp\"\nconsul = { service = \"api\" }\n";
    lab.reload(&format!("{}{consul}", config("", &[1]))).await;
    lab.discover("api", &[7]).await;
    assert_eq!(lab.command("api", [10, 0, 0, 7], Change::Weight(3)).await.map_err(|e| e.status), Err(409));
    assert_eq!(lab.command("api", [10, 0, 0, 7], Change::Drain).await, Ok(()));
}

#[tokio::test]
async fn a_reload_that_changes_a_start_only_field_names_it_and_applies_the_rest() {
    let mut lab = Lab::new(&config("", &[1, 2])).await;
    lab.reload(&config("max_vips = 8\nconntrack_insert_limit = 5", &[1, 3])).await;
    assert_eq!(lab.daemon.restart_needed, ["max_vips", "conntrack_insert_limit"]);
    assert_eq!(lab.daemon.start.capacities.max_vips, 64, "the running value stays");
    assert_eq!(lab.table(), [ip(1), ip(3)], "the backends changed all the same");
    let published = lab.published();
    assert_eq!(published.daemon.as_ref().unwrap().restart_needed, ["max_vips", "conntrack_insert_limit"]);
    assert_eq!(published.max_vips, 64);

    // A file that is invalid on its own changes nothing.
    lab.reload("interface = [").await;
    assert_eq!(lab.table(), [ip(1), ip(3)]);
    // Back to the running values: nothing waits for a restart any more.
    lab.reload(&config("", &[1, 3])).await;
    assert!(lab.daemon.restart_needed.is_empty());
}

#[tokio::test]
async fn an_edit_of_the_file_is_seen_on_the_next_tick() {
    let mut lab = Lab::new(&config("", &[1, 2])).await;
    std::fs::write(&lab.config, config("", &[2])).unwrap();
    // Some filesystems keep mtimes in whole seconds.
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    std::fs::File::options().write(true).open(&lab.config).unwrap().set_modified(later).unwrap();
    lab.daemon.handle(Event::Tick).await;
    assert_eq!(lab.table(), [ip(2)]);
}

fn instance(last: u8) -> Instance {
    Instance {
        id: InstanceId::Consul { node: format!("n{last}"), id: format!("api-{last}") },
        address: ip(last),
        tagged: vec![],
        port: 80,
        weight: 1,
        warning: false,
    }
}

fn answer_at(epoch: u64, service: &str, backends: &[u8]) -> Event {
    let source = Source::Consul(ServiceQuery { service: service.into(), tag: None });
    let instances = backends.iter().map(|b| instance(*b)).collect();
    Event::Discovery { epoch, update: Update::Instances { source, instances, problems: vec![], index: 5 } }
}

const CONSUL_WEB: &str = "interface = \"eth0\"\n[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\nconsul = { service = \"web\" }\n";

#[tokio::test]
async fn discovery_answers_apply_and_those_of_replaced_watchers_are_dropped() {
    let mut lab = Lab::new(CONSUL_WEB).await;
    lab.discover("web", &[1, 2]).await;
    assert_eq!(lab.table(), [ip(1), ip(2)]);
    lab.daemon.handle(answer_at(lab.daemon.watchers.epoch(SourceKind::Consul) - 1, "web", &[3])).await;
    assert_eq!(lab.table(), [ip(1), ip(2)], "a report from before the start-over");
    assert_eq!(lab.flags([10, 0, 0, 1]), Some(BACKEND_ACTIVE));
}

#[tokio::test]
async fn discovered_backends_beyond_capacity_wait_by_name_and_serving_ones_stay() {
    // Three backend ids.
    let mut lab = Lab::new(&format!("max_backends = 4\n{CONSUL_WEB}")).await;
    lab.discover("web", &[2, 3, 4]).await;
    assert_eq!(lab.daemon.sync, Sync::InSync);
    lab.discover("web", &[1, 2, 3, 4, 5]).await;
    assert_eq!(lab.table(), [ip(2), ip(3), ip(4)], "a newcomer never pushes out a serving backend");
    let short = |lab: &Lab| match &lab.daemon.sync {
        Sync::Short(s) => s.clone(),
        other => panic!("{other:?}"),
    };
    let s = short(&lab);
    assert_eq!((s.vips_left_out, s.backends_left_out), (0, 2));
    let named: Vec<String> = s.named.iter().map(ToString::to_string).collect();
    assert!(named[0].contains("backend 10.0.0.1 left out") && named[1].contains("10.0.0.5"), "{named:?}");

    // 10.0.0.2 leaves; its id goes to the first in line.
    lab.discover("web", &[1, 3, 4, 5]).await;
    lab.daemon.handle(Event::Tick).await;
    assert_eq!(lab.table(), [ip(1), ip(3), ip(4)]);
    assert_eq!(short(&lab).backends_left_out, 1);

    // Counted in full, named up to a bound.
    let many: Vec<u8> = (1..=200).collect();
    lab.discover("web", &many).await;
    let s = short(&lab);
    assert_eq!((s.backends_left_out, s.named.len()), (197, Shortfalls::NAMED));
    assert!(lab.daemon.sync.describe().ends_with("; and 187 more"), "{}", lab.daemon.sync.describe());
}

#[tokio::test]
async fn new_etcd_settings_start_only_etcd_over() {
    let api = "[[vip]]\nname = \"api\"\naddress = \"192.0.2.20\"\nport = 80\nprotocol = \"tcp\"\netcd = { prefix = \"/api/\" }\n";
    let config = |endpoint: &str| format!("{CONSUL_WEB}{api}\n[etcd]\nendpoints = [\"{endpoint}\"]\n");
    let mut lab = Lab::new(&config("10.0.0.5:2379")).await;
    lab.discover("web", &[1, 2]).await;
    let web = Source::Consul(ServiceQuery { service: "web".into(), tag: None });
    let (consul, etcd) =
        (lab.daemon.watchers.epoch(SourceKind::Consul), lab.daemon.watchers.epoch(SourceKind::Etcd));
    lab.reload(&config("10.0.0.6:2379")).await;
    assert_eq!(lab.daemon.watchers.epoch(SourceKind::Consul), consul, "Consul's watchers go on");
    assert!(lab.daemon.watchers.epoch(SourceKind::Etcd) > etcd, "etcd's start over");
    assert!(
        lab.daemon.discovery.view(&web).and_then(|v| v.instances.as_ref()).is_some(),
        "Consul's answer stands"
    );
    assert_eq!(lab.table(), [ip(1), ip(2)]);
}

#[tokio::test]
async fn the_table_changes_while_the_state_file_cannot_be_written() {
    let dir = std::env::temp_dir().join(format!("xlb-daemon-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The writer's temporary file is a FIFO nobody reads: opening it
    // blocks the writer until a reader comes.
    let fifo = RunFiles::in_dir(&dir, "eth0").state().with_extension("json.tmp");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut lab = Lab::in_dir(dir, CONSUL_WEB).await;
    for backends in [&[1, 2][..], &[2], &[2, 3, 4]] {
        let started = std::time::Instant::now();
        lab.discover("web", backends).await;
        assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
        assert_eq!(lab.table(), backends.iter().map(|b| ip(*b)).collect::<Vec<_>>());
    }
    assert!(!RunFiles::in_dir(&lab.dir, "eth0").state().exists(), "the writer is still stuck");
    // Let the stuck write through: then the newest status is written, not
    // every one offered meanwhile.
    let reader = std::thread::spawn(move || std::fs::read(fifo).unwrap());
    lab.daemon.publisher.finish();
    reader.join().unwrap();
    let state = std::fs::read(RunFiles::in_dir(&lab.dir, "eth0").state()).unwrap();
    let written: crate::observe::status::Status = serde_json::from_slice(&state).unwrap();
    assert_eq!(written.vips[0].backends.len(), 3, "the latest status");
}

const TABLE: u32 = 200;

fn announcing(head: &str, backends: &[u8]) -> String {
    config(&format!("{head}\n[announce]\ntable = {TABLE}\nwithdraw_wait = 0\n"), backends).replacen(
        "\n[announce]",
        "\n\n[announce]",
        1,
    )
}

impl Lab {
    /// The addresses xlb routes in the announce table.
    fn announced(&self) -> Vec<IpAddr> {
        let routes = &self.daemon.host.routes;
        routes.iter().filter(|((t, _), p)| *t == TABLE && **p == RTPROT_XLB).map(|((_, ip), _)| *ip).collect()
    }

    fn announcement(&self, vip: &str) -> String {
        let status = self.published();
        status.vip(vip).and_then(|v| v.announce).map(|a| a.to_string()).unwrap_or_default()
    }
}

fn web_ip() -> IpAddr {
    IpAddr::from([192, 0, 2, 10])
}

#[tokio::test]
async fn a_vip_is_announced_while_it_has_a_backend() {
    let mut lab = Lab::new(&announcing("", &[1, 2])).await;
    assert_eq!(lab.announced(), [web_ip()]);
    assert_eq!(lab.announcement("web"), "announced");

    lab.reload(&announcing("", &[])).await;
    assert!(lab.announced().is_empty(), "no backend: withdrawn");
    assert_eq!(lab.announcement("web"), "withdrawn: no usable backend");
    lab.reload(&announcing("", &[2])).await;
    assert_eq!(lab.announced(), [web_ip()], "a backend is back: announced again");

    // Draining the last active backend withdraws too.
    assert_eq!(lab.command("web", [10, 0, 0, 2], Change::Drain).await, Ok(()));
    assert!(lab.announced().is_empty());
    assert_eq!(lab.command("web", [10, 0, 0, 2], Change::Undrain).await, Ok(()));
    assert_eq!(lab.announced(), [web_ip()]);
}

#[tokio::test]
async fn maintenance_withdraws_everything_and_outlives_a_restart() {
    let text = announcing("", &[1]);
    let mut lab = Lab::new(&text).await;
    let (reply, answer) = oneshot::channel();
    lab.daemon.handle(Event::Api(Command { action: Action::Announce { on: false }, reply })).await;
    assert_eq!(answer.await.unwrap(), Ok(()));
    assert!(lab.announced().is_empty());
    assert_eq!(lab.announcement("web"), "withdrawn: maintenance (xlb announce off)");

    // A restart (same run directory) keeps it off.
    let dir = std::mem::take(&mut lab.dir);
    drop(lab);
    let mut lab = Lab::in_dir(dir, &text).await;
    assert!(lab.announced().is_empty(), "still in maintenance after a restart");
    let (reply, answer) = oneshot::channel();
    lab.daemon.handle(Event::Api(Command { action: Action::Announce { on: true }, reply })).await;
    assert_eq!(answer.await.unwrap(), Ok(()));
    assert_eq!(lab.announced(), [web_ip()]);
}

#[tokio::test]
async fn a_graceful_stop_withdraws_first() {
    let mut lab = Lab::new(&announcing("", &[1])).await;
    assert_eq!(lab.announced(), [web_ip()]);
    assert_eq!(lab.daemon.withdraw_for_stop().await, Some(Duration::ZERO));
    assert!(lab.announced().is_empty());
    assert_eq!(lab.announcement("web"), "withdrawn: the daemon is stopping");
}

#[tokio::test]
async fn a_route_someone_else_put_there_is_left_alone_and_bird_being_down_changes_nothing() {
    let dir = std::env::temp_dir().join(format!("xlb-daemon-foreign-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let host = FakeHost { routes: BTreeMap::from([((TABLE, web_ip()), 4)]), ..FakeHost::default() };
    let mut lab = Lab::with_host(dir, &announcing("", &[1]), host).await;
    lab.daemon.handle(Event::Bird(Err("cannot reach BIRD at /run/bird/bird.ctl".into()))).await;
    assert_eq!(lab.daemon.host.routes[&(TABLE, web_ip())], 4, "not replaced");
    assert!(lab.announcement("web").contains("did not add (proto 4)"), "{}", lab.announcement("web"));
    lab.reload(&announcing("", &[])).await;
    assert_eq!(lab.daemon.host.routes[&(TABLE, web_ip())], 4, "nor withdrawn");
    let announce = lab.published().announce.clone().unwrap();
    assert!(announce.bird.error.unwrap().contains("cannot reach BIRD"));
}

#[tokio::test]
async fn birds_sessions_are_shown() {
    let dir = std::env::temp_dir().join(format!("xlb-daemon-bird-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let up = bird::Protocol {
        name: "up4".into(),
        proto: "BGP".into(),
        state: "up".into(),
        info: "Established".into(),
    };
    let mut lab = Lab::in_dir(dir, &announcing("", &[1])).await;
    lab.daemon.handle(Event::Bird(Ok(vec![up.clone()]))).await;
    let announce = lab.published().announce.clone().unwrap();
    assert_eq!((announce.table, announce.bird.error, announce.bird.protocols), (TABLE, None, vec![up]));
}

#[tokio::test]
async fn routes_a_previous_run_left_for_gone_vips_are_withdrawn_and_shared_addresses_stay() {
    let dir = std::env::temp_dir().join(format!("xlb-daemon-leftover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gone = IpAddr::from([192, 0, 2, 99]);
    let host = FakeHost { routes: BTreeMap::from([((TABLE, gone), RTPROT_XLB)]), ..FakeHost::default() };
    let dns =
        "[[vip]]\nname = \"dns\"\naddress = \"192.0.2.10\"\nport = 53\nprotocol = \"udp\"\nbackends = []\n";
    let mut lab = Lab::with_host(dir, &format!("{}{dns}", announcing("", &[1])), host).await;
    assert_eq!(lab.announced(), [web_ip()], "the leftover is withdrawn, web's address announced");
    assert!(lab.announcement("dns").starts_with("announced for another VIP"), "{}", lab.announcement("dns"));
    lab.reload(&format!("{}{dns}", announcing("", &[]))).await;
    assert!(lab.announced().is_empty(), "neither can serve: withdrawn");
}

#[tokio::test]
async fn a_short_write_failure_holds_the_announcements() {
    let mut lab = Lab::new(&announcing("", &[1])).await;
    lab.daemon.maps.store_mut().fail_writes = true;
    lab.reload(&announcing("", &[1, 2])).await;
    assert!(matches!(lab.daemon.sync, Sync::Retrying { .. }));
    assert_eq!(lab.announced(), [web_ip()], "held through a failure shorter than the grace");
    lab.daemon.retrying_since = Some(std::time::Instant::now() - announce::RETRY_GRACE);
    lab.daemon.handle(Event::Tick).await;
    assert!(lab.announced().is_empty(), "a lasting failure withdraws");
    lab.daemon.maps.store_mut().fail_writes = false;
    lab.daemon.handle(Event::Tick).await;
    assert_eq!(lab.announced(), [web_ip()]);
}

#[tokio::test]
async fn a_tun_next_hop_follows_the_kernels_changes_and_falls_back_to_the_fib() {
    let old = NextHop { mac: [2, 0xee, 0, 0, 0, 1], mtu: 1500 };
    let host = FakeHost { hop: Some(old), ..FakeHost::default() };
    let dir = std::env::temp_dir().join(format!("xlb-daemon-hop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = config("", &[1]).replace("protocol = \"tcp\"", "protocol = \"tcp\"\nforward = \"tun\"");
    let mut lab = Lab::with_host(dir, &text, host).await;
    let entry = |lab: &Lab| {
        let state = &lab.daemon.reconciler.vips()[&web()].backends[&ip(1)];
        lab.daemon.maps.store().backends[&state.id]
    };
    let written = entry(&lab);
    assert_eq!(written.flags, BACKEND_ACTIVE | BACKEND_TUN | BACKEND_HOP);
    assert_eq!((written.mac, written.mtu), (old.mac, old.mtu));

    // A route change moves the hop: looked up again and rewritten.
    let new = NextHop { mac: [2, 0xee, 0, 0, 0, 2], mtu: 1400 };
    lab.daemon.host.hop = Some(new);
    lab.daemon.handle(Event::Net(Changes { routes: true, neighbours: false })).await;
    assert_eq!(lab.daemon.host.route_changes, 1);
    let written = entry(&lab);
    assert_eq!((written.mac, written.mtu, written.flags & BACKEND_HOP), (new.mac, new.mtu, BACKEND_HOP));
    let published = lab.published();
    let shown = published.vips[0].backends[0].next_hop.clone();
    assert_eq!(shown, Some(HopStatus { mac: "02:ee:00:00:00:02".into(), mtu: 1400 }));

    // The route is gone: the entry stays in use, and the packet path asks
    // the FIB (which counts tun_no_route while there is none).
    lab.daemon.host.hop = None;
    lab.daemon.handle(Event::Net(Changes { routes: true, neighbours: false })).await;
    assert_eq!(entry(&lab).flags, BACKEND_ACTIVE | BACKEND_TUN);
    assert_eq!(lab.published().vips[0].backends[0].next_hop, None);
    assert_eq!(lab.table(), [ip(1)], "still the backend");
}
