//! Consul's health entries and how they become [`Instance`]s. Pure: no I/O.

use std::{collections::HashMap, net::IpAddr};

use serde::Deserialize;

use super::{AddressSource, Instance, InstanceId, Problem, Unusable, WEIGHT_META_KEY, WarningPolicy};
use crate::config::MAX_WEIGHT;
use crate::discovery::{Settled, settle};

/// One element of `GET /v1/health/service/<service>`: the parts xlb reads.
/// Go encodes empty maps and slices as `null`, hence the `Option`s.
#[derive(Debug, Deserialize)]
pub(crate) struct Entry {
    #[serde(rename = "Node")]
    pub node: Node,
    #[serde(rename = "Service")]
    pub service: Service,
    #[serde(rename = "Checks", default)]
    pub checks: Option<Vec<Check>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Node {
    #[serde(rename = "Node", default)]
    pub name: String,
    #[serde(rename = "Address", default)]
    pub address: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Service {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Address", default)]
    pub address: String,
    #[serde(rename = "Tags", default)]
    pub tags: Option<Vec<String>>,
    #[serde(rename = "Port", default)]
    pub port: i64,
    #[serde(rename = "Meta", default)]
    pub meta: Option<HashMap<String, String>>,
    #[serde(rename = "Weights", default)]
    pub weights: Option<Weights>,
    #[serde(rename = "TaggedAddresses", default)]
    pub tagged_addresses: Option<HashMap<String, TaggedAddress>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct TaggedAddress {
    #[serde(rename = "Address", default)]
    pub address: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Weights {
    #[serde(rename = "Passing", default = "one")]
    pub passing: i64,
    #[serde(rename = "Warning", default = "one")]
    pub warning: i64,
}

fn one() -> i64 {
    1
}

#[derive(Debug, Deserialize)]
pub(crate) struct Check {
    #[serde(rename = "Status", default)]
    pub status: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Health {
    Passing,
    Warning,
    Critical,
}

/// The worst status among an entry's checks (node checks included, as
/// Consul's `passing` filter counts them). No checks is passing, as for
/// Consul; a status xlb does not know counts as critical.
pub(crate) fn aggregate(checks: &[Check]) -> Health {
    checks
        .iter()
        .map(|c| match c.status.as_str() {
            "passing" => Health::Passing,
            "warning" => Health::Warning,
            _ => Health::Critical,
        })
        .max()
        .unwrap_or(Health::Passing)
}

/// An answer's body (a JSON array of health entries) as instances, by
/// [`map_entries`] with the cap of [`MAX_INSTANCES`](super::MAX_INSTANCES).
pub fn decode(
    body: &[u8],
    tag: Option<&str>,
    policy: WarningPolicy,
) -> Result<(Vec<Instance>, Vec<Problem>), serde_json::Error> {
    let entries: Vec<Entry> = serde_json::from_slice(body)?;
    Ok(map_entries(entries, tag, policy, super::MAX_INSTANCES))
}

/// Turns the entries of a query for `tag` (if any) into instances by the
/// rules in the module's notes: sorted by (node, id), at most `limit`, with what
/// was skipped or changed.
pub(crate) fn map_entries(
    entries: Vec<Entry>,
    tag: Option<&str>,
    policy: WarningPolicy,
    limit: usize,
) -> (Vec<Instance>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut candidates = Vec::with_capacity(entries.len());
    for entry in entries {
        // Consul filtered on the tag already, but an agent's streaming
        // backend has answered instances without it (Consul issue 9695):
        // check again, the same way.
        if tag.is_some_and(|tag| !has_tag(entry.service.tags.as_deref().unwrap_or_default(), tag)) {
            continue;
        }
        let health = aggregate(entry.checks.as_deref().unwrap_or_default());
        let warning = match (health, policy) {
            (Health::Passing, _) => false,
            (Health::Warning, WarningPolicy::Keep) => true,
            (Health::Warning, WarningPolicy::Exclude) | (Health::Critical, _) => continue,
        };
        if let Some(instance) = to_instance(entry, warning, &mut problems) {
            candidates.push(instance);
        }
    }
    let Settled { instances, duplicates, over_limit } = settle(candidates, limit);
    problems.extend(duplicates.into_iter().map(Problem::Duplicate));
    problems.extend(over_limit.map(|total| Problem::TooMany { total, kept: limit }));
    (instances, problems)
}

fn to_instance(entry: Entry, warning: bool, problems: &mut Vec<Problem>) -> Option<Instance> {
    let Entry { node, service, .. } = entry;
    let label = format!("{}/{}", node.name, service.id);
    let (raw, source) = if service.address.is_empty() {
        (&node.address, AddressSource::Node)
    } else {
        (&service.address, AddressSource::Service)
    };
    let Ok(address) = raw.parse::<IpAddr>() else {
        problems.push(Problem::BadAddress { instance: label, address: raw.clone() });
        return None;
    };
    if let Some(why) = Unusable::of(address) {
        problems.push(Problem::UnusableAddress { instance: label, address, source, why });
        return None;
    }
    let Ok(port) = u16::try_from(service.port) else {
        problems.push(Problem::BadPort { instance: label, port: service.port });
        return None;
    };
    let weight = weight(&service, warning, &label, problems);
    // Dual-stack services give the other family's address as a tagged one.
    let tagged = ["lan_ipv4", "wan_ipv4", "lan_ipv6", "wan_ipv6"]
        .iter()
        .filter_map(|k| service.tagged_addresses.as_ref()?.get(*k)?.address.parse::<IpAddr>().ok())
        .filter(|a| *a != address && Unusable::of(*a).is_none())
        .collect();
    let id = InstanceId::Consul { node: node.name, id: service.id };
    Some(Instance { id, address, tagged, port, weight, warning })
}

/// Whether `tags` hold `tag` as Consul's health endpoint matches it: both
/// lowercased, then compared. (Its streaming backend uses Go's
/// `strings.EqualFold` instead, which also matches a few letters that
/// lowercasing keeps apart, such as ſ and s.)
pub(crate) fn has_tag(tags: &[String], tag: &str) -> bool {
    tags.iter().any(|t| go_lower(t).eq(go_lower(tag)))
}

/// Go's `strings.ToLower`: each character by itself, so U+0130 (the only
/// one with a longer lowercase) becomes the first character of it, `i`.
fn go_lower(s: &str) -> impl Iterator<Item = char> + '_ {
    s.chars().map(|c| c.to_lowercase().next().unwrap_or(c))
}

fn weight(service: &Service, warning: bool, label: &str, problems: &mut Vec<Problem>) -> u32 {
    let mut weight = match (&service.weights, warning) {
        (None, _) => 1,
        (Some(w), false) => w.passing,
        (Some(w), true) => w.warning,
    };
    if let Some(value) = service.meta.as_ref().and_then(|m| m.get(WEIGHT_META_KEY)) {
        match value.parse::<u32>() {
            Ok(w) => weight = i64::from(w),
            Err(_) => {
                problems.push(Problem::BadWeightMeta { instance: label.to_owned(), value: value.clone() })
            }
        }
    }
    let clamped = weight.clamp(0, i64::from(MAX_WEIGHT));
    if clamped != weight {
        problems.push(Problem::WeightClamped { instance: label.to_owned(), weight, clamped: clamped as u32 });
    }
    clamped as u32
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::discovery::Duplicate;

    fn cid(node: &str, id: &str) -> InstanceId {
        InstanceId::Consul { node: node.into(), id: id.into() }
    }

    /// The service ID of a Consul instance.
    fn sid(i: &Instance) -> &str {
        match &i.id {
            InstanceId::Consul { id, .. } => id,
            InstanceId::Etcd { .. } => unreachable!("a Consul instance"),
        }
    }

    fn node(i: &Instance) -> &str {
        match &i.id {
            InstanceId::Consul { node, .. } => node,
            InstanceId::Etcd { .. } => unreachable!("a Consul instance"),
        }
    }

    fn entries(value: serde_json::Value) -> Vec<Entry> {
        serde_json::from_value(value).unwrap()
    }

    /// An entry as Consul sends it (extra fields included), with one node
    /// check and one service check.
    fn entry(node: &str, id: &str, address: &str, service_status: &str) -> serde_json::Value {
        json!({
            "Node": { "ID": "40e4a748", "Node": node, "Address": "192.0.2.1", "Datacenter": "dc1",
                      "TaggedAddresses": null, "Meta": null },
            "Service": { "ID": id, "Service": "web", "Tags": null, "Address": address, "Meta": null,
                         "Port": 8080, "Weights": { "Passing": 10, "Warning": 1 } },
            "Checks": [
                { "Node": node, "CheckID": "serfHealth", "Status": "passing", "ServiceID": "" },
                { "Node": node, "CheckID": format!("service:{id}"), "Status": service_status, "ServiceID": id },
            ]
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ids(instances: &[Instance]) -> Vec<&str> {
        instances.iter().map(sid).collect()
    }

    #[test]
    fn maps_addresses_with_node_fallback_sorted_by_node_and_id() {
        let (instances, problems) = map_entries(
            entries(json!([
                entry("n2", "web-b", "10.0.0.2", "passing"),
                entry("n1", "web-a", "", "passing"),
                entry("n1", "web-c", "2001:db8::3", "passing"),
            ])),
            None,
            WarningPolicy::Keep,
            100,
        );
        assert_eq!(problems, []);
        let got: Vec<_> = instances.iter().map(|i| (node(i), sid(i), i.address)).collect();
        assert_eq!(
            got,
            [
                ("n1", "web-a", ip("192.0.2.1")),
                ("n1", "web-c", ip("2001:db8::3")),
                ("n2", "web-b", ip("10.0.0.2"))
            ]
        );
        assert!(instances.iter().all(|i| i.port == 8080 && i.weight == 10 && !i.warning));
    }

    #[test]
    fn aggregate_is_the_worst_check() {
        let checks = |s: &[&str]| s.iter().map(|s| Check { status: s.to_string() }).collect::<Vec<_>>();
        assert_eq!(aggregate(&checks(&[])), Health::Passing);
        assert_eq!(aggregate(&checks(&["passing", "warning"])), Health::Warning);
        assert_eq!(aggregate(&checks(&["warning", "critical", "passing"])), Health::Critical);
        assert_eq!(aggregate(&checks(&["passing", "maintenance"])), Health::Critical);
    }

    #[test]
    fn warning_policy_keeps_with_warning_weight_or_excludes() {
        let list = json!([
            entry("n1", "ok", "10.0.0.1", "passing"),
            entry("n1", "slow", "10.0.0.2", "warning"),
            entry("n1", "down", "10.0.0.3", "critical"),
        ]);
        let (kept, _) = map_entries(entries(list.clone()), None, WarningPolicy::Keep, 100);
        let got: Vec<_> = kept.iter().map(|i| (sid(i), i.weight, i.warning)).collect();
        assert_eq!(got, [("ok", 10, false), ("slow", 1, true)]);
        let (strict, _) = map_entries(entries(list), None, WarningPolicy::Exclude, 100);
        let got: Vec<_> = strict.iter().map(sid).collect();
        assert_eq!(got, ["ok"]);
    }

    #[test]
    fn a_failing_node_check_takes_its_instances_out() {
        let mut e = entry("n1", "web", "10.0.0.1", "passing");
        e["Checks"][0]["Status"] = json!("critical");
        let (instances, _) = map_entries(entries(json!([e])), None, WarningPolicy::Keep, 100);
        assert!(instances.is_empty());
    }

    #[test]
    fn weights_default_meta_override_and_clamp() {
        let mut no_weights = entry("n1", "a", "10.0.0.1", "passing");
        no_weights["Service"]["Weights"] = json!(null);
        let mut meta = entry("n1", "b", "10.0.0.2", "passing");
        meta["Service"]["Meta"] = json!({ "xlb-weight": "7" });
        let mut meta_warning = entry("n1", "c", "10.0.0.3", "warning");
        meta_warning["Service"]["Meta"] = json!({ "xlb-weight": "7" });
        let mut bad_meta = entry("n1", "d", "10.0.0.4", "passing");
        bad_meta["Service"]["Meta"] = json!({ "xlb-weight": "heavy" });
        let mut huge = entry("n1", "e", "10.0.0.5", "passing");
        huge["Service"]["Meta"] = json!({ "xlb-weight": "20000" });
        let mut zero = entry("n1", "f", "10.0.0.6", "passing");
        zero["Service"]["Weights"] = json!({ "Passing": 0, "Warning": 0 });
        let mut negative = entry("n1", "g", "10.0.0.7", "passing");
        negative["Service"]["Weights"] = json!({ "Passing": -3, "Warning": 1 });

        let (instances, problems) = map_entries(
            entries(json!([no_weights, meta, meta_warning, bad_meta, huge, zero, negative])),
            None,
            WarningPolicy::Keep,
            100,
        );
        let got: Vec<_> = instances.iter().map(|i| (sid(i), i.weight)).collect();
        assert_eq!(got, [("a", 1), ("b", 7), ("c", 7), ("d", 10), ("e", MAX_WEIGHT), ("f", 0), ("g", 0)]);
        assert_eq!(
            problems,
            [
                Problem::BadWeightMeta { instance: "n1/d".into(), value: "heavy".into() },
                Problem::WeightClamped { instance: "n1/e".into(), weight: 20000, clamped: MAX_WEIGHT },
                Problem::WeightClamped { instance: "n1/g".into(), weight: -3, clamped: 0 },
            ]
        );
    }

    #[test]
    fn bad_addresses_and_ports_are_skipped_and_reported() {
        let hostname = entry("n1", "a", "web.example.internal", "passing");
        let mut bad_node = entry("n2", "b", "", "passing");
        bad_node["Node"]["Address"] = json!("node2.example.internal");
        let mut port = entry("n1", "c", "10.0.0.3", "passing");
        port["Service"]["Port"] = json!(70000);
        let good = entry("n1", "d", "10.0.0.4", "passing");
        let (instances, problems) =
            map_entries(entries(json!([hostname, bad_node, port, good])), None, WarningPolicy::Keep, 100);
        assert_eq!(instances.len(), 1);
        assert_eq!(sid(&instances[0]), "d");
        assert_eq!(
            problems,
            [
                Problem::BadAddress { instance: "n1/a".into(), address: "web.example.internal".into() },
                Problem::BadAddress { instance: "n2/b".into(), address: "node2.example.internal".into() },
                Problem::BadPort { instance: "n1/c".into(), port: 70000 },
            ]
        );
    }

    #[test]
    fn duplicates_keep_passing_then_heavier_then_first() {
        let mut heavy = entry("n2", "heavy", "10.0.0.1", "passing");
        heavy["Service"]["Weights"]["Passing"] = json!(50);
        let light = entry("n1", "light", "10.0.0.1", "passing");
        let mut warn = entry("n0", "warn", "10.0.0.1", "warning");
        warn["Service"]["Weights"]["Warning"] = json!(100);
        let twin_b = entry("n1", "twin-b", "10.0.0.2", "passing");
        let twin_a = entry("n1", "twin-a", "10.0.0.2", "passing");
        let (instances, problems) =
            map_entries(entries(json!([heavy, light, warn, twin_b, twin_a])), None, WarningPolicy::Keep, 100);
        let got: Vec<_> = instances.iter().map(sid).collect();
        assert_eq!(got, ["twin-a", "heavy"]);
        assert_eq!(
            problems,
            [
                Problem::Duplicate(Duplicate {
                    address: ip("10.0.0.1"),
                    kept: cid("n2", "heavy"),
                    dropped: cid("n1", "light"),
                }),
                Problem::Duplicate(Duplicate {
                    address: ip("10.0.0.1"),
                    kept: cid("n2", "heavy"),
                    dropped: cid("n0", "warn"),
                }),
                Problem::Duplicate(Duplicate {
                    address: ip("10.0.0.2"),
                    kept: cid("n1", "twin-a"),
                    dropped: cid("n1", "twin-b"),
                }),
            ]
        );
    }

    #[test]
    fn the_cap_keeps_the_first_by_node_and_id() {
        let list: Vec<_> = (0..5)
            .rev()
            .map(|i| entry("n1", &format!("web-{i}"), &format!("10.0.0.{i}"), "passing"))
            .collect();
        let (instances, problems) = map_entries(entries(json!(list)), None, WarningPolicy::Keep, 3);
        let got: Vec<_> = instances.iter().map(sid).collect();
        assert_eq!(got, ["web-0", "web-1", "web-2"]);
        assert_eq!(problems, [Problem::TooMany { total: 5, kept: 3 }]);
    }

    #[test]
    fn null_checks_and_missing_fields_decode() {
        let list = entries(json!([{ "Node": { "Node": "n1", "Address": "10.0.0.9" },
                                     "Service": { "ID": "bare" }, "Checks": null }]));
        let (instances, problems) = map_entries(list, None, WarningPolicy::Exclude, 100);
        assert_eq!(problems, []);
        assert_eq!(
            instances,
            [Instance {
                id: cid("n1", "bare"),
                address: ip("10.0.0.9"),
                tagged: vec![],
                port: 0,
                weight: 1,
                warning: false
            }]
        );
    }

    #[test]
    fn tagged_addresses_give_a_dual_stack_instance_its_other_address() {
        let list = entries(json!([{ "Node": { "Node": "n1", "Address": "10.0.0.9" },
                                     "Service": { "ID": "web", "Address": "10.0.0.1",
                                                  "TaggedAddresses": {
                                                      "lan_ipv4": { "Address": "10.0.0.1", "Port": 80 },
                                                      "lan_ipv6": { "Address": "fd00::1", "Port": 80 },
                                                      "wan_ipv6": { "Address": "not-an-ip", "Port": 80 } } },
                                     "Checks": [] }]));
        let (instances, _) = map_entries(list, None, WarningPolicy::Keep, 100);
        assert_eq!(instances[0].address, ip("10.0.0.1"));
        assert_eq!(instances[0].tagged, [ip("fd00::1")]);
    }

    #[test]
    fn addresses_no_backend_can_have_are_skipped_with_where_they_came_from() {
        let mut dev_agent = entry("n1", "web-1", "", "passing");
        dev_agent["Node"]["Address"] = json!("127.0.0.1");
        let list = json!([
            dev_agent,
            entry("n1", "web-2", "0.0.0.0", "passing"),
            entry("n1", "web-3", "224.0.0.5", "passing"),
            entry("n1", "web-4", "255.255.255.255", "passing"),
            entry("n1", "web-5", "::ffff:127.0.0.2", "passing"),
            entry("n1", "web-6", "10.0.0.6", "passing"),
        ]);
        let (instances, problems) = map_entries(entries(list), None, WarningPolicy::Keep, 100);
        assert_eq!(ids(&instances), ["web-6"]);
        let unusable = |id: &str, address: &str, source, why| Problem::UnusableAddress {
            instance: format!("n1/{id}"),
            address: ip(address),
            source,
            why,
        };
        assert_eq!(
            problems,
            [
                unusable("web-1", "127.0.0.1", AddressSource::Node, Unusable::Loopback),
                unusable("web-2", "0.0.0.0", AddressSource::Service, Unusable::Unspecified),
                unusable("web-3", "224.0.0.5", AddressSource::Service, Unusable::Multicast),
                unusable("web-4", "255.255.255.255", AddressSource::Service, Unusable::Broadcast),
                unusable("web-5", "::ffff:127.0.0.2", AddressSource::Service, Unusable::Loopback),
            ]
        );
        assert_eq!(
            problems[0].to_string(),
            "instance n1/web-1: no Service.Address, and Node.Address 127.0.0.1 is a loopback address: \
             skipped (register the service with an Address)"
        );
        assert_eq!(
            problems[1].to_string(),
            "instance n1/web-2: Service.Address 0.0.0.0 is the unspecified address: skipped \
             (register the service with the backend's own address)"
        );
    }

    #[test]
    fn unusable_tagged_addresses_are_left_out() {
        let mut e = entry("n1", "web", "10.0.0.1", "passing");
        e["Service"]["TaggedAddresses"] = json!({ "lan_ipv6": { "Address": "::1", "Port": 80 },
                                                  "wan_ipv6": { "Address": "fd00::1", "Port": 80 } });
        let (instances, problems) = map_entries(entries(json!([e])), None, WarningPolicy::Keep, 100);
        assert_eq!(problems, []);
        assert_eq!(instances[0].tagged, [ip("fd00::1")]);
    }

    #[test]
    fn a_tagged_query_keeps_only_entries_with_the_tag() {
        let with = |id: &str, address: &str, tags: serde_json::Value| {
            let mut e = entry("n1", id, address, "passing");
            e["Service"]["Tags"] = tags;
            e
        };
        let list = json!([
            with("a", "10.0.0.1", json!(["Blue", "canary"])),
            with("b", "10.0.0.2", json!(["green"])),
            with("c", "10.0.0.3", json!(null)),
            with("d", "10.0.0.4", json!([])),
        ]);
        let (tagged, problems) = map_entries(entries(list.clone()), Some("blue"), WarningPolicy::Keep, 100);
        assert_eq!((ids(&tagged), problems), (vec!["a"], vec![]));
        let (all, _) = map_entries(entries(list), None, WarningPolicy::Keep, 100);
        assert_eq!(ids(&all), ["a", "b", "c", "d"]);
    }

    #[test]
    fn tags_match_as_consul_lowercases_them() {
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(has_tag(&tags(&["v1", "Primary"]), "primary"));
        assert!(has_tag(&tags(&["primary"]), "PRIMARY"));
        assert!(has_tag(&tags(&["ÉTÉ"]), "été"));
        assert!(has_tag(&tags(&["İ"]), "i"), "Go lowercases U+0130 to a plain i");
        assert!(!has_tag(&tags(&["ſ"]), "s"), "lowercasing keeps the long s apart");
        assert!(!has_tag(&tags(&["primary-1"]), "primary"));
        assert!(!has_tag(&[], "primary"));
    }
}
