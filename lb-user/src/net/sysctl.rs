//! Kernel settings under /proc/sys/net.

use std::{fmt, net::IpAddr};

/// One sysctl: its name as `sysctl -w` takes it, and its path (the two
/// differ for interface names with dots, such as VLANs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysctl {
    key: String,
    path: String,
}

impl Sysctl {
    fn conf(family: &str, scope: &str, setting: &str) -> Self {
        Sysctl {
            key: format!("net.{family}.conf.{scope}.{setting}"),
            path: format!("/proc/sys/net/{family}/conf/{scope}/{setting}"),
        }
    }

    /// `net.ipv4.conf.<interface>.forwarding`, or its IPv6 twin for an
    /// IPv6 `family`.
    pub fn forwarding(interface: &str, family: IpAddr) -> Self {
        Self::conf(if family.is_ipv4() { "ipv4" } else { "ipv6" }, interface, "forwarding")
    }

    /// Lets the kernel take packets whose source is one of its own addresses
    /// (TUN packets it forwards while a next hop resolves).
    pub fn accept_local(interface: &str) -> Self {
        Self::conf("ipv4", interface, "accept_local")
    }

    pub fn ipv6_forwarding_all() -> Self {
        Self::conf("ipv6", "all", "forwarding")
    }

    /// Whether it reads 1.
    pub fn is_on(&self) -> bool {
        std::fs::read_to_string(&self.path).is_ok_and(|s| s.trim() == "1")
    }
}

impl fmt::Display for Sysctl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_of_interfaces_with_dots() {
        let s = Sysctl::forwarding("eth0.100", "fd00::1".parse().unwrap());
        assert_eq!(s.to_string(), "net.ipv6.conf.eth0.100.forwarding");
        assert_eq!(s.path, "/proc/sys/net/ipv6/conf/eth0.100/forwarding");
        assert_eq!(Sysctl::accept_local("eth0").path, "/proc/sys/net/ipv4/conf/eth0/accept_local");
    }
}
