//! The vocabulary every layer shares: what a VIP is addressed by, how it
//! forwards, how the program attaches, where a backend stands. The maps'
//! byte-level forms of these live in `dataplane::wire`; nothing above the
//! data plane sees those.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// A VIP's transport protocol.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a VIP's packets reach its backends.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// Direct routing: rewrite MACs, send back out; backends share the L2
    /// segment and hold the VIP.
    #[default]
    Dr,
    /// IP-in-IP / IPv6-in-IPv6 to the backend, which may sit anywhere
    /// routable and runs `xlb decap`.
    Tun,
}

impl Forward {
    pub fn name(self) -> &'static str {
        match self {
            Forward::Dr => "dr",
            Forward::Tun => "tun",
        }
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a packet must be addressed to for a VIP to take it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for VipAddr {
    /// "tcp 192.0.2.10:80", "udp [2001:db8::10]:53".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V6(ip) => write!(f, "{} [{ip}]:{}", self.protocol, self.port),
            IpAddr::V4(ip) => write!(f, "{} {ip}:{}", self.protocol, self.port),
        }
    }
}

/// How program `xlb` (or `xlb_decap`) is attached to its interface.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic when the driver lacks it.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

/// How a running program ended up attached.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    Native,
    Generic,
    /// Swapped in through the link an earlier run pinned (its mode stands).
    ExistingLink,
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attachment::Native => "native",
            Attachment::Generic => "generic",
            Attachment::ExistingLink => "existing link",
        })
    }
}

/// Where a backend stands, as status, metrics and the API show it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum BackendRole {
    /// In the table: takes new flows.
    Active,
    /// Out of the table (weight 0 or drained); established flows stay.
    Draining,
    /// No MAC known yet (DR): out of the table until it resolves.
    Unresolved,
    /// Removed: out of the table, keeping its established flows until
    /// `drain_timeout` runs out.
    Leaving,
    /// Its entry takes no flows (seen only in the pinned maps of a stopped
    /// daemon).
    Inactive,
}

impl BackendRole {
    pub fn name(self) -> &'static str {
        match self {
            BackendRole::Active => "active",
            BackendRole::Draining => "draining",
            BackendRole::Unresolved => "unresolved",
            BackendRole::Leaving => "leaving",
            BackendRole::Inactive => "inactive",
        }
    }
}

impl fmt::Display for BackendRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
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

/// An address prefix as operators write it: `10.8.0.0/24`, or one
/// address (`10.8.0.11`, a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').map_or((s, None), |(a, l)| (a, Some(l)));
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an address or ADDR/LEN prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| format!("{s:?}: length must be 0–{max}"))?,
        };
        let bits = |a: IpAddr| match a {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        };
        let host = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        if bits(addr) & host != 0 {
            return Err(format!("{s:?} has bits set past its length (did you mean a single address?)"));
        }
        Ok(Prefix { addr, len })
    }
}

impl From<Prefix> for String {
    fn from(p: Prefix) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for Prefix {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_addresses_read_as_operators_write_them() {
        let v4 = VipAddr { ip: [192, 0, 2, 10].into(), port: 80, protocol: Protocol::Tcp };
        let v6 = VipAddr { ip: "2001:db8::10".parse().unwrap(), port: 53, protocol: Protocol::Udp };
        assert_eq!(v4.to_string(), "tcp 192.0.2.10:80");
        assert_eq!(v6.to_string(), "udp [2001:db8::10]:53");
        assert_eq!(format_mac(&[2, 0, 0, 0, 0xab, 1]), "02:00:00:00:ab:01");
    }

    #[test]
    fn prefixes_read_as_operators_write_them() {
        let p = |s: &str| s.parse::<Prefix>();
        assert_eq!(p("10.8.0.0/24").unwrap().to_string(), "10.8.0.0/24");
        assert_eq!(p("10.8.0.11").unwrap().to_string(), "10.8.0.11/32");
        assert_eq!(p("fd08::/64").unwrap().to_string(), "fd08::/64");
        assert_eq!(p("2001:db8::1").unwrap().len, 128);
        assert_eq!(p("0.0.0.0/0").unwrap().len, 0);
        assert!(p("10.8.0.11/24").unwrap_err().contains("bits set past its length"));
        assert!(p("10.8.0.0/33").unwrap_err().contains("0–32"));
        assert!(p("fd08::/129").unwrap_err().contains("0–128"));
        assert!(p("lb1/24").unwrap_err().contains("not an address"));
    }
}
