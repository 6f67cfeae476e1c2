//! What the daemon knows beyond the maps (VIP names, weights, MAC
//! resolution), published to /run/xlb/<interface>.json after every change
//! so `xlb status` can label what it reads from the pinned maps.

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    addr,
    reconcile::{Reconciler, Role},
};

#[derive(Debug, Serialize, Deserialize)]
pub struct DaemonState {
    pub pid: u32,
    pub config: PathBuf,
    pub interface: String,
    pub pin_dir: PathBuf,
    /// How the program is attached: "native", "generic" or "existing link".
    pub attach: String,
    pub vips: Vec<VipLabel>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VipLabel {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: u8,
    pub backends: Vec<BackendLabel>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendLabel {
    pub address: IpAddr,
    pub id: u16,
    pub weight: u32,
    pub mac: Option<String>,
    /// See `cli::status::BackendStatus::state`.
    pub role: String,
}

pub fn path(interface: &str) -> PathBuf {
    Path::new("/run/xlb").join(format!("{interface}.json"))
}

impl DaemonState {
    pub fn labels(reconciler: &Reconciler) -> Vec<VipLabel> {
        reconciler
            .vips()
            .iter()
            .filter_map(|(key, vip)| {
                Some(VipLabel {
                    name: vip.name.clone(),
                    address: addr::from_bytes(key.addr, key.family)?,
                    port: u16::from_be(key.port_be),
                    protocol: key.proto,
                    backends: vip
                        .backends
                        .iter()
                        .map(|(a, b)| BackendLabel {
                            address: *a,
                            id: b.id,
                            weight: b.weight,
                            mac: b.mac.as_ref().map(addr::format_mac),
                            role: match b.role {
                                Role::Active => "active".into(),
                                Role::Idle if b.mac.is_none() => "unresolved".into(),
                                Role::Idle => "draining".into(),
                                Role::Leaving { .. } => "leaving".into(),
                            },
                        })
                        .collect(),
                })
            })
            .collect()
    }

    /// Replaces the file atomically.
    pub fn write(&self) -> io::Result<()> {
        let path = path(&self.interface);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, path)
    }

    pub fn read(interface: &str) -> Option<DaemonState> {
        let text = std::fs::read(path(interface)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn remove(interface: &str) {
        let _ = std::fs::remove_file(path(interface));
    }

    /// Whether the process that wrote this is still an xlb.
    pub fn daemon_alive(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|c| c.split(|&b| b == 0).next().is_some_and(|argv0| argv0.ends_with(b"xlb")))
            .unwrap_or(false)
    }
}
