//! The configuration file: parsing, defaults and validation.
//!
//! Validation is complete before anything touches the data plane, and every
//! error names the field it is about.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use lb_common::limits;

use crate::consul::{ConsulSettings, ServiceQuery};
use anyhow::Context as _;
use serde::Deserialize;

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

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic when the driver lacks it.
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// Direct routing: rewrite MACs, send back out; backends own the VIP.
    #[default]
    Dr,
    /// IP-in-IP / IPv6-in-IPv6 to the backend, which may sit anywhere
    /// routable and runs `xlb decap`.
    Tun,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interface to attach to.
    pub interface: String,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Where maps and the XDP link are pinned (default /sys/fs/bpf/xlb/<interface>).
    pub pin_dir: Option<PathBuf>,
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    #[serde(default = "default_max_vips")]
    pub max_vips: u32,
    #[serde(default = "default_max_backends")]
    pub max_backends: u32,
    /// Connection table entries (flows remembered across table changes).
    #[serde(default = "default_conntrack_size")]
    pub conntrack_size: u32,
    /// New flows recorded per CPU per second before the flood guard stops
    /// recording (0: no limit).
    #[serde(default = "default_conntrack_insert_limit")]
    pub conntrack_insert_limit: u64,
    /// Seconds a removed backend keeps its established flows.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: u64,
    /// Outer source address of TUN-mode packets (default: the interface's
    /// first global address of that family).
    pub tun_source_v4: Option<IpAddr>,
    pub tun_source_v6: Option<IpAddr>,
    /// How to reach Consul, for VIPs with a `consul` service.
    pub consul: Option<ConsulSettings>,
    /// The admin HTTP API (metrics, status, drain).
    #[serde(default)]
    pub admin: Admin,
    #[serde(default, rename = "vip")]
    pub vips: Vec<Vip>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Where the admin API listens. Anything but loopback needs a token.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Bearer token every request must carry (`Authorization: Bearer …`).
    pub token: Option<String>,
    /// File holding the token (read at start).
    pub token_file: Option<PathBuf>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin { listen: default_admin_listen(), token: None, token_file: None }
    }
}

impl Admin {
    /// The bearer token, read from `token_file` when that is how it is set.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(path)) => {
                let token = std::fs::read_to_string(path)
                    .with_context(|| format!("admin.token_file: cannot read {}", path.display()))?;
                let token = token.trim();
                anyhow::ensure!(!token.is_empty(), "admin.token_file: {} is empty", path.display());
                Ok(Some(token.to_owned()))
            }
            (None, None) => Ok(None),
        }
    }
}

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9300";

fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN.parse().expect("a socket address")
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Vip {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub forward: Forward,
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Take the backends from this Consul service instead of `backends`.
    pub consul: Option<ServiceQuery>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Largest backend weight; weights are relative, so this is plenty.
pub const MAX_WEIGHT: u32 = 10_000;

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

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        config.validate().map_err(|(field, message)| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        })?;
        Ok(config)
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.pin_dir.clone().unwrap_or_else(|| default_pin_dir(&self.interface))
    }

    /// Returns the offending field's path and what is wrong with it.
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: &str, message: String| Err((field.to_owned(), message));
        if self.interface.is_empty() || self.interface.len() > 15 || self.interface.contains('/') {
            return err("interface", format!("{:?} is not a valid interface name", self.interface));
        }
        if !is_prime(self.table_size) || self.table_size > limits::MAX_TABLE_SIZE {
            return err(
                "table_size",
                format!(
                    "{} must be a prime no larger than {} (the default, {}, suits up to ~650 backends per VIP)",
                    self.table_size,
                    limits::MAX_TABLE_SIZE,
                    limits::DEFAULT_TABLE_SIZE
                ),
            );
        }
        if !(1..=limits::MAX_VIPS).contains(&self.max_vips) {
            return err("max_vips", format!("{} is outside 1..={}", self.max_vips, limits::MAX_VIPS));
        }
        // Id 0 is reserved, so the largest id is max_backends - 1.
        if !(2..=limits::MAX_BACKENDS).contains(&self.max_backends) {
            return err(
                "max_backends",
                format!("{} is outside 2..={}", self.max_backends, limits::MAX_BACKENDS),
            );
        }
        if !(1024..=limits::MAX_CONNTRACK_SIZE).contains(&self.conntrack_size) {
            return err(
                "conntrack_size",
                format!("{} is outside 1024..={}", self.conntrack_size, limits::MAX_CONNTRACK_SIZE),
            );
        }
        if self.drain_timeout > 86_400 {
            return err("drain_timeout", format!("{} s is over a day", self.drain_timeout));
        }
        if self.admin.token.is_some() && self.admin.token_file.is_some() {
            return err("admin.token_file", "set `token` or `token_file`, not both".into());
        }
        if self.admin.token.as_deref() == Some("") {
            return err("admin.token", "must not be empty".into());
        }
        let has_token = self.admin.token.is_some() || self.admin.token_file.is_some();
        if !self.admin.listen.ip().is_loopback() && !has_token {
            return err(
                "admin.listen",
                format!(
                    "{} is not a loopback address: set admin.token (or token_file) so the API is not open to the network",
                    self.admin.listen
                ),
            );
        }
        if self.tun_source_v4.is_some_and(|a| !a.is_ipv4()) {
            return err("tun_source_v4", "not an IPv4 address".into());
        }
        if self.tun_source_v6.is_some_and(|a| !a.is_ipv6()) {
            return err("tun_source_v6", "not an IPv6 address".into());
        }
        if self.vips.len() > self.max_vips as usize {
            return err(
                "vip",
                format!("{} VIPs configured but max_vips = {}", self.vips.len(), self.max_vips),
            );
        }
        let mut names = HashSet::new();
        let mut keys = HashMap::new();
        let mut backend_slots = 0usize;
        for (i, vip) in self.vips.iter().enumerate() {
            let at = format!("vip[{i}]");
            // Names go into admin API paths and metric labels unescaped.
            let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if vip.name.is_empty() || vip.name.len() > 64 || !vip.name.chars().all(name_char) {
                return err(
                    &format!("{at}.name"),
                    format!("{:?} must be 1 to 64 of A-Z, a-z, 0-9, '-', '_' and '.'", vip.name),
                );
            }
            if !names.insert(vip.name.as_str()) {
                return err(&format!("{at}.name"), format!("duplicate VIP name {:?}", vip.name));
            }
            let at = format!("vip[{i}] ({})", vip.name);
            if vip.port == 0 {
                return err(&format!("{at}.port"), "must be 1..=65535".into());
            }
            if let Some(other) = keys.insert((vip.address, vip.port, vip.protocol), &vip.name) {
                return err(
                    &format!("{at}.address"),
                    format!(
                        "duplicate VIP: {} {}:{} is also VIP {other:?}",
                        vip.protocol, vip.address, vip.port
                    ),
                );
            }
            if let Some(query) = &vip.consul {
                if !vip.backends.is_empty() {
                    return err(
                        &format!("{at}.consul"),
                        "a VIP takes its backends from `backends` or from `consul`, not both".into(),
                    );
                }
                if query.service.is_empty() {
                    return err(&format!("{at}.consul.service"), "must not be empty".into());
                }
            }
            let mut seen = HashSet::new();
            for (j, backend) in vip.backends.iter().enumerate() {
                let field = format!("{at}.backends[{j}]");
                if backend.address.is_ipv4() != vip.address.is_ipv4() {
                    return err(
                        &format!("{field}.address"),
                        format!(
                            "{} is {} but the VIP {} is {}: backends must be of the VIP's family (DR forwards packets unchanged; TUN wraps IPv4 in IPv4 and IPv6 in IPv6)",
                            backend.address,
                            family_name(backend.address),
                            vip.address,
                            family_name(vip.address)
                        ),
                    );
                }
                if !usable_unicast(backend.address) {
                    return err(
                        &format!("{field}.address"),
                        format!("{} is not a unicast host address", backend.address),
                    );
                }
                if !seen.insert(backend.address) {
                    return err(
                        &format!("{field}.address"),
                        format!("duplicate backend {}", backend.address),
                    );
                }
                if backend.weight > MAX_WEIGHT {
                    return err(
                        &format!("{field}.weight"),
                        format!("{} is above the maximum of {MAX_WEIGHT}", backend.weight),
                    );
                }
            }
            // Maglev gives each backend about M/N entries; fewer than one is no balance.
            if vip.backends.len() >= self.table_size as usize {
                return err(
                    &format!("{at}.backends"),
                    format!(
                        "{} backends need a table_size well above that (at least 100x is advised)",
                        vip.backends.len()
                    ),
                );
            }
            backend_slots += vip.backends.len();
        }
        if backend_slots >= self.max_backends as usize {
            return err(
                "max_backends",
                format!(
                    "{backend_slots} VIP-backend pairs configured but max_backends = {} (one id is reserved)",
                    self.max_backends
                ),
            );
        }
        Ok(())
    }
}

pub fn default_pin_dir(interface: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/xlb").join(interface)
}

fn family_name(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Not unspecified, multicast, loopback or broadcast: an address a backend
/// can have.
pub fn usable_unicast(addr: IpAddr) -> bool {
    !(addr.is_unspecified() || addr.is_multicast() || addr.is_loopback())
        && addr != IpAddr::from([255, 255, 255, 255])
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interface = "eth0"
[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"
forward = "dr"
backends = [ { address = "10.0.0.11" }, { address = "10.0.0.12", weight = 2 } ]
"#;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("xlb.toml")).map_err(|e| {
            let mut s = e.to_string();
            if let Some(src) = std::error::Error::source(&e) {
                s.push_str(&format!(" {src}"));
            }
            s
        })
    }

    #[test]
    fn the_documented_example_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.interface, "eth0");
        assert_eq!(c.table_size, 65_537);
        assert_eq!(c.xdp_mode, XdpMode::Auto);
        assert_eq!(c.pin_dir(), Path::new("/sys/fs/bpf/xlb/eth0"));
        assert_eq!(c.vips[0].backends[0].weight, 1);
        assert_eq!(c.vips[0].backends[1].weight, 2);
    }

    #[test]
    fn every_invalid_config_is_rejected_naming_the_field() {
        let vip = |body: &str| format!("interface = \"eth0\"\n[[vip]]\n{body}\n");
        let base = "name = \"web\"\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"";
        let cases: Vec<(&str, String, &[&str])> = vec![
            ("unknown top-level field", format!("{GOOD}\nbogus = 1"), &["unknown field `bogus`"]),
            ("unknown vip field", vip(&format!("{base}\ncolour = \"red\"")), &["unknown field `colour`"]),
            (
                "unknown backend field",
                vip(&format!("{base}\nbackends = [ {{ address = \"10.0.0.1\", mac = \"x\" }} ]")),
                &["unknown field `mac`"],
            ),
            (
                "missing name",
                vip("address = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\""),
                &["missing field `name`"],
            ),
            (
                "port of the wrong type",
                vip(&base.replace("port = 80", "port = \"80\"")),
                &["port", "invalid type"],
            ),
            ("port out of range", vip(&base.replace("port = 80", "port = 70000")), &["port"]),
            ("port zero", vip(&base.replace("port = 80", "port = 0")), &["vip[0] (web).port"]),
            (
                "bad address",
                vip(&base.replace("192.0.2.10", "192.0.2.300")),
                &["address", "invalid IP address"],
            ),
            ("unknown protocol", vip(&base.replace("\"tcp\"", "\"sctp\"")), &["unknown variant `sctp`"]),
            (
                "tun source of the wrong family",
                format!("tun_source_v4 = \"fd00::1\"\n{GOOD}"),
                &["tun_source_v4", "not an IPv4 address"],
            ),
            (
                "family mismatch",
                vip(&format!("{base}\nbackends = [ {{ address = \"fd00::1\" }} ]")),
                &["vip[0] (web).backends[0].address", "IPv6", "IPv4"],
            ),
            (
                "duplicate backend",
                vip(&format!(
                    "{base}\nbackends = [ {{ address = \"10.0.0.1\" }}, {{ address = \"10.0.0.1\" }} ]"
                )),
                &["backends[1].address", "duplicate backend"],
            ),
            (
                "weight too large",
                vip(&format!("{base}\nbackends = [ {{ address = \"10.0.0.1\", weight = 10001 }} ]")),
                &["backends[0].weight"],
            ),
            (
                "negative weight",
                vip(&format!("{base}\nbackends = [ {{ address = \"10.0.0.1\", weight = -1 }} ]")),
                &["weight"],
            ),
            (
                "loopback backend",
                vip(&format!("{base}\nbackends = [ {{ address = \"127.0.0.1\" }} ]")),
                &["backends[0].address", "not a unicast host address"],
            ),
            (
                "vip name with a slash",
                format!(
                    "{GOOD}\n[[vip]]\nname = \"web/x\"\naddress = \"192.0.2.11\"\nport = 80\nprotocol = \"tcp\""
                ),
                &["vip[1].name", "web/x"],
            ),
            (
                "duplicate vip name",
                format!("{GOOD}\n[[vip]]\n{}", base.replace("port = 80", "port = 81")),
                &["vip[1].name", "duplicate VIP name"],
            ),
            (
                "same address, port and protocol twice",
                format!("{GOOD}\n[[vip]]\n{}", base.replace("\"web\"", "\"web2\"")),
                &["vip[1] (web2).address", "duplicate VIP", "also VIP \"web\""],
            ),
            ("table size not prime", format!("table_size = 65536\n{GOOD}"), &["table_size", "prime"]),
            ("table size too large", format!("table_size = 2147483647\n{GOOD}"), &["table_size"]),
            ("max_vips too small", format!("max_vips = 0\n{GOOD}"), &["max_vips"]),
            (
                "more vips than max_vips",
                format!(
                    "max_vips = 1\n{GOOD}\n[[vip]]\n{}",
                    base.replace("\"web\"", "\"b\"").replace("80", "81")
                ),
                &["vip", "max_vips = 1"],
            ),
            ("backends over max_backends", format!("max_backends = 2\n{GOOD}"), &["max_backends"]),
            ("bad interface name", GOOD.replace("eth0", "a-name-longer-than-15"), &["interface"]),
            ("unknown xdp_mode", format!("xdp_mode = \"turbo\"\n{GOOD}"), &["unknown variant `turbo`"]),
            (
                "admin API open to the network without a token",
                format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:9300\""),
                &["admin.listen", "token"],
            ),
            (
                "admin token twice",
                format!("{GOOD}\n[admin]\ntoken = \"a\"\ntoken_file = \"/t\""),
                &["admin.token_file"],
            ),
            (
                "consul and static backends together",
                GOOD.to_string()
                    .replace("forward = \"dr\"", "forward = \"dr\"\nconsul = { service = \"web\" }"),
                &["vip[0] (web).consul", "not both"],
            ),
            (
                "empty consul service",
                vip(&format!("{base}\nconsul = {{ service = \"\" }}")),
                &["vip[0] (web).consul.service"],
            ),
            (
                "unknown consul field",
                format!("{GOOD}\n[consul]\nadress = \"x\""),
                &["unknown field `adress`"],
            ),
        ];
        let mut failures = Vec::new();
        for (name, text, needles) in cases {
            match parse(&text) {
                Ok(_) => failures.push(format!("{name}: accepted")),
                Err(msg) => {
                    for needle in needles {
                        if !msg.contains(needle) {
                            failures.push(format!("{name}: {msg:?} does not mention {needle:?}"));
                        }
                    }
                    if !msg.starts_with("xlb.toml") {
                        failures.push(format!("{name}: {msg:?} does not name the file"));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn primes() {
        assert!(is_prime(65_537) && is_prime(2) && is_prime(1_048_583));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0) && !is_prime(65_535));
    }
}
