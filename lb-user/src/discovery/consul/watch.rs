//! The blocking-query loop and its pure parts: index rules, confirming
//! reads, rate limit, back-off.

use std::time::Duration;

use tokio::{sync::mpsc, time::Instant};

use super::{Client, Instance, Problem, ServiceQuery, Update, error_chain};
use crate::discovery::{Source, backoff, new_problems, random};

/// How [`watch_with`] paces its queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchOptions {
    /// `wait` of each blocking query. Under a minute so that proxies and
    /// firewalls with 60 s idle timeouts between xlb and Consul do not cut
    /// a held query.
    pub wait: Duration,
    /// `wait` of each blocking query for a tag (at most `wait`). Such a
    /// query's answer is only a wake-up, confirmed by a plain read (see
    /// [`watch_with`]), so a stale streaming view that does not wake the
    /// query hides a change for at most this long. 15 s keeps a backend
    /// that left the tag in service no longer than a health check at the
    /// common 10 s interval takes to notice a failure, for one more plain
    /// read per 15 s per tagged service.
    pub tagged_wait: Duration,
    /// Queries allowed back to back before the rate limit applies.
    pub rate_burst: u32,
    /// Past the burst, at most one query per `rate_interval`.
    pub rate_interval: Duration,
    /// Back-off after the first failure; it doubles per failure...
    pub backoff_base: Duration,
    /// ...up to this.
    pub backoff_cap: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            wait: Duration::from_secs(55),
            tagged_wait: Duration::from_secs(15),
            rate_burst: 5,
            rate_interval: Duration::from_millis(100),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

impl WatchOptions {
    /// The `wait` of blocking queries for `query`.
    fn wait_for(&self, query: &ServiceQuery) -> Duration {
        if query.tag.is_some() { self.wait.min(self.tagged_wait) } else { self.wait }
    }
}

/// [`watch_with`] with [`WatchOptions::default`].
pub async fn watch(client: Client, query: ServiceQuery, updates: mpsc::Sender<Update>) {
    watch_with(client, query, WatchOptions::default(), updates).await;
}

/// Follows `query` until `updates` is closed, one query at a time, and
/// sends an [`Update`] for each: `Instances` for the first answer, for
/// each answer whose instances or problems differ from the last ones sent,
/// and for the first answer after failures (so a consumer that marked the
/// source stale sees it recover); `Unchanged` for every other answer;
/// `Failed` for each failed query. After a failure the last instances sent
/// still stand.
///
/// The rules, after Consul's "Blocking Queries" page
/// (<https://developer.hashicorp.com/consul/api-docs/features/blocking>):
/// - **Index goes backwards** (snapshot restore, agent reset): the next
///   query uses index 0, a non-blocking read that restarts the loop
///   (`next_index`). The answer that went backwards is current data, and
///   is used.
/// - **Index 0 or missing**: after handling an answer the index is at least
///   1, which "is always safe" and blocks; a missing or non-numeric
///   `X-Consul-Index` is a failed query (a proxy stripping it would
///   otherwise turn the loop into polling).
/// - **Nothing changed** (the wait ran out, or the query woke for a write
///   that left the instances as they were): the next query is a plain read
///   without `index`, which confirms the blocking answer (`take`). Since
///   Consul 1.10 an agent answers blocking health queries from its
///   streaming backend, a view of the service that the agent keeps up to
///   date from the servers, while a plain read asks the servers; a view
///   that fell behind would otherwise go unnoticed for as long as it keeps
///   answering. The read costs one request per `wait`.
/// - **A tag** (`ServiceQuery::tag`): a blocking answer is not used at
///   all, only taken as a sign that something may have changed; the plain
///   read that follows it is used instead (`take`), and blocking queries
///   wait only `tagged_wait`. Agents before Consul 1.10.11, 1.11.6 and
///   1.12.1 (Consul PR 12640) keep, in a filtered streaming view, an
///   instance that no longer matches the filter, so tag-filtered blocking
///   queries go on answering an instance that lost the tag while a plain
///   read shows it gone. The stale view answers every later blocking query
///   too: confirming only the answers that changed nothing would let each
///   change of the service bring the instance back until the next wait
///   ran out. Tags are also checked on xlb's side (see
///   [`Instance`](super::Instance)).
/// - **Index jumps forward**: taken as it is. The index is a raft index,
///   which every write in the cluster advances, so a large step between two
///   answers is normal. A wrong, too-high index would hold the next query
///   for all of `wait` while the service changes below it, so after a step
///   of more than `SUSPECT_JUMP` the next query waits only `PROBE_WAIT`
///   (`next_wait`): a genuine index comes back unchanged and the loop goes
///   on as usual, a wrong one comes back lower and resets it by the first
///   rule. A plain read is a step from the index known before it, not
///   from 0.
/// - **Rate limit**: a token bucket (GCRA) with a burst of `rate_burst`
///   and one query per `rate_interval` after it, as the page recommends
///   over a sleep per iteration: changes are delivered at once when rare,
///   and a server answering instantly (churn, or a bug) gets one query per
///   interval. The page's example is 15 s; the default here is a burst of
///   5 and then 100 ms: a load balancer that learns late that a backend
///   failed keeps sending it traffic, and health that flaps several times
///   a second must still reach the table in well under a second. Ten
///   queries a second for a service whose health churns is little load.
/// - **Errors**: back-off from `backoff_base`, doubling per consecutive
///   failure up to `backoff_cap`, with jitter (`backoff`), on top of the
///   rate limit. The query after a failure does not block (index 0), so
///   the answer that shows Consul is back comes at once, not when the
///   service next changes or `wait` runs out.
/// - **wait**: sent as set; Consul itself adds up to wait/16 of jitter to
///   spread wake-ups, so the client adds none.
///
/// Problems in Consul's answer ([`Problem`]) are logged once, when they
/// first appear, not on every query.
pub async fn watch_with(
    client: Client,
    query: ServiceQuery,
    options: WatchOptions,
    updates: mpsc::Sender<Update>,
) {
    let mut limiter = RateLimiter::new(options.rate_burst, options.rate_interval);
    let base_wait = options.wait_for(&query);
    let mut wait = base_wait;
    // The index Consul last gave; the next query blocks on it unless
    // `confirm` makes it a plain read.
    let mut index = 0;
    let mut confirm = false;
    let mut sent: Option<Said> = None;
    let mut failures = 0_u32;
    loop {
        let queried = if confirm { 0 } else { index };
        let send_at = limiter.acquire(Instant::now());
        let fetched = tokio::select! {
            biased;
            () = updates.closed() => return,
            fetched = async {
                tokio::time::sleep_until(send_at).await;
                client.fetch(&query, queried, wait).await
            } => fetched,
        };
        let (update, retry_in) = match fetched {
            Ok(snapshot) => {
                wait = next_wait(index, snapshot.index, base_wait);
                index = next_index(index, snapshot.index);
                let said = Said { instances: snapshot.instances, problems: snapshot.problems };
                let changed = is_news(sent.as_ref(), &said, failures > 0);
                let verdict = take(queried > 0, query.tag.is_some(), changed);
                confirm = verdict != Take::Use;
                if verdict == Take::Confirm {
                    continue;
                }
                failures = 0;
                (report(&query, &mut sent, said, changed, snapshot.index), None)
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                index = 0;
                wait = base_wait;
                let retry_in = backoff(failures, options.backoff_base, options.backoff_cap, random());
                let error = error_chain(&error);
                tracing::warn!(service = %query, failures, ?retry_in, "consul: {error}");
                let source = Source::Consul(query.clone());
                let update = Update::Failed { source, error, consecutive_failures: failures, retry_in };
                (update, Some(retry_in))
            }
        };
        if updates.send(update).await.is_err() {
            return;
        }
        if let Some(delay) = retry_in {
            tokio::select! {
                biased;
                () = updates.closed() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// What an answer said, as far as the consumer is told.
#[derive(Debug, PartialEq, Eq)]
struct Said {
    instances: Vec<Instance>,
    problems: Vec<Problem>,
}

/// Whether an answer tells the consumer something: it differs from what
/// was last sent, or it is the first after failures.
fn is_news(sent: Option<&Said>, said: &Said, after_failures: bool) -> bool {
    after_failures || sent != Some(said)
}

/// The update for a used answer; a changed one becomes what was last sent,
/// and its new problems are logged.
fn report(query: &ServiceQuery, sent: &mut Option<Said>, said: Said, changed: bool, index: u64) -> Update {
    let source = Source::Consul(query.clone());
    if !changed {
        return Update::Unchanged { source, index };
    }
    let before = sent.as_ref().map_or(&[][..], |s| &s.problems);
    for problem in new_problems(before, &said.problems) {
        tracing::warn!(service = %query, "consul: {problem}");
    }
    tracing::debug!(service = %query, index, count = said.instances.len(), "consul: instances");
    let update = Update::Instances {
        source,
        instances: said.instances.clone(),
        problems: said.problems.iter().map(ToString::to_string).collect(),
        index,
    };
    *sent = Some(said);
    update
}

/// How [`watch_with`] takes a successful answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// Used; the next query blocks.
    Use,
    /// Used, and confirmed by a plain read next.
    UseAndConfirm,
    /// Not used: a plain read follows, and that is used.
    Confirm,
}

/// How to take an answer, given whether its query blocked, whether it
/// was for a tag, and whether it changed what was last sent.
pub(crate) fn take(blocking: bool, tagged: bool, changed: bool) -> Take {
    match (blocking, tagged, changed) {
        (false, _, _) => Take::Use,
        (true, true, _) => Take::Confirm,
        (true, false, true) => Take::Use,
        (true, false, false) => Take::UseAndConfirm,
    }
}

/// The index for the next query, given the one the last query used and the
/// one that came back.
pub(crate) fn next_index(previous: u64, returned: u64) -> u64 {
    if returned < previous { 0 } else { returned.max(1) }
}

/// A forward step of the index larger than any real cluster makes between
/// two answers (four billion writes).
const SUSPECT_JUMP: u64 = 1 << 32;
/// How long the query after such a step may block.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// The `wait` for the next query, given the index the last query used and
/// the one that came back.
pub(crate) fn next_wait(previous: u64, returned: u64, wait: Duration) -> Duration {
    if returned.saturating_sub(previous) > SUSPECT_JUMP { wait.min(PROBE_WAIT) } else { wait }
}

/// GCRA, the token bucket as a single time: `burst` queries may go back to
/// back, then one per `interval`.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    interval: Duration,
    tolerance: Duration,
    /// Theoretical arrival time of the next query at the steady rate.
    tat: Option<Instant>,
}

impl RateLimiter {
    pub(crate) fn new(burst: u32, interval: Duration) -> Self {
        RateLimiter { interval, tolerance: interval.saturating_mul(burst.max(1) - 1), tat: None }
    }

    /// When a query wanted at `now` may go; counts it as sent then.
    pub(crate) fn acquire(&mut self, now: Instant) -> Instant {
        let tat = self.tat.unwrap_or(now);
        let send_at = tat.checked_sub(self.tolerance).map_or(now, |earliest| earliest.max(now));
        self.tat = Some(tat.max(send_at) + self.interval);
        send_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_goes_backwards_resets_to_zero() {
        assert_eq!(next_index(100, 99), 0);
        assert_eq!(next_index(100, 1), 0);
        // After the reset the next answer is taken as it is.
        assert_eq!(next_index(0, 7), 7);
    }

    #[test]
    fn a_huge_forward_jump_is_probed_with_a_short_wait() {
        let wait = Duration::from_secs(55);
        assert_eq!(next_wait(100, 5_000_000, wait), wait, "a busy cluster's step");
        assert_eq!(next_wait(100, 100, wait), wait);
        assert_eq!(next_wait(100, 1 << 40, wait), PROBE_WAIT);
        assert_eq!(next_wait(0, u64::MAX, wait), PROBE_WAIT, "even on the first answer");
        assert_eq!(next_wait(1 << 40, 1 << 40, wait), wait, "confirmed: blocking again");
        assert_eq!(next_wait(1 << 40, 7, wait), wait, "went back: the reset handles it");
    }

    #[test]
    fn index_zero_becomes_one() {
        assert_eq!(next_index(0, 0), 1);
        assert_eq!(next_index(1, 0), 0, "backwards first; the answer after it becomes 1");
    }

    #[test]
    fn same_or_higher_index_is_kept() {
        assert_eq!(next_index(42, 42), 42);
        assert_eq!(next_index(42, 43), 43);
        assert_eq!(next_index(42, u64::MAX), u64::MAX);
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_one_per_interval() {
        let start = Instant::now();
        let t = |ms: u64| start + Duration::from_millis(ms);
        let mut limiter = RateLimiter::new(2, Duration::from_millis(1000));
        assert_eq!(limiter.acquire(t(0)), t(0));
        assert_eq!(limiter.acquire(t(0)), t(0));
        assert_eq!(limiter.acquire(t(0)), t(1000));
        assert_eq!(limiter.acquire(t(1000)), t(2000));
        // A blocking query that took a long while: the burst is back.
        assert_eq!(limiter.acquire(t(60_000)), t(60_000));
        assert_eq!(limiter.acquire(t(60_001)), t(60_001));
        assert_eq!(limiter.acquire(t(60_002)), t(61_000));
    }

    #[test]
    fn rate_limiter_steady_rate_over_many_requests() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(2, Duration::from_millis(100));
        let mut now = start;
        for _ in 0..50 {
            now = limiter.acquire(now);
        }
        // 2 free, 48 at 100 ms each.
        assert_eq!(now - start, Duration::from_millis(4800));
        let mut single = RateLimiter::new(0, Duration::from_millis(100));
        assert_eq!(single.acquire(start), start);
        assert_eq!(single.acquire(start), start + Duration::from_millis(100));
    }

    fn instance(id: &str) -> Instance {
        Instance {
            id: crate::discovery::InstanceId::Consul { node: "n1".into(), id: id.into() },
            address: std::net::IpAddr::from([10, 0, 0, 1]),
            tagged: vec![],
            port: 80,
            weight: 1,
            warning: false,
        }
    }

    fn query(tag: Option<&str>) -> ServiceQuery {
        ServiceQuery { service: "web".into(), tag: tag.map(Into::into) }
    }

    #[test]
    fn blocking_answers_that_change_nothing_are_confirmed_by_a_plain_read() {
        assert_eq!(take(true, false, false), Take::UseAndConfirm);
        assert_eq!(take(true, false, true), Take::Use);
        assert_eq!(take(false, false, false), Take::Use, "a plain read is itself the confirmation");
        assert_eq!(take(false, false, true), Take::Use);
    }

    #[test]
    fn tagged_blocking_answers_are_only_wake_ups() {
        assert_eq!(take(true, true, true), Take::Confirm, "a stale view may bring an instance back");
        assert_eq!(take(true, true, false), Take::Confirm, "a stale view may hide a change");
        assert_eq!(take(false, true, true), Take::Use);
        assert_eq!(take(false, true, false), Take::Use);
    }

    #[test]
    fn tagged_queries_block_for_less_time() {
        let options = WatchOptions::default();
        assert_eq!(options.wait_for(&query(None)), Duration::from_secs(55));
        assert_eq!(options.wait_for(&query(Some("blue"))), Duration::from_secs(15));
        let short = WatchOptions { wait: Duration::from_secs(5), ..options };
        assert_eq!(short.wait_for(&query(Some("blue"))), Duration::from_secs(5), "never longer than wait");
    }

    #[test]
    fn news_is_a_change_of_instances_or_problems_or_a_recovery() {
        let said = |ids: &[&str], problems: Vec<Problem>| Said {
            instances: ids.iter().map(|id| instance(id)).collect(),
            problems,
        };
        let problem = Problem::BadPort { instance: "n1/b".into(), port: -1 };
        let sent = said(&["a"], vec![]);
        assert!(is_news(None, &said(&[], vec![]), false), "the first answer");
        assert!(!is_news(Some(&sent), &said(&["a"], vec![]), false));
        assert!(is_news(Some(&sent), &said(&["a", "b"], vec![]), false));
        assert!(is_news(Some(&sent), &said(&["a"], vec![problem]), false), "a new problem alone");
        assert!(is_news(Some(&sent), &said(&["a"], vec![]), true), "the first answer after failures");
    }

    #[test]
    fn every_used_answer_is_reported_and_news_carries_the_instances() {
        let q = query(None);
        let mut sent = None;
        let said = || Said { instances: vec![instance("a")], problems: vec![] };
        match report(&q, &mut sent, said(), true, 7) {
            Update::Instances { instances, problems, index, .. } => {
                assert_eq!((instances, problems, index), (vec![instance("a")], vec![], 7));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(sent, Some(said()));
        let source = Source::Consul(q.clone());
        assert_eq!(report(&q, &mut sent, said(), false, 8), Update::Unchanged { source, index: 8 });
        assert_eq!(sent, Some(said()));
    }
}
