//! The read-then-watch loop and the key set it keeps.

use std::{collections::BTreeMap, fmt, time::Duration};

use etcd_client::{Client, EventType, GetOptions, WatchOptions as EtcdWatch};
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, info, warn};

use super::{Bad, Connector, EtcdPrefix, Record, State, parse};
use crate::{
    discovery::{
        Duplicate, Instance, InstanceId, MAX_INSTANCES, Settled, Source, Update, backoff, new_problems,
        random, settle,
    },
    errors::error_chain,
};

/// How [`watch_with`] paces itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchOptions {
    /// Back-off after the first failure; it doubles per failure...
    pub backoff_base: Duration,
    /// ...up to this.
    pub backoff_cap: Duration,
    /// How often the watch asks etcd to confirm it is current (a progress
    /// request): the source's age then says how long ago etcd last
    /// answered.
    pub progress_every: Duration,
    /// Keys per page when reading the prefix.
    pub page: i64,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(30),
            progress_every: Duration::from_secs(10),
            page: 1000,
        }
    }
}

/// [`watch_with`] with [`WatchOptions::default`].
pub async fn watch(connector: Connector, prefix: EtcdPrefix, updates: mpsc::Sender<Update>) {
    watch_with(connector, prefix, WatchOptions::default(), updates).await;
}

/// Follows the keys under `prefix` until `updates` is closed, and sends an
/// [`Update`] for each answer: `Instances` for the first read, for every
/// change of the instances or the problems, and for the first answer
/// after failures; `Unchanged` for a progress answer or events that
/// changed nothing; `Failed` when a session ends (connection refused or
/// lost, a request timed out, access denied), after which the last
/// instances sent still stand.
///
/// The rules:
/// - **No gap**: the prefix is read at one revision R (page by page, each
///   page at R), then watched from R + 1, so every later change arrives as
///   an event.
/// - **Resume**: after a failure the watch starts again from the revision
///   after the last event applied, on whichever member answers.
/// - **Compaction**: when etcd cancels the watch because that revision was
///   compacted away, the events in between are gone: the prefix is read
///   again and the set replaced (which the consumer diffs).
/// - **Progress**: every `progress_every` the watch asks etcd for a
///   progress answer, which shows the source alive (an `Unchanged`). A
///   connection that died silently is found by gRPC keepalives.
/// - **Errors**: back-off from `backoff_base`, doubling per consecutive
///   failure up to `backoff_cap`, with jitter; a session that lasted
///   `STABLE` starts the count again.
///
/// A key whose value is not an instance ([`Bad`]) is left out and
/// reported; the rest of the set is unaffected. Problems are logged once,
/// when they appear.
pub async fn watch_with(
    connector: Connector,
    prefix: EtcdPrefix,
    options: WatchOptions,
    updates: mpsc::Sender<Update>,
) {
    let mut follower = Follower::new(prefix, updates.clone());
    loop {
        let started = Instant::now();
        let ended = tokio::select! {
            biased;
            () = updates.closed() => return,
            ended = follower.session(&connector, &options) => ended,
        };
        let Err(error) = ended else { return };
        // Only a session that lasted resets the back-off: one that fails
        // right after it connects must not retry ten times a second.
        if started.elapsed() >= STABLE {
            follower.failures = 0;
        }
        follower.failures = follower.failures.saturating_add(1);
        follower.stale = true;
        let retry_in = backoff(follower.failures, options.backoff_base, options.backoff_cap, random());
        warn!(source = %follower.source, failures = follower.failures, ?retry_in, "{error}");
        let update = Update::Failed {
            source: follower.source.clone(),
            error,
            consecutive_failures: follower.failures,
            retry_in,
        };
        if follower.updates.send(update).await.is_err() {
            return;
        }
        tokio::select! {
            biased;
            () = follower.updates.closed() => return,
            () = tokio::time::sleep(retry_in) => {}
        }
    }
}

/// Something under the prefix that did not make it into the instance list
/// as it stood.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Problem {
    /// The key's value is not an instance; the key is left out.
    Bad { key: InstanceId, why: Bad },
    /// Another key has the same address; only `kept` is a backend.
    Duplicate(Duplicate),
    /// More than [`MAX_INSTANCES`]; the first `kept` by key are used.
    TooMany { total: usize, kept: usize },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Bad { key, why } => write!(f, "{key}: {why}; left out"),
            Problem::Duplicate(Duplicate { address, kept, dropped }) => {
                write!(f, "{kept} and {dropped} share address {address}; using {kept}")
            }
            Problem::TooMany { total, kept } => write!(f, "{total} instances; using the first {kept} by key"),
        }
    }
}

/// What the consumer was told last.
#[derive(Debug, PartialEq, Eq)]
struct Said {
    instances: Vec<Instance>,
    problems: Vec<Problem>,
}

struct Follower {
    source: Source,
    prefix: Vec<u8>,
    /// Every key under the prefix, as read.
    keys: BTreeMap<Vec<u8>, Result<Record, Bad>>,
    /// The last revision applied; 0: the prefix must be read.
    revision: i64,
    sent: Option<Said>,
    /// Sessions failed in a row (the back-off).
    failures: u32,
    /// A session failed since the consumer was last told the set.
    stale: bool,
    updates: mpsc::Sender<Update>,
}

/// How long a session must last to count as a recovery for the back-off.
const STABLE: Duration = Duration::from_secs(10);

/// The largest answer decoded (tonic's default is 4 MiB): a page of keys
/// or a batch of events with large values.
const MAX_MESSAGE: usize = 16 << 20;

/// Why a session ended: an error in words; `Ok` when the consumer left.
type Ended = Result<(), String>;

impl Follower {
    fn new(prefix: EtcdPrefix, updates: mpsc::Sender<Update>) -> Self {
        Follower {
            prefix: prefix.prefix.clone().into_bytes(),
            source: Source::Etcd(prefix),
            keys: BTreeMap::new(),
            revision: 0,
            sent: None,
            failures: 0,
            stale: false,
            updates,
        }
    }

    /// One connection: read if needed, then watch until something fails.
    async fn session(&mut self, connector: &Connector, options: &WatchOptions) -> Ended {
        let timeout = connector.settings().request_timeout;
        let mut client = connector.connect().await.map_err(|e| error_chain(&e))?;
        loop {
            if self.revision == 0 {
                self.read(&mut client, timeout, options.page).await?;
                if !self.report().await {
                    return Ok(());
                }
            }
            let from = self.revision + 1;
            let watch = EtcdWatch::new().with_prefix().with_start_revision(from).with_progress_notify();
            let mut watcher = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
            let mut stream = tokio::time::timeout(timeout, watcher.watch(self.prefix.clone(), Some(watch)))
                .await
                .map_err(|_| format!("etcd did not start the watch within {timeout:?}"))?
                .map_err(|e| format!("etcd watch: {}", error_chain(&e)))?;
            let mut progress =
                tokio::time::interval_at(Instant::now() + options.progress_every, options.progress_every);
            progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    _ = progress.tick() => {
                        stream.request_progress().await.map_err(|e| format!("etcd watch: {}", error_chain(&e)))?;
                        continue;
                    }
                };
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => return Err("etcd closed the watch".into()),
                    Err(e) => return Err(format!("etcd watch: {}", error_chain(&e))),
                };
                if response.canceled() {
                    if response.compact_revision() > 0 {
                        info!(
                            source = %self.source,
                            from,
                            compacted = response.compact_revision(),
                            "etcd compacted the revisions the watch needed; reading the prefix again"
                        );
                        self.revision = 0;
                        break;
                    }
                    return Err(format!("etcd cancelled the watch: {}", response.cancel_reason()));
                }
                // Only events move the resume point. An answer without
                // them (the watch's creation, progress) shows etcd alive:
                // some etcd versions sent a requested progress answer with
                // a revision ahead of events still on their way.
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        EventType::Put => self.keys.insert(kv.key().to_vec(), parse(kv.value())),
                        EventType::Delete => self.keys.remove(kv.key()),
                    };
                    self.revision = self.revision.max(kv.mod_revision());
                }
                if !self.report().await {
                    return Ok(());
                }
            }
        }
    }

    /// Reads every key under the prefix at one revision, page by page (a
    /// page too large to decode is asked again in halves).
    async fn read(&mut self, client: &mut Client, timeout: Duration, page: i64) -> Result<(), String> {
        let end = range_end(&self.prefix);
        let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let mut keys = BTreeMap::new();
        let mut from = self.prefix.clone();
        let (mut at, mut page) = (0, page.max(1));
        loop {
            let mut get = GetOptions::new().with_range(end.clone()).with_limit(page);
            if at > 0 {
                get = get.with_revision(at);
            }
            let answer = tokio::time::timeout(timeout, kv.get(from.clone(), Some(get)))
                .await
                .map_err(|_| format!("etcd did not answer a read within {timeout:?}"))?;
            let mut answer = match answer {
                // tonic refuses an answer over the decode limit as out of range.
                Err(etcd_client::Error::GRpcStatus(status))
                    if matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted)
                        && page > 1 =>
                {
                    page /= 2;
                    continue;
                }
                other => other.map_err(|e| format!("etcd read: {}", error_chain(&e)))?,
            };
            if at == 0 {
                at = answer.header().map_or(0, |h| h.revision());
                if at <= 0 {
                    return Err("etcd answered a read without a revision".into());
                }
            }
            let more = answer.more();
            let kvs = answer.take_kvs();
            for kv in &kvs {
                keys.insert(kv.key().to_vec(), parse(kv.value()));
            }
            match kvs.last() {
                Some(last) if more => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        debug!(source = %self.source, revision = at, keys = keys.len(), "etcd: read the prefix");
        self.keys = keys;
        self.revision = at;
        Ok(())
    }

    /// Tells the consumer what the keys say now; false if it left.
    async fn report(&mut self) -> bool {
        let said = self.said();
        let index = u64::try_from(self.revision).unwrap_or(0);
        let update = if self.stale || self.sent.as_ref() != Some(&said) {
            let before = self.sent.as_ref().map_or(&[][..], |s| &s.problems);
            for problem in new_problems(before, &said.problems) {
                warn!(source = %self.source, "etcd: {problem}");
            }
            let update = Update::Instances {
                source: self.source.clone(),
                instances: said.instances.clone(),
                problems: said.problems.iter().map(ToString::to_string).collect(),
                index,
            };
            self.sent = Some(said);
            update
        } else {
            Update::Unchanged { source: self.source.clone(), index }
        };
        self.stale = false;
        self.updates.send(update).await.is_ok()
    }

    fn said(&self) -> Said {
        let mut problems = Vec::new();
        let mut candidates = Vec::with_capacity(self.keys.len());
        for (key, read) in &self.keys {
            let id = InstanceId::Etcd { key: String::from_utf8_lossy(key).into_owned() };
            match read {
                Ok(record) => candidates.extend(instance(id, record)),
                Err(why) => problems.push(Problem::Bad { key: id, why: why.clone() }),
            }
        }
        let Settled { instances, duplicates, over_limit } = settle(candidates, MAX_INSTANCES);
        problems.extend(duplicates.into_iter().map(Problem::Duplicate));
        problems.extend(over_limit.map(|total| Problem::TooMany { total, kept: MAX_INSTANCES }));
        Said { instances, problems }
    }
}

/// The backend a record makes, if any: `down` makes none, `drain` one of
/// weight 0.
fn instance(id: InstanceId, record: &Record) -> Option<Instance> {
    let weight = match record.state {
        State::Down => return None,
        State::Drain => 0,
        State::Up => record.weight,
    };
    Some(Instance {
        id,
        address: record.address,
        tagged: Vec::new(),
        port: record.port,
        weight,
        warning: false,
    })
}

/// The first key after every key that starts with `prefix`, as etcd's
/// range ends are given.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes (or nothing): every key from the prefix on.
    vec![0]
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn range_ends_cover_exactly_the_prefix() {
        assert_eq!(range_end(b"/services/web/"), b"/services/web0");
        assert_eq!(range_end(b"a\xff\xff"), b"b");
        assert_eq!(range_end(b"\xff"), b"\0");
    }

    fn follower(keys: &[(&str, &str)]) -> Follower {
        let (updates, _) = mpsc::channel(1);
        let mut f = Follower::new(EtcdPrefix { prefix: "/s/".into() }, updates);
        for (k, v) in keys {
            f.keys.insert(k.as_bytes().to_vec(), parse(v.as_bytes()));
        }
        f
    }

    fn key(k: &str) -> InstanceId {
        InstanceId::Etcd { key: k.into() }
    }

    #[test]
    fn bad_keys_are_left_out_and_the_rest_stand() {
        let f = follower(&[
            ("/s/a", r#"{"address": "10.0.0.1", "weight": 3}"#),
            ("/s/b", "not an address"),
            ("/s/c", "10.0.0.3:80"),
            ("/s/d", r#"{"address": "10.0.0.4", "state": "drain"}"#),
            ("/s/e", r#"{"address": "10.0.0.5", "state": "down"}"#),
            ("/s/f", r#"{"port": 80}"#),
        ]);
        let said = f.said();
        let got: Vec<_> =
            said.instances.iter().map(|i| (i.id.clone(), i.address, i.port, i.weight)).collect();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            got,
            [
                (key("/s/a"), ip("10.0.0.1"), 0, 3),
                (key("/s/c"), ip("10.0.0.3"), 80, 1),
                (key("/s/d"), ip("10.0.0.4"), 0, 0),
            ]
        );
        let shown: Vec<String> = said.problems.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(shown[0].starts_with("key /s/b: the value is neither JSON nor IP"), "{shown:?}");
        assert!(shown[1].starts_with("key /s/f: the JSON value is not an instance"), "{shown:?}");
    }

    #[test]
    fn one_backend_per_address_and_a_cap() {
        let f = follower(&[("/s/a", "10.0.0.1"), ("/s/b", r#"{"address": "10.0.0.1", "weight": 5}"#)]);
        let said = f.said();
        assert_eq!(said.instances.len(), 1);
        assert_eq!((said.instances[0].id.clone(), said.instances[0].weight), (key("/s/b"), 5), "the heavier");
        assert_eq!(said.problems.len(), 1);
        assert_eq!(
            said.problems[0].to_string(),
            "key /s/b and key /s/a share address 10.0.0.1; using key /s/b"
        );

        let mut many = follower(&[]);
        for i in 0..MAX_INSTANCES + 2 {
            let addr = IpAddr::from([10, 1, (i >> 8) as u8, i as u8]);
            many.keys.insert(format!("/s/{i:05}").into_bytes(), parse(addr.to_string().as_bytes()));
        }
        let said = many.said();
        assert_eq!(said.instances.len(), MAX_INSTANCES);
        assert_eq!(said.problems, [Problem::TooMany { total: MAX_INSTANCES + 2, kept: MAX_INSTANCES }]);
    }
}
