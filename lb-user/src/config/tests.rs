use std::path::Path;

use super::{file::is_prime, *};
use crate::model::Protocol;

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
    Config::parse(text, Path::new("xlb.toml")).map_err(|e| crate::errors::error_chain(&e))
}

#[test]
fn second_chance_is_live_and_zero_turns_it_off() {
    let c = parse(&format!("drain_timeout = 10\nsecond_chance = 0\n{GOOD}")).unwrap();
    assert_eq!((c.live.drain_timeout, c.live.second_chance), (Duration::from_secs(10), Duration::ZERO));
    let c = parse(&format!("drain_timeout = 10\n{GOOD}")).unwrap();
    assert_eq!(c.live.second_chance, Duration::from_secs(10));
}

#[test]
fn the_documented_example_parses_with_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.start.interface, "eth0");
    assert_eq!(c.start.capacities.table_size, 65_537);
    assert_eq!(c.start.xdp_mode, XdpMode::Auto);
    assert_eq!(c.start.pin_dir, Path::new("/sys/fs/bpf/xlb/eth0"));
    assert_eq!(c.live.drain_timeout, Duration::from_secs(30));
    assert_eq!(c.live.second_chance, c.live.drain_timeout, "second chance lasts a drain unless set");
    let web = &c.live.vips[0];
    assert_eq!(web.addr, VipAddr { ip: [192, 0, 2, 10].into(), port: 80, protocol: Protocol::Tcp });
    let weights: Vec<u32> = web.backends.listed().iter().map(|b| b.weight).collect();
    assert_eq!(weights, [1, 2]);
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
        ("bad address", vip(&base.replace("192.0.2.10", "192.0.2.300")), &["address", "invalid IP address"]),
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
        ("drain timeout over a day", format!("drain_timeout = 86401\n{GOOD}"), &["drain_timeout"]),
        (
            "second chance over a day",
            format!("second_chance = 86401\n{GOOD}"),
            &["second_chance", "over a day"],
        ),
        (
            "second chance defaulting to a drain over a day",
            format!("drain_timeout = 86401\nsecond_chance = 60\n{GOOD}"),
            &["drain_timeout"],
        ),
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
        ("empty admin token", format!("{GOOD}\n[admin]\ntoken = \"\""), &["admin.token", "empty"]),
        (
            "consul and static backends together",
            GOOD.replace("forward = \"dr\"", "forward = \"dr\"\nconsul = { service = \"web\" }"),
            &["vip[0] (web).consul", "not both"],
        ),
        (
            "empty consul service",
            vip(&format!("{base}\nconsul = {{ service = \"\" }}")),
            &["vip[0] (web).consul.service"],
        ),
        ("unknown consul field", format!("{GOOD}\n[consul]\nadress = \"x\""), &["unknown field `adress`"]),
        (
            "etcd and static backends together",
            GOOD.replace("forward = \"dr\"", "forward = \"dr\"\netcd = { prefix = \"/s/\" }"),
            &["vip[0] (web).etcd", "not both"],
        ),
        (
            "consul and etcd together",
            vip(&format!("{base}\nconsul = {{ service = \"web\" }}\netcd = {{ prefix = \"/s/\" }}")),
            &["vip[0] (web).etcd", "one source"],
        ),
        (
            "empty etcd prefix",
            vip(&format!("{base}\netcd = {{ prefix = \"\" }}")),
            &["vip[0] (web).etcd.prefix"],
        ),
        (
            "etcd endpoint without a port",
            format!("{GOOD}\n[etcd]\nendpoints = [\"etcd-1\"]"),
            &["etcd.endpoints", "host:port"],
        ),
        ("etcd password without a user", format!("{GOOD}\n[etcd]\npassword = \"x\""), &["etcd.username"]),
        (
            "announce into the main table",
            format!("{GOOD}\n[announce]\ntable = 254"),
            &["announce.table", "main table"],
        ),
        (
            "announce without a table",
            format!("{GOOD}\n[announce]\nwithdraw_wait = 3"),
            &["missing field `table`"],
        ),
        (
            "withdraw wait too long",
            format!("{GOOD}\n[announce]\ntable = 200\nwithdraw_wait = 601"),
            &["announce.withdraw_wait"],
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

/// Each start-only field, with a value other than GOOD's.
fn start_only_edits() -> Vec<(&'static str, String)> {
    let add = |line: &str| format!("{line}\n{GOOD}");
    vec![
        ("interface", format!("pin_dir = \"/sys/fs/bpf/xlb/eth0\"\n{}", GOOD.replace("eth0", "eth1"))),
        ("xdp_mode", add("xdp_mode = \"generic\"")),
        ("pin_dir", add("pin_dir = \"/sys/fs/bpf/other\"")),
        ("table_size", add("table_size = 251")),
        ("max_vips", add("max_vips = 8")),
        ("max_backends", add("max_backends = 100")),
        ("conntrack_size", add("conntrack_size = 2048")),
        ("conntrack_insert_limit", add("conntrack_insert_limit = 5")),
        ("tun_source_v4", add("tun_source_v4 = \"10.9.9.9\"")),
        ("tun_source_v6", add("tun_source_v6 = \"fd00::9\"")),
        ("admin", format!("{GOOD}\n[admin]\nlisten = \"127.0.0.1:9400\"")),
        ("announce", format!("{GOOD}\n[announce]\ntable = 200")),
    ]
}

#[test]
fn each_start_only_field_is_named_when_it_changes() {
    let base = parse(GOOD).unwrap().start;
    let edits = start_only_edits();
    assert_eq!(edits.iter().map(|(f, _)| *f).collect::<Vec<_>>(), StartConfig::FIELDS, "one edit per field");
    for (field, text) in edits {
        let changed = parse(&text).unwrap().start;
        assert_eq!(base.changed_fields(&changed), [field], "{text}");
    }
    let live_only = parse(&format!("drain_timeout = 5\n{GOOD}")).unwrap();
    assert!(base.changed_fields(&live_only.start).is_empty());
}

fn reload(text: &str, running: &StartConfig) -> Result<Reload, String> {
    let path = std::env::temp_dir().join(format!(
        "xlb-reload-{}-{:?}.toml",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, text).unwrap();
    let result = Config::reload(&path, running).map_err(|e| crate::errors::error_chain(&e));
    std::fs::remove_file(&path).unwrap();
    result
}

#[test]
fn a_reload_takes_the_live_part_and_names_the_start_only_fields_it_refuses() {
    let running = parse(GOOD).unwrap().start;
    let edited = format!(
        "max_vips = 8\nconntrack_insert_limit = 5\ndrain_timeout = 7\n{}",
        GOOD.replace("10.0.0.12", "10.0.0.13")
    );
    let r = reload(&edited, &running).unwrap();
    assert_eq!(r.refused, ["max_vips", "conntrack_insert_limit"]);
    assert_eq!(r.live.drain_timeout, Duration::from_secs(7));
    assert_eq!(r.live.vips[0].backends.listed()[1].address, IpAddr::from([10, 0, 0, 13]));

    // The live part must fit the running capacities, not only the file's.
    let small = parse(&format!("max_vips = 1\n{GOOD}")).unwrap().start;
    let two = format!(
        "max_vips = 2\n{GOOD}\n[[vip]]\nname = \"b\"\naddress = \"192.0.2.11\"\nport = 80\nprotocol = \"tcp\"\n"
    );
    let err = reload(&two, &small).unwrap_err();
    assert!(
        err.contains("vip: 2 VIPs configured but max_vips = 1")
            && err.contains("max_vips apply only at start"),
        "{err}"
    );
    // A file that is invalid on its own is refused as such.
    let err = reload("interface = [", &running).unwrap_err();
    assert!(err.contains("TOML") || err.contains("expected"), "{err}");
}

#[test]
fn the_readme_lists_exactly_the_start_only_fields() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.contains("Start-only fields:"))
        .expect("the README's Live changes section has a `Start-only fields:` line");
    let listed: Vec<&str> = line.split('`').skip(1).step_by(2).collect();
    assert_eq!(listed, StartConfig::FIELDS, "README line: {line}");
}

#[test]
fn primes() {
    assert!(is_prime(65_537) && is_prime(2) && is_prime(1_048_583));
    assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0) && !is_prime(65_535));
}

#[test]
fn the_top_level_check_applies_to_tcp_vips_without_their_own() {
    let text = "interface = \"eth0\"\n[check]\nkind = \"tcp\"\nfall = 3\n\n\
        [[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\n\n\
        [[vip]]\nname = \"api\"\naddress = \"192.0.2.10\"\nport = 443\nprotocol = \"tcp\"\ncheck = { kind = \"none\" }\n\n\
        [[vip]]\nname = \"dns\"\naddress = \"192.0.2.10\"\nport = 53\nprotocol = \"udp\"\n\n\
        [[vip]]\nname = \"app\"\naddress = \"192.0.2.10\"\nport = 8080\nprotocol = \"tcp\"\ncheck = { kind = \"http\", path = \"/up\" }\n";
    let c = parse(text).unwrap();
    let check = |name: &str| c.live.vip(name).unwrap().check.clone();
    assert_eq!(check("web").map(|c| c.fall), Some(3), "inherited");
    assert_eq!(check("api"), None, "opted out");
    assert_eq!(check("dns"), None, "UDP VIPs are not checked");
    assert!(matches!(check("app").map(|c| c.probe), Some(check::Probe::Http(_))), "its own");

    let udp = "interface = \"eth0\"\n[[vip]]\nname = \"dns\"\naddress = \"192.0.2.10\"\nport = 53\nprotocol = \"udp\"\ncheck = { kind = \"tcp\" }\n";
    assert!(parse(udp).unwrap_err().contains("vip[0] (dns).check: health checks probe TCP"));
    let bad_top = "interface = \"eth0\"\n[check]\nkind = \"tcp\"\nrise = 0\n";
    assert!(parse(bad_top).unwrap_err().contains("check.rise: 0 is outside 1..=100"));
}

#[test]
fn the_connection_table_holds_whole_sets() {
    let caps = |conntrack_size| Capacities { table_size: 13, max_vips: 1, max_backends: 1, conntrack_size };
    assert_eq!(caps(1024).conntrack_slots(), 1024);
    assert_eq!(caps(1025).conntrack_slots(), 1028, "rounded up to a set of four");
}
