//! The configuration file, parsed into types.
//!
//! A [`Config`] is two parts: [`StartConfig`], which shapes the loaded
//! program and its maps and applies only when `xlb run` starts, and
//! [`LiveConfig`], which a reload applies without a restart. The split is
//! the reload rule: [`Config::reload`] takes the live part of an edited
//! file and names every start-only field that differs, which then keeps
//! its running value.
//!
//! Validation is complete before anything touches the data plane, and every
//! error names the file and the field it is about.

pub mod check;
pub mod consul;
pub mod etcd;
mod file;
#[cfg(test)]
mod tests;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
pub use file::{DEFAULT_ADMIN_LISTEN, DEFAULT_BIRD_SOCKET};

pub use check::Check;
pub use consul::{ConsulSettings, EmptyPolicy, ServiceQuery};
pub use etcd::{EtcdPrefix, EtcdSettings};

use crate::model::{Forward, VipAddr, XdpMode};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: {field}: {message}")]
    Invalid { path: PathBuf, field: String, message: String },
}

/// Largest backend weight; weights are relative, so this is plenty.
pub const MAX_WEIGHT: u32 = 10_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub start: StartConfig,
    pub live: LiveConfig,
}

/// What program `xlb` is loaded and attached with, and what the daemon
/// binds at start. Changing any of it needs a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartConfig {
    /// Interface to attach to.
    pub interface: String,
    pub xdp_mode: XdpMode,
    /// Where maps and the XDP link are pinned.
    pub pin_dir: PathBuf,
    pub capacities: Capacities,
    /// New flows recorded per CPU per second before the flood guard stops
    /// recording (0: no limit).
    pub conntrack_insert_limit: u64,
    /// Outer source addresses of TUN packets; `None`: the interface's.
    pub tun_source_v4: Option<Ipv4Addr>,
    pub tun_source_v6: Option<Ipv6Addr>,
    pub admin: AdminConfig,
    /// VIP routes for a BGP speaker to announce; `None`: xlb announces nothing.
    pub announce: Option<AnnounceConfig>,
}

impl StartConfig {
    /// Every start-only field, as the file spells it.
    pub const FIELDS: [&'static str; 12] = [
        "interface",
        "xdp_mode",
        "pin_dir",
        "table_size",
        "max_vips",
        "max_backends",
        "conntrack_size",
        "conntrack_insert_limit",
        "tun_source_v4",
        "tun_source_v6",
        "admin",
        "announce",
    ];

    /// The fields (from [`Self::FIELDS`]) whose values differ in `other`.
    pub fn changed_fields(&self, other: &StartConfig) -> Vec<&'static str> {
        let (a, b) = (self, other);
        let differs = [
            a.interface != b.interface,
            a.xdp_mode != b.xdp_mode,
            a.pin_dir != b.pin_dir,
            a.capacities.table_size != b.capacities.table_size,
            a.capacities.max_vips != b.capacities.max_vips,
            a.capacities.max_backends != b.capacities.max_backends,
            a.capacities.conntrack_size != b.capacities.conntrack_size,
            a.conntrack_insert_limit != b.conntrack_insert_limit,
            a.tun_source_v4 != b.tun_source_v4,
            a.tun_source_v6 != b.tun_source_v6,
            a.admin != b.admin,
            a.announce != b.announce,
        ];
        Self::FIELDS.iter().zip(differs).filter(|(_, d)| *d).map(|(f, _)| *f).collect()
    }
}

/// The sizes of the maps: they are created with these and a restart that
/// changes them cannot adopt the pinned maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Maglev table size M (prime).
    pub table_size: u32,
    pub max_vips: u32,
    /// Backend ids, counted per VIP-backend pair; id 0 is reserved.
    pub max_backends: u32,
    pub conntrack_size: u32,
}

impl Capacities {
    /// The connection table's slots: `conntrack_size` rounded up to whole
    /// sets, what the table holds and what status reports.
    pub fn conntrack_slots(&self) -> u32 {
        lb_common::conn_sets(self.conntrack_size) * lb_common::CONN_WAYS as u32
    }
}

/// The admin HTTP API (metrics, status, drain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where the admin API listens. Anything but loopback needs a token.
    pub listen: SocketAddr,
    pub token: Option<TokenSource>,
}

/// `[announce]`: xlb keeps a host route for every VIP that can serve in a
/// kernel routing table of its own, for a BGP speaker (BIRD's kernel
/// protocol) to learn and announce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceConfig {
    pub table: u32,
    /// How long a graceful stop (or `xlb announce off`) waits after
    /// withdrawing, for routers to move flows away.
    pub withdraw_wait: Duration,
    /// BIRD's control socket, read for its sessions' state in `xlb status`.
    pub bird_socket: PathBuf,
}

/// Where the admin API's bearer token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    Inline(String),
    /// Read at start.
    File(PathBuf),
}

impl AdminConfig {
    /// The bearer token, read from its file when that is how it is set.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        match &self.token {
            None => Ok(None),
            Some(TokenSource::Inline(token)) => Ok(Some(token.clone())),
            Some(TokenSource::File(path)) => {
                let token = std::fs::read_to_string(path)
                    .with_context(|| format!("admin.token_file: cannot read {}", path.display()))?;
                let token = token.trim();
                anyhow::ensure!(!token.is_empty(), "admin.token_file: {} is empty", path.display());
                Ok(Some(token.to_owned()))
            }
        }
    }

    /// An address a client on this host reaches the API at: a daemon
    /// listening on every address answers on loopback.
    pub fn local_url(&self) -> String {
        let mut listen = self.listen;
        if listen.ip().is_unspecified() {
            listen.set_ip(if listen.is_ipv4() {
                Ipv4Addr::LOCALHOST.into()
            } else {
                Ipv6Addr::LOCALHOST.into()
            });
        }
        format!("http://{listen}")
    }
}

/// What a reload applies: VIPs, backends, discovery and drain timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveConfig {
    /// How long a backend removed from the config keeps its established flows.
    pub drain_timeout: Duration,
    /// How long after a table switch a TUN VIP keeps the previous table
    /// for second chance; zero turns it off.
    pub second_chance: Duration,
    /// How to reach Consul, for VIPs whose backends come from it.
    pub consul: Option<ConsulSettings>,
    /// How to reach etcd, for VIPs whose backends come from it.
    pub etcd: Option<EtcdSettings>,
    pub vips: Vec<Vip>,
}

impl LiveConfig {
    /// The `[consul]` section, with Consul's environment variables filling in.
    pub fn consul_settings(&self) -> ConsulSettings {
        let mut settings = self.consul.clone().unwrap_or_default();
        settings.apply_env();
        settings
    }

    /// The `[etcd]` section, or the defaults.
    pub fn etcd_settings(&self) -> EtcdSettings {
        self.etcd.clone().unwrap_or_default()
    }

    /// The discovery sources the VIPs follow, sorted, each once.
    pub fn sources(&self) -> Vec<Source> {
        let mut sources: Vec<Source> = self
            .vips
            .iter()
            .filter_map(|v| match &v.backends {
                Backends::Discovered(source) => Some(source.clone()),
                Backends::Static(_) => None,
            })
            .collect();
        sources.sort();
        sources.dedup();
        sources
    }

    /// What to do when `source` reports no instance.
    pub fn on_empty(&self, source: &Source) -> EmptyPolicy {
        match source {
            Source::Consul(_) => self.consul.as_ref().map(|c| c.on_empty).unwrap_or_default(),
            Source::Etcd(_) => self.etcd.as_ref().map(|e| e.on_empty).unwrap_or_default(),
        }
    }

    pub fn vip(&self, name: &str) -> Option<&Vip> {
        self.vips.iter().find(|v| v.name == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    /// Unique; used in logs, metric labels and admin API paths.
    pub name: String,
    pub addr: VipAddr,
    pub forward: Forward,
    pub backends: Backends,
    /// Active health check of its backends; `None`: none.
    pub check: Option<Check>,
}

/// Where a VIP's backends come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backends {
    /// Listed in the file.
    Static(Vec<Backend>),
    /// The instances a discovery source lists.
    Discovered(Source),
}

/// A service in a discovery system: where a VIP's backends come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// The healthy instances of a Consul service.
    Consul(ServiceQuery),
    /// The keys under an etcd prefix.
    Etcd(EtcdPrefix),
}

/// Which discovery system a [`Source`] is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Consul,
    Etcd,
}

impl SourceKind {
    /// What a source of this kind is called: "Consul service", "etcd prefix".
    pub fn noun(self) -> &'static str {
        match self {
            SourceKind::Consul => "Consul service",
            SourceKind::Etcd => "etcd prefix",
        }
    }

    /// As metric labels and the API write it.
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::Consul => "consul",
            SourceKind::Etcd => "etcd",
        }
    }
}

impl Source {
    pub fn kind(&self) -> SourceKind {
        match self {
            Source::Consul(_) => SourceKind::Consul,
            Source::Etcd(_) => SourceKind::Etcd,
        }
    }

    /// The service's name in its system: `web`, `web[tag=blue]`,
    /// `/services/web/`.
    pub fn name(&self) -> String {
        match self {
            Source::Consul(query) => query.to_string(),
            Source::Etcd(prefix) => prefix.to_string(),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind().noun(), self.name())
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceKind::Consul => "Consul",
            SourceKind::Etcd => "etcd",
        })
    }
}

impl Backends {
    /// The statically listed backends (none for discovered ones).
    pub fn listed(&self) -> &[Backend] {
        match self {
            Backends::Static(list) => list,
            Backends::Discovered(_) => &[],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: IpAddr,
    /// 0 drains the backend.
    pub weight: u32,
}

/// The outcome of rereading the file while running.
#[derive(Debug)]
pub struct Reload {
    /// The file's live part, valid under the running start-only settings.
    pub live: LiveConfig,
    /// Start-only fields the file changed; they keep their running values.
    pub refused: Vec<&'static str>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::parse(&read(path)?, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        file::File::from_toml(text, path)?.validate().map_err(|e| e.at(path))
    }

    /// Rereads `path` for a daemon running with `running`: the new live
    /// part, checked against the running start-only settings (a VIP count
    /// within the running `max_vips`, say), and the start-only fields the
    /// file changed, which need a restart.
    pub fn reload(path: &Path, running: &StartConfig) -> Result<Reload, ConfigError> {
        let file = file::File::from_toml(&read(path)?, path)?;
        let new = file.validate().map_err(|e| e.at(path))?;
        let refused = running.changed_fields(&new.start);
        let live = file.live(running).map_err(|mut e| {
            e.message.push_str(&format!(
                " under the running settings ({} apply only at start)",
                refused.join(", ")
            ));
            e.at(path)
        })?;
        Ok(Reload { live, refused })
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })
}

pub fn default_pin_dir(interface: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/xlb").join(interface)
}
