//! etcd v3 discovery: a VIP's backends from the keys under a prefix, one
//! instance per key, the way services register with `etcdctl put --lease`
//! and confd reads them.
//!
//! [`watch`] reads the prefix at one revision (in pages), then watches it
//! from the next revision, so no change falls between the two; a dropped
//! connection resumes the watch where it stopped, and a revision compacted
//! away in the meantime reads the prefix again. A key's value becomes an
//! [`Instance`](super::Instance) by [`value::parse`]; a key that is deleted
//! or whose lease expires (etcd's form of a failed health check) leaves the
//! set with the next event. The client is `etcd-client` (gRPC), with every
//! configured endpoint in one balanced channel.

mod value;
mod watch;

use std::{sync::Arc, time::Duration};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

pub use value::{Bad, MAX_VALUE, Record, State, parse};
pub use watch::{WatchOptions, watch, watch_with};

pub use crate::config::{
    EtcdPrefix, EtcdSettings,
    etcd::{Credentials, Password, Tls},
};

/// gRPC keepalive pings on an idle connection: a member that went away
/// without closing it (a partition, a powered-off host) is noticed within
/// this plus the request timeout.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// How to reach etcd, with the TLS files read; cheap to clone.
#[derive(Clone)]
pub struct Connector {
    settings: Arc<EtcdSettings>,
    tls: Option<TlsOptions>,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot read etcd {what} {path}")]
    ReadFile {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd password file {0} is empty")]
    PasswordFileEmpty(std::path::PathBuf),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd")]
    Client(#[from] etcd_client::Error),
}

impl Connector {
    /// Reads the TLS files now, so that a missing one fails the config.
    pub fn new(settings: &EtcdSettings) -> Result<Self, EtcdError> {
        let read = |what, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| EtcdError::ReadFile { what, path: path.to_owned(), source })
        };
        // The config allows https:// for every endpoint or none.
        let https = settings.endpoints.iter().any(|e| e.starts_with("https://"));
        let tls = if https {
            let files = settings.tls.clone().unwrap_or(Tls { ca_file: None, client: None });
            // A CA file replaces the system's roots rather than adding to them.
            let mut tls = match &files.ca_file {
                Some(ca) => TlsOptions::new().ca_certificate(Certificate::from_pem(read("ca_file", ca)?)),
                None => TlsOptions::new().with_native_roots(),
            };
            if let Some((cert, key)) = &files.client {
                tls = tls.identity(Identity::from_pem(read("client_cert", cert)?, read("client_key", key)?));
            }
            Some(tls)
        } else {
            None
        };
        Ok(Connector { settings: Arc::new(settings.clone()), tls })
    }

    pub fn settings(&self) -> &EtcdSettings {
        &self.settings
    }

    /// A client for the cluster (authenticated, if a user is set: that
    /// needs a member to answer).
    pub async fn connect(&self) -> Result<Client, EtcdError> {
        let s = &self.settings;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(s.dial_timeout)
            .with_keep_alive(KEEPALIVE, s.request_timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from its cluster's leader refuses, rather
            // than serving what it last knew as if it were current.
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        if let Some(Credentials { username, password }) = &s.credentials {
            let password = match password {
                Password::Inline(p) => p.clone(),
                Password::File(path) => {
                    let text = std::fs::read_to_string(path).map_err(|source| EtcdError::ReadFile {
                        what: "password file",
                        path: path.clone(),
                        source,
                    })?;
                    let text = text.trim_end_matches(['\r', '\n']).to_owned();
                    if text.is_empty() {
                        return Err(EtcdError::PasswordFileEmpty(path.clone()));
                    }
                    text
                }
            };
            options = options.with_user(username.clone(), password);
        }
        let limit = s.dial_timeout + s.request_timeout;
        tokio::time::timeout(limit, Client::connect(&s.endpoints, Some(options)))
            .await
            .map_err(|_| EtcdError::Timeout(limit))?
            .map_err(EtcdError::from)
    }
}
