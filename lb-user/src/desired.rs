//! The desired state, built from the config and what discovery reports:
//! every VIP with its backends, and each DR backend's MAC.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use crate::{
    addr,
    config::{self, Config, Forward},
    consul::Instance,
    discovery::Discovery,
    overrides::Overrides,
    reconcile::{Desired, DesiredBackend, DesiredVip, Leave},
};

/// The address a discovered instance serves a VIP at: its own or a tagged
/// one of the VIP's family (a service may back a v4 and a v6 VIP), if it
/// is a usable unicast address.
pub fn instance_address(instance: &Instance, vip: IpAddr) -> Option<IpAddr> {
    std::iter::once(&instance.address)
        .chain(&instance.tagged)
        .find(|a| a.is_ipv4() == vip.is_ipv4())
        .copied()
        .filter(|a| config::usable_unicast(*a))
}

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
                                let Some(address) = instance_address(i, v.address) else {
                                    continue;
                                };
                                if i.port != 0 && i.port != v.port {
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
                                        addr: address,
                                        weight: overrides.weight(&v.name, address, i.weight),
                                        mac: mac(&address),
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

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, path::Path, time::Instant};

    use super::*;
    use crate::consul::{EmptyPolicy, Instance, ServiceQuery, Update};

    fn config(max_backends: u32) -> Config {
        let text = format!(
            "interface = \"eth0\"\nmax_backends = {max_backends}\n\n\
             [[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\nconsul = {{ service = \"web\" }}\n"
        );
        Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    fn query() -> ServiceQuery {
        ServiceQuery { service: "web".into(), tag: None }
    }

    fn instance(i: u32, address: IpAddr, port: u16, weight: u32) -> Instance {
        Instance {
            node: format!("n{i}"),
            id: format!("web-{i}"),
            address,
            tagged: vec![],
            port,
            weight,
            warning: false,
        }
    }

    fn discovery(instances: Vec<Instance>) -> Discovery {
        let mut d = Discovery::new(EmptyPolicy::Keep);
        d.watch_only(&[query()]);
        d.update(Update::Instances { query: query(), instances, problems: vec![], index: 1 }, Instant::now());
        d
    }

    #[test]
    fn instances_of_another_family_are_skipped_and_another_port_is_noted() {
        let mut dual = instance(5, "fd00::5".parse().unwrap(), 80, 2);
        dual.tagged = vec![IpAddr::from([10, 0, 0, 5])];
        let d = discovery(vec![
            instance(1, IpAddr::from([10, 0, 0, 1]), 80, 1),
            instance(2, "fd00::2".parse().unwrap(), 80, 1),
            instance(3, IpAddr::from([10, 0, 0, 3]), 8080, 1),
            instance(4, IpAddr::from([10, 0, 0, 4]), 0, 1_000_000),
            dual,
        ]);
        let (desired, notes) = build(&config(4096), &d, &Overrides::default(), &HashMap::new());
        let addrs: Vec<_> = desired.vips[0].backends.iter().map(|b| (b.addr, b.weight)).collect();
        let v4 = |d| IpAddr::from([10, 0, 0, d]);
        assert_eq!(
            addrs,
            [(v4(1), 1), (v4(4), 1_000_000), (v4(5), 2)],
            "a dual-stack instance by its tagged address"
        );
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("port 8080"), "{notes:?}");
        assert_eq!(desired.vips[0].leave, Leave::AtOnce, "failed instances leave at once");
    }

    #[test]
    fn ten_thousand_instances_are_bounded_by_the_backend_budget() {
        let many = (0..10_000u32)
            .map(|i| instance(i, IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]), 80, 1))
            .collect();
        let (desired, notes) = build(&config(4096), &discovery(many), &Overrides::default(), &HashMap::new());
        assert_eq!(desired.vips[0].backends.len(), 4095);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("10000 instances but only 4095 backend ids"), "{notes:?}");
    }

    #[test]
    fn a_service_without_an_answer_holds_its_vip() {
        let mut d = Discovery::new(EmptyPolicy::Keep);
        d.watch_only(&[query()]);
        let (desired, _) = build(&config(4096), &d, &Overrides::default(), &HashMap::new());
        assert!(desired.vips[0].hold && desired.vips[0].backends.is_empty());
    }
}
