//! Consul service discovery: a VIP's backends from the instances of a
//! Consul service.
//!
//! [`Client::fetch`] runs one query of Consul's health endpoint,
//! `GET /v1/health/service/<service>`, blocking or not. [`watch`] keeps one
//! blocking query at a time open for a service and sends an [`Update`] for
//! every answer (the instances when they changed) and every failure. The
//! client speaks Consul's documented HTTP API, so it works unchanged
//! against a real agent; `xlb-tests` has an in-process fake of that API to
//! test it against.
//!
//! Where each rule lives:
//! - which instances count (health, warning state): [`WarningPolicy`];
//! - how an entry becomes an [`Instance`] (address, tag, weight,
//!   duplicates, caps): [`Instance`] and [`Problem`];
//! - blocking-query index rules, confirming reads, rate limit and back-off:
//!   [`watch_with`].

mod client;
mod entries;
mod watch;

use std::{fmt, net::IpAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

pub use client::{Client, Snapshot};
pub use watch::{WatchOptions, watch, watch_with};

/// The agent Consul's own tools use when nothing says otherwise.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8500";

/// Instances accepted per service; past it the first ones by (node, id)
/// are kept and the rest reported ([`Problem::TooMany`]).
pub const MAX_INSTANCES: usize = 10_000;

/// Service meta key whose value (a decimal u32) replaces the weight Consul
/// gives the instance.
pub const WEIGHT_META_KEY: &str = "xlb-weight";

/// How to reach Consul. The config file embeds it as `[consul]`; fields
/// left out can come from Consul's usual environment variables through
/// [`ConsulSettings::apply_env`].
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulSettings {
    /// The agent: `host:port` (plain HTTP, as Consul's tools read
    /// `CONSUL_HTTP_ADDR`), `http://host:port` or `https://host:port`.
    /// Default: [`DEFAULT_ADDRESS`].
    pub address: Option<String>,
    /// ACL token, sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// File holding the ACL token; read again before every request, so a
    /// rotated token is picked up. Exclusive with `token`.
    pub token_file: Option<PathBuf>,
    /// Datacenter to query (`dc`); default: the agent's own.
    pub datacenter: Option<String>,
    /// PEM CA bundle to verify the agent's certificate with, instead of the
    /// system trust store. Needs an `https://` address.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS, with `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// What to do with instances whose worst check is `warning`.
    #[serde(default)]
    pub warning: WarningPolicy,
    /// What to do when a service that had instances has none left.
    #[serde(default)]
    pub on_empty: EmptyPolicy,
}

impl fmt::Debug for ConsulSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulSettings")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("datacenter", &self.datacenter)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("warning", &self.warning)
            .field("on_empty", &self.on_empty)
            .finish()
    }
}

impl ConsulSettings {
    /// Fills the fields the config left out from the process environment,
    /// the way Consul's own tools read it: `CONSUL_HTTP_ADDR` (with
    /// `CONSUL_HTTP_SSL=true` meaning https for an address without a
    /// scheme), `CONSUL_HTTP_TOKEN`, then `CONSUL_HTTP_TOKEN_FILE` (only
    /// when the config names neither a token nor a token file),
    /// `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`. The config
    /// file wins over the environment; empty variables count as unset.
    pub fn apply_env(&mut self) {
        self.apply_env_from(|name| std::env::var(name).ok());
    }

    /// [`ConsulSettings::apply_env`] with another source of variables.
    pub fn apply_env_from(&mut self, var: impl Fn(&str) -> Option<String>) {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if self.address.is_none() {
            self.address = var("CONSUL_HTTP_ADDR").map(|address| {
                let ssl = var("CONSUL_HTTP_SSL").is_some_and(|v| go_bool_true(&v));
                if ssl && !address.contains("://") { format!("https://{address}") } else { address }
            });
        }
        if self.token.is_none() && self.token_file.is_none() {
            self.token = var("CONSUL_HTTP_TOKEN");
            if self.token.is_none() {
                self.token_file = var("CONSUL_HTTP_TOKEN_FILE").map(PathBuf::from);
            }
        }
        if self.ca_file.is_none() {
            self.ca_file = var("CONSUL_CACERT").map(PathBuf::from);
        }
        if self.client_cert.is_none() {
            self.client_cert = var("CONSUL_CLIENT_CERT").map(PathBuf::from);
        }
        if self.client_key.is_none() {
            self.client_key = var("CONSUL_CLIENT_KEY").map(PathBuf::from);
        }
    }
}

/// The values Go's `strconv.ParseBool` reads as true, which is how Consul
/// reads `CONSUL_HTTP_SSL`.
fn go_bool_true(value: &str) -> bool {
    matches!(value.trim(), "1" | "t" | "T" | "true" | "TRUE" | "True")
}

/// What to do with an instance whose worst check is `warning` (none
/// critical).
///
/// Consul's `?passing` filter returns "only nodes with all checks in the
/// `passing` state" (health endpoint docs), so it drops warning instances
/// along with critical ones. [`WarningPolicy::Keep`] therefore queries
/// without `passing` and filters on the client: an instance is kept unless
/// one of its checks (node checks such as `serfHealth` included) is
/// critical, and a kept warning instance gets its `Weights.Warning` weight,
/// the way Consul's DNS interface treats warning instances by default.
/// [`WarningPolicy::Exclude`] lets the server filter with `?passing` (and
/// filters again, so the rule does not depend on the server).
///
/// Keep is the default: a warning check (an HTTP check answering 429, a
/// check an operator set to warning to shed load) means "degraded", and
/// Consul's `Weights.Warning` exists to turn such an instance down rather
/// than off. Taking every backend out because all of them are slow would
/// turn an overload into an outage.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum WarningPolicy {
    /// Warning instances stay backends, with their warning weight.
    #[default]
    Keep,
    /// Only instances with every check passing are backends.
    Exclude,
}

/// When a service's healthy set becomes empty. An empty set is more often a
/// broken health check, a network partition between Consul and the
/// backends, or a bad deploy of the checks than every backend dying at
/// once; keeping the last set ("panic mode", as Envoy and Katran operators
/// run it) keeps serving whatever still works.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum EmptyPolicy {
    /// Keep the last non-empty set and raise the alarm (log, status, counter).
    #[default]
    Keep,
    /// Apply the empty set: the VIP drops its packets (`no_backend`).
    Apply,
}

/// One Consul service to follow. The config file embeds it per VIP.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct ServiceQuery {
    /// Service name.
    pub service: String,
    /// Only instances carrying this tag (Consul's `tag` parameter).
    pub tag: Option<String>,
}

impl fmt::Display for ServiceQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tag {
            Some(tag) => write!(f, "{}[tag={tag}]", self.service),
            None => f.write_str(&self.service),
        }
    }
}

/// A healthy (or, by [`WarningPolicy::Keep`], degraded) instance of a
/// service, ready to be a backend.
///
/// From a health entry: `address` is `Service.Address`, or `Node.Address`
/// when that is empty (Consul's documented fallback); an address that is
/// not an IP (a hostname), or is one no backend can have ([`Unusable`]: a
/// dev agent's `Node.Address` is 127.0.0.1), skips the instance. For a
/// query with a tag, an entry without it is skipped too, whatever the agent
/// answered (see [`watch_with`]). `weight` is
/// `Service.Weights.Passing`, or `Weights.Warning` for a warning instance
/// (1 when Consul sends no weights), replaced by the service meta key
/// [`WEIGHT_META_KEY`] in either state when that holds a valid u32; it is
/// clamped to `0..=`[`MAX_WEIGHT`](crate::config::MAX_WEIGHT), and 0 means
/// drain, as in the config file. Two instances with the same address (the
/// backend's identity in xlb) are one backend: the passing one wins over a
/// warning one, then the higher weight, then the first by (node, id).
/// Everything skipped or changed is reported as a [`Problem`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Instance {
    /// `Node.Node`: with `id`, the instance's identity in Consul.
    pub node: String,
    /// `Service.ID`.
    pub id: String,
    pub address: IpAddr,
    /// Other addresses from `Service.TaggedAddresses` (`lan_ipv4`,
    /// `wan_ipv4`, `lan_ipv6`, `wan_ipv6`, in that order): a dual-stack
    /// instance backs VIPs of both families.
    pub tagged: Vec<IpAddr>,
    /// `Service.Port` (unused by DR forwarding, which keeps the port).
    pub port: u16,
    pub weight: u32,
    /// Its worst check is `warning`.
    pub warning: bool,
}

/// Something in Consul's answer that did not make it into the instance list
/// as it stood. [`watch`] logs each once, when it appears.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Problem {
    /// Neither `Service.Address` nor `Node.Address` is an IP address.
    BadAddress { instance: String, address: String },
    /// The address is an IP, but not one a backend can have.
    UnusableAddress { instance: String, address: IpAddr, source: AddressSource, why: Unusable },
    /// `Service.Port` is outside 0–65535.
    BadPort { instance: String, port: i64 },
    /// The weight meta key is not a u32; Consul's weight was used.
    BadWeightMeta { instance: String, value: String },
    /// The weight was outside 0–[`MAX_WEIGHT`](crate::config::MAX_WEIGHT).
    WeightClamped { instance: String, weight: i64, clamped: u32 },
    /// Another instance has the same address; only `kept` is a backend.
    Duplicate { address: IpAddr, kept: String, dropped: String },
    /// More than [`MAX_INSTANCES`]; the first `kept` by (node, id) are used.
    TooMany { total: usize, kept: usize },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::BadAddress { instance, address } => {
                write!(f, "instance {instance}: address {address:?} is not an IP address; skipped")
            }
            Problem::UnusableAddress { instance, address, source: AddressSource::Service, why } => write!(
                f,
                "instance {instance}: Service.Address {address} is {why}: skipped \
                 (register the service with the backend's own address)"
            ),
            Problem::UnusableAddress { instance, address, source: AddressSource::Node, why } => write!(
                f,
                "instance {instance}: no Service.Address, and Node.Address {address} is {why}: skipped \
                 (register the service with an Address)"
            ),
            Problem::BadPort { instance, port } => {
                write!(f, "instance {instance}: port {port} is out of range; skipped")
            }
            Problem::BadWeightMeta { instance, value } => write!(
                f,
                "instance {instance}: meta {WEIGHT_META_KEY}={value:?} is not a whole number; \
                 using Consul's weight"
            ),
            Problem::WeightClamped { instance, weight, clamped } => {
                write!(f, "instance {instance}: weight {weight} is out of range; using {clamped}")
            }
            Problem::Duplicate { address, kept, dropped } => {
                write!(f, "instances {kept} and {dropped} share address {address}; using {kept}")
            }
            Problem::TooMany { total, kept } => {
                write!(f, "{total} instances; using the first {kept} by node and id")
            }
        }
    }
}

/// Where an instance's address came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressSource {
    /// `Service.Address`.
    Service,
    /// `Node.Address`, as `Service.Address` was empty.
    Node,
}

/// Why an IP address cannot be a backend's: packets to it would never
/// leave this host or would reach many hosts at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unusable {
    Unspecified,
    Loopback,
    Multicast,
    Broadcast,
}

impl Unusable {
    /// Why `address` cannot be a backend's, or `None` if it can. An
    /// IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
    pub fn of(address: IpAddr) -> Option<Unusable> {
        let address = address.to_canonical();
        if address.is_unspecified() {
            Some(Unusable::Unspecified)
        } else if address.is_loopback() {
            Some(Unusable::Loopback)
        } else if address.is_multicast() {
            Some(Unusable::Multicast)
        } else if address == IpAddr::from([255, 255, 255, 255]) {
            Some(Unusable::Broadcast)
        } else {
            None
        }
    }
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unusable::Unspecified => "the unspecified address",
            Unusable::Loopback => "a loopback address",
            Unusable::Multicast => "a multicast address",
            Unusable::Broadcast => "the broadcast address",
        })
    }
}

/// What [`watch`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// The instances now (sorted by node, then id) and the answer's
    /// problems (everything skipped or changed on the way). Sent for the
    /// first answer, when the instances or the problems change, and for the
    /// first answer after failures.
    Instances { query: ServiceQuery, instances: Vec<Instance>, problems: Vec<Problem>, index: u64 },
    /// Consul answered, and the instances and problems last sent still
    /// stand. Sent for every other answer, so that a consumer can tell how
    /// long ago Consul last answered apart from how long ago the set last
    /// changed.
    Unchanged { query: ServiceQuery, index: u64 },
    /// A query failed; the last instances sent still stand. The next
    /// attempt is `retry_in` from now.
    Failed { query: ServiceQuery, error: String, consecutive_failures: u32, retry_in: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("consul address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("consul: set either token or token_file, not both")]
    TokenConflict,
    #[error("consul token from {origin} is not a valid HTTP header value")]
    TokenInvalid { origin: String },
    #[error("consul token file {path} is empty")]
    TokenFileEmpty { path: PathBuf },
    #[error("cannot read consul {what} {path}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("consul {what} {path} holds no usable PEM data")]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Option<reqwest::Error>,
    },
    #[error("consul ca_file, client_cert and client_key need an https:// address, not {address:?}")]
    TlsNeedsHttps { address: String },
    #[error("consul client_cert and client_key must be set together")]
    ClientCertIncomplete,
    #[error("cannot build the consul HTTP client")]
    Build(#[source] reqwest::Error),
    #[error("consul service name is empty")]
    EmptyService,
    #[error("GET {url}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: HTTP {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("GET {url}: no valid X-Consul-Index header (got {value:?})")]
    Index { url: String, value: Option<String> },
    #[error(
        "GET {url}: the ACL token may not read every instance (X-Consul-Results-Filtered-By-ACLs); \
         it needs service:read on the service and node:read on its nodes"
    )]
    FilteredByAcl { url: String },
    #[error("GET {url}: the answer is larger than {max} bytes")]
    TooLarge { url: String, max: usize },
    #[error("GET {url}: unexpected response body")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

pub use crate::errors::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn env_fills_only_what_the_config_left_out() {
        let mut s = ConsulSettings::default();
        s.apply_env_from(env(&[
            ("CONSUL_HTTP_ADDR", "10.0.0.1:8500"),
            ("CONSUL_HTTP_TOKEN", "t0k"),
            ("CONSUL_CACERT", "/ca.pem"),
        ]));
        assert_eq!(s.address.as_deref(), Some("10.0.0.1:8500"));
        assert_eq!(s.token.as_deref(), Some("t0k"));
        assert_eq!(s.ca_file, Some(PathBuf::from("/ca.pem")));

        let mut s = ConsulSettings {
            address: Some("https://consul:8501".into()),
            token_file: Some("/run/token".into()),
            ..Default::default()
        };
        s.apply_env_from(env(&[("CONSUL_HTTP_ADDR", "10.0.0.1:8500"), ("CONSUL_HTTP_TOKEN", "t0k")]));
        assert_eq!(s.address.as_deref(), Some("https://consul:8501"));
        assert_eq!(s.token, None, "a configured token file wins over the env token");
    }

    #[test]
    fn env_ssl_and_token_file_and_empty_values() {
        let mut s = ConsulSettings::default();
        s.apply_env_from(env(&[
            ("CONSUL_HTTP_ADDR", "consul:8501"),
            ("CONSUL_HTTP_SSL", "true"),
            ("CONSUL_HTTP_TOKEN", " "),
            ("CONSUL_HTTP_TOKEN_FILE", "/run/t"),
        ]));
        assert_eq!(s.address.as_deref(), Some("https://consul:8501"));
        assert_eq!(s.token, None);
        assert_eq!(s.token_file, Some(PathBuf::from("/run/t")));
    }

    #[test]
    fn settings_parse_and_reject_unknown_fields() {
        let s: ConsulSettings = toml::from_str(
            "address = \"127.0.0.1:8500\"\ntoken = \"x\"\ndatacenter = \"dc2\"\nwarning = \"exclude\"\n",
        )
        .unwrap();
        assert_eq!(s.warning, WarningPolicy::Exclude);
        assert_eq!(s.datacenter.as_deref(), Some("dc2"));
        assert!(toml::from_str::<ConsulSettings>("adress = \"x\"").is_err());
        assert!(toml::from_str::<ServiceQuery>("service = \"web\"\ntags = \"x\"").is_err());
        let q: ServiceQuery = toml::from_str("service = \"web\"\ntag = \"blue\"").unwrap();
        assert_eq!(q.to_string(), "web[tag=blue]");
    }

    #[test]
    fn debug_redacts_the_token() {
        let s = ConsulSettings { token: Some("secret-token".into()), ..Default::default() };
        let text = format!("{s:?}");
        assert!(!text.contains("secret-token"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn error_chain_joins_sources() {
        let e = ConsulError::ReadFile {
            what: "token file",
            path: "/nope".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        };
        assert_eq!(error_chain(&e), "cannot read consul token file /nope: gone");
    }
}
