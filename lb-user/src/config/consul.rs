//! The `[consul]` section and a VIP's `consul = { … }`: how to reach
//! Consul and which service to follow.

use std::{fmt, path::PathBuf};

use serde::Deserialize;

/// The agent Consul's own tools use when nothing says otherwise.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8500";

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
}
