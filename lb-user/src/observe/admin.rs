//! The admin HTTP API: metrics, status, health, and drain/undrain/weight
//! changes.
//!
//! Reads answer from the daemon's memory: the [`Status`] it publishes after
//! every change, with counters read from the maps the daemon holds open.
//! Changes are commands to the daemon, answered once they are applied.

use std::{
    convert::Infallible,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::json;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, oneshot, watch},
};

use super::{metrics, status::Status};
use crate::{config::MAX_WEIGHT, control::announce::Switch, dataplane::Counters};

/// A change an operator asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Drain,
    Undrain,
    Weight(u32),
}

#[derive(Debug)]
pub struct Command {
    pub action: Action,
    pub reply: oneshot::Sender<Result<(), ApiError>>,
}

/// What an operator asks the daemon to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Backend {
        vip: String,
        backend: IpAddr,
        change: Change,
    },
    /// `xlb announce on|off`.
    Announce {
        on: bool,
    },
}

/// An HTTP status and a message, sent as `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}

/// A status as the daemon published it: a version that every publication
/// bumps, and the status with its counters left at zero.
pub type Published = (u64, Arc<Status>);

/// What the handlers share with the daemon.
pub struct Api {
    token: Option<String>,
    status: watch::Receiver<Published>,
    counters: Arc<dyn Counters + Send + Sync>,
    commands: mpsc::Sender<Command>,
    /// The last status with counters: for which version, and when read.
    cache: Mutex<Option<(u64, Instant, Arc<Status>)>>,
}

impl Api {
    pub fn new(
        token: Option<String>,
        status: watch::Receiver<Published>,
        counters: Arc<dyn Counters + Send + Sync>,
        commands: mpsc::Sender<Command>,
    ) -> Self {
        Api { token, status, counters, commands, cache: Mutex::new(None) }
    }
}

/// Connections open at once; more wait in the listen backlog. Each lives
/// for one request at most `CONNECTION_DEADLINE`, so idle or slow clients
/// free their slot within seconds.
const MAX_CONNECTIONS: usize = 256;
/// A client that has not sent its request headers by then is cut off.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The whole exchange, body included: a client that trickles a body in
/// does not hold its slot longer.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Request line and headers, at most (hyper's smallest buffer is 8 KiB).
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long counters read for one published status are reused (scrapes
/// from several Prometheus servers, `xlb stats --watch`): counting walks
/// the connection table. A newer status is read at once.
const COUNTERS_TTL: Duration = Duration::from_secs(1);

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Api>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: back off instead of spinning.
                tracing::warn!(error = %e, "admin API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared).await) }
            });
            // One request per connection: scrapes every few seconds gain
            // nothing from keep-alive, and an idle kept-alive connection
            // would hold a slot.
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection).await;
            drop(permit);
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn json_reply(status: StatusCode, value: &impl serde::Serialize) -> Reply {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    reply(status, "application/json", body)
}

fn error(e: ApiError) -> Reply {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_reply(status, &json!({ "error": e.message }))
}

/// Constant-time comparison, so the token cannot be guessed by timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| same(given.trim().as_bytes(), token.as_bytes()))
}

/// Without a token, a browser on the same host must not reach the API
/// through a name that resolves to it (DNS rebinding): the Host header
/// must be an address or "localhost".
fn host_ok(req: &Request<Incoming>) -> bool {
    let Some(host) = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) else { return true };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

/// The live status page: static, so it needs no token (it asks for one
/// and sends it with the API calls it makes).
const PAGE: &str = include_str!("page.html");

async fn handle(req: Request<Incoming>, shared: &Api) -> Reply {
    if req.method() == Method::GET && req.uri().path() == "/" && (shared.token.is_some() || host_ok(&req)) {
        let mut page = reply(StatusCode::OK, "text/html; charset=utf-8", PAGE);
        // Only its own scripts and calls: nothing from elsewhere, no framing.
        page.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            header::HeaderValue::from_static(
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; frame-ancestors 'none'",
            ),
        );
        return page;
    }
    match &shared.token {
        Some(token) if !authorized(&req, token) => {
            let mut r = error(ApiError::new(401, "missing or wrong bearer token"));
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return r;
        }
        None if !host_ok(&req) => return error(ApiError::new(403, "use an IP address or localhost in Host")),
        _ => {}
    }
    // Changes must come as JSON: a cross-site form or "simple" request
    // cannot set that content type without a preflight.
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if matches!(*req.method(), Method::POST | Method::PUT) && !json {
        return error(ApiError::new(415, "send changes with Content-Type: application/json"));
    }
    let path: Vec<String> = req.uri().path().trim_matches('/').split('/').map(str::to_owned).collect();
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    match (req.method().clone(), path.as_slice()) {
        (Method::GET, ["healthz"]) => reply(StatusCode::OK, "text/plain", "ok\n"),
        (Method::GET, ["readyz"]) => {
            let published = shared.status.borrow().1.clone();
            let stopping = published.announce.as_ref().is_some_and(|a| a.switch == Switch::Stopping);
            match published.daemon.as_ref().map(|d| &d.sync) {
                _ if stopping => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: stopping (VIPs withdrawn, waiting for routers)\n",
                ),
                Some(sync) if sync.is_in_sync() => reply(StatusCode::OK, "text/plain", "ready\n"),
                sync => {
                    let why = sync.map_or_else(|| "the daemon has not started".to_owned(), |s| s.describe());
                    reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n"))
                }
            }
        }
        (Method::GET, ["metrics"]) => match read(shared).await {
            Ok(s) => reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics::render(&s)),
            Err(e) => error(e),
        },
        (Method::GET, ["api", "v1", "status"]) => match read(shared).await {
            Ok(s) => json_reply(StatusCode::OK, &*s),
            Err(e) => error(e),
        },
        (Method::GET, ["api", "v1", "vips"]) => match read(shared).await {
            Ok(s) => json_reply(StatusCode::OK, &s.vips),
            Err(e) => error(e),
        },
        (Method::GET, ["api", "v1", "vips", name]) => match read(shared).await {
            Ok(s) => match s.vip(name) {
                Some(v) => json_reply(StatusCode::OK, v),
                None => error(ApiError::new(404, format!("no VIP named {name:?}"))),
            },
            Err(e) => error(e),
        },
        (method, ["api", "v1", "vips", name, "backends", addr, action]) => {
            let change = match (method, *action) {
                (Method::POST, "drain") => Ok(Change::Drain),
                (Method::POST, "undrain") => Ok(Change::Undrain),
                (Method::PUT, "weight") => weight(req).await.map(Change::Weight),
                (_, "drain" | "undrain" | "weight") => {
                    Err(ApiError::new(405, "use POST for drain and undrain, PUT for weight"))
                }
                _ => Err(ApiError::new(404, format!("no action {action:?}"))),
            };
            let backend = addr
                .parse::<IpAddr>()
                .map_err(|_| ApiError::new(400, format!("{addr:?} is not an IP address")));
            match (change, backend) {
                (Ok(change), Ok(backend)) => {
                    match command(shared, Action::Backend { vip: (*name).to_owned(), backend, change }).await
                    {
                        Ok(()) => json_reply(
                            StatusCode::OK,
                            &json!({ "vip": name, "backend": backend.to_string() }),
                        ),
                        Err(e) => error(e),
                    }
                }
                (Err(e), _) | (_, Err(e)) => error(e),
            }
        }
        (Method::POST, ["api", "v1", "announce", switch @ ("on" | "off")]) => {
            let on = *switch == "on";
            match command(shared, Action::Announce { on }).await {
                Ok(()) => {
                    let published = shared.status.borrow().1.clone();
                    let wait = published.announce.as_ref().map(|a| a.withdraw_wait);
                    json_reply(StatusCode::OK, &json!({ "announce": switch, "withdraw_wait": wait }))
                }
                Err(e) => error(e),
            }
        }
        (_, ["api", "v1", "announce", "on" | "off"]) => error(ApiError::new(405, "use POST")),
        _ => error(ApiError::new(404, "no such endpoint; see the README's admin API section")),
    }
}

/// The published status with its counters, counted off the daemon's
/// thread and reused for `COUNTERS_TTL` while no newer status is out.
async fn read(shared: &Api) -> Result<Arc<Status>, ApiError> {
    let (version, published) = shared.status.borrow().clone();
    if let Some((seen, at, s)) = &*shared.cache.lock().unwrap_or_else(|e| e.into_inner())
        && *seen == version
        && at.elapsed() < COUNTERS_TTL
    {
        return Ok(s.clone());
    }
    let started = Instant::now();
    let counters = shared.counters.clone();
    let s = tokio::task::spawn_blocking(move || {
        let mut s = Status::clone(&published);
        s.count(&*counters).map(|()| s)
    })
    .await
    .map_err(|e| ApiError::new(500, format!("status reader failed: {e}")))?
    .map_err(|e| {
        ApiError::new(
            503,
            format!("cannot read the data plane's counters: {}", crate::errors::error_chain(&e)),
        )
    })?;
    let s = Arc::new(s);
    *shared.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((version, started, s.clone()));
    Ok(s)
}

/// The body of a weight change: `{"weight": N}`, N in 0..=MAX_WEIGHT.
async fn weight(req: Request<Incoming>) -> Result<u32, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        weight: i64,
    }
    let bytes = Limited::new(req.into_body(), 4096)
        .collect()
        .await
        .map_err(|_| ApiError::new(400, "body too large or unreadable"))?
        .to_bytes();
    let body: Body = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(400, format!("expected {{\"weight\": N}}: {e}")))?;
    if !(0..=MAX_WEIGHT as i64).contains(&body.weight) {
        return Err(ApiError::new(400, format!("weight {} is outside 0..={MAX_WEIGHT}", body.weight)));
    }
    Ok(body.weight as u32)
}

/// Hands a change to the daemon; it answers once the change is applied
/// and published, so the next read shows it.
async fn command(shared: &Api, action: Action) -> Result<(), ApiError> {
    let (reply, answer) = oneshot::channel();
    let cmd = Command { action, reply };
    shared.commands.send(cmd).await.map_err(|_| ApiError::new(503, "the daemon is shutting down"))?;
    answer.await.map_err(|_| ApiError::new(503, "the daemon is shutting down"))?
}

#[cfg(test)]
mod tests {
    use lb_common::Counter;

    use super::*;
    use crate::{
        control::reconcile::Shortfall,
        dataplane::MemoryCounters,
        model::{Attachment, BackendRole, Forward, Protocol},
        observe::status::{BackendStatus, DaemonStatus, Shortfalls, Sync, VipStatus},
    };

    fn status(sync: Sync, weight: u32) -> Status {
        Status {
            interface: "eth0".into(),
            daemon_pid: Some(1),
            daemon: Some(DaemonStatus {
                pid: 1,
                config: "xlb.toml".into(),
                attachment: Attachment::Native,
                sync,
                restart_needed: vec![],
            }),
            vips: vec![VipStatus {
                name: Some("web".into()),
                address: [192, 0, 2, 10].into(),
                port: 80,
                protocol: Protocol::Tcp,
                forward: Forward::Dr,
                source: None,
                id: 3,
                generation: 1,
                swapped_at: None,
                previous_until: None,
                packets: 0,
                bytes: 0,
                backends: vec![BackendStatus {
                    address: Some([10, 0, 0, 1].into()),
                    id: 7,
                    state: BackendRole::Active,
                    weight: Some(weight),
                    mac: None,
                    next_hop: None,
                    slots: 13,
                    share: 1.0,
                    packets: 0,
                    bytes: 0,
                }],
                notes: vec![],
                announce: None,
                checks: Vec::new(),
                check_panic: false,
            }],
            ..Status::default()
        }
    }

    struct Served {
        url: String,
        publish: watch::Sender<Published>,
        counters: Arc<MemoryCounters>,
        http: reqwest::Client,
    }

    /// The API on a loopback port, its status published by hand, its
    /// commands answered by `answer`.
    async fn serve_api(answer: fn(&Command) -> Result<(), ApiError>) -> Served {
        let (publish, status) = watch::channel((1, Arc::new(status(Sync::InSync, 1))));
        let counters = Arc::new(MemoryCounters::default());
        let (commands, mut received) = mpsc::channel::<Command>(4);
        tokio::spawn(async move {
            while let Some(cmd) = received.recv().await {
                let result = answer(&cmd);
                let _ = cmd.reply.send(result);
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener, Arc::new(Api::new(None, status, counters.clone(), commands))));
        Served { url, publish, counters, http: reqwest::Client::new() }
    }

    impl Served {
        async fn get(&self, path: &str) -> (u16, String) {
            let r = self.http.get(format!("{}{path}", self.url)).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    }

    /// How long a normal client waits for `/metrics`.
    async fn timed_get(api: &Served) -> Duration {
        let started = std::time::Instant::now();
        let (code, body) = api.get("/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("xlb_maps_in_sync"));
        started.elapsed()
    }

    #[tokio::test]
    async fn idle_slow_and_oversized_clients_do_not_keep_metrics_from_a_normal_one() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let api = serve_api(|_| Ok(())).await;
        let addr = api.url.trim_start_matches("http://").to_owned();
        // 200 connections that never send a byte, and 20 that announce a
        // 10 MB body and trickle it.
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        }
        let mut slow = Vec::new();
        for _ in 0..20 {
            let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = "PUT /api/v1/vips/web/backends/10.0.0.11/weight HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                        Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{\"weight\": ";
            c.write_all(head.as_bytes()).await.unwrap();
            slow.push(c);
        }
        let took = timed_get(&api).await;
        assert!(took < Duration::from_secs(1), "/metrics took {took:?} beside 220 abusive connections");

        // An oversized body is refused once it passes the limit, not read whole.
        let reply = api
            .http
            .put(format!("{}/api/v1/vips/web/backends/10.0.0.11/weight", api.url))
            .header("content-type", "application/json")
            .body(vec![b' '; 1 << 20])
            .send()
            .await;
        assert!(reply.is_err() || reply.unwrap().status().as_u16() == 400, "a 1 MiB body is refused");
        // Oversized headers: 431, the connection closed.
        let mut big = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let header =
            format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
        let _ = big.write_all(header.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), big.read_to_end(&mut answer)).await;
        assert!(
            String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 431"),
            "{}",
            String::from_utf8_lossy(&answer)
        );

        // Past the cap, idle clients are cut off by the header timeout and
        // the normal one gets its turn.
        for _ in 0..100 {
            idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        }
        let took = timed_get(&api).await;
        assert!(took < HEADER_TIMEOUT + Duration::from_secs(2), "/metrics took {took:?} past the cap");
        // Every idle connection was closed by the server.
        for mut c in idle.into_iter().take(10) {
            let mut buf = [0u8; 1];
            let n =
                tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("closed in time");
            assert!(matches!(n, Ok(0) | Err(_)), "an idle connection is closed");
        }
        drop(slow);
    }

    #[tokio::test]
    async fn the_status_page_is_one_self_contained_file() {
        let api = serve_api(|_| Ok(())).await;
        let r = api.http.get(format!("{}/", api.url)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().to_owned();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
        let page = r.text().await.unwrap();
        assert!(
            page.contains("/api/v1/status") && page.contains("Content-Type"),
            "polls the API, sends JSON"
        );
        // Nothing loaded from elsewhere: no script, style, font or image sources.
        for outside in ["src=\"http", "href=\"http", "@import", "url("] {
            assert!(!page.contains(outside), "the page loads {outside}");
        }
    }

    #[tokio::test]
    async fn reads_come_from_the_published_status_and_the_counters() {
        let api = serve_api(|_| Ok(())).await;
        api.counters.values.lock().unwrap().vips.insert(3, Counter { packets: 5, bytes: 320 });
        api.counters.values.lock().unwrap().backends.insert(7, Counter { packets: 4, bytes: 256 });
        let (code, body) = api.get("/api/v1/vips/web").await;
        assert_eq!(code, 200, "{body}");
        let web: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((web["packets"].as_u64(), web["backends"][0]["packets"].as_u64()), (Some(5), Some(4)));
        assert_eq!(web["backends"][0]["weight"], 1);

        // A newer status shows at once, though the counters were read
        // less than a second ago.
        api.publish.send_replace((2, Arc::new(status(Sync::InSync, 3))));
        let (_, body) = api.get("/api/v1/vips/web").await;
        let web: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(web["backends"][0]["weight"], 3, "{body}");
        let (_, metrics) = api.get("/metrics").await;
        assert!(
            metrics.contains(
                "xlb_vip_packets_total{vip=\"web\",address=\"192.0.2.10\",port=\"80\",protocol=\"tcp\"} 5"
            ),
            "{metrics}"
        );
        assert!(metrics.contains("xlb_maps_in_sync 1"), "{metrics}");
    }

    #[tokio::test]
    async fn readiness_says_what_is_not_in_sync() {
        let api = serve_api(|_| Ok(())).await;
        assert_eq!(api.get("/readyz").await, (200, "ready\n".into()));
        let short = Sync::Short(Shortfalls::new(&[Shortfall::Backend {
            vip: "web".into(),
            backend: [10, 0, 0, 3].into(),
            max_backends: 3,
        }]));
        api.publish.send_replace((2, Arc::new(status(short, 1))));
        let (code, body) = api.get("/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("short of capacity: VIP web: backend 10.0.0.3 left out"), "{body}");
        let (_, metrics) = api.get("/metrics").await;
        assert!(metrics.contains("xlb_capacity_left_out{kind=\"backend\"} 1"), "{metrics}");
        assert!(metrics.contains("xlb_backend_left_out{vip=\"web\",backend=\"10.0.0.3\"} 1"), "{metrics}");
        let retrying = Sync::Retrying { error: "map VIPS: write failed".into() };
        api.publish.send_replace((3, Arc::new(status(retrying, 1))));
        let (code, body) = api.get("/readyz").await;
        assert!(code == 503 && body.contains("retrying") && body.contains("map VIPS"), "{body}");
    }

    #[tokio::test]
    async fn changes_go_to_the_daemon_and_its_answer_comes_back() {
        let api = serve_api(|cmd| match cmd.action {
            Action::Backend { change: Change::Weight(7), .. } => Err(ApiError::new(409, "from Consul")),
            _ => Ok(()),
        })
        .await;
        let drain = format!("{}/api/v1/vips/web/backends/10.0.0.1/drain", api.url);
        let r = api.http.post(&drain).header("content-type", "application/json").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let weight = format!("{}/api/v1/vips/web/backends/10.0.0.1/weight", api.url);
        let r = api
            .http
            .put(&weight)
            .header("content-type", "application/json")
            .body(r#"{"weight": 7}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 409);
        assert!(r.text().await.unwrap().contains("from Consul"));
    }
}
