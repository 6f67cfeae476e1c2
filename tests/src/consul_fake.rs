//! A fake Consul agent: the slice of Consul's HTTP API that xlb's Consul
//! client uses, and the agent endpoints that register and heal services,
//! served over real HTTP on its own tokio runtime.
//!
//! What it follows from Consul's documentation:
//! - `PUT /v1/agent/service/register`: `Name` (required), `ID` (default the
//!   name), `Address`, `Port`, `Tags`, `Meta`, `Weights` (default
//!   `{"Passing": 1, "Warning": 1}`), `Check` / `Checks`. Keys match without
//!   regard to case or underscores (Consul takes camel and snake case).
//!   Check ids default to `service:<ID>`, with `:1`, `:2`… when there are
//!   several; names to `Service '<Name>' check`; the initial status is
//!   `critical` unless `Status` says otherwise. A check that already
//!   exists keeps its status and output on re-registration, so that
//!   registering again does not flap health (an assumption about the agent:
//!   the HTTP docs do not say). `?replace-existing-checks`
//!   removes the service's checks that the registration leaves out.
//!   Checks are TTL checks: a `TTL` turns the check critical
//!   ("TTL expired") when no update comes in time; checks of other kinds
//!   are accepted and keep the status they are given.
//! - `PUT /v1/agent/service/deregister/<id>`: removes the service and its
//!   checks; an unknown id is no error.
//! - `PUT /v1/agent/check/{pass,warn,fail}/<id>?note=` and
//!   `PUT /v1/agent/check/update/<id>` (`{"Status", "Output"}`): the note
//!   becomes the check's `Output`.
//! - `GET /v1/health/service/<name>` with `passing` (every check passing,
//!   node checks included), `tag` (repeatable, all must match, case
//!   insensitive), `dc` (another datacenter: 500 "No path to datacenter"),
//!   and blocking queries: with `index` > 0 the request is held until the
//!   service's index passes it or `wait` (default 5 minutes, at most 10)
//!   plus up to wait/16 of jitter runs out (an answer for that carries the
//!   index it was held on). `X-Consul-Index` is the raft index
//!   of the last write that changed the service's result — a write that
//!   changes nothing (a TTL pass on a passing check, an identical
//!   re-registration) moves no index and wakes no query. A service that
//!   does not exist answers `[]` with the index of the last registration
//!   or deregistration of any service.
//! - Every entry carries the node check `serfHealth`, passing unless
//!   [`FakeConsul::set_node_health`] says otherwise. A service registered
//!   without `Address` has `Service.Address` `""` and the agent's node
//!   address as `Node.Address` ([`Builder::node`]; a dev agent's is
//!   127.0.0.1, the default here).
//! - ACLs, when built with a token: a request with another token gets 403
//!   "ACL not found"; without a token (the anonymous token, default deny),
//!   writes get 403 "Permission denied: …", and health reads answer `[]`
//!   with `X-Consul-Results-Filtered-By-ACLs: true`, as Consul filters
//!   reads rather than refusing them. The token may come as
//!   `X-Consul-Token`, `Authorization: Bearer`, or `?token=`.
//!
//! Test knobs: [`FakeConsul::reset_index`] (a snapshot restore: indexes go
//! back and held queries return), [`FakeConsul::set_down`] (stop
//! listening, so connections are refused; back up on the same port),
//! [`FakeConsul::set_blocking`] (answer blocking queries at once, like a
//! misbehaving server), [`FakeConsul::set_error`] (answer health queries
//! with an error status), [`Builder::streaming_tag_bug`] (tag-filtered
//! blocking queries answer as a buggy streaming agent does), and a log of
//! requests.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    hash::{BuildHasher, RandomState},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinSet, time::Instant};

const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Raft index of the fake's first write (a real cluster has a few behind it).
const FIRST_INDEX: u64 = 10;

/// Check status, as Consul spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckStatus {
    Passing,
    Warning,
    Critical,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Passing => "passing",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
        }
    }

    fn parse(s: &str) -> Option<CheckStatus> {
        match s {
            "passing" => Some(CheckStatus::Passing),
            "warning" => Some(CheckStatus::Warning),
            "critical" => Some(CheckStatus::Critical),
            _ => None,
        }
    }
}

/// One HTTP request the fake answered (or refused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Decoded query parameters, in order (`?passing` is `("passing", "")`).
    pub query: Vec<(String, String)>,
    pub token: Option<String>,
}

impl RecordedRequest {
    /// The value of query parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// How to start a [`FakeConsul`].
#[derive(Clone, Debug)]
pub struct Builder {
    bind: SocketAddr,
    node: String,
    node_address: String,
    datacenter: String,
    acl_token: Option<String>,
    streaming_tag_bug: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            node: "fake-node".into(),
            node_address: "127.0.0.1".into(),
            datacenter: "dc1".into(),
            acl_token: None,
            streaming_tag_bug: false,
        }
    }
}

impl Builder {
    /// Address to listen on (default 127.0.0.1, any port); e.g. an address
    /// reachable from a network namespace.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// The agent's node: its name and `Node.Address` (default
    /// `fake-node`, 127.0.0.1).
    pub fn node(mut self, name: &str, address: &str) -> Self {
        self.node = name.into();
        self.node_address = address.into();
        self
    }

    pub fn datacenter(mut self, name: &str) -> Self {
        self.datacenter = name.into();
        self
    }

    /// Turns ACLs on (default deny) with `token` as the one valid token.
    pub fn acl_token(mut self, token: &str) -> Self {
        self.acl_token = Some(token.into());
        self
    }

    /// Answers tag-filtered blocking queries as the streaming backend of
    /// agents before Consul 1.10.11, 1.11.6 and 1.12.1 does (Consul PR
    /// 12640): from a view of the service for those tags, made by the
    /// first such query, that takes in every instance matching them but
    /// never lets go of one that stops matching; it keeps answering it as
    /// it last matched until it is deregistered. Plain reads (no `index`)
    /// are answered correctly, as the agent forwards them to the servers.
    pub fn streaming_tag_bug(mut self) -> Self {
        self.streaming_tag_bug = true;
        self
    }

    pub fn start(self) -> std::io::Result<FakeConsul> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-consul")
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind(self.bind)?;
        let addr = listener.local_addr()?;
        let (changed, _) = watch::channel(0);
        let mut state = State {
            node: self.node,
            node_address: self.node_address,
            datacenter: self.datacenter,
            acl_token: self.acl_token,
            streaming_tag_bug: self.streaming_tag_bug,
            views: HashMap::new(),
            raft_index: FIRST_INDEX,
            catalog_index: FIRST_INDEX,
            service_index: HashMap::new(),
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            restores: 0,
            blocking: true,
            error: None,
            requests: Vec::new(),
        };
        state.checks.insert(
            "serfHealth".into(),
            Check {
                id: "serfHealth".into(),
                name: "Serf Health Status".into(),
                service_id: String::new(),
                status: CheckStatus::Passing,
                output: "Agent alive and reachable".into(),
                notes: String::new(),
                ttl: None,
                expires_at: None,
                create_index: FIRST_INDEX,
                modify_index: FIRST_INDEX,
            },
        );
        let shared = Arc::new(Shared { state: Mutex::new(state), changed });
        let server = Server::start(&runtime, listener, shared.clone())?;
        runtime.spawn(expire_ttls(shared.clone()));
        Ok(FakeConsul { addr, shared, runtime: Some(runtime), server: Mutex::new(Some(server)) })
    }
}

/// The fake agent; stops on drop.
pub struct FakeConsul {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    server: Mutex<Option<Server>>,
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        // Not a blocking shutdown: the fake may be dropped inside a test's
        // own runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl FakeConsul {
    /// A fake on 127.0.0.1 (any port) with default settings.
    pub fn start() -> FakeConsul {
        Self::builder().start().expect("start the fake Consul")
    }

    pub fn builder() -> Builder {
        Builder::default()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for `ConsulSettings::address`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers a service as `PUT /v1/agent/service/register` does (no ACL
    /// check). Panics on a registration Consul would refuse.
    pub fn register(&self, registration: Value) {
        let mut state = self.shared.lock();
        match state.register(&registration, false) {
            Ok(touched) => self.shared.commit(&mut state, &touched),
            Err((status, message)) => panic!("registration refused ({status}): {message}"),
        }
    }

    pub fn deregister(&self, service_id: &str) {
        let mut state = self.shared.lock();
        let touched = state.deregister(service_id);
        self.shared.commit(&mut state, &touched);
    }

    pub fn pass(&self, check_id: &str) {
        self.set_check(check_id, CheckStatus::Passing, "");
    }

    pub fn warn(&self, check_id: &str) {
        self.set_check(check_id, CheckStatus::Warning, "");
    }

    pub fn fail(&self, check_id: &str) {
        self.set_check(check_id, CheckStatus::Critical, "");
    }

    /// Sets a check's status and output, as the TTL endpoints do. Panics on
    /// an unknown check.
    pub fn set_check(&self, check_id: &str, status: CheckStatus, output: &str) {
        let mut state = self.shared.lock();
        match state.update_check(check_id, status, output) {
            Ok(touched) => self.shared.commit(&mut state, &touched),
            Err((_, message)) => panic!("{message}"),
        }
    }

    /// The status of the node check `serfHealth`, which every entry carries.
    pub fn set_node_health(&self, status: CheckStatus) {
        self.set_check("serfHealth", status, "");
    }

    /// The `X-Consul-Index` a health query for `service` gets now.
    pub fn service_index(&self, service: &str) -> u64 {
        self.shared.lock().index_of(service)
    }

    /// A snapshot restore: every index goes back to a low value (the data
    /// stays), and held blocking queries return at once with it.
    pub fn reset_index(&self) {
        let mut state = self.shared.lock();
        state.raft_index = 2;
        state.catalog_index = 2;
        for index in state.service_index.values_mut() {
            *index = 2;
        }
        state.restores += 1;
        // The agent's streams start over from a new snapshot.
        state.views.clear();
        self.shared.notify();
    }

    /// Down: stop listening (connections are refused) and cut the open
    /// ones. Up: listen again on the same address.
    pub fn set_down(&self, down: bool) {
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        match (down, server.take()) {
            (true, Some(running)) => running.stop(),
            (false, None) => {
                let runtime = self.runtime.as_ref().expect("runtime lives until drop");
                *server = Some(Server::rebind(runtime, self.addr, self.shared.clone()));
            }
            (_, current) => *server = current,
        }
    }

    /// With `false`, blocking queries are answered at once, like a server
    /// whose index churns (or a buggy one).
    pub fn set_blocking(&self, blocking: bool) {
        let mut state = self.shared.lock();
        state.blocking = blocking;
        self.shared.notify();
    }

    /// Health queries answer with this status (and a Consul-like message)
    /// until set back to `None`.
    pub fn set_error(&self, status: Option<u16>) {
        self.shared.lock().error = status.map(|s| StatusCode::from_u16(s).expect("a valid HTTP status"));
    }

    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }
}

struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    stopped: std::sync::mpsc::Receiver<()>,
}

impl Server {
    fn start(
        runtime: &tokio::runtime::Runtime,
        listener: std::net::TcpListener,
        shared: Arc<Shared>,
    ) -> std::io::Result<Server> {
        listener.set_nonblocking(true)?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("register the listener");
            serve(listener, shared, stop_rx).await;
            let _ = stopped_tx.send(());
        });
        Ok(Server { stop, stopped })
    }

    fn rebind(runtime: &tokio::runtime::Runtime, addr: SocketAddr, shared: Arc<Shared>) -> Server {
        // The old socket is closed; std sets SO_REUSEADDR, so connections in
        // TIME_WAIT do not hold the port. Retry briefly all the same.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match std::net::TcpListener::bind(addr) {
                Ok(listener) => return Server::start(runtime, listener, shared).expect("serve again"),
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("fake consul: rebinding {addr}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("fake consul: cannot listen on {addr} again: {e}"),
            }
        }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        // Once this returns the listener is closed and every connection cut.
        let _ = self.stopped.recv_timeout(Duration::from_secs(5));
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| handle(shared.clone(), request));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Turns checks with an expired TTL critical, as the agent does.
async fn expire_ttls(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut state = shared.lock();
        let now = Instant::now();
        let expired: Vec<String> = state
            .checks
            .values()
            .filter(|c| c.expires_at.is_some_and(|at| at <= now))
            .map(|c| c.id.clone())
            .collect();
        let mut touched = Vec::new();
        for id in expired {
            if let Some(check) = state.checks.get_mut(&id) {
                check.expires_at = None;
            }
            if let Ok(names) = state.set_status(&id, CheckStatus::Critical, "TTL expired") {
                touched.extend(names);
            }
        }
        if !touched.is_empty() {
            shared.commit(&mut state, &touched);
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change; held queries wait on it.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a write that changed the results of services `touched`: one
    /// new raft index, theirs now.
    fn commit(&self, state: &mut State, touched: &[String]) {
        if touched.is_empty() {
            return;
        }
        state.raft_index += 1;
        let index = state.raft_index;
        for name in touched {
            state.service_index.insert(name.clone(), index);
        }
        state.refresh_views();
        self.notify();
    }

    fn notify(&self) {
        self.changed.send_modify(|version| *version = version.wrapping_add(1));
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Service {
    id: String,
    name: String,
    tags: Vec<String>,
    address: String,
    port: i64,
    meta: BTreeMap<String, String>,
    weights: (i64, i64),
    /// `TaggedAddresses` as registered (name → {Address, Port}).
    tagged: BTreeMap<String, Value>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Clone, Debug)]
struct Check {
    id: String,
    name: String,
    /// Empty for a node check.
    service_id: String,
    status: CheckStatus,
    output: String,
    notes: String,
    ttl: Option<Duration>,
    expires_at: Option<Instant>,
    create_index: u64,
    modify_index: u64,
}

impl Check {
    /// What a registration compares: everything but timers and indexes.
    fn same_definition(&self, other: &Check) -> bool {
        (&self.name, &self.service_id, self.status, &self.output, &self.notes, self.ttl)
            == (&other.name, &other.service_id, other.status, &other.output, &other.notes, other.ttl)
    }
}

type ApiError = (StatusCode, String);

struct State {
    node: String,
    node_address: String,
    datacenter: String,
    acl_token: Option<String>,
    streaming_tag_bug: bool,
    /// With `streaming_tag_bug`: per service and tags, the view's entries
    /// by service id.
    views: HashMap<(String, Vec<String>), BTreeMap<String, Value>>,
    raft_index: u64,
    /// Index of the last registration or deregistration of any service.
    catalog_index: u64,
    /// Per service name: index of the last write that changed its result.
    service_index: HashMap<String, u64>,
    services: BTreeMap<String, Service>,
    checks: BTreeMap<String, Check>,
    restores: u64,
    blocking: bool,
    error: Option<StatusCode>,
    requests: Vec<RecordedRequest>,
}

impl State {
    fn index_of(&self, service: &str) -> u64 {
        self.service_index.get(service).copied().unwrap_or(self.catalog_index).max(1)
    }

    fn service_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.services.values().map(|s| s.name.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Services whose results change when check `check` changes.
    fn touched_by(&self, check: &Check) -> Vec<String> {
        if check.service_id.is_empty() {
            self.service_names()
        } else {
            self.services.get(&check.service_id).map(|s| vec![s.name.clone()]).unwrap_or_default()
        }
    }

    fn register(&mut self, body: &Value, replace_existing_checks: bool) -> Result<Vec<String>, ApiError> {
        let bad = |message: String| (StatusCode::BAD_REQUEST, message);
        let Some(object) = body.as_object() else {
            return Err(bad("Request decode failed: expected a JSON object".into()));
        };
        let name = string_field(object, "Name")?.unwrap_or_default();
        if name.is_empty() {
            return Err(bad("Missing service name".into()));
        }
        let id = string_field(object, "ID")?.filter(|id| !id.is_empty()).unwrap_or_else(|| name.clone());
        let tags = match field(object, "Tags") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|t| t.as_str().map(str::to_owned).ok_or_else(|| bad("Tags must be strings".into())))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("Tags must be an array".into())),
        };
        let meta = match field(object, "Meta") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v.as_str() {
                    Some(v) => Ok((k.clone(), v.to_owned())),
                    None => Err(bad(format!("Meta value for key {k:?} must be a string"))),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("Meta must be an object".into())),
        };
        let weights = match field(object, "Weights") {
            None | Some(Value::Null) => (1, 1),
            Some(Value::Object(w)) => {
                (int_field(w, "Passing")?.unwrap_or(1), int_field(w, "Warning")?.unwrap_or(1))
            }
            Some(_) => return Err(bad("Weights must be an object".into())),
        };
        let tagged = match field(object, "TaggedAddresses") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Some(_) => return Err(bad("TaggedAddresses must be an object".into())),
        };
        let mut definitions = Vec::new();
        match field(object, "Check") {
            None | Some(Value::Null) => {}
            Some(Value::Object(check)) => definitions.push(check),
            Some(_) => return Err(bad("Check must be an object".into())),
        }
        match field(object, "Checks") {
            None | Some(Value::Null) => {}
            Some(Value::Array(checks)) => {
                for check in checks {
                    definitions.push(check.as_object().ok_or_else(|| bad("Checks must be objects".into()))?);
                }
            }
            Some(_) => return Err(bad("Checks must be an array".into())),
        }

        let previous = self.services.get(&id).cloned();
        let is_new = previous.is_none();
        let index = self.raft_index + 1;
        let service = Service {
            id: id.clone(),
            name: name.clone(),
            tags,
            address: string_field(object, "Address")?.unwrap_or_default(),
            port: int_field(object, "Port")?.unwrap_or(0),
            meta,
            weights,
            tagged,
            create_index: previous.as_ref().map_or(index, |p| p.create_index),
            modify_index: index,
        };

        let several = definitions.len() > 1;
        let mut checks = Vec::new();
        for (i, definition) in definitions.into_iter().enumerate() {
            let generated = if several { format!("service:{id}:{}", i + 1) } else { format!("service:{id}") };
            let check_id = match string_field(definition, "CheckID")? {
                Some(c) if !c.is_empty() => c,
                _ => string_field(definition, "ID")?.filter(|c| !c.is_empty()).unwrap_or(generated),
            };
            let status = match string_field(definition, "Status")? {
                None => CheckStatus::Critical,
                Some(s) if s.is_empty() => CheckStatus::Critical,
                Some(s) => {
                    CheckStatus::parse(&s).ok_or_else(|| bad(format!("Invalid check status: {s:?}")))?
                }
            };
            let ttl = match string_field(definition, "TTL")? {
                Some(t) if !t.is_empty() => {
                    Some(parse_go_duration(&t).ok_or_else(|| bad(format!("Invalid TTL {t:?}")))?)
                }
                _ => None,
            };
            let mut check = Check {
                id: check_id.clone(),
                name: string_field(definition, "Name")?
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| format!("Service '{name}' check")),
                service_id: id.clone(),
                status,
                output: String::new(),
                notes: string_field(definition, "Notes")?.unwrap_or_default(),
                ttl,
                expires_at: ttl.map(|t| Instant::now() + t),
                create_index: index,
                modify_index: index,
            };
            if let Some(existing) = self.checks.get(&check_id) {
                check.status = existing.status;
                check.output = existing.output.clone();
                check.create_index = existing.create_index;
            }
            checks.push(check);
        }

        let mut changed = previous.as_ref().is_none_or(|p| {
            let mut p = p.clone();
            p.modify_index = service.modify_index;
            p != service
        });
        let removed: Vec<String> = if replace_existing_checks {
            self.checks
                .values()
                .filter(|c| c.service_id == id && !checks.iter().any(|n| n.id == c.id))
                .map(|c| c.id.clone())
                .collect()
        } else {
            Vec::new()
        };
        for check_id in &removed {
            self.checks.remove(check_id);
            changed = true;
        }
        for check in checks {
            match self.checks.get_mut(&check.id) {
                Some(existing) if existing.same_definition(&check) => existing.expires_at = check.expires_at,
                _ => {
                    changed = true;
                    self.checks.insert(check.id.clone(), check);
                }
            }
        }
        if !changed {
            return Ok(Vec::new());
        }
        let mut touched = vec![name];
        if let Some(previous) = previous.filter(|p| p.name != service.name) {
            touched.push(previous.name);
        }
        if is_new || touched.len() > 1 {
            self.catalog_index = index;
        }
        self.services.insert(id, service);
        Ok(touched)
    }

    fn deregister(&mut self, service_id: &str) -> Vec<String> {
        let Some(service) = self.services.remove(service_id) else {
            return Vec::new();
        };
        self.checks.retain(|_, c| c.service_id != service_id);
        self.catalog_index = self.raft_index + 1;
        vec![service.name]
    }

    fn update_check(
        &mut self,
        check_id: &str,
        status: CheckStatus,
        output: &str,
    ) -> Result<Vec<String>, ApiError> {
        let Some(check) = self.checks.get_mut(check_id) else {
            return Err((StatusCode::NOT_FOUND, format!("Unknown check ID {check_id:?}")));
        };
        if let Some(ttl) = check.ttl {
            check.expires_at = Some(Instant::now() + ttl);
        }
        self.set_status(check_id, status, output)
    }

    /// Changes a check; the services whose result changed (none when the
    /// status and output were already these).
    fn set_status(
        &mut self,
        check_id: &str,
        status: CheckStatus,
        output: &str,
    ) -> Result<Vec<String>, ApiError> {
        let index = self.raft_index + 1;
        let Some(check) = self.checks.get_mut(check_id) else {
            return Err((StatusCode::NOT_FOUND, format!("Unknown check ID {check_id:?}")));
        };
        if check.status == status && check.output == output {
            return Ok(Vec::new());
        }
        check.status = status;
        check.output = output.to_owned();
        check.modify_index = index;
        let check = check.clone();
        Ok(self.touched_by(&check))
    }

    /// The health entries of `service`, before ACL filtering.
    fn entries(&self, service: &str, tags: &[String], passing: bool) -> Vec<Value> {
        let node_checks: Vec<&Check> = self.checks.values().filter(|c| c.service_id.is_empty()).collect();
        let mut entries = Vec::new();
        for s in self.services.values().filter(|s| s.name == service) {
            if !tags.iter().all(|want| s.tags.iter().any(|t| t.to_lowercase() == want.to_lowercase())) {
                continue;
            }
            let checks: Vec<&Check> = node_checks
                .iter()
                .copied()
                .chain(self.checks.values().filter(|c| c.service_id == s.id))
                .collect();
            if passing && checks.iter().any(|c| c.status != CheckStatus::Passing) {
                continue;
            }
            entries.push(self.entry(s, &checks));
        }
        entries
    }

    /// The view for `service` and `tags` with the streaming tag bug (see
    /// [`Builder::streaming_tag_bug`]), made now if it does not exist.
    fn view(&mut self, service: &str, tags: &[String]) -> &BTreeMap<String, Value> {
        let key = (service.to_owned(), tags.to_vec());
        if !self.views.contains_key(&key) {
            self.views.insert(key.clone(), BTreeMap::new());
            self.refresh_view(&key);
        }
        &self.views[&key]
    }

    /// Takes a write into every view, as the agent's streams do.
    fn refresh_views(&mut self) {
        let keys: Vec<_> = self.views.keys().cloned().collect();
        for key in keys {
            self.refresh_view(&key);
        }
    }

    /// The bug: an instance that no longer matches is not dropped, only
    /// one that is gone.
    fn refresh_view(&mut self, key: &(String, Vec<String>)) {
        let (service, tags) = key;
        let matching = self.entries(service, tags, false);
        let services = &self.services;
        let Some(view) = self.views.get_mut(key) else { return };
        view.retain(|id, _| services.get(id).is_some_and(|s| &s.name == service));
        for entry in matching {
            let id = entry["Service"]["ID"].as_str().unwrap_or_default().to_owned();
            view.insert(id, entry);
        }
    }

    fn entry(&self, s: &Service, checks: &[&Check]) -> Value {
        let checks: Vec<Value> = checks
            .iter()
            .map(|c| {
                let (service_name, service_tags) = if c.service_id.is_empty() {
                    (String::new(), Vec::new())
                } else {
                    (s.name.clone(), s.tags.clone())
                };
                json!({
                    "Node": self.node,
                    "CheckID": c.id,
                    "Name": c.name,
                    "Status": c.status.as_str(),
                    "Notes": c.notes,
                    "Output": c.output,
                    "ServiceID": c.service_id,
                    "ServiceName": service_name,
                    "ServiceTags": service_tags,
                    "Type": if c.ttl.is_some() { "ttl" } else { "" },
                    "Namespace": "default",
                    "CreateIndex": c.create_index,
                    "ModifyIndex": c.modify_index,
                })
            })
            .collect();
        let mut entry = json!({
            "Node": {
                "ID": "00000000-0000-4000-8000-00000000fa4e",
                "Node": self.node,
                "Address": self.node_address,
                "Datacenter": self.datacenter,
                "TaggedAddresses": { "lan": self.node_address, "wan": self.node_address },
                "Meta": { "consul-network-segment": "" },
                "CreateIndex": FIRST_INDEX,
                "ModifyIndex": FIRST_INDEX,
            },
            "Service": {
                "ID": s.id,
                "Service": s.name,
                "Tags": s.tags,
                "Address": s.address,
                "Meta": s.meta,
                "Port": s.port,
                "Weights": { "Passing": s.weights.0, "Warning": s.weights.1 },
                "EnableTagOverride": false,
                "Namespace": "default",
                "CreateIndex": s.create_index,
                "ModifyIndex": s.modify_index,
            },
            "Checks": checks,
        });
        // Consul leaves the field out when there are none (omitempty).
        if !s.tagged.is_empty() {
            entry["Service"]["TaggedAddresses"] = json!(s.tagged);
        }
        entry
    }
}

/// Whether every check of a health entry passes.
fn all_passing(entry: &Value) -> bool {
    entry["Checks"].as_array().is_some_and(|checks| checks.iter().all(|c| c["Status"] == "passing"))
}

/// A JSON key, matched as Consul's decoder does: case-insensitively, and
/// snake case too.
fn field<'a>(object: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    let folded = |k: &str| k.replace('_', "").to_ascii_lowercase();
    let want = folded(name);
    object.iter().find(|(k, _)| folded(k) == want).map(|(_, v)| v)
}

fn string_field(object: &serde_json::Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match field(object, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err((StatusCode::BAD_REQUEST, format!("Request decode failed: {name} must be a string"))),
    }
}

fn int_field(object: &serde_json::Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    match field(object, name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| {
            (StatusCode::BAD_REQUEST, format!("Request decode failed: {name} must be an integer"))
        }),
    }
}

/// Go's `time.ParseDuration`, for the units Consul users write.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) =
                (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn random_fraction() -> f64 {
    (RandomState::new().hash_one(0_u8) >> 11) as f64 / (1_u64 << 53) as f64
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("Content-Type", "text/plain; charset=utf-8".parse().expect("static header"));
    response
}

fn json_response(value: &Value, index: u64, filtered: bool) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    let headers = response.headers_mut();
    headers.insert("Content-Type", "application/json".parse().expect("static header"));
    headers.insert("X-Consul-Index", index.into());
    headers.insert("X-Consul-Knownleader", "true".parse().expect("static header"));
    headers.insert("X-Consul-Lastcontact", "0".parse().expect("static header"));
    if filtered {
        headers.insert("X-Consul-Results-Filtered-By-Acls", "true".parse().expect("static header"));
    }
    response
}

enum Caller {
    /// ACLs off, or the configured token.
    Allowed,
    Anonymous,
    Unknown,
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query: Vec<(String, String)> = form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let token = header("X-Consul-Token")
        .or_else(|| header("Authorization").and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned)))
        .or_else(|| param("token"))
        .filter(|t| !t.is_empty());
    let caller = {
        let mut state = shared.lock();
        state.requests.push(RecordedRequest {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            token: token.clone(),
        });
        match (&state.acl_token, &token) {
            (None, _) => Caller::Allowed,
            (Some(want), Some(got)) if want == got => Caller::Allowed,
            (Some(_), Some(_)) => Caller::Unknown,
            (Some(_), None) => Caller::Anonymous,
        }
    };
    if matches!(caller, Caller::Unknown) {
        return Ok(text(StatusCode::FORBIDDEN, "ACL not found"));
    }
    let segments: Vec<String> = path.trim_start_matches('/').split('/').map(percent_decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let write = |resource: &str| -> Option<Response<Full<Bytes>>> {
        if method != Method::PUT {
            return Some(text(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} not allowed")));
        }
        matches!(caller, Caller::Anonymous).then(|| {
            text(
                StatusCode::FORBIDDEN,
                format!(
                    "Permission denied: anonymous token lacks permission '{resource}'. The anonymous token \
                     is used implicitly when a request does not specify a token."
                ),
            )
        })
    };
    let response = match segments.as_slice() {
        ["v1", "agent", "service", "register"] => {
            if let Some(refused) = write("service:write") {
                return Ok(refused);
            }
            let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            match serde_json::from_slice::<Value>(&body) {
                Err(e) => text(StatusCode::BAD_REQUEST, format!("Request decode failed: {e}")),
                Ok(registration) => {
                    let replace = param("replace-existing-checks").is_some_and(|v| v != "false");
                    let mut state = shared.lock();
                    match state.register(&registration, replace) {
                        Ok(touched) => {
                            shared.commit(&mut state, &touched);
                            text(StatusCode::OK, "")
                        }
                        Err((status, message)) => text(status, message),
                    }
                }
            }
        }
        ["v1", "agent", "service", "deregister", id] => {
            if let Some(refused) = write("service:write") {
                return Ok(refused);
            }
            let mut state = shared.lock();
            let touched = state.deregister(id);
            shared.commit(&mut state, &touched);
            text(StatusCode::OK, "")
        }
        ["v1", "agent", "check", verb @ ("pass" | "warn" | "fail" | "update"), id] => {
            if let Some(refused) = write("service:write") {
                return Ok(refused);
            }
            let (status, output) = if *verb == "update" {
                let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let update: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let object = update.as_object().cloned().unwrap_or_default();
                let status = string_field(&object, "Status").ok().flatten().unwrap_or_default();
                match CheckStatus::parse(&status) {
                    Some(s) => (s, string_field(&object, "Output").ok().flatten().unwrap_or_default()),
                    None => {
                        return Ok(text(
                            StatusCode::BAD_REQUEST,
                            format!("Invalid check status: {status:?}"),
                        ));
                    }
                }
            } else {
                let status = match *verb {
                    "pass" => CheckStatus::Passing,
                    "warn" => CheckStatus::Warning,
                    _ => CheckStatus::Critical,
                };
                (status, param("note").unwrap_or_default())
            };
            let mut state = shared.lock();
            match state.update_check(id, status, &output) {
                Ok(touched) => {
                    shared.commit(&mut state, &touched);
                    text(StatusCode::OK, "")
                }
                Err((status, message)) => text(status, message),
            }
        }
        ["v1", "health", "service", service] => {
            if method != Method::GET {
                return Ok(text(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} not allowed")));
            }
            health(&shared, service, &query, matches!(caller, Caller::Anonymous)).await
        }
        ["v1", "status", "leader"] => json_response(&json!("127.0.0.1:8300"), 0, false),
        _ => text(StatusCode::NOT_FOUND, ""),
    };
    Ok(response)
}

async fn health(
    shared: &Shared,
    service: &str,
    query: &[(String, String)],
    anonymous: bool,
) -> Response<Full<Bytes>> {
    let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let passing =
        param("passing").is_some_and(|v| !matches!(v, "false" | "0" | "f" | "F" | "FALSE" | "False"));
    let tags: Vec<String> = query.iter().filter(|(k, _)| k == "tag").map(|(_, v)| v.clone()).collect();
    let index = match param("index").map(str::parse::<u64>) {
        None => 0,
        Some(Ok(i)) => i,
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid index"),
    };
    let wait = match param("wait").map(parse_go_duration) {
        None => DEFAULT_WAIT,
        Some(Some(w)) if w.is_zero() => DEFAULT_WAIT,
        Some(Some(w)) => w.min(MAX_WAIT),
        Some(None) => return text(StatusCode::BAD_REQUEST, "Invalid wait time"),
    };
    let deadline = Instant::now() + wait + wait.div_f64(16.0).mul_f64(random_fraction());
    let mut changed = shared.changed.subscribe();
    let (restores, from_view) = {
        let mut state = shared.lock();
        let from_view = index > 0 && !tags.is_empty() && state.streaming_tag_bug;
        if from_view {
            // The first blocking query makes the view, from the data now.
            state.view(service, &tags);
        }
        (state.restores, from_view)
    };
    loop {
        {
            let mut state = shared.lock();
            if let Some(status) = state.error {
                return text(status, format!("rpc error making call: fake failure ({})", status.as_u16()));
            }
            if param("dc").is_some_and(|dc| !dc.is_empty() && dc != state.datacenter) {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
            }
            let current = state.index_of(service);
            let hold = index > 0 && current <= index && state.blocking && state.restores == restores;
            if !hold || Instant::now() >= deadline {
                let entries = if from_view {
                    // `passing` filters the view's answer, as the agent does.
                    let view = state.view(service, &tags).values();
                    view.filter(|e| !passing || all_passing(e)).cloned().collect()
                } else {
                    state.entries(service, &tags, passing)
                };
                return if anonymous {
                    json_response(&json!([]), current, !entries.is_empty())
                } else {
                    json_response(&Value::Array(entries), current, false)
                };
            }
        }
        // Any change wakes every held query; each checks its own service.
        let _ = tokio::time::timeout_at(deadline, changed.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("55s"), Some(Duration::from_secs(55)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("10x"), None);
    }

    #[test]
    fn paths_are_percent_decoded() {
        assert_eq!(percent_decode("a%20b%2Fc"), "a b/c");
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn keys_match_like_consul() {
        let body = json!({ "name": "web", "Service_ID": "x", "TTL": "1s" });
        let object = body.as_object().unwrap();
        assert_eq!(field(object, "Name"), Some(&json!("web")));
        assert_eq!(field(object, "ServiceID"), Some(&json!("x")));
        assert_eq!(field(object, "ttl"), Some(&json!("1s")));
    }
}
