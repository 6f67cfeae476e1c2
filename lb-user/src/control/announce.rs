//! Which VIP addresses a node should announce, and why not the others.
//!
//! A VIP is announceable when the program is attached (the daemon runs),
//! the maps hold what the daemon wants, and the VIP has at least one
//! backend in its table. Discovery's fail-static and `on_empty` rules have
//! already decided the backends, so a Consul outage withdraws nothing. An
//! address is announced when any VIP on it is announceable: web:80 must
//! not go dark because dns:53 on the same address lost its backends.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

/// Why a VIP is not announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Withdrawn {
    /// Its table is empty: every backend is gone, drained or unresolved.
    NoUsableBackend,
    /// It has no VIP id (max_vips reached).
    NotInMaps,
    /// The last map write failed; the maps may not be what is wanted.
    NotInSync,
    /// `xlb announce off`.
    Maintenance,
    /// The daemon is stopping gracefully.
    Stopping,
    /// Its route could not be added to the table.
    TableError,
}

impl fmt::Display for Withdrawn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Withdrawn::NoUsableBackend => "no usable backend",
            Withdrawn::NotInMaps => "not in the maps (no VIP id left)",
            Withdrawn::NotInSync => "maps not in sync",
            Withdrawn::Maintenance => "maintenance (xlb announce off)",
            Withdrawn::Stopping => "the daemon is stopping",
            Withdrawn::TableError => "its route could not be added (see the announce table error)",
        })
    }
}

/// A VIP's announcement, as status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Announcement {
    Announced,
    /// Another VIP on the same address keeps it announced.
    AnnouncedForShared {
        reason: Withdrawn,
    },
    Withdrawn {
        reason: Withdrawn,
    },
    /// The table holds a route for the address that xlb did not add: xlb
    /// leaves it alone (and cannot withdraw it).
    Foreign {
        proto: u8,
    },
}

impl fmt::Display for Announcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Announcement::Announced => f.write_str("announced"),
            Announcement::AnnouncedForShared { reason } => {
                write!(f, "announced for another VIP on its address (itself: {reason})")
            }
            Announcement::Withdrawn { reason } => write!(f, "withdrawn: {reason}"),
            Announcement::Foreign { proto } => {
                write!(f, "routed by a route xlb did not add (proto {proto}); xlb leaves it alone")
            }
        }
    }
}

/// Whether the node announces anything at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Switch {
    On,
    Maintenance,
    Stopping,
}

/// One VIP as announcing sees it.
#[derive(Clone, Debug)]
pub struct VipFacts {
    pub name: String,
    pub ip: IpAddr,
    /// It has an id and its table is written.
    pub in_maps: bool,
    /// Backends in its live table.
    pub active: usize,
}

/// The addresses to announce, and each VIP's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub announce: BTreeMap<IpAddr, bool>,
    pub vips: BTreeMap<String, Announcement>,
}

/// What to announce, given the VIPs, whether the maps are in sync, and the
/// switch. `foreign` maps addresses routed by someone else's route.
pub fn plan(vips: &[VipFacts], in_sync: bool, switch: Switch, foreign: &BTreeMap<IpAddr, u8>) -> Plan {
    let own: Vec<(&VipFacts, Result<(), Withdrawn>)> = vips
        .iter()
        .map(|v| {
            let verdict = match switch {
                Switch::Stopping => Err(Withdrawn::Stopping),
                Switch::Maintenance => Err(Withdrawn::Maintenance),
                Switch::On if !v.in_maps => Err(Withdrawn::NotInMaps),
                Switch::On if !in_sync => Err(Withdrawn::NotInSync),
                Switch::On if v.active == 0 => Err(Withdrawn::NoUsableBackend),
                Switch::On => Ok(()),
            };
            (v, verdict)
        })
        .collect();
    let mut plan = Plan::default();
    for (v, verdict) in &own {
        *plan.announce.entry(v.ip).or_default() |= verdict.is_ok();
    }
    for (v, verdict) in own {
        let state = match (foreign.get(&v.ip), verdict) {
            (Some(proto), _) => Announcement::Foreign { proto: *proto },
            (None, Ok(())) => Announcement::Announced,
            (None, Err(reason)) if plan.announce[&v.ip] => Announcement::AnnouncedForShared { reason },
            (None, Err(reason)) => Announcement::Withdrawn { reason },
        };
        plan.vips.insert(v.name.clone(), state);
    }
    plan.announce.retain(|ip, _| !foreign.contains_key(ip));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(name: &str, last: u8, in_maps: bool, active: usize) -> VipFacts {
        VipFacts { name: name.into(), ip: IpAddr::from([192, 0, 2, last]), in_maps, active }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_vip_is_announced_when_in_the_maps_in_sync_and_with_a_backend() {
        let vips = [vip("web", 10, true, 3), vip("empty", 11, true, 0), vip("extra", 12, false, 2)];
        let p = plan(&vips, true, Switch::On, &BTreeMap::new());
        assert_eq!(p.announce, BTreeMap::from([(ip(10), true), (ip(11), false), (ip(12), false)]));
        assert_eq!(p.vips["web"], Announcement::Announced);
        assert_eq!(p.vips["empty"].to_string(), "withdrawn: no usable backend");
        assert_eq!(p.vips["extra"], Announcement::Withdrawn { reason: Withdrawn::NotInMaps });

        let p = plan(&vips, false, Switch::On, &BTreeMap::new());
        assert!(p.announce.values().all(|a| !a), "a failed write withdraws everything");
        assert_eq!(p.vips["web"], Announcement::Withdrawn { reason: Withdrawn::NotInSync });
    }

    #[test]
    fn maintenance_and_stopping_withdraw_everything() {
        let vips = [vip("web", 10, true, 3)];
        for (switch, reason) in
            [(Switch::Maintenance, Withdrawn::Maintenance), (Switch::Stopping, Withdrawn::Stopping)]
        {
            let p = plan(&vips, true, switch, &BTreeMap::new());
            assert!(!p.announce[&ip(10)]);
            assert_eq!(p.vips["web"], Announcement::Withdrawn { reason });
        }
    }

    #[test]
    fn a_shared_address_stays_while_one_of_its_vips_can_serve() {
        let vips = [vip("web", 10, true, 3), vip("dns", 10, true, 0)];
        let p = plan(&vips, true, Switch::On, &BTreeMap::new());
        assert_eq!(p.announce, BTreeMap::from([(ip(10), true)]));
        assert_eq!(p.vips["dns"], Announcement::AnnouncedForShared { reason: Withdrawn::NoUsableBackend });
    }

    #[test]
    fn an_address_routed_by_someone_else_is_left_alone() {
        let vips = [vip("web", 10, true, 3), vip("api", 11, true, 1)];
        let p = plan(&vips, true, Switch::On, &BTreeMap::from([(ip(10), 4)]));
        assert_eq!(p.announce, BTreeMap::from([(ip(11), true)]), "neither added nor withdrawn");
        assert_eq!(p.vips["web"], Announcement::Foreign { proto: 4 });
    }
}
