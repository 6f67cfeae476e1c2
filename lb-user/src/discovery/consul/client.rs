//! The HTTP side: settings → reqwest client, one health query → [`Snapshot`].

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use reqwest::{
    StatusCode, Url,
    header::{HeaderMap, HeaderValue},
};

use super::{
    ConsulError, ConsulSettings, DEFAULT_ADDRESS, Instance, Problem, ServiceQuery, WarningPolicy, entries,
};

/// Consul caps `wait` at 10 minutes.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Time allowed on top of `wait` (and Consul's up to wait/16 of jitter) for
/// an answer, and the whole budget of a non-blocking query.
const REQUEST_SLACK: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of an error body goes into [`ConsulError::Status`].
const ERROR_BODY_MAX: usize = 512;
/// Largest health answer read. [`MAX_INSTANCES`](super::MAX_INSTANCES) entries with a few checks
/// each (check output is capped at 4 KiB by default) stay far below it; a
/// server that streams without end is cut off instead of filling memory.
const BODY_MAX: usize = 128 << 20;

/// A Consul agent to query. Cheap to clone (the connection pool is shared).
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Token,
    datacenter: Option<String>,
    warning: WarningPolicy,
}

#[derive(Clone)]
enum Token {
    None,
    Fixed(HeaderValue),
    File(PathBuf),
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Token::None => f.write_str("None"),
            Token::Fixed(_) => f.write_str("Fixed(<redacted>)"),
            Token::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// One answer of the health endpoint, mapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Sorted by (node, id).
    pub instances: Vec<Instance>,
    /// `X-Consul-Index` as the server sent it.
    pub index: u64,
    /// What was skipped or changed on the way (see [`Instance`]).
    pub problems: Vec<Problem>,
}

impl Client {
    /// Checks the settings and reads the files they name (token file, CA,
    /// client certificate), so that a mistake shows at start.
    /// [`ConsulSettings::apply_env`] is the caller's choice, before this.
    pub fn new(settings: &ConsulSettings) -> Result<Self, ConsulError> {
        let address = settings.address.as_deref().unwrap_or(DEFAULT_ADDRESS);
        let base = parse_address(address)?;
        let token = match (&settings.token, &settings.token_file) {
            (Some(_), Some(_)) => return Err(ConsulError::TokenConflict),
            (Some(token), None) => Token::Fixed(header_value(token, "the settings")?),
            (None, Some(path)) => {
                read_token_file(path)?;
                Token::File(path.clone())
            }
            (None, None) => Token::None,
        };

        let mut builder = reqwest::Client::builder()
            // The agent is local or named explicitly: never go through an
            // HTTP proxy from the environment.
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("xlb/", env!("CARGO_PKG_VERSION")));
        let tls =
            settings.ca_file.is_some() || settings.client_cert.is_some() || settings.client_key.is_some();
        if tls && base.scheme() != "https" {
            return Err(ConsulError::TlsNeedsHttps { address: address.to_owned() });
        }
        if let Some(path) = &settings.ca_file {
            let pem = read_file("CA file", path)?;
            let pem_error = |source| ConsulError::Pem { what: "CA file", path: path.clone(), source };
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| pem_error(Some(e)))?;
            if certs.is_empty() {
                return Err(pem_error(None));
            }
            // Like Consul's own client: a CA file replaces the system roots.
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&settings.client_cert, &settings.client_key) {
            (Some(cert), Some(key)) => {
                let mut pem = read_file("client certificate", cert)?;
                pem.push(b'\n');
                pem.extend(read_file("client key", key)?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|source| ConsulError::Pem {
                    what: "client certificate and key",
                    path: cert.clone(),
                    source: Some(source),
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => return Err(ConsulError::ClientCertIncomplete),
        }
        let http = builder.build().map_err(ConsulError::Build)?;
        Ok(Client { http, base, token, datacenter: settings.datacenter.clone(), warning: settings.warning })
    }

    /// Runs one health query. With `index` 0 it answers at once; otherwise
    /// it is a blocking query: Consul holds it until the service's index
    /// passes `index` or `wait` (plus Consul's jitter of up to wait/16)
    /// runs out. The index rules for a loop are [`super::watch_with`]'s.
    pub async fn fetch(
        &self,
        query: &ServiceQuery,
        index: u64,
        wait: Duration,
    ) -> Result<Snapshot, ConsulError> {
        let url = health_url(&self.base, query, self.datacenter.as_deref(), self.warning, index, wait)?;
        let shown = url.to_string();
        let mut request = self.http.get(url).timeout(request_timeout(index, wait));
        match &self.token {
            Token::None => {}
            Token::Fixed(token) => request = request.header("X-Consul-Token", token.clone()),
            Token::File(path) => {
                let path = path.clone();
                let token = tokio::task::spawn_blocking(move || read_token_file(&path))
                    .await
                    .expect("reading the token file does not panic")?;
                request = request.header("X-Consul-Token", token);
            }
        }
        let response =
            request.send().await.map_err(|source| ConsulError::Request { url: shown.clone(), source })?;
        let status = response.status();
        if status != StatusCode::OK {
            let body = read_prefix(response, ERROR_BODY_MAX * 4).await;
            let body = error_body(&String::from_utf8_lossy(&body));
            return Err(ConsulError::Status { url: shown, status: status.as_u16(), body });
        }
        let new_index = consul_index(response.headers())
            .map_err(|value| ConsulError::Index { url: shown.clone(), value })?;
        if response
            .headers()
            .get("X-Consul-Results-Filtered-By-ACLs")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
        {
            // A partial list would silently drain backends the token may not
            // see: fail loudly and keep the last good list instead.
            return Err(ConsulError::FilteredByAcl { url: shown });
        }
        let body = read_capped(response, BODY_MAX, &shown).await?;
        let (instances, problems) = entries::decode(&body, query.tag.as_deref(), self.warning)
            .map_err(|source| ConsulError::Decode { url: shown, source })?;
        Ok(Snapshot { instances, index: new_index, problems })
    }
}

async fn read_capped(mut response: reqwest::Response, max: usize, url: &str) -> Result<Vec<u8>, ConsulError> {
    let mut body = Vec::new();
    while let Some(chunk) =
        response.chunk().await.map_err(|source| ConsulError::Request { url: url.to_owned(), source })?
    {
        if body.len() + chunk.len() > max {
            return Err(ConsulError::TooLarge { url: url.to_owned(), max });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The first `max` bytes of the body, or fewer if it fails; the rest is
/// never read (an error body only shows its start).
async fn read_prefix(mut response: reqwest::Response, max: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < max
        && let Ok(Some(chunk)) = response.chunk().await
    {
        body.extend_from_slice(&chunk[..chunk.len().min(max - body.len())]);
    }
    body
}

/// `host:port` means http (as `CONSUL_HTTP_ADDR` does); `http://` and
/// `https://` are taken as they are, a path after them as a prefix.
pub(crate) fn parse_address(address: &str) -> Result<Url, ConsulError> {
    let invalid = |reason: String| ConsulError::Address { address: address.to_owned(), reason };
    let trimmed = address.trim();
    let with_scheme = if trimmed.contains("://") { trimmed.to_owned() } else { format!("http://{trimmed}") };
    let url = Url::parse(&with_scheme).map_err(|e| invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!("scheme {:?} is not supported (use http or https)", url.scheme())));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host".into()));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(invalid("only scheme, host, port and a path prefix are allowed".into()));
    }
    Ok(url)
}

pub(crate) fn health_url(
    base: &Url,
    query: &ServiceQuery,
    datacenter: Option<&str>,
    policy: WarningPolicy,
    index: u64,
    wait: Duration,
) -> Result<Url, ConsulError> {
    if query.service.is_empty() {
        return Err(ConsulError::EmptyService);
    }
    let mut url = base.clone();
    url.path_segments_mut().expect("http(s) URLs have paths").pop_if_empty().extend([
        "v1",
        "health",
        "service",
        &query.service,
    ]);
    {
        let mut pairs = url.query_pairs_mut();
        if policy == WarningPolicy::Exclude {
            pairs.append_key_only("passing");
        }
        if let Some(tag) = &query.tag {
            pairs.append_pair("tag", tag);
        }
        if let Some(dc) = datacenter {
            pairs.append_pair("dc", dc);
        }
        if index > 0 {
            pairs.append_pair("index", &index.to_string());
            pairs.append_pair("wait", &go_duration(wait));
        }
    }
    if url.query() == Some("") {
        url.set_query(None);
    }
    Ok(url)
}

/// `wait` as a Go duration, in milliseconds, between 1 ms and Consul's 10
/// minute cap (0 would mean Consul's default of 5 minutes).
pub(crate) fn go_duration(wait: Duration) -> String {
    let ms = wait.min(MAX_WAIT).as_millis().max(1);
    format!("{ms}ms")
}

fn request_timeout(index: u64, wait: Duration) -> Duration {
    if index == 0 {
        return REQUEST_SLACK;
    }
    let wait = wait.min(MAX_WAIT).max(Duration::from_millis(1));
    wait + wait / 16 + REQUEST_SLACK
}

/// `X-Consul-Index`, or what was there instead.
pub(crate) fn consul_index(headers: &HeaderMap) -> Result<u64, Option<String>> {
    let value = headers.get("X-Consul-Index").ok_or(None)?;
    let text = value.to_str().map_err(|_| Some(String::from_utf8_lossy(value.as_bytes()).into_owned()))?;
    text.trim().parse().map_err(|_| Some(text.to_owned()))
}

fn error_body(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(ERROR_BODY_MAX) {
        Some((cut, _)) => format!("{}…", &body[..cut]),
        None => body.to_owned(),
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ConsulError> {
    std::fs::read(path).map_err(|source| ConsulError::ReadFile { what, path: path.to_owned(), source })
}

fn read_token_file(path: &Path) -> Result<HeaderValue, ConsulError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConsulError::ReadFile {
        what: "token file",
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ConsulError::TokenFileEmpty { path: path.to_owned() });
    }
    header_value(token, &path.display().to_string())
}

fn header_value(token: &str, origin: &str) -> Result<HeaderValue, ConsulError> {
    let mut value = HeaderValue::from_str(token.trim())
        .map_err(|_| ConsulError::TokenInvalid { origin: origin.to_owned() })?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(service: &str, tag: Option<&str>) -> ServiceQuery {
        ServiceQuery { service: service.into(), tag: tag.map(Into::into) }
    }

    #[test]
    fn addresses_without_scheme_are_http() {
        assert_eq!(parse_address("127.0.0.1:8500").unwrap().as_str(), "http://127.0.0.1:8500/");
        assert_eq!(parse_address("https://consul.example:8501").unwrap().scheme(), "https");
        assert_eq!(parse_address("[::1]:8500").unwrap().host_str(), Some("[::1]"));
        assert_eq!(parse_address("http://proxy/consul/").unwrap().path(), "/consul/");
        assert!(parse_address("unix:///run/consul.sock").is_err());
        assert!(parse_address("http://").is_err());
        assert!(parse_address("http://h:8500/?x=1").is_err());
    }

    #[test]
    fn health_urls_carry_the_query_parameters() {
        let base = parse_address("127.0.0.1:8500").unwrap();
        let url = |q: &ServiceQuery, dc, policy, index, wait| {
            health_url(&base, q, dc, policy, index, wait).unwrap().to_string()
        };
        assert_eq!(
            url(&query("web", None), None, WarningPolicy::Keep, 0, Duration::from_secs(55)),
            "http://127.0.0.1:8500/v1/health/service/web"
        );
        assert_eq!(
            url(
                &query("web", Some("blue")),
                Some("dc2"),
                WarningPolicy::Exclude,
                42,
                Duration::from_secs(55)
            ),
            "http://127.0.0.1:8500/v1/health/service/web?passing&tag=blue&dc=dc2&index=42&wait=55000ms"
        );
        assert_eq!(
            url(&query("a b/c", Some("x&y")), None, WarningPolicy::Keep, 1, Duration::ZERO),
            "http://127.0.0.1:8500/v1/health/service/a%20b%2Fc?tag=x%26y&index=1&wait=1ms"
        );
        let prefixed = parse_address("http://proxy/consul").unwrap();
        assert_eq!(
            health_url(&prefixed, &query("web", None), None, WarningPolicy::Keep, 0, Duration::ZERO)
                .unwrap()
                .as_str(),
            "http://proxy/consul/v1/health/service/web"
        );
        assert!(matches!(
            health_url(&base, &query("", None), None, WarningPolicy::Keep, 0, Duration::ZERO),
            Err(ConsulError::EmptyService)
        ));
    }

    #[test]
    fn wait_is_clamped_to_consul_limits() {
        assert_eq!(go_duration(Duration::from_secs(55)), "55000ms");
        assert_eq!(go_duration(Duration::ZERO), "1ms");
        assert_eq!(go_duration(Duration::from_secs(3600)), "600000ms");
        assert_eq!(request_timeout(0, Duration::from_secs(55)), REQUEST_SLACK);
        assert_eq!(request_timeout(5, Duration::from_secs(32)), Duration::from_secs(32 + 2) + REQUEST_SLACK);
    }

    #[test]
    fn index_header_must_be_a_number() {
        let mut headers = HeaderMap::new();
        assert_eq!(consul_index(&headers), Err(None));
        headers.insert("X-Consul-Index", HeaderValue::from_static("123"));
        assert_eq!(consul_index(&headers), Ok(123));
        headers.insert("X-Consul-Index", HeaderValue::from_static("-1"));
        assert_eq!(consul_index(&headers), Err(Some("-1".into())));
    }

    #[test]
    fn settings_errors_are_caught_at_construction() {
        let both =
            ConsulSettings { token: Some("a".into()), token_file: Some("/x".into()), ..Default::default() };
        assert!(matches!(Client::new(&both), Err(ConsulError::TokenConflict)));
        let tls_over_http = ConsulSettings { ca_file: Some("/ca.pem".into()), ..Default::default() };
        assert!(matches!(Client::new(&tls_over_http), Err(ConsulError::TlsNeedsHttps { .. })));
        let half_cert = ConsulSettings {
            address: Some("https://consul:8501".into()),
            client_cert: Some("/c.pem".into()),
            ..Default::default()
        };
        assert!(matches!(Client::new(&half_cert), Err(ConsulError::ClientCertIncomplete)));
        let missing_ca = ConsulSettings {
            address: Some("https://consul:8501".into()),
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert!(matches!(Client::new(&missing_ca), Err(ConsulError::ReadFile { what: "CA file", .. })));
        let bad_token = ConsulSettings { token: Some("bad\ntoken".into()), ..Default::default() };
        assert!(matches!(Client::new(&bad_token), Err(ConsulError::TokenInvalid { .. })));
    }

    #[test]
    fn token_files_are_read_and_trimmed_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("xlb-consul-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "s3cret");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(read_token_file(&path), Err(ConsulError::TokenFileEmpty { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_pem_is_rejected() {
        let dir = std::env::temp_dir().join(format!("xlb-consul-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").unwrap();
        let settings = ConsulSettings {
            address: Some("https://consul:8501".into()),
            ca_file: Some(ca),
            ..Default::default()
        };
        assert!(matches!(Client::new(&settings), Err(ConsulError::Pem { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn long_error_bodies_are_cut() {
        assert_eq!(error_body(" Permission denied \n"), "Permission denied");
        let long = "x".repeat(ERROR_BODY_MAX + 10);
        assert_eq!(error_body(&long).chars().count(), ERROR_BODY_MAX + 1);
    }

    #[tokio::test]
    async fn bodies_past_the_cap_are_refused() {
        let answer = |len: usize| reqwest::Response::from(hyper::Response::new(vec![b'['; len]));
        assert_eq!(read_capped(answer(64), 64, "u").await.unwrap().len(), 64);
        let err = read_capped(answer(65), 64, "u").await.unwrap_err();
        assert!(matches!(err, ConsulError::TooLarge { max: 64, .. }), "{err:?}");
        assert_eq!(read_prefix(answer(65), 64).await.len(), 64);
        assert_eq!(read_prefix(answer(10), 64).await.len(), 10);
    }
}
