//! The admin HTTP API: metrics, status, health, and drain/undrain/weight
//! changes (applied by the daemon's main loop through the reconciler).
//!
//! Every read comes from the pinned maps and the state file, exactly what
//! `xlb status` shows; changes are commands to the main loop, answered once
//! they are in the maps.

use std::{
    convert::Infallible,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
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
    sync::{Semaphore, mpsc, oneshot},
};

use crate::{config::MAX_WEIGHT, metrics, status};

/// A change an operator asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Drain,
    Undrain,
    Weight(u32),
}

#[derive(Debug)]
pub struct Command {
    pub vip: String,
    pub backend: IpAddr,
    pub change: Change,
    pub reply: oneshot::Sender<Result<(), ApiError>>,
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

/// What the handlers share with the daemon.
pub struct Shared {
    pub pin_dir: PathBuf,
    pub interface: String,
    pub token: Option<String>,
    /// Program attached and maps in sync with what is wanted.
    pub ready: AtomicBool,
    pub commands: mpsc::Sender<Command>,
    /// The last status read: when it began, and `changes` then.
    pub cache: Mutex<Option<(Instant, u64, Arc<status::Status>)>>,
    /// Changes made through the API so far: a status read before the
    /// latest one is not served again.
    pub changes: AtomicU64,
}

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client that has not sent its request headers by then is cut off.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a computed status is reused (scrapes from several Prometheus
/// servers, `xlb stats --watch`): reading it walks the maps.
const STATUS_TTL: Duration = Duration::from_secs(1);

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
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
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
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

async fn handle(req: Request<Incoming>, shared: &Shared) -> Reply {
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
            if shared.ready.load(Ordering::Relaxed) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: maps not in sync yet\n")
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
            Ok(s) => match s.vips.iter().find(|v| v.name.as_deref() == Some(name)) {
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
                (Ok(change), Ok(backend)) => match command(shared, name, backend, change).await {
                    Ok(()) => {
                        json_reply(StatusCode::OK, &json!({ "vip": name, "backend": backend.to_string() }))
                    }
                    Err(e) => error(e),
                },
                (Err(e), _) | (_, Err(e)) => error(e),
            }
        }
        _ => error(ApiError::new(404, "no such endpoint; see the README's admin API section")),
    }
}

/// The status, read off the main loop's thread (it walks the maps) and
/// reused for `STATUS_TTL`.
async fn read(shared: &Shared) -> Result<Arc<status::Status>, ApiError> {
    let changes = shared.changes.load(Ordering::SeqCst);
    if let Some((at, seen, s)) = &*shared.cache.lock().unwrap_or_else(|e| e.into_inner())
        && at.elapsed() < STATUS_TTL
        && *seen == changes
    {
        return Ok(s.clone());
    }
    let started = Instant::now();
    let (pin_dir, interface) = (shared.pin_dir.clone(), shared.interface.clone());
    let s = tokio::task::spawn_blocking(move || status::read(&pin_dir, Some(&interface)))
        .await
        .map_err(|e| ApiError::new(500, format!("status reader failed: {e}")))?
        .map_err(|e| ApiError::new(503, format!("cannot read the data plane: {e:#}")))?;
    let s = Arc::new(s);
    *shared.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some((started, changes, s.clone()));
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

async fn command(shared: &Shared, vip: &str, backend: IpAddr, change: Change) -> Result<(), ApiError> {
    let (reply, answer) = oneshot::channel();
    let cmd = Command { vip: vip.to_owned(), backend, change, reply };
    shared.commands.send(cmd).await.map_err(|_| ApiError::new(503, "the daemon is shutting down"))?;
    answer.await.map_err(|_| ApiError::new(503, "the daemon is shutting down"))??;
    // The next read shows the change.
    shared.changes.fetch_add(1, Ordering::SeqCst);
    Ok(())
}
