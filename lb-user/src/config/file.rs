//! The file as TOML has it, and its validation into [`Config`].

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::limits;
use serde::Deserialize;

use super::{
    AdminConfig, AnnounceConfig, Backend, Backends, Capacities, Config, ConfigError, ConsulSettings,
    LiveConfig, MAX_WEIGHT, ServiceQuery, Source, StartConfig, TokenSource, Vip,
    check::{Check, CheckFile},
    default_pin_dir,
    etcd::{EtcdFile, EtcdPrefix},
};
use crate::model::{Forward, Protocol, Unusable, VipAddr, XdpMode};

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9300";
/// Where Debian's bird2 puts its control socket.
pub const DEFAULT_BIRD_SOCKET: &str = "/run/bird/bird.ctl";
/// The longest `announce.withdraw_wait` accepted.
const MAX_WITHDRAW_WAIT: u64 = 600;
/// The longest `drain_timeout` accepted.
const MAX_DRAIN_SECS: u64 = 86_400;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    interface: String,
    #[serde(default)]
    xdp_mode: XdpMode,
    pin_dir: Option<PathBuf>,
    #[serde(default = "default_table_size")]
    table_size: u32,
    #[serde(default = "default_max_vips")]
    max_vips: u32,
    #[serde(default = "default_max_backends")]
    max_backends: u32,
    #[serde(default = "default_conntrack_size")]
    conntrack_size: u32,
    #[serde(default = "default_conntrack_insert_limit")]
    conntrack_insert_limit: u64,
    #[serde(default = "default_drain_timeout")]
    drain_timeout: u64,
    /// Seconds; `drain_timeout` when not given.
    second_chance: Option<u64>,
    tun_source_v4: Option<IpAddr>,
    tun_source_v6: Option<IpAddr>,
    consul: Option<ConsulSettings>,
    etcd: Option<EtcdFile>,
    /// The health check of every VIP without a `check` of its own.
    check: Option<CheckFile>,
    #[serde(default)]
    admin: AdminFile,
    announce: Option<AnnounceFile>,
    #[serde(default, rename = "vip")]
    vips: Vec<VipFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    #[serde(default = "default_admin_listen")]
    listen: SocketAddr,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

impl Default for AdminFile {
    fn default() -> Self {
        AdminFile { listen: default_admin_listen(), token: None, token_file: None }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnnounceFile {
    table: u32,
    #[serde(default = "default_withdraw_wait")]
    withdraw_wait: u64,
    #[serde(default = "default_bird_socket")]
    bird_socket: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VipFile {
    name: String,
    address: IpAddr,
    port: u16,
    protocol: Protocol,
    #[serde(default)]
    forward: Forward,
    #[serde(default)]
    backends: Vec<BackendFile>,
    consul: Option<ServiceQuery>,
    etcd: Option<EtcdPrefix>,
    check: Option<CheckFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendFile {
    address: IpAddr,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_table_size() -> u32 {
    limits::DEFAULT_TABLE_SIZE
}
fn default_max_vips() -> u32 {
    limits::DEFAULT_MAX_VIPS
}
fn default_max_backends() -> u32 {
    limits::DEFAULT_MAX_BACKENDS
}
fn default_conntrack_size() -> u32 {
    limits::DEFAULT_CONNTRACK_SIZE
}
fn default_conntrack_insert_limit() -> u64 {
    limits::DEFAULT_CONN_INSERT_LIMIT
}
fn default_drain_timeout() -> u64 {
    30
}
fn default_weight() -> u32 {
    1
}
fn default_withdraw_wait() -> u64 {
    5
}
fn default_bird_socket() -> PathBuf {
    PathBuf::from(DEFAULT_BIRD_SOCKET)
}
fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN.parse().expect("a socket address")
}

/// A field and what is wrong with it.
#[derive(Debug)]
pub(super) struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid { field: field.into(), message: message.into() }
    }

    pub fn at(self, path: &Path) -> ConfigError {
        ConfigError::Invalid { path: path.to_owned(), field: self.field, message: self.message }
    }
}

impl File {
    pub fn from_toml(text: &str, path: &Path) -> Result<File, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
    }

    pub fn validate(&self) -> Result<Config, Invalid> {
        let start = self.start()?;
        let live = self.live(&start)?;
        Ok(Config { start, live })
    }

    fn start(&self) -> Result<StartConfig, Invalid> {
        let interface = &self.interface;
        if interface.is_empty() || interface.len() > 15 || interface.contains('/') {
            return Err(Invalid::new("interface", format!("{interface:?} is not a valid interface name")));
        }
        if !is_prime(self.table_size) || self.table_size > limits::MAX_TABLE_SIZE {
            return Err(Invalid::new(
                "table_size",
                format!(
                    "{} must be a prime no larger than {} (the default, {}, suits up to ~650 backends per VIP)",
                    self.table_size,
                    limits::MAX_TABLE_SIZE,
                    limits::DEFAULT_TABLE_SIZE
                ),
            ));
        }
        in_range("max_vips", self.max_vips, 1, limits::MAX_VIPS)?;
        // Id 0 is reserved, so the largest id is max_backends - 1.
        in_range("max_backends", self.max_backends, 2, limits::MAX_BACKENDS)?;
        in_range("conntrack_size", self.conntrack_size, 1024, limits::MAX_CONNTRACK_SIZE)?;
        let tun_source_v4 = match self.tun_source_v4 {
            None => None,
            Some(IpAddr::V4(a)) => Some(a),
            Some(IpAddr::V6(_)) => return Err(Invalid::new("tun_source_v4", "not an IPv4 address")),
        };
        let tun_source_v6 = match self.tun_source_v6 {
            None => None,
            Some(IpAddr::V6(a)) => Some(a),
            Some(IpAddr::V4(_)) => return Err(Invalid::new("tun_source_v6", "not an IPv6 address")),
        };
        Ok(StartConfig {
            interface: interface.clone(),
            xdp_mode: self.xdp_mode,
            pin_dir: self.pin_dir.clone().unwrap_or_else(|| default_pin_dir(interface)),
            capacities: Capacities {
                table_size: self.table_size,
                max_vips: self.max_vips,
                max_backends: self.max_backends,
                conntrack_size: self.conntrack_size,
            },
            conntrack_insert_limit: self.conntrack_insert_limit,
            tun_source_v4,
            tun_source_v6,
            admin: self.admin.validate()?,
            announce: self.announce.as_ref().map(AnnounceFile::validate).transpose()?,
        })
    }

    /// The live part, valid under `start` (which is this file's own, or the
    /// running one on a reload).
    pub fn live(&self, start: &StartConfig) -> Result<LiveConfig, Invalid> {
        let caps = start.capacities;
        if self.drain_timeout > MAX_DRAIN_SECS {
            return Err(Invalid::new("drain_timeout", format!("{} s is over a day", self.drain_timeout)));
        }
        let second_chance = self.second_chance.unwrap_or(self.drain_timeout);
        if second_chance > MAX_DRAIN_SECS {
            return Err(Invalid::new("second_chance", format!("{second_chance} s is over a day")));
        }
        if self.vips.len() > caps.max_vips as usize {
            return Err(Invalid::new(
                "vip",
                format!("{} VIPs configured but max_vips = {}", self.vips.len(), caps.max_vips),
            ));
        }
        let mut names = HashSet::new();
        let mut addrs = HashMap::new();
        let mut vips = Vec::with_capacity(self.vips.len());
        let default_check = match &self.check {
            None => None,
            Some(check) => check
                .validate()
                .map_err(|(field, message)| Invalid::new(format!("check.{field}"), message))?,
        };
        for (i, raw) in self.vips.iter().enumerate() {
            let vip = raw.validate(i, caps, default_check.as_ref())?;
            let at = format!("vip[{i}]");
            if !names.insert(vip.name.clone()) {
                return Err(Invalid::new(format!("{at}.name"), format!("duplicate VIP name {:?}", vip.name)));
            }
            if let Some(other) = addrs.insert(vip.addr, vip.name.clone()) {
                return Err(Invalid::new(
                    format!("{at} ({}).address", vip.name),
                    format!("duplicate VIP: {} is also VIP {other:?}", vip.addr),
                ));
            }
            vips.push(vip);
        }
        let pairs: usize = vips.iter().map(|v| v.backends.listed().len()).sum();
        if pairs >= caps.max_backends as usize {
            return Err(Invalid::new(
                "max_backends",
                format!(
                    "{pairs} VIP-backend pairs configured but max_backends = {} (one id is reserved)",
                    caps.max_backends
                ),
            ));
        }
        let etcd = match &self.etcd {
            Some(file) => Some(
                file.validate().map_err(|(field, message)| Invalid::new(format!("etcd.{field}"), message))?,
            ),
            None => None,
        };
        Ok(LiveConfig {
            drain_timeout: Duration::from_secs(self.drain_timeout),
            second_chance: Duration::from_secs(second_chance),
            consul: self.consul.clone(),
            etcd,
            vips,
        })
    }
}

impl AdminFile {
    fn validate(&self) -> Result<AdminConfig, Invalid> {
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err(Invalid::new("admin.token_file", "set `token` or `token_file`, not both"));
            }
            (Some(t), None) if t.is_empty() => return Err(Invalid::new("admin.token", "must not be empty")),
            (Some(t), None) => Some(TokenSource::Inline(t.clone())),
            (None, Some(path)) => Some(TokenSource::File(path.clone())),
            (None, None) => None,
        };
        if !self.listen.ip().is_loopback() && token.is_none() {
            return Err(Invalid::new(
                "admin.listen",
                format!(
                    "{} is not a loopback address: set admin.token (or token_file) so the API is not open to the network",
                    self.listen
                ),
            ));
        }
        Ok(AdminConfig { listen: self.listen, token })
    }
}

impl AnnounceFile {
    fn validate(&self) -> Result<AnnounceConfig, Invalid> {
        let reserved = match self.table {
            0 => Some("0 is not a routing table"),
            253 => Some("253 is the kernel's default table"),
            254 => Some("254 is the kernel's main table"),
            255 => Some("255 is the kernel's local table"),
            _ => None,
        };
        if let Some(why) = reserved {
            return Err(Invalid::new(
                "announce.table",
                format!("{why}: give xlb a table of its own (e.g. 200) for BIRD's kernel protocol to learn"),
            ));
        }
        if self.withdraw_wait > MAX_WITHDRAW_WAIT {
            return Err(Invalid::new(
                "announce.withdraw_wait",
                format!("{} s is over {MAX_WITHDRAW_WAIT} s", self.withdraw_wait),
            ));
        }
        Ok(AnnounceConfig {
            table: self.table,
            withdraw_wait: Duration::from_secs(self.withdraw_wait),
            bird_socket: self.bird_socket.clone(),
        })
    }
}

impl VipFile {
    fn validate(&self, i: usize, caps: Capacities, default_check: Option<&Check>) -> Result<Vip, Invalid> {
        // Names go into admin API paths and metric labels unescaped.
        let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if self.name.is_empty() || self.name.len() > 64 || !self.name.chars().all(name_char) {
            return Err(Invalid::new(
                format!("vip[{i}].name"),
                format!("{:?} must be 1 to 64 of A-Z, a-z, 0-9, '-', '_' and '.'", self.name),
            ));
        }
        let at = format!("vip[{i}] ({})", self.name);
        if self.port == 0 {
            return Err(Invalid::new(format!("{at}.port"), "must be 1..=65535"));
        }
        let backends = match (&self.consul, &self.etcd) {
            (Some(_), Some(_)) => {
                return Err(Invalid::new(
                    format!("{at}.etcd"),
                    "a VIP takes its backends from one source: `backends`, `consul` or `etcd`",
                ));
            }
            (Some(_), None) | (None, Some(_)) if !self.backends.is_empty() => {
                let field = if self.consul.is_some() { "consul" } else { "etcd" };
                return Err(Invalid::new(
                    format!("{at}.{field}"),
                    format!("a VIP takes its backends from `backends` or from `{field}`, not both"),
                ));
            }
            (Some(query), None) if query.service.is_empty() => {
                return Err(Invalid::new(format!("{at}.consul.service"), "must not be empty"));
            }
            (Some(query), None) => Backends::Discovered(Source::Consul(query.clone())),
            (None, Some(prefix)) if prefix.prefix.is_empty() => {
                return Err(Invalid::new(
                    format!("{at}.etcd.prefix"),
                    "must not be empty (it would take every key in etcd)",
                ));
            }
            (None, Some(prefix)) => Backends::Discovered(Source::Etcd(prefix.clone())),
            (None, None) => Backends::Static(self.static_backends(&at, caps)?),
        };
        let check = match &self.check {
            // The top-level check is for TCP VIPs.
            None => default_check.filter(|_| self.protocol == Protocol::Tcp).cloned(),
            Some(check) => check
                .validate()
                .map_err(|(field, message)| Invalid::new(format!("{at}.check.{field}"), message))?,
        };
        if check.is_some() && self.protocol != Protocol::Tcp {
            return Err(Invalid::new(
                format!("{at}.check"),
                "health checks probe TCP (a connect or HTTP) and this VIP is UDP: remove its check",
            ));
        }
        Ok(Vip {
            name: self.name.clone(),
            addr: VipAddr { ip: self.address, port: self.port, protocol: self.protocol },
            forward: self.forward,
            backends,
            check,
        })
    }

    fn static_backends(&self, at: &str, caps: Capacities) -> Result<Vec<Backend>, Invalid> {
        let mut seen = HashSet::new();
        for (j, backend) in self.backends.iter().enumerate() {
            let field = format!("{at}.backends[{j}]");
            let address = backend.address;
            if address.is_ipv4() != self.address.is_ipv4() {
                return Err(Invalid::new(
                    format!("{field}.address"),
                    format!(
                        "{address} is {} but the VIP {} is {}: backends must be of the VIP's family (DR forwards packets unchanged; TUN wraps IPv4 in IPv4 and IPv6 in IPv6)",
                        family_name(address),
                        self.address,
                        family_name(self.address)
                    ),
                ));
            }
            if let Some(why) = Unusable::of(address) {
                return Err(Invalid::new(
                    format!("{field}.address"),
                    format!("{address} is not a unicast host address: it is {why}"),
                ));
            }
            if !seen.insert(address) {
                return Err(Invalid::new(format!("{field}.address"), format!("duplicate backend {address}")));
            }
            if backend.weight > MAX_WEIGHT {
                return Err(Invalid::new(
                    format!("{field}.weight"),
                    format!("{} is above the maximum of {MAX_WEIGHT}", backend.weight),
                ));
            }
        }
        // Maglev gives each backend about M/N entries; fewer than one is no balance.
        if self.backends.len() >= caps.table_size as usize {
            return Err(Invalid::new(
                format!("{at}.backends"),
                format!(
                    "{} backends need a table_size well above that (at least 100x is advised)",
                    self.backends.len()
                ),
            ));
        }
        Ok(self.backends.iter().map(|b| Backend { address: b.address, weight: b.weight }).collect())
    }
}

fn in_range(field: &str, value: u32, min: u32, max: u32) -> Result<(), Invalid> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(Invalid::new(field, format!("{value} is outside {min}..={max}")))
    }
}

fn family_name(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}
