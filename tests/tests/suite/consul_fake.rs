//! xlb's Consul client against the fake Consul agent, over real HTTP on
//! 127.0.0.1. No root needed.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use xlb::discovery::consul::{
    AddressSource, Client, ConsulError, ConsulSettings, Instance, InstanceId, Problem, ServiceQuery,
    Unusable, Update, WarningPolicy, WatchOptions, watch_with,
};
use xlb_tests::consul_fake::{CheckStatus, FakeConsul};

/// Upper bound for anything that should happen "at once".
const PROMPT: Duration = Duration::from_secs(5);
const LONG_WAIT: Duration = Duration::from_secs(30);

fn settings(fake: &FakeConsul) -> ConsulSettings {
    ConsulSettings { address: Some(fake.url()), ..Default::default() }
}

fn client(fake: &FakeConsul) -> Client {
    Client::new(&settings(fake)).expect("client")
}

fn web() -> ServiceQuery {
    ServiceQuery { service: "web".into(), tag: None }
}

fn tagged(tag: &str) -> ServiceQuery {
    ServiceQuery { service: "web".into(), tag: Some(tag.into()) }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A `web` instance with one TTL check in `status`, plus `extra` fields.
fn register(fake: &FakeConsul, id: &str, address: &str, status: &str, extra: Value) {
    let mut registration = json!({
        "Name": "web", "ID": id, "Address": address, "Port": 8080,
        "Check": { "TTL": "60s", "Status": status },
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        registration[k] = v.clone();
    }
    fake.register(registration);
}

fn three_webs(fake: &FakeConsul) {
    register(fake, "web-1", "10.1.0.1", "passing", json!({}));
    register(fake, "web-2", "10.1.0.2", "passing", json!({}));
    register(fake, "web-3", "10.1.0.3", "passing", json!({}));
}

/// A Consul instance's service ID.
fn sid(i: &Instance) -> &str {
    match &i.id {
        InstanceId::Consul { id, .. } => id,
        InstanceId::Etcd { .. } => panic!("not a Consul instance: {i:?}"),
    }
}

fn ids(instances: &[Instance]) -> Vec<&str> {
    instances.iter().map(sid).collect()
}

/// Watch pacing scaled down for tests.
fn fast() -> WatchOptions {
    WatchOptions {
        wait: Duration::from_secs(10),
        tagged_wait: Duration::from_secs(10),
        rate_burst: 2,
        rate_interval: Duration::from_millis(10),
        backoff_base: Duration::from_millis(40),
        backoff_cap: Duration::from_millis(320),
    }
}

fn start_watch(fake: &FakeConsul, query: ServiceQuery, options: WatchOptions) -> mpsc::Receiver<Update> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(watch_with(client(fake), query, options, tx));
    rx
}

async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(PROMPT, rx.recv()).await.expect("an update in time").expect("watch is running")
}

/// The next instances sent, past any `Unchanged` updates.
async fn next_instances(rx: &mut mpsc::Receiver<Update>) -> Vec<Instance> {
    loop {
        match next(rx).await {
            Update::Instances { instances, .. } => return instances,
            Update::Unchanged { .. } => {}
            other => panic!("expected instances, got {other:?}"),
        }
    }
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PROMPT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn health_requests(fake: &FakeConsul) -> Vec<xlb_tests::consul_fake::RecordedRequest> {
    fake.requests().into_iter().filter(|r| r.path.starts_with("/v1/health/service/")).collect()
}

async fn http_put(fake: &FakeConsul, path: &str, body: Option<Value>, token: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().put(format!("{}{path}", fake.url()));
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    if let Some(token) = token {
        request = request.header("X-Consul-Token", token);
    }
    let response = request.send().await.expect("PUT");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test]
async fn fetch_maps_instances_addresses_and_weights() {
    let fake = FakeConsul::builder().node("node-a", "192.0.2.99").start().unwrap();
    register(&fake, "web-1", "10.1.0.1", "passing", json!({ "Weights": { "Passing": 5, "Warning": 1 } }));
    // No service address: the node's. Weight from meta.
    register(&fake, "web-2", "", "passing", json!({ "Meta": { "xlb-weight": "7", "team": "edge" } }));
    // Registered over HTTP, in snake case as Consul also accepts.
    let (status, body) = http_put(
        &fake,
        "/v1/agent/service/register",
        Some(json!({ "name": "web", "id": "web-3", "address": "2001:db8::3", "port": 9090,
                     "check": { "ttl": "60s", "status": "passing" } })),
        None,
    )
    .await;
    assert_eq!((status, body.as_str()), (200, ""));
    register(&fake, "other", "10.9.9.9", "passing", json!({ "Name": "db" }));

    let snapshot = client(&fake).fetch(&web(), 0, LONG_WAIT).await.expect("fetch");
    assert_eq!(snapshot.problems, []);
    assert_eq!(snapshot.index, fake.service_index("web"));
    let expect = |id: &str, address: &str, port, weight| Instance {
        id: InstanceId::Consul { node: "node-a".into(), id: id.into() },
        address: ip(address),
        tagged: vec![],
        port,
        weight,
        warning: false,
    };
    assert_eq!(
        snapshot.instances,
        [
            expect("web-1", "10.1.0.1", 8080, 5),
            expect("web-2", "192.0.2.99", 8080, 7),
            expect("web-3", "2001:db8::3", 9090, 1),
        ]
    );
}

#[tokio::test]
async fn new_checks_start_critical_with_consul_check_ids() {
    let fake = FakeConsul::start();
    fake.register(json!({ "Name": "web", "ID": "web-1", "Address": "10.1.0.1",
                          "Checks": [{ "TTL": "60s" }, { "TTL": "60s" }] }));
    fake.register(json!({ "Name": "web", "ID": "web-2", "Address": "10.1.0.2", "Check": { "TTL": "60s" } }));
    let client = client(&fake);
    assert!(client.fetch(&web(), 0, LONG_WAIT).await.unwrap().instances.is_empty());

    fake.pass("service:web-1:1");
    assert!(
        client.fetch(&web(), 0, LONG_WAIT).await.unwrap().instances.is_empty(),
        "one check still critical"
    );
    let (status, _) = http_put(&fake, "/v1/agent/check/pass/service:web-1:2?note=ok", None, None).await;
    assert_eq!(status, 200);
    fake.pass("service:web-2");
    let snapshot = client.fetch(&web(), 0, LONG_WAIT).await.unwrap();
    assert_eq!(ids(&snapshot.instances), ["web-1", "web-2"]);

    let (status, body) = http_put(&fake, "/v1/agent/check/pass/service:nope", None, None).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn blocking_query_returns_promptly_when_a_check_fails() {
    let fake = FakeConsul::start();
    three_webs(&fake);
    let client = client(&fake);
    let first = client.fetch(&web(), 0, LONG_WAIT).await.unwrap();
    assert_eq!(first.instances.len(), 3);

    let held = fake.request_count();
    let blocked = {
        let client = client.clone();
        tokio::spawn(async move { client.fetch(&web(), first.index, LONG_WAIT).await })
    };
    eventually("the blocking query to arrive", || fake.request_count() > held).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!blocked.is_finished(), "the query must be held while nothing changes");

    let failed_at = Instant::now();
    fake.fail("service:web-2");
    let snapshot = blocked.await.unwrap().expect("fetch");
    let latency = failed_at.elapsed();
    assert!(latency < Duration::from_millis(100), "answered {latency:?} after the check failed");
    assert!(snapshot.index > first.index);
    assert_eq!(ids(&snapshot.instances), ["web-1", "web-3"]);
}

#[tokio::test]
async fn blocking_query_times_out_with_the_same_index_when_nothing_changes() {
    let fake = FakeConsul::start();
    three_webs(&fake);
    let client = client(&fake);
    let first = client.fetch(&web(), 0, LONG_WAIT).await.unwrap();

    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let blocked = {
        let client = client.clone();
        tokio::spawn(async move { client.fetch(&web(), first.index, wait).await })
    };
    // Writes that change nothing move no index and wake nobody: a TTL pass
    // on a passing check, an identical re-registration, another service.
    tokio::time::sleep(Duration::from_millis(50)).await;
    fake.pass("service:web-1");
    register(&fake, "web-3", "10.1.0.3", "passing", json!({}));
    fake.register(json!({ "Name": "db", "ID": "db-1", "Address": "10.2.0.1" }));
    let snapshot = blocked.await.unwrap().expect("fetch");
    let took = started.elapsed();
    assert!(took >= wait, "returned after {took:?}, before wait ran out");
    assert!(took < wait + wait / 16 + Duration::from_millis(250), "returned after {took:?}");
    assert_eq!(snapshot.index, first.index);
    assert_eq!(snapshot.instances, first.instances);
}

#[tokio::test]
async fn a_quiet_service_is_reported_unchanged_each_time_the_wait_runs_out() {
    let fake = FakeConsul::start();
    three_webs(&fake);
    let wait = Duration::from_millis(300);
    let mut rx = start_watch(&fake, web(), WatchOptions { wait, ..fast() });
    assert_eq!(next_instances(&mut rx).await.len(), 3);
    let index = fake.service_index("web");
    let started = Instant::now();
    // Three waits run out; each blocking answer, and the plain read that
    // confirms it, is reported.
    for _ in 0..6 {
        match next(&mut rx).await {
            Update::Unchanged { index: answered, .. } => assert_eq!(answered, index),
            other => panic!("nothing changed, got {other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(took + Duration::from_millis(50) >= wait * 3, "three waits in {took:?}");
    assert!(took < (wait + wait / 16) * 3 + Duration::from_millis(500), "three waits in {took:?}");
    let requests = health_requests(&fake);
    let waits: Vec<_> = requests[..7].iter().map(|r| r.param("wait")).collect();
    assert_eq!(waits, [None, Some("300ms"), None, Some("300ms"), None, Some("300ms"), None]);
    assert!(requests.iter().all(|r| r.param("wait").is_some() == r.param("index").is_some()));
}

#[tokio::test]
async fn an_instance_registered_without_address_on_a_dev_agent_is_reported_and_left_out() {
    let fake = FakeConsul::builder().node("dev", "127.0.0.1").start().unwrap();
    register(&fake, "web-1", "10.1.0.1", "passing", json!({}));
    let no_address = |id: &str| json!({ "Name": "web", "ID": id, "Port": 8080, "Check": { "TTL": "60s", "Status": "passing" } });
    fake.register(no_address("web-2"));
    // As Consul answers it: no service address, the agent's node address.
    let body =
        reqwest::get(format!("{}/v1/health/service/web", fake.url())).await.unwrap().text().await.unwrap();
    let raw: Value = serde_json::from_str(&body).unwrap();
    let entry = raw.as_array().unwrap().iter().find(|e| e["Service"]["ID"] == "web-2").unwrap();
    assert_eq!((&entry["Service"]["Address"], &entry["Node"]["Address"]), (&json!(""), &json!("127.0.0.1")));

    let loopback = |id: &str| {
        Problem::UnusableAddress {
            instance: format!("dev/{id}"),
            address: ip("127.0.0.1"),
            source: AddressSource::Node,
            why: Unusable::Loopback,
        }
        .to_string()
    };
    let mut rx = start_watch(&fake, web(), fast());
    match next(&mut rx).await {
        Update::Instances { instances, problems, .. } => {
            assert_eq!(ids(&instances), ["web-1"]);
            assert_eq!(problems, [loopback("web-2")]);
            assert_eq!(
                problems[0].to_string(),
                "instance dev/web-2: no Service.Address, and Node.Address 127.0.0.1 is a loopback address: \
                 skipped (register the service with an Address)"
            );
        }
        other => panic!("expected instances, got {other:?}"),
    }
    // A new problem alone is news too.
    fake.register(no_address("web-3"));
    match next(&mut rx).await {
        Update::Instances { instances, problems, .. } => {
            assert_eq!(ids(&instances), ["web-1"]);
            assert_eq!(problems, [loopback("web-2"), loopback("web-3")]);
        }
        other => panic!("expected instances, got {other:?}"),
    }
}

#[tokio::test]
async fn watcher_restarts_from_zero_when_the_index_goes_backwards() {
    let fake = FakeConsul::start();
    three_webs(&fake);
    let mut rx = start_watch(&fake, web(), fast());
    let Update::Instances { index: before, .. } = next(&mut rx).await else { panic!("instances first") };
    // Let the index climb so that the restored one is clearly lower.
    for _ in 0..3 {
        fake.warn("service:web-3");
        fake.pass("service:web-3");
    }
    let _ =
        tokio::time::timeout(Duration::from_millis(300), async { while rx.recv().await.is_some() {} }).await;
    assert!(fake.service_index("web") > before);

    let seen = fake.requests().len();
    fake.reset_index();
    eventually("a non-blocking query after the reset", || {
        fake.requests()[seen..]
            .iter()
            .any(|r| r.path == "/v1/health/service/web" && r.param("index").is_none())
    })
    .await;
    // Had the watcher kept its old, higher index, this change (now at a
    // lower index) would wait out the 10 s `wait`.
    fake.fail("service:web-1");
    let instances = next_instances(&mut rx).await;
    assert_eq!(ids(&instances), ["web-2", "web-3"]);
}

#[tokio::test]
async fn watcher_backs_off_while_consul_is_down_then_recovers() {
    let fake = FakeConsul::start();
    three_webs(&fake);
    let options = fast();
    let mut rx = start_watch(&fake, web(), options.clone());
    let first = next_instances(&mut rx).await;
    assert_eq!(first.len(), 3);

    fake.set_down(true);
    let mut failures = Vec::new();
    for expected in 1..=5_u32 {
        match next(&mut rx).await {
            Update::Failed { consecutive_failures, retry_in, error, .. } => {
                assert_eq!(consecutive_failures, expected);
                let ceiling = (options.backoff_base * 2_u32.pow(expected - 1)).min(options.backoff_cap);
                assert!(retry_in >= ceiling / 2 && retry_in <= ceiling, "retry {expected}: {retry_in:?}");
                assert!(error.starts_with("GET http://"), "{error}");
                failures.push((Instant::now(), retry_in));
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
    for pair in failures.windows(2) {
        let (at, retry_in) = pair[0];
        let gap = pair[1].0 - at;
        assert!(
            gap + Duration::from_millis(5) >= retry_in,
            "retried after {gap:?}, back-off was {retry_in:?}"
        );
    }

    fake.set_down(false);
    // The first answer after failures is sent even though nothing changed.
    loop {
        match next(&mut rx).await {
            Update::Instances { instances, .. } => {
                assert_eq!(instances, first);
                break;
            }
            Update::Failed { consecutive_failures, .. } => assert!(consecutive_failures > 5),
            other => panic!("the first answer after failures carries the instances, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn watcher_reports_server_errors_and_keeps_the_last_instances() {
    let fake = FakeConsul::start();
    three_webs(&fake);
    let mut rx = start_watch(&fake, web(), fast());
    assert_eq!(next_instances(&mut rx).await.len(), 3);

    fake.set_error(Some(500));
    fake.fail("service:web-1"); // wakes the held query, which now errs
    for n in 1..=2 {
        match next(&mut rx).await {
            Update::Failed { error, consecutive_failures, .. } => {
                assert_eq!(consecutive_failures, n);
                assert!(error.contains("HTTP 500") && error.contains("fake failure"), "{error}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
    fake.set_error(None);
    loop {
        if let Update::Instances { instances, .. } = next(&mut rx).await {
            assert_eq!(ids(&instances), ["web-2", "web-3"]);
            break;
        }
    }
}

#[tokio::test]
async fn watcher_rate_limits_a_server_that_answers_at_once() {
    let fake = FakeConsul::start();
    three_webs(&fake);
    fake.set_blocking(false);
    let options = WatchOptions { rate_interval: Duration::from_millis(100), ..fast() };
    let mut rx = start_watch(&fake, web(), options);
    assert_eq!(next_instances(&mut rx).await.len(), 3);
    let start = health_requests(&fake).len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let made = health_requests(&fake).len() - start;
    // One per 100 ms (the burst is spent on the first two queries).
    assert!((5..=12).contains(&made), "{made} queries in one second");
    let updates: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert!(updates.iter().all(|u| matches!(u, Update::Unchanged { .. })), "nothing changed: {updates:?}");
    assert!(updates.len() + 1 >= made, "every answer is reported: {} for {made}", updates.len());
}

#[tokio::test]
async fn acl_token_is_enforced_and_sent() {
    let fake = FakeConsul::builder().acl_token("s3cret").start().unwrap();
    register(&fake, "web-1", "10.1.0.1", "passing", json!({}));

    let registration = json!({ "Name": "web", "ID": "web-2", "Address": "10.1.0.2" });
    let (status, body) =
        http_put(&fake, "/v1/agent/service/register", Some(registration.clone()), None).await;
    assert_eq!(status, 403);
    assert!(body.starts_with("Permission denied"), "{body}");
    let (status, body) =
        http_put(&fake, "/v1/agent/service/register", Some(registration.clone()), Some("wrong")).await;
    assert_eq!((status, body.as_str()), (403, "ACL not found"));
    let (status, _) = http_put(&fake, "/v1/agent/service/register", Some(registration), Some("s3cret")).await;
    assert_eq!(status, 200);

    // Anonymous reads are filtered, not refused: the client must not take
    // the empty list for "no instances".
    let anonymous = client(&fake).fetch(&web(), 0, LONG_WAIT).await;
    assert!(matches!(anonymous, Err(ConsulError::FilteredByAcl { .. })), "{anonymous:?}");

    let wrong = Client::new(&ConsulSettings { token: Some("wrong".into()), ..settings(&fake) }).unwrap();
    match wrong.fetch(&web(), 0, LONG_WAIT).await {
        Err(ConsulError::Status { status: 403, body, .. }) => assert_eq!(body, "ACL not found"),
        other => panic!("expected 403, got {other:?}"),
    }

    let right = Client::new(&ConsulSettings { token: Some("s3cret".into()), ..settings(&fake) }).unwrap();
    assert_eq!(right.fetch(&web(), 0, LONG_WAIT).await.unwrap().instances.len(), 2);

    let path = std::env::temp_dir().join(format!("xlb-consul-token-{}", xlb_tests::unique_id()));
    std::fs::write(&path, "s3cret\n").unwrap();
    let from_file =
        Client::new(&ConsulSettings { token_file: Some(path.clone()), ..settings(&fake) }).unwrap();
    assert_eq!(from_file.fetch(&web(), 0, LONG_WAIT).await.unwrap().instances.len(), 2);
    // Re-read per request: a rotated token is used at once.
    std::fs::write(&path, "rotated\n").unwrap();
    assert!(matches!(
        from_file.fetch(&web(), 0, LONG_WAIT).await,
        Err(ConsulError::Status { status: 403, .. })
    ));
    std::fs::remove_file(&path).unwrap();

    let tokens: Vec<_> = health_requests(&fake).into_iter().map(|r| r.token).collect();
    assert_eq!(
        tokens,
        [None, Some("wrong".into()), Some("s3cret".into()), Some("s3cret".into()), Some("rotated".into())]
    );
}

#[tokio::test]
async fn tag_filters_instances() {
    let fake = FakeConsul::start();
    register(&fake, "web-blue", "10.1.0.1", "passing", json!({ "Tags": ["blue"] }));
    register(&fake, "web-green", "10.1.0.2", "passing", json!({ "Tags": ["green", "canary"] }));
    register(&fake, "web-none", "10.1.0.3", "passing", json!({}));
    let client = client(&fake);
    assert_eq!(ids(&client.fetch(&tagged("blue"), 0, LONG_WAIT).await.unwrap().instances), ["web-blue"]);
    assert_eq!(ids(&client.fetch(&tagged("canary"), 0, LONG_WAIT).await.unwrap().instances), ["web-green"]);
    assert!(client.fetch(&tagged("red"), 0, LONG_WAIT).await.unwrap().instances.is_empty());
    assert_eq!(client.fetch(&web(), 0, LONG_WAIT).await.unwrap().instances.len(), 3);
    let tags: Vec<_> = health_requests(&fake).iter().map(|r| r.param("tag").map(str::to_owned)).collect();
    assert_eq!(tags, [Some("blue".into()), Some("canary".into()), Some("red".into()), None]);
}

/// Re-registers `web-<n>` with only `tags`.
fn retag(fake: &FakeConsul, n: u8, tags: &[&str]) {
    register(fake, &format!("web-{n}"), &format!("10.1.0.{n}"), "passing", json!({ "Tags": tags }));
}

#[tokio::test]
async fn the_fake_emulates_the_streaming_tag_bug() {
    let fake = FakeConsul::builder().streaming_tag_bug().start().unwrap();
    retag(&fake, 1, &["blue"]);
    retag(&fake, 2, &["blue"]);
    let client = client(&fake);
    let first = client.fetch(&tagged("blue"), 0, LONG_WAIT).await.unwrap();
    assert_eq!(ids(&first.instances), ["web-1", "web-2"]);

    let held = {
        let client = client.clone();
        tokio::spawn(async move { client.fetch(&tagged("blue"), first.index, LONG_WAIT).await })
    };
    let seen = fake.request_count();
    eventually("the blocking query", || fake.request_count() > seen).await;
    retag(&fake, 2, &["green"]);
    let stale = held.await.unwrap().unwrap();
    assert!(stale.index > first.index, "the write wakes the query");
    assert_eq!(ids(&stale.instances), ["web-1", "web-2"], "the view keeps the instance that lost the tag");
    let plain = client.fetch(&tagged("blue"), 0, LONG_WAIT).await.unwrap();
    assert_eq!((ids(&plain.instances), plain.index), (vec!["web-1"], stale.index));

    // Later blocking answers keep it, as it last matched, until it is
    // deregistered; other changes still come through.
    fake.fail("service:web-1");
    let next = client.fetch(&tagged("blue"), stale.index, LONG_WAIT).await.unwrap();
    assert_eq!(ids(&next.instances), ["web-2"]);
    fake.deregister("web-2");
    assert!(client.fetch(&tagged("blue"), next.index, LONG_WAIT).await.unwrap().instances.is_empty());
    // Queries without a tag are not affected.
    retag(&fake, 3, &[]);
    let all = client.fetch(&web(), first.index, LONG_WAIT).await.unwrap();
    assert_eq!(ids(&all.instances), ["web-3"]);
}

#[tokio::test]
async fn a_tagged_watch_drops_an_instance_that_lost_the_tag_despite_a_stale_streaming_view() {
    let fake = FakeConsul::builder().streaming_tag_bug().start().unwrap();
    retag(&fake, 1, &["blue"]);
    retag(&fake, 2, &["blue"]);
    retag(&fake, 3, &["green"]);
    let tagged_wait = Duration::from_millis(400);
    let mut rx = start_watch(&fake, tagged("blue"), WatchOptions { tagged_wait, ..fast() });
    assert_eq!(ids(&next_instances(&mut rx).await), ["web-1", "web-2"]);
    eventually("a blocking query", || health_requests(&fake).iter().any(|r| r.param("index").is_some()))
        .await;

    // What the design promises: within one tagged wait (plus Consul's
    // jitter and a round trip), however stale the agent's view.
    let bound = tagged_wait + tagged_wait / 16 + Duration::from_millis(250);
    let removed_at = Instant::now();
    retag(&fake, 2, &["green"]);
    let instances = tokio::time::timeout(bound, next_instances(&mut rx)).await.expect("dropped in time");
    assert_eq!(ids(&instances), ["web-1"]);
    assert!(removed_at.elapsed() <= bound, "{:?}", removed_at.elapsed());

    // The view goes on answering web-2, when a wait runs out and when the
    // service changes, but it does not come back.
    fake.warn("service:web-1");
    let deadline = Instant::now() + tagged_wait * 3;
    let mut warned = false;
    while let Ok(update) = tokio::time::timeout_at(deadline.into(), next(&mut rx)).await {
        match update {
            Update::Instances { instances, .. } => {
                assert_eq!(ids(&instances), ["web-1"]);
                warned = instances[0].warning;
            }
            Update::Unchanged { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(warned, "the change of web-1 came through");
}

#[tokio::test]
async fn warning_instances_follow_the_policy() {
    let fake = FakeConsul::start();
    register(&fake, "web-1", "10.1.0.1", "passing", json!({ "Weights": { "Passing": 10, "Warning": 2 } }));
    register(&fake, "web-2", "10.1.0.2", "warning", json!({ "Weights": { "Passing": 10, "Warning": 2 } }));
    register(&fake, "web-3", "10.1.0.3", "critical", json!({}));

    let keep = client(&fake).fetch(&web(), 0, LONG_WAIT).await.unwrap();
    let got: Vec<_> = keep.instances.iter().map(|i| (sid(i), i.weight, i.warning)).collect();
    assert_eq!(got, [("web-1", 10, false), ("web-2", 2, true)]);

    let strict = Client::new(&ConsulSettings { warning: WarningPolicy::Exclude, ..settings(&fake) }).unwrap();
    assert_eq!(ids(&strict.fetch(&web(), 0, LONG_WAIT).await.unwrap().instances), ["web-1"]);

    let passing: Vec<_> = health_requests(&fake).iter().map(|r| r.param("passing").is_some()).collect();
    assert_eq!(passing, [false, true], "keep filters on the client, exclude asks the server");

    // A warning instance coming back to passing gets its passing weight.
    fake.pass("service:web-2");
    let back = client(&fake).fetch(&web(), 0, LONG_WAIT).await.unwrap();
    let got: Vec<_> = back.instances.iter().map(|i| (sid(i), i.weight, i.warning)).collect();
    assert_eq!(got, [("web-1", 10, false), ("web-2", 10, false)]);
}

#[tokio::test]
async fn deregistering_removes_the_instance_from_a_watch() {
    let fake = FakeConsul::start();
    three_webs(&fake);
    let mut rx = start_watch(&fake, web(), fast());
    assert_eq!(next_instances(&mut rx).await.len(), 3);
    let (status, _) = http_put(&fake, "/v1/agent/service/deregister/web-3", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&next_instances(&mut rx).await), ["web-1", "web-2"]);
    // An unknown id is no error, and changes nothing.
    let index = fake.service_index("web");
    let (status, _) = http_put(&fake, "/v1/agent/service/deregister/web-9", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(fake.service_index("web"), index);
    fake.deregister("web-1");
    fake.deregister("web-2");
    // The watch may see the state between the two deregistrations first.
    let mut last = next_instances(&mut rx).await;
    if !last.is_empty() {
        assert_eq!(ids(&last), ["web-2"]);
        last = next_instances(&mut rx).await;
    }
    assert!(last.is_empty());
}

#[tokio::test]
async fn node_check_failure_takes_every_instance_out() {
    let fake = FakeConsul::start();
    three_webs(&fake);
    let client = client(&fake);
    let first = client.fetch(&web(), 0, LONG_WAIT).await.unwrap();
    fake.set_node_health(CheckStatus::Critical);
    let snapshot = client.fetch(&web(), first.index, LONG_WAIT).await.unwrap();
    assert!(snapshot.instances.is_empty());
    fake.set_node_health(CheckStatus::Passing);
    assert_eq!(client.fetch(&web(), snapshot.index, LONG_WAIT).await.unwrap().instances.len(), 3);
}

#[tokio::test]
async fn an_expired_ttl_turns_the_check_critical() {
    let fake = FakeConsul::start();
    fake.register(json!({ "Name": "web", "ID": "web-1", "Address": "10.1.0.1",
                          "Check": { "TTL": "300ms", "Status": "passing" } }));
    let client = client(&fake);
    let first = client.fetch(&web(), 0, LONG_WAIT).await.unwrap();
    assert_eq!(first.instances.len(), 1);
    let started = Instant::now();
    let snapshot = client.fetch(&web(), first.index, LONG_WAIT).await.unwrap();
    assert!(snapshot.instances.is_empty());
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn datacenter_goes_out_as_dc() {
    let fake = FakeConsul::builder().datacenter("east").start().unwrap();
    three_webs(&fake);
    let other = Client::new(&ConsulSettings { datacenter: Some("west".into()), ..settings(&fake) }).unwrap();
    match other.fetch(&web(), 0, LONG_WAIT).await {
        Err(ConsulError::Status { status: 500, body, .. }) => assert_eq!(body, "No path to datacenter"),
        other => panic!("expected 500, got {other:?}"),
    }
    let own = Client::new(&ConsulSettings { datacenter: Some("east".into()), ..settings(&fake) }).unwrap();
    assert_eq!(own.fetch(&web(), 0, LONG_WAIT).await.unwrap().instances.len(), 3);
}

#[tokio::test]
async fn watch_ends_when_the_receiver_is_dropped() {
    let fake = FakeConsul::start();
    three_webs(&fake);
    let (tx, mut rx) = mpsc::channel(4);
    let task = tokio::spawn(watch_with(client(&fake), web(), WatchOptions { wait: LONG_WAIT, ..fast() }, tx));
    assert_eq!(next_instances(&mut rx).await.len(), 3);
    let seen = fake.request_count();
    eventually("the blocking query", || fake.request_count() > seen).await;
    drop(rx);
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("watch returns although its query is held")
        .unwrap();
}

#[tokio::test]
async fn a_down_agent_refuses_connections_and_comes_back_on_the_same_port() {
    let fake = FakeConsul::start();
    three_webs(&fake);
    let client = client(&fake);
    let addr = fake.addr();
    fake.set_down(true);
    assert!(std::net::TcpStream::connect(addr).is_err(), "connections are refused while down");
    let started = Instant::now();
    assert!(matches!(client.fetch(&web(), 0, LONG_WAIT).await, Err(ConsulError::Request { .. })));
    assert!(started.elapsed() < Duration::from_secs(1));
    fake.set_down(false);
    assert_eq!(fake.addr(), addr);
    assert_eq!(client.fetch(&web(), 0, LONG_WAIT).await.unwrap().instances.len(), 3);
}
