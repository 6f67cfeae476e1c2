//! The desired state: every VIP with the backends it should have, built
//! from the live config, what discovery reports, the operator's overrides
//! and the MACs resolved so far. The reconciler never learns where a
//! backend came from, only which claim on ids its VIP has.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::{
    config::{
        Backends, Check, LiveConfig,
        check::{NewBackends, OnAllFailed, OnFail},
    },
    control::overrides::Overrides,
    discovery::{Discovery, Instance},
    health::{State, Target},
    model::{Forward, Unusable, VipAddr},
};

/// What configuration and discovery want.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub vips: Vec<DesiredVip>,
    /// How long a removed backend keeps its established flows.
    pub drain_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVip {
    pub name: String,
    pub addr: VipAddr,
    pub forward: Forward,
    pub backends: Vec<DesiredBackend>,
    /// How backends missing from `backends` leave.
    pub leave: Leave,
    /// Backends left out because they failed their health check: they
    /// leave at once, whatever `leave` says.
    pub failed: Vec<IpAddr>,
    /// The backend list is not known yet (discovery has not answered): an
    /// existing VIP keeps what it has, a new one starts without backends.
    pub hold: bool,
    pub claim: Claim,
    /// How long the table before a switch stays readable for second
    /// chance; zero for none (DR VIPs, or turned off).
    pub second_chance: Duration,
}

/// Who gets backend ids first when there are too few for everyone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Claim {
    /// The operator listed each backend in the config: placed first, and
    /// ids that free up go to those still waiting before anyone else.
    #[default]
    Listed,
    /// A discovery source's, which can list more than fits: its newcomers
    /// take only ids no listed backend waits for.
    Discovered,
}

/// How a backend that is no longer wanted leaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Leave {
    /// Drains for `Desired::drain_timeout` (it was removed on purpose).
    #[default]
    Drain,
    /// Goes at once and its flows rebalance (it failed its health check).
    AtOnce,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub addr: IpAddr,
    /// 0 drains the backend.
    pub weight: u32,
    /// DR: the backend's MAC; a backend without one stays out of the table.
    pub mac: Option<[u8; 6]>,
    /// TUN: the next hop toward it; without one the data plane asks the
    /// kernel's FIB for each packet.
    pub hop: Option<NextHop>,
}

/// Where TUN packets to a backend go: out of xlb's interface to this MAC,
/// on a path that takes outer packets of up to `mtu` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub mac: [u8; 6],
    pub mtu: u16,
}

/// A discovered instance left out of a VIP, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub vip: String,
    pub text: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VIP {}: {}", self.vip, self.text)
    }
}

/// The address a discovered instance serves a VIP at: its own or a tagged
/// one of the VIP's family (a service may back a v4 and a v6 VIP).
pub fn instance_address(instance: &Instance, vip: IpAddr) -> Option<IpAddr> {
    std::iter::once(&instance.address).chain(&instance.tagged).find(|a| a.is_ipv4() == vip.is_ipv4()).copied()
}

/// What goes into a desired state besides the config.
pub struct Inputs<'a> {
    pub discovery: &'a Discovery,
    pub overrides: &'a Overrides,
    /// Resolved MACs of DR backends.
    pub macs: &'a HashMap<IpAddr, [u8; 6]>,
    /// Resolved next hops of TUN backends.
    pub hops: &'a HashMap<IpAddr, NextHop>,
    /// Health checks' verdicts; a target not in it is `Unknown`.
    pub health: &'a HashMap<Target, State>,
}

/// A desired state and what building it found.
#[derive(Debug, Default)]
pub struct Built {
    pub desired: Desired,
    /// Discovered instances left out, and why.
    pub notes: Vec<Note>,
    /// What the health checker must probe, by VIP.
    pub targets: BTreeMap<String, Vec<Target>>,
    /// VIPs whose every backend fails its check, kept in panic mode.
    pub panics: Vec<String>,
}

/// The desired state, with what it found on the way.
pub fn build(config: &LiveConfig, inputs: &Inputs<'_>) -> Built {
    let mut notes = Vec::new();
    let (mut targets, mut panics) = (BTreeMap::new(), Vec::new());
    let vips = config
        .vips
        .iter()
        .map(|v| {
            let tun = v.forward == Forward::Tun;
            let backend = |addr: IpAddr, weight: u32| DesiredBackend {
                addr,
                weight: inputs.overrides.weight(&v.name, addr, weight),
                mac: if tun { None } else { inputs.macs.get(&addr).copied() },
                hop: if tun { inputs.hops.get(&addr).copied() } else { None },
            };
            let claim = match v.backends {
                Backends::Static(_) => Claim::Listed,
                Backends::Discovered(_) => Claim::Discovered,
            };
            let (backends, leave, hold) = match &v.backends {
                Backends::Static(list) => {
                    (list.iter().map(|b| backend(b.address, b.weight)).collect(), Leave::Drain, false)
                }
                // Instances leave discovery's healthy set by failing: no drain.
                Backends::Discovered(source) => {
                    match inputs.discovery.view(source).and_then(|s| s.instances.as_ref()) {
                        None => (Vec::new(), Leave::AtOnce, true),
                        Some(instances) => {
                            let mut list = Vec::new();
                            for i in instances {
                                match admit(i, v.addr, v.forward) {
                                    Ok(addr) => list.push(backend(addr, i.weight)),
                                    Err(why) => notes.push(Note {
                                        vip: v.name.clone(),
                                        text: format!("{source}: instance {} {why}; skipped", i.id),
                                    }),
                                }
                            }
                            (list, Leave::AtOnce, false)
                        }
                    }
                }
            };
            let mut backends: Vec<DesiredBackend> = backends;
            let mut failed = Vec::new();
            if let Some(check) = &v.check {
                let probed = targets.entry(v.name.clone()).or_default();
                let checked = checked(&mut backends, check, v.addr.port, inputs.health, probed);
                match checked {
                    Checked::Panic => panics.push(v.name.clone()),
                    Checked::Failed(list) => failed = list,
                }
            }
            DesiredVip {
                name: v.name.clone(),
                addr: v.addr,
                forward: v.forward,
                backends,
                leave,
                failed,
                hold,
                claim,
                second_chance: if tun { config.second_chance } else { Duration::ZERO },
            }
        })
        .collect();
    Built { desired: Desired { vips, drain_timeout: config.drain_timeout }, notes, targets, panics }
}

enum Checked {
    /// Every backend fails: all kept.
    Panic,
    /// These were taken out.
    Failed(Vec<IpAddr>),
}

/// Keeps the backends the check lets serve (a failing one drains instead
/// with `on_fail = "drain"`), and adds each to the checker's targets.
fn checked(
    backends: &mut Vec<DesiredBackend>,
    check: &Check,
    vip_port: u16,
    health: &HashMap<Target, State>,
    targets: &mut Vec<Target>,
) -> Checked {
    let port = check.port.unwrap_or(vip_port);
    let target = |addr: IpAddr| Target { addr: SocketAddr::new(addr, port), check: check.clone() };
    let state = |addr: IpAddr| health.get(&target(addr)).copied().unwrap_or(State::Unknown);
    targets.extend(backends.iter().map(|b| target(b.addr)));
    let any = |s: State| backends.iter().any(|b| state(b.addr) == s);
    if check.on_all_failed == OnAllFailed::Keep && any(State::Down) && !any(State::Up) {
        return Checked::Panic;
    }
    let mut failed = Vec::new();
    backends.retain_mut(|b| match state(b.addr) {
        State::Up => true,
        State::Unknown => check.new_backends == NewBackends::Up,
        State::Down if check.on_fail == OnFail::Drain => {
            b.weight = 0;
            true
        }
        State::Down => {
            failed.push(b.addr);
            false
        }
    });
    Checked::Failed(failed)
}

/// The address `instance` backs the VIP at, or why it cannot.
fn admit(instance: &Instance, vip: VipAddr, forward: Forward) -> Result<IpAddr, String> {
    let family = if vip.ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let Some(addr) = instance_address(instance, vip.ip) else {
        return Err(format!("has no {family} address (the VIP is {family})"));
    };
    if let Some(why) = Unusable::of(addr) {
        return Err(format!("has address {addr}, which is {why}"));
    }
    if instance.port != 0 && instance.port != vip.port {
        let mode = if forward == Forward::Tun { "TUN" } else { "DR" };
        return Err(format!(
            "listens on port {}, not the VIP's {}: {mode} forwarding keeps the port",
            instance.port, vip.port
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, path::Path, time::Instant};

    use super::*;
    use crate::{
        config::{Config, ServiceQuery, Source},
        discovery::{EmptyPolicy, InstanceId, Update},
    };

    fn config() -> Config {
        let text = "interface = \"eth0\"\n\n\
             [[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\nconsul = { service = \"web\" }\n";
        Config::parse(text, Path::new("test.toml")).unwrap()
    }

    fn query() -> Source {
        Source::Consul(ServiceQuery { service: "web".into(), tag: None })
    }

    fn instance(i: u32, address: IpAddr, port: u16, weight: u32) -> Instance {
        Instance {
            id: InstanceId::Consul { node: format!("n{i}"), id: format!("web-{i}") },
            address,
            tagged: vec![],
            port,
            weight,
            warning: false,
        }
    }

    fn discovery(instances: Vec<Instance>) -> Discovery {
        let mut d = Discovery::default();
        d.watch_only(&[(query(), EmptyPolicy::Keep)]);
        d.update(
            Update::Instances { source: query(), instances, problems: vec![], index: 1 },
            Instant::now(),
        );
        d
    }

    fn build_with(config: &Config, d: &Discovery) -> (Desired, Vec<Note>) {
        let built = build_checked(config, d, &HashMap::new());
        (built.desired, built.notes)
    }

    fn build_checked(config: &Config, d: &Discovery, health: &HashMap<Target, State>) -> Built {
        let inputs = Inputs {
            discovery: d,
            overrides: &Overrides::default(),
            macs: &HashMap::new(),
            hops: &HashMap::new(),
            health,
        };
        build(&config.live, &inputs)
    }

    #[test]
    fn instances_left_out_are_noted_with_the_reason() {
        let mut dual = instance(5, "fd00::5".parse().unwrap(), 80, 2);
        dual.tagged = vec![IpAddr::from([10, 0, 0, 5])];
        let d = discovery(vec![
            instance(1, IpAddr::from([10, 0, 0, 1]), 80, 1),
            instance(2, "fd00::2".parse().unwrap(), 80, 1),
            instance(3, IpAddr::from([10, 0, 0, 3]), 8080, 1),
            instance(4, IpAddr::from([10, 0, 0, 4]), 0, 1_000_000),
            dual,
            instance(6, IpAddr::from([127, 0, 0, 1]), 80, 1),
        ]);
        let (desired, notes) = build_with(&config(), &d);
        let addrs: Vec<_> = desired.vips[0].backends.iter().map(|b| (b.addr, b.weight)).collect();
        let v4 = |d| IpAddr::from([10, 0, 0, d]);
        assert_eq!(
            addrs,
            [(v4(1), 1), (v4(4), 1_000_000), (v4(5), 2)],
            "a dual-stack instance by its tagged address"
        );
        let texts: Vec<String> = notes.iter().map(ToString::to_string).collect();
        assert_eq!(texts.len(), 3, "{texts:?}");
        assert!(texts[0].contains("n2/web-2 has no IPv4 address"), "{texts:?}");
        assert!(texts[1].contains("port 8080"), "{texts:?}");
        assert!(texts[2].contains("127.0.0.1, which is a loopback address"), "{texts:?}");
        assert_eq!(desired.vips[0].leave, Leave::AtOnce, "failed instances leave at once");
    }

    #[test]
    fn a_service_without_an_answer_holds_its_vip() {
        let mut d = Discovery::default();
        d.watch_only(&[(query(), EmptyPolicy::Keep)]);
        let (desired, _) = build_with(&config(), &d);
        assert!(desired.vips[0].hold && desired.vips[0].backends.is_empty());
    }

    fn checked_config(check: &str) -> Config {
        let text = format!(
            "interface = \"eth0\"\n\n[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\n\
             backends = [ {{ address = \"10.0.0.1\" }}, {{ address = \"10.0.0.2\" }}, {{ address = \"10.0.0.3\" }} ]\n\
             check = {{ kind = \"tcp\", port = 8080{check} }}\n"
        );
        Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    fn verdicts(config: &Config, states: [State; 3]) -> HashMap<Target, State> {
        let check = config.live.vips[0].check.clone().unwrap();
        (1..=3u8)
            .zip(states)
            .map(|(i, s)| (Target { addr: SocketAddr::from(([10, 0, 0, i], 8080)), check: check.clone() }, s))
            .collect()
    }

    fn weights(built: &Built) -> Vec<(IpAddr, u32)> {
        built.desired.vips[0].backends.iter().map(|b| (b.addr, b.weight)).collect()
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3));

    #[test]
    fn failing_backends_leave_at_once_and_new_ones_wait_for_their_check() {
        use State::*;
        let config = checked_config("");
        let d = Discovery::default();
        let built = build_checked(&config, &d, &verdicts(&config, [Up, Down, Unknown]));
        assert_eq!(weights(&built), [(A, 1)]);
        assert_eq!(built.desired.vips[0].failed, [B], "the failed one leaves at once");
        let probed: Vec<SocketAddr> = built.targets["web"].iter().map(|t| t.addr).collect();
        assert_eq!(probed.len(), 3, "every candidate is probed, on the check's port");
        assert!(probed.iter().all(|a| a.port() == 8080));
        assert!(built.panics.is_empty());

        let drain = checked_config(", on_fail = \"drain\", new_backends = \"up\"");
        let built = build_checked(&drain, &d, &verdicts(&drain, [Up, Down, Unknown]));
        assert_eq!(weights(&built), [(A, 1), (B, 0), (C, 1)], "drained, and admitted before a verdict");
        assert!(built.desired.vips[0].failed.is_empty());
    }

    #[test]
    fn every_backend_failing_is_panic_mode_unless_told_to_empty() {
        use State::*;
        let config = checked_config("");
        let d = Discovery::default();
        let built = build_checked(&config, &d, &verdicts(&config, [Down, Down, Unknown]));
        assert_eq!(weights(&built), [(A, 1), (B, 1), (C, 1)], "all kept");
        assert_eq!(built.panics, ["web"]);
        // Nothing checked yet is not a failure: a new VIP waits.
        let built = build_checked(&config, &d, &HashMap::new());
        assert!(weights(&built).is_empty() && built.panics.is_empty());

        let empty = checked_config(", on_all_failed = \"empty\"");
        let built = build_checked(&empty, &d, &verdicts(&empty, [Down, Down, Down]));
        assert!(weights(&built).is_empty() && built.panics.is_empty());
        assert_eq!(built.desired.vips[0].failed, [A, B, C]);
    }
}
