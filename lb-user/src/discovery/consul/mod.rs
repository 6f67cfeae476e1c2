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

use std::{fmt, net::IpAddr, path::PathBuf};

pub use client::{Client, Snapshot};
pub use entries::decode;
pub use watch::{WatchOptions, watch, watch_with};

pub use super::{Duplicate, Instance, InstanceId, MAX_INSTANCES, Update};
pub use crate::{
    config::consul::{ConsulSettings, DEFAULT_ADDRESS, EmptyPolicy, ServiceQuery, WarningPolicy},
    model::Unusable,
};

/// Service meta key whose value (a decimal u32) replaces the weight Consul
/// gives the instance.
pub const WEIGHT_META_KEY: &str = "xlb-weight";

// How a health entry becomes an [`Instance`]:
// `address` is `Service.Address`, or `Node.Address` when that is empty
// (Consul's documented fallback); an address that is not an IP (a
// hostname), or is one no backend can have ([`Unusable`]: a dev agent's
// `Node.Address` is 127.0.0.1), skips the instance. For a query with a
// tag, an entry without it is skipped too, whatever the agent answered
// (see [`watch_with`]). `tagged` holds `Service.TaggedAddresses`
// (`lan_ipv4`, `wan_ipv4`, `lan_ipv6`, `wan_ipv6`, in that order). `weight`
// is `Service.Weights.Passing`, or `Weights.Warning` for a warning instance
// (1 when Consul sends no weights), replaced by the service meta key
// [`WEIGHT_META_KEY`] in either state when that holds a valid u32; it is
// clamped to `0..=`[`MAX_WEIGHT`](crate::config::MAX_WEIGHT). `warning`:
// its worst check is `warning`. Two instances with the same address are
// one backend ([`dedup_by_address`](super::dedup_by_address)). Everything
// skipped or changed is reported as a [`Problem`].

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
    Duplicate(Duplicate),
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
            Problem::Duplicate(Duplicate { address, kept, dropped }) => {
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
