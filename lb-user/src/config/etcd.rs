//! The `[etcd]` section and a VIP's `etcd = { prefix = … }`: how to reach
//! etcd and which keys hold a service's instances.

use std::{fmt, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::consul::EmptyPolicy;

/// The endpoint etcd's own tools use when nothing says otherwise.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
/// etcdctl's `--dial-timeout` and `--command-timeout` defaults.
const DEFAULT_DIAL_TIMEOUT_MS: u64 = 2_000;
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// The longest timeout accepted (longer ones hide an outage as long).
const MAX_TIMEOUT_MS: u64 = 60_000;

/// `[etcd]` as the file has it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFile {
    pub endpoints: Option<Vec<String>>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub dial_timeout_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    #[serde(default)]
    pub on_empty: EmptyPolicy,
}

/// How to reach etcd, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// `http://host:port` or `https://host:port`, one per cluster member:
    /// requests go to any that answers, and a watch that loses its member
    /// resumes on another.
    pub endpoints: Vec<String>,
    pub credentials: Option<Credentials>,
    pub tls: Option<Tls>,
    /// How long connecting to a member may take.
    pub dial_timeout: Duration,
    /// How long a request (a page of the prefix, starting the watch) may
    /// take, and how long a keepalive ping may go unanswered before the
    /// connection counts as dead.
    pub request_timeout: Duration,
    pub on_empty: EmptyPolicy,
}

impl Default for EtcdSettings {
    fn default() -> Self {
        EtcdFile::default().validate().expect("the defaults are valid")
    }
}

/// An etcd user and where its password comes from.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Password,
}

#[derive(Clone, PartialEq, Eq)]
pub enum Password {
    Inline(String),
    /// Read again at every connection, so a rotated password is picked up.
    File(PathBuf),
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Password::Inline(_) => f.write_str("<redacted>"),
            Password::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// PEM files for TLS: a CA to verify the members with (default: the
/// system's roots) and a client certificate for mutual TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub ca_file: Option<PathBuf>,
    pub client: Option<(PathBuf, PathBuf)>,
}

impl fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("endpoints", &self.endpoints)
            .field("username", &self.credentials.as_ref().map(|c| &c.username))
            .field("password", &self.credentials.as_ref().map(|c| &c.password))
            .field("tls", &self.tls)
            .field("dial_timeout", &self.dial_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("on_empty", &self.on_empty)
            .finish()
    }
}

impl EtcdFile {
    /// The settings, or the field that is wrong and why.
    pub fn validate(&self) -> Result<EtcdSettings, (&'static str, String)> {
        let endpoints = match &self.endpoints {
            None => vec![DEFAULT_ENDPOINT.to_owned()],
            Some(list) if list.is_empty() => {
                return Err(("endpoints", "must name at least one member".into()));
            }
            Some(list) => {
                list.iter().map(|e| endpoint(e)).collect::<Result<_, _>>().map_err(|m| ("endpoints", m))?
            }
        };
        let credentials = match (&self.username, &self.password, &self.password_file) {
            (_, Some(_), Some(_)) => {
                return Err(("password_file", "set either password or password_file, not both".into()));
            }
            (None, None, None) => None,
            (None, _, _) => return Err(("username", "a password needs the user it belongs to".into())),
            (Some(_), None, None) => {
                return Err(("password", "a username needs a password or password_file".into()));
            }
            (Some(u), _, _) if u.is_empty() => return Err(("username", "must not be empty".into())),
            (Some(u), Some(p), None) => {
                Some(Credentials { username: u.clone(), password: Password::Inline(p.clone()) })
            }
            (Some(u), None, Some(f)) => {
                Some(Credentials { username: u.clone(), password: Password::File(f.clone()) })
            }
        };
        let client = match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            (Some(_), None) => return Err(("client_key", "client_cert needs its client_key".into())),
            (None, Some(_)) => return Err(("client_cert", "client_key needs its client_cert".into())),
        };
        let tls = (self.ca_file.is_some() || client.is_some())
            .then(|| Tls { ca_file: self.ca_file.clone(), client });
        let https = endpoints.iter().filter(|e| e.starts_with("https://")).count();
        if https != 0 && https != endpoints.len() {
            return Err(("endpoints", "use https:// for every member or for none".into()));
        }
        if tls.is_some() && https == 0 {
            let field = if self.ca_file.is_some() { "ca_file" } else { "client_cert" };
            return Err((field, "TLS files need https:// endpoints".into()));
        }
        let timeout = |field, value: Option<u64>, default| match value.unwrap_or(default) {
            0 => Err((field, "must be at least 1 ms".to_owned())),
            ms if ms > MAX_TIMEOUT_MS => Err((field, format!("{ms} ms is over {MAX_TIMEOUT_MS} ms"))),
            ms => Ok(Duration::from_millis(ms)),
        };
        Ok(EtcdSettings {
            endpoints,
            credentials,
            tls,
            dial_timeout: timeout("dial_timeout_ms", self.dial_timeout_ms, DEFAULT_DIAL_TIMEOUT_MS)?,
            request_timeout: timeout(
                "request_timeout_ms",
                self.request_timeout_ms,
                DEFAULT_REQUEST_TIMEOUT_MS,
            )?,
            on_empty: self.on_empty,
        })
    }
}

/// An endpoint as a URL: `host:port` means plain HTTP, as etcdctl reads it.
fn endpoint(text: &str) -> Result<String, String> {
    let url = if text.contains("://") { text.to_owned() } else { format!("http://{text}") };
    let Some(rest) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) else {
        return Err(format!("{text:?}: the scheme must be http:// or https://"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let port = authority.rsplit_once(':').map(|(_, p)| p);
    if authority.is_empty() || authority.contains('/') || port.is_none_or(|p| p.parse::<u16>().is_err()) {
        return Err(format!("{text:?} is not host:port (e.g. 10.0.0.5:2379 or https://etcd-1:2379)"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// The keys holding one service's instances: every key under `prefix` is
/// one instance. The config file embeds it per VIP.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct EtcdPrefix {
    /// Byte prefix of the keys, e.g. `/services/web/` (with the trailing
    /// slash, or `/services/web` also matches `/services/web2/…`).
    pub prefix: String,
}

impl fmt::Display for EtcdPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EtcdSettings, (&'static str, String)> {
        toml::from_str::<EtcdFile>(text).unwrap().validate()
    }

    #[test]
    fn defaults_are_etcdctls() {
        let s = parse("").unwrap();
        assert_eq!(s.endpoints, [DEFAULT_ENDPOINT]);
        assert_eq!((s.dial_timeout, s.request_timeout), (Duration::from_secs(2), Duration::from_secs(5)));
        assert!(s.credentials.is_none() && s.tls.is_none());
        assert_eq!(s.on_empty, EmptyPolicy::Keep);
    }

    #[test]
    fn endpoints_take_host_port_or_a_url() {
        let s = parse("endpoints = [\"10.0.0.5:2379\", \"http://etcd-2:2379/\"]").unwrap();
        assert_eq!(s.endpoints, ["http://10.0.0.5:2379", "http://etcd-2:2379"]);
        let s = parse("endpoints = [\"https://[fd00::5]:2379\"]\nca_file = \"/ca.pem\"").unwrap();
        assert_eq!(s.tls, Some(Tls { ca_file: Some("/ca.pem".into()), client: None }));
        for (bad, field) in [
            ("endpoints = []", "endpoints"),
            ("endpoints = [\"etcd-1\"]", "endpoints"),
            ("endpoints = [\"unix:///run/etcd\"]", "endpoints"),
            ("endpoints = [\"http://etcd:99999\"]", "endpoints"),
            ("endpoints = [\"http://etcd:2379/v3\"]", "endpoints"),
            ("endpoints = [\"https://a:1\", \"http://b:1\"]", "endpoints"),
            ("ca_file = \"/ca.pem\"", "ca_file"),
            ("client_cert = \"/c.pem\"", "client_key"),
            ("endpoints = [\"https://a:1\"]\nclient_key = \"/k.pem\"", "client_cert"),
        ] {
            assert_eq!(parse(bad).unwrap_err().0, field, "{bad}");
        }
    }

    #[test]
    fn credentials_need_a_user_and_one_password() {
        let s = parse("username = \"xlb\"\npassword_file = \"/run/pw\"").unwrap();
        let c = s.credentials.as_ref().unwrap();
        assert_eq!((c.username.as_str(), &c.password), ("xlb", &Password::File("/run/pw".into())));
        let text = format!("{:?}", parse("username = \"xlb\"\npassword = \"s3cret\"").unwrap());
        assert!(!text.contains("s3cret") && text.contains("<redacted>"), "{text}");
        for (bad, field) in [
            ("password = \"x\"", "username"),
            ("username = \"xlb\"", "password"),
            ("username = \"\"\npassword = \"x\"", "username"),
            ("username = \"u\"\npassword = \"x\"\npassword_file = \"/f\"", "password_file"),
        ] {
            assert_eq!(parse(bad).unwrap_err().0, field, "{bad}");
        }
    }

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(parse("dial_timeout_ms = 0").unwrap_err().0, "dial_timeout_ms");
        assert_eq!(parse("request_timeout_ms = 600000").unwrap_err().0, "request_timeout_ms");
        assert_eq!(parse("request_timeout_ms = 250").unwrap().request_timeout, Duration::from_millis(250));
        assert!(toml::from_str::<EtcdFile>("endpoint = [\"x\"]").is_err(), "unknown fields are refused");
        assert!(toml::from_str::<EtcdPrefix>("prefix = \"/a/\"\nrecursive = true").is_err());
    }
}
