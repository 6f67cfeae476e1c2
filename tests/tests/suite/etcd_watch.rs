//! xlb's etcd watcher against a real etcd server (Debian's etcd 3.4) on
//! 127.0.0.1: what it reports for puts, deletes, expired leases, bad
//! values, outages, compaction, auth and a member's death.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use xlb::{
    config::{
        EtcdPrefix, EtcdSettings,
        etcd::{Credentials, Password, Tls},
    },
    discovery::{
        Instance, InstanceId, Update,
        etcd::{Connector, WatchOptions, watch_with},
    },
};
use xlb_tests::etcd::{Etcd, Relay};

/// Upper bound for anything that should happen "at once".
const PROMPT: Duration = Duration::from_secs(5);
const PREFIX: &str = "/services/web/";

fn settings(endpoints: Vec<String>) -> EtcdSettings {
    EtcdSettings {
        endpoints,
        dial_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(1),
        ..Default::default()
    }
}

/// Pacing scaled down for tests; pages of 2 keys, so reads take several.
fn fast() -> WatchOptions {
    WatchOptions {
        backoff_base: Duration::from_millis(40),
        backoff_cap: Duration::from_millis(320),
        progress_every: Duration::from_millis(500),
        page: 2,
    }
}

fn start_watch(settings: &EtcdSettings) -> mpsc::Receiver<Update> {
    let (tx, rx) = mpsc::channel(64);
    let connector = Connector::new(settings).expect("connector");
    tokio::spawn(watch_with(connector, EtcdPrefix { prefix: PREFIX.into() }, fast(), tx));
    rx
}

async fn next(rx: &mut mpsc::Receiver<Update>, within: Duration) -> Update {
    tokio::time::timeout(within, rx.recv()).await.expect("an update in time").expect("watch is running")
}

/// The error of the next update, which must be a failure.
async fn failure(rx: &mut mpsc::Receiver<Update>) -> String {
    match next(rx, PROMPT).await {
        Update::Failed { error, .. } => error,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// The first instances sent that `done` accepts, past anything else;
/// with the problems sent with them.
async fn until(
    rx: &mut mpsc::Receiver<Update>,
    within: Duration,
    what: &str,
    done: impl Fn(&[Instance]) -> bool,
) -> (Vec<Instance>, Vec<String>) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let update = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("watch is running");
        if let Update::Instances { instances, problems, .. } = update
            && done(&instances)
        {
            return (instances, problems);
        }
    }
}

fn keys(instances: &[Instance]) -> Vec<String> {
    instances
        .iter()
        .map(|i| match &i.id {
            InstanceId::Etcd { key } => key.trim_start_matches(PREFIX).to_owned(),
            InstanceId::Consul { .. } => panic!("not an etcd instance"),
        })
        .collect()
}

fn key(k: &str) -> String {
    format!("{PREFIX}{k}")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn puts_deletes_leases_weights_and_drains_follow_etcd() {
    let etcd = Etcd::start().unwrap();
    etcd.put(&key("a"), r#"{"address": "10.1.0.1", "port": 80, "weight": 2}"#);
    etcd.put(&key("b"), "10.1.0.2");
    etcd.put(&key("c"), "10.1.0.3:80");
    etcd.put("/services/webby/x", "10.9.0.1");
    // A dead member first: requests go to the one that answers.
    let dead = format!("http://127.0.0.1:{}", etcd.client_port(0) + 1);
    let mut rx = start_watch(&settings(vec![dead, etcd.endpoint()]));

    let (first, problems) = until(&mut rx, PROMPT, "the first read", |_| true).await;
    assert_eq!(keys(&first), ["a", "b", "c"], "read in pages of 2; nothing outside the prefix");
    assert_eq!(problems, Vec::<String>::new());
    let got: Vec<_> = first.iter().map(|i| (i.address, i.port, i.weight)).collect();
    assert_eq!(got, [(ip("10.1.0.1"), 80, 2), (ip("10.1.0.2"), 0, 1), (ip("10.1.0.3"), 80, 1)]);

    etcd.put(&key("d"), "10.1.0.4");
    until(&mut rx, PROMPT, "d joins", |i| keys(i) == ["a", "b", "c", "d"]).await;
    etcd.delete(&key("a"));
    until(&mut rx, PROMPT, "a leaves", |i| keys(i) == ["b", "c", "d"]).await;
    etcd.put(&key("b"), r#"{"address": "10.1.0.2", "weight": 5}"#);
    until(&mut rx, PROMPT, "b reweighted", |i| i[0].weight == 5).await;
    etcd.put(&key("b"), r#"{"address": "10.1.0.2", "state": "drain"}"#);
    until(&mut rx, PROMPT, "b drains (weight 0)", |i| i[0].weight == 0).await;
    etcd.put(&key("b"), r#"{"address": "10.1.0.2", "state": "down"}"#);
    until(&mut rx, PROMPT, "b is down", |i| keys(i) == ["c", "d"]).await;

    // A lease nobody keeps alive: the key goes when it expires.
    let granted = Instant::now();
    etcd.put_leased(&key("e"), "10.1.0.5", 2);
    until(&mut rx, PROMPT, "e joins", |i| keys(i).contains(&"e".to_owned())).await;
    until(&mut rx, Duration::from_secs(10), "e's lease expires", |i| !keys(i).contains(&"e".to_owned()))
        .await;
    let expired = granted.elapsed();
    eprintln!("a 2 s lease's key left after {expired:.2?}");
    assert!(expired >= Duration::from_secs(2), "{expired:?}");

    // Change → update latency, put by put (from the put's start: its
    // commit included).
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    let mut latencies = Vec::new();
    for n in 0..20 {
        let value = format!("{{\"address\": \"10.1.0.6\", \"weight\": {}}}", n + 1);
        let started = Instant::now();
        client.put(key("f"), value, None).await.unwrap();
        until(&mut rx, PROMPT, "the weight change", |i| i.iter().any(|i| i.weight == n + 1)).await;
        latencies.push(started.elapsed());
    }
    let (summary, median) = xlb_tests::summary(&mut latencies, "changes");
    eprintln!("etcd put → watcher update {summary}");
    assert!(median < Duration::from_millis(200), "{latencies:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_values_are_left_out_and_reported_once_and_the_rest_stand() {
    let etcd = Etcd::start().unwrap();
    etcd.put(&key("good"), "10.2.0.1");
    let mut rx = start_watch(&settings(vec![etcd.endpoint()]));
    until(&mut rx, PROMPT, "the good key", |i| keys(i) == ["good"]).await;

    etcd.put(&key("junk"), "this is not an address");
    etcd.put(&key("noaddr"), r#"{"port": 80, "weight": 2}"#);
    etcd.put(&key("host"), r#"{"address": "web-3.internal"}"#);
    etcd.put(&key("loop"), "127.0.0.1:80");
    etcd.put(&key("huge"), &format!("{{\"address\": \"10.2.0.9\", \"pad\": \"{}\"}}", "x".repeat(5000)));
    etcd.put(&key("good2"), "10.2.0.2");
    let (instances, problems) = until(&mut rx, PROMPT, "good2", |i| keys(i) == ["good", "good2"]).await;
    assert_eq!(keys(&instances), ["good", "good2"], "bad keys never flush the good ones");
    let text = problems.join("\n");
    for needle in [
        "key /services/web/junk: the value is neither JSON nor IP",
        "key /services/web/noaddr: the JSON value is not an instance (missing field `address`",
        "key /services/web/host: address \"web-3.internal\" is not an IP address",
        "key /services/web/loop: address 127.0.0.1 is a loopback address",
        "key /services/web/huge: the value is 5",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
    assert_eq!(problems.len(), 5, "{text}");

    // Fixed, it joins.
    etcd.put(&key("junk"), "10.2.0.3");
    let (_, problems) = until(&mut rx, PROMPT, "junk fixed", |i| keys(i).len() == 3).await;
    assert_eq!(problems.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_keeps_the_set_and_changes_made_meanwhile_arrive_even_when_compacted() {
    let etcd = Etcd::start().unwrap();
    for (k, v) in [("a", "10.3.0.1"), ("b", "10.3.0.2"), ("c", "10.3.0.3")] {
        etcd.put(&key(k), v);
    }
    let relay = Relay::start(etcd.client_port(0)).unwrap();
    let mut rx = start_watch(&settings(vec![format!("http://127.0.0.1:{}", relay.port)]));
    until(&mut rx, PROMPT, "the first read", |i| keys(i) == ["a", "b", "c"]).await;

    // Cut: failures, and no other set.
    relay.cut();
    let mut failures = 0;
    while failures < 3 {
        match next(&mut rx, PROMPT).await {
            Update::Failed { .. } => failures += 1,
            Update::Unchanged { .. } => {}
            other => panic!("only failures while cut, got {other:?}"),
        }
    }
    // Changes while cut, resumed from the last revision.
    etcd.delete(&key("a"));
    etcd.put(&key("d"), "10.3.0.4");
    relay.restore();
    until(&mut rx, PROMPT, "the changes made while cut", |i| keys(i) == ["b", "c", "d"]).await;

    // Again, with the revisions in between compacted away: read again.
    relay.cut();
    while !matches!(next(&mut rx, PROMPT).await, Update::Failed { .. }) {}
    etcd.delete(&key("b"));
    etcd.put(&key("e"), "10.3.0.5");
    etcd.put(&key("c"), r#"{"address": "10.3.0.3", "weight": 7}"#);
    etcd.compact();
    relay.restore();
    let (after, _) = until(&mut rx, PROMPT, "the set after compaction", |i| keys(i) == ["c", "d", "e"]).await;
    assert_eq!(after[0].weight, 7);
    // And the watch goes on from the new read.
    etcd.put(&key("f"), "10.3.0.6");
    until(&mut rx, PROMPT, "f after the re-read", |i| keys(i) == ["c", "d", "e", "f"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_without_read_rights_gets_an_error_and_the_set_stands() {
    let mut etcd = Etcd::start().unwrap();
    etcd.put(&key("a"), "10.4.0.1");
    etcd.enable_auth();
    etcd.ctl(&["role", "add", "web-reader"]).unwrap();
    etcd.ctl(&["role", "grant-permission", "web-reader", "--prefix=true", "read", PREFIX]).unwrap();
    etcd.ctl(&["user", "add", "reader:readerpw"]).unwrap();
    etcd.ctl(&["user", "grant-role", "reader", "web-reader"]).unwrap();
    etcd.ctl(&["user", "add", "nobody:nobodypw"]).unwrap();
    let as_user = |user: &str, password: Password, endpoint: String| EtcdSettings {
        credentials: Some(Credentials { username: user.into(), password }),
        ..settings(vec![endpoint])
    };

    // No rights: the error says so.
    let mut rx = start_watch(&as_user("nobody", Password::Inline("nobodypw".into()), etcd.endpoint()));
    let error = failure(&mut rx).await;
    assert!(error.contains("permission denied"), "{error}");
    // A wrong password: refused too.
    let mut rx = start_watch(&as_user("reader", Password::Inline("wrong".into()), etcd.endpoint()));
    let error = failure(&mut rx).await;
    assert!(error.contains("authentication failed"), "{error}");

    // The reader (password from a file) reads; once its role is revoked,
    // the next session fails and no set replaces the one in force.
    let file = std::env::temp_dir().join(format!("xlb-etcd-pw-{}", xlb_tests::unique_id()));
    std::fs::write(&file, "readerpw\n").unwrap();
    let relay = Relay::start(etcd.client_port(0)).unwrap();
    let mut rx = start_watch(&as_user(
        "reader",
        Password::File(file.clone()),
        format!("http://127.0.0.1:{}", relay.port),
    ));
    until(&mut rx, PROMPT, "the reader's read", |i| keys(i) == ["a"]).await;
    etcd.ctl(&["user", "revoke-role", "reader", "web-reader"]).unwrap();
    relay.cut();
    relay.restore();
    let mut denied = false;
    for _ in 0..10 {
        match next(&mut rx, PROMPT).await {
            Update::Failed { error, .. } if error.contains("permission denied") => {
                denied = true;
                break;
            }
            Update::Failed { .. } | Update::Unchanged { .. } => {}
            other => panic!("no new set without read rights, got {other:?}"),
        }
    }
    assert!(denied, "the revoked reader is told it may not read");
    let _ = std::fs::remove_file(file);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watch_follows_the_cluster_when_members_die() {
    let mut etcd = Etcd::cluster(None, 3).unwrap();
    etcd.put(&key("a"), "10.5.0.1");
    let mut rx = start_watch(&settings(etcd.endpoints()));
    until(&mut rx, PROMPT, "the first read", |i| keys(i) == ["a"]).await;
    // Whichever member the watch is on, one of these deaths is its own.
    for (member, k, addr) in [(0, "b", "10.5.0.2"), (1, "c", "10.5.0.3"), (2, "d", "10.5.0.4")] {
        etcd.kill(member);
        etcd.put(&key(k), addr);
        let started = Instant::now();
        until(&mut rx, Duration::from_secs(10), "the put after a member died", |i| {
            keys(i).contains(&k.to_owned())
        })
        .await;
        eprintln!(
            "member m{member} killed: the next put arrived {:.2?} after etcd took it",
            started.elapsed()
        );
        etcd.restart(member).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_watch_is_confirmed_by_progress_answers() {
    let etcd = Etcd::start().unwrap();
    etcd.put(&key("a"), "10.6.0.1");
    let mut rx = start_watch(&settings(vec![etcd.endpoint()]));
    until(&mut rx, PROMPT, "the first read", |i| keys(i) == ["a"]).await;
    // Nothing changes for 3 s: every 500 ms etcd confirms the watch is
    // current, and nothing fails (a missing answer would end the session
    // after 1.5 s).
    let until_quiet = Instant::now() + Duration::from_secs(3);
    let mut confirmed = 0;
    while Instant::now() < until_quiet {
        match next(&mut rx, PROMPT).await {
            Update::Unchanged { index, .. } => {
                assert!(index >= 2, "the revision: {index}");
                confirmed += 1;
            }
            other => panic!("a quiet watch reports only progress, got {other:?}"),
        }
    }
    assert!(confirmed >= 4, "{confirmed} progress answers in 3 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_with_a_ca_file_and_a_client_certificate() {
    let etcd = Etcd::start_tls().unwrap();
    etcd.put(&key("a"), "10.7.0.1");
    let files = etcd.tls.clone().unwrap();
    let with = |ca_file: Option<std::path::PathBuf>,
                client: Option<(std::path::PathBuf, std::path::PathBuf)>| {
        EtcdSettings { tls: Some(Tls { ca_file, client }), ..settings(vec![etcd.endpoint()]) }
    };
    let client = Some((files.client_cert.clone(), files.client_key.clone()));

    let mut rx = start_watch(&with(Some(files.ca.clone()), client.clone()));
    until(&mut rx, PROMPT, "the read over mutual TLS", |i| keys(i) == ["a"]).await;

    // Without a client certificate etcd refuses; with only the system's
    // roots the server's certificate is unknown.
    for (what, settings) in [
        ("no client certificate", with(Some(files.ca.clone()), None)),
        ("system roots only", with(None, client)),
    ] {
        let mut rx = start_watch(&settings);
        let error = failure(&mut rx).await;
        eprintln!("{what}: {error}");
        assert!(what != "system roots only" || error.contains("UnknownIssuer"), "{error}");
    }
}
