//! The desired state, built from the config and what discovery reports:
//! every VIP with its backends, and each DR backend's MAC.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use crate::{
    addr,
    config::{Config, Forward},
    discovery::Discovery,
    overrides::Overrides,
    reconcile::{Desired, DesiredBackend, DesiredVip, Leave},
};

/// The desired state, and notes on discovered instances left out of it
/// (for the log).
pub fn build(
    config: &Config,
    discovery: &Discovery,
    overrides: &Overrides,
    macs: &HashMap<IpAddr, [u8; 6]>,
) -> (Desired, Vec<String>) {
    let mut notes = Vec::new();
    // Backend ids are finite: static backends are checked at config time,
    // discovered ones get what is left, VIP by VIP in config order.
    let static_count: usize = config.vips.iter().map(|v| v.backends.len()).sum();
    let mut budget = (config.max_backends as usize - 1).saturating_sub(static_count);
    let vips = config
        .vips
        .iter()
        .map(|v| {
            let tun = v.forward == Forward::Tun;
            // TUN packets go to the next hop the data plane's FIB lookup
            // finds: nothing to resolve per backend.
            let mac = |a: &IpAddr| if tun { Some([0; 6]) } else { macs.get(a).copied() };
            let mut hold = false;
            let mut leave = Leave::Drain;
            let backends = match &v.consul {
                None => v
                    .backends
                    .iter()
                    .map(|b| DesiredBackend {
                        addr: b.address,
                        weight: overrides.weight(&v.name, b.address, b.weight),
                        mac: mac(&b.address),
                    })
                    .collect(),
                Some(query) => {
                    // Instances leave Consul's healthy set by failing: no drain.
                    leave = Leave::AtOnce;
                    match discovery.view(query).and_then(|s| s.instances.as_ref()) {
                        None => {
                            hold = true;
                            Vec::new()
                        }
                        Some(instances) => {
                            let mut list = Vec::new();
                            for i in instances {
                                if i.address.is_ipv4() != v.address.is_ipv4() {
                                    notes.push(format!(
                                        "VIP {}: {query} instance {}/{} at {} is not of the VIP's family; skipped",
                                        v.name, i.node, i.id, i.address
                                    ));
                                } else if i.port != 0 && i.port != v.port {
                                    notes.push(format!(
                                        "VIP {}: {query} instance {}/{} listens on port {}, not the VIP's {}: \
                                         {} forwarding keeps the port; skipped",
                                        v.name,
                                        i.node,
                                        i.id,
                                        i.port,
                                        v.port,
                                        if tun { "TUN" } else { "DR" }
                                    ));
                                } else {
                                    list.push(DesiredBackend {
                                        addr: i.address,
                                        weight: overrides.weight(&v.name, i.address, i.weight),
                                        mac: mac(&i.address),
                                    });
                                }
                            }
                            if list.len() > budget {
                                notes.push(format!(
                                    "VIP {}: {query} has {} instances but only {budget} backend ids are left \
                                     (max_backends); using the first {budget} by address",
                                    v.name,
                                    list.len()
                                ));
                                list.sort_by_key(|b| b.addr);
                                list.truncate(budget);
                            }
                            budget -= list.len();
                            list
                        }
                    }
                }
            };
            DesiredVip {
                name: v.name.clone(),
                key: addr::vip_key(v.address, v.port, v.protocol.number()),
                mode: if tun { lb_common::MODE_TUN } else { lb_common::MODE_DR },
                backends,
                leave,
                hold,
            }
        })
        .collect();
    (Desired { vips, drain_timeout: Duration::from_secs(config.drain_timeout) }, notes)
}
