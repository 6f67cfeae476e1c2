//! What service discovery says, as the daemon acts on it: per watched
//! source (a Consul service, an etcd prefix), the instance set in force,
//! and whether it is fresh.
//!
//! Both sources report the same [`Update`]s of the same [`Instance`]s, and
//! one set of rules applies to them here. Fail static: a failed query
//! changes nothing but the `stale` flag, and a set that turns empty is kept
//! (by default) with the alarm raised. Only a successful, non-empty answer
//! replaces the set.

use std::{
    collections::BTreeMap,
    fmt,
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    time::{Duration, Instant},
};

use tracing::{info, warn};

pub mod consul;
pub mod etcd;

pub use crate::config::{EmptyPolicy, Source};

/// Instances accepted per source; past it the first ones by
/// [`InstanceId`] are kept and the rest reported.
pub const MAX_INSTANCES: usize = 10_000;

/// An instance of a service, ready to be a backend: a healthy (or, by
/// Consul's warning policy, degraded) Consul instance, or an etcd key whose
/// value says `up` or `drain`. How each source's answer becomes these is
/// in its module.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Instance {
    pub id: InstanceId,
    pub address: IpAddr,
    /// Other addresses (Consul's `TaggedAddresses`): a dual-stack instance
    /// backs VIPs of both families.
    pub tagged: Vec<IpAddr>,
    /// The port it listens on; 0: not said (any). Unused by forwarding,
    /// which keeps the port; an instance on another port than the VIP's is
    /// left out.
    pub port: u16,
    /// 0 means drain, as in the config file.
    pub weight: u32,
    /// Degraded (Consul: its worst check is `warning`).
    pub warning: bool,
}

/// An instance's identity in its source.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InstanceId {
    /// `Node.Node` and `Service.ID`.
    Consul { node: String, id: String },
    /// The key (shown lossily if not UTF-8).
    Etcd { key: String },
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstanceId::Consul { node, id } => write!(f, "{node}/{id}"),
            InstanceId::Etcd { key } => write!(f, "key {key}"),
        }
    }
}

/// Two instances with the same address: one backend, `kept`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Duplicate {
    pub address: IpAddr,
    pub kept: InstanceId,
    pub dropped: InstanceId,
}

/// One instance per address (the backend's identity in xlb): a healthy one
/// before a degraded one, then the higher weight, then the first by id.
pub fn dedup_by_address(mut candidates: Vec<Instance>) -> (Vec<Instance>, Vec<Duplicate>) {
    candidates.sort_by(|a, b| {
        (a.address, a.warning, std::cmp::Reverse(a.weight), &a.id).cmp(&(
            b.address,
            b.warning,
            std::cmp::Reverse(b.weight),
            &b.id,
        ))
    });
    let mut kept: Vec<Instance> = Vec::with_capacity(candidates.len());
    let mut duplicates = Vec::new();
    for instance in candidates {
        match kept.last() {
            Some(first) if first.address == instance.address => duplicates.push(Duplicate {
                address: instance.address,
                kept: first.id.clone(),
                dropped: instance.id,
            }),
            _ => kept.push(instance),
        }
    }
    (kept, duplicates)
}

/// Candidates as an answer's instances: one per address
/// ([`dedup_by_address`]), sorted by id, at most `limit`.
pub struct Settled {
    pub instances: Vec<Instance>,
    pub duplicates: Vec<Duplicate>,
    /// How many there were, when over `limit`.
    pub over_limit: Option<usize>,
}

pub fn settle(candidates: Vec<Instance>, limit: usize) -> Settled {
    let (mut instances, duplicates) = dedup_by_address(candidates);
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    let total = instances.len();
    instances.truncate(limit);
    Settled { instances, duplicates, over_limit: (total > limit).then_some(total) }
}

/// What a watcher reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// The instances now (sorted by id) and what in the answer was skipped
    /// or changed, in words. Sent for the first answer, when the instances
    /// or the problems change, and for the first answer after failures.
    Instances { source: Source, instances: Vec<Instance>, problems: Vec<String>, index: u64 },
    /// The source answered, and the instances and problems last sent still
    /// stand: a consumer can tell how long ago the source last answered
    /// apart from how long ago the set last changed.
    Unchanged { source: Source, index: u64 },
    /// A query failed; the last instances sent still stand. The next
    /// attempt is `retry_in` from now.
    Failed { source: Source, error: String, consecutive_failures: u32, retry_in: Duration },
}

impl Update {
    pub fn source(&self) -> &Source {
        match self {
            Update::Instances { source, .. }
            | Update::Unchanged { source, .. }
            | Update::Failed { source, .. } => source,
        }
    }
}

/// The delay before retry number `failures` (1 for the first): a ceiling
/// of `base × 2^(failures−1)`, at most `cap`, and a delay drawn from the
/// upper half of it (`random` picks where), so that watchers that failed
/// together do not retry together, while the delay still grows.
pub(crate) fn backoff(failures: u32, base: Duration, cap: Duration, random: u64) -> Duration {
    let factor = 1_u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX);
    let ceiling = base.saturating_mul(factor).min(cap);
    let floor = ceiling / 2;
    let span = u64::try_from((ceiling - floor).as_nanos()).unwrap_or(u64::MAX);
    floor + Duration::from_nanos(random % span.saturating_add(1))
}

pub(crate) fn random() -> u64 {
    // std's RandomState is seeded randomly per process and steps per use.
    RandomState::new().hash_one(0_u8)
}

/// Problems in `new` that were not in `old`.
pub(crate) fn new_problems<'a, P: PartialEq>(old: &[P], new: &'a [P]) -> Vec<&'a P> {
    new.iter().filter(|p| !old.contains(p)).collect()
}

#[derive(Debug, Default)]
pub struct ServiceView {
    /// The instances in force; `None` until the source first answers.
    pub instances: Option<Vec<Instance>>,
    /// The source's index of the last answer (Consul's index, etcd's revision).
    pub index: u64,
    /// When the source last answered, whether or not anything changed.
    pub synced_at: Option<Instant>,
    /// When the instances in force last changed.
    pub changed_at: Option<Instant>,
    /// What in the source's last answer was skipped or changed, and why.
    pub problems: Vec<String>,
    /// Queries failed since the last answer (non-zero: stale).
    pub failures: u32,
    pub errors_total: u64,
    pub last_error: Option<String>,
    /// The source answered with no instances and the last set was kept.
    pub empty_kept: bool,
    /// Times that happened.
    pub empty_alarms: u64,
    /// What to do with an empty answer.
    pub on_empty: EmptyPolicy,
}

impl ServiceView {
    pub fn stale(&self) -> bool {
        self.failures > 0
    }

    /// Time since the source last answered.
    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.synced_at.map(|t| now.saturating_duration_since(t))
    }

    /// The source answered at `now` with `index`: the view is in sync again.
    fn answered(&mut self, source: &Source, index: u64, now: Instant) {
        if self.failures > 0 {
            info!(%source, failures = self.failures, "{} answers again; discovery in sync", source.kind());
        }
        self.failures = 0;
        self.synced_at = Some(now);
        self.index = index;
    }
}

#[derive(Debug, Default)]
pub struct Discovery {
    services: BTreeMap<Source, ServiceView>,
}

impl Discovery {
    /// Follows exactly `sources` from now on, each with its empty-set
    /// policy: new ones start unknown, dropped ones are forgotten.
    pub fn watch_only(&mut self, sources: &[(Source, EmptyPolicy)]) {
        self.services.retain(|s, _| sources.iter().any(|(w, _)| w == s));
        for (source, on_empty) in sources {
            self.services.entry(source.clone()).or_default().on_empty = *on_empty;
        }
    }

    /// Forgets what every source of `kind` said: they start over unknown.
    pub fn forget(&mut self, kind: crate::config::SourceKind) {
        for (source, view) in &mut self.services {
            if source.kind() == kind {
                *view = ServiceView { on_empty: view.on_empty, ..ServiceView::default() };
            }
        }
    }

    pub fn services(&self) -> &BTreeMap<Source, ServiceView> {
        &self.services
    }

    pub fn view(&self, source: &Source) -> Option<&ServiceView> {
        self.services.get(source)
    }

    /// Takes in a watcher's update; returns whether the instances in force
    /// changed.
    pub fn update(&mut self, update: Update, now: Instant) -> bool {
        match update {
            Update::Unchanged { source, index } => {
                if let Some(view) = self.services.get_mut(&source) {
                    view.answered(&source, index, now);
                }
                false
            }
            Update::Instances { source, instances, problems, index } => {
                let Some(view) = self.services.get_mut(&source) else { return false };
                view.answered(&source, index, now);
                view.problems = problems;
                // Before a first answer the VIP holds what its pinned tables
                // hold (after a restart): an empty first answer must not
                // flush that either.
                let had_some = view.instances.as_ref().is_none_or(|i| !i.is_empty());
                if instances.is_empty() && had_some && view.on_empty == EmptyPolicy::Keep {
                    if !view.empty_kept {
                        view.empty_alarms += 1;
                        warn!(
                            %source,
                            kept = view.instances.as_ref().map_or(0, Vec::len),
                            "{} reports no healthy instance; keeping the last set (on_empty = \"keep\")",
                            source.kind()
                        );
                    }
                    view.empty_kept = true;
                    return false;
                }
                if view.empty_kept {
                    info!(%source, instances = instances.len(), "healthy instances are back");
                }
                view.empty_kept = false;
                let changed = view.instances.as_ref() != Some(&instances);
                if changed {
                    view.changed_at = Some(now);
                }
                view.instances = Some(instances);
                changed
            }
            Update::Failed { source, error, consecutive_failures, retry_in } => {
                let Some(view) = self.services.get_mut(&source) else { return false };
                if view.failures == 0 {
                    warn!(
                        %source,
                        %error,
                        retry_in = ?retry_in,
                        "{} query failed; keeping the last known backends (discovery stale)",
                        source.kind()
                    );
                }
                view.failures = consecutive_failures.max(1);
                view.errors_total += 1;
                view.last_error = Some(error);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServiceQuery;

    fn q() -> Source {
        Source::Consul(ServiceQuery { service: "web".into(), tag: None })
    }

    fn discovery(on_empty: EmptyPolicy) -> Discovery {
        let mut d = Discovery::default();
        d.watch_only(&[(q(), on_empty)]);
        d
    }

    fn instances(n: u8) -> Vec<Instance> {
        (1..=n)
            .map(|i| Instance {
                id: InstanceId::Consul { node: format!("n{i}"), id: "web".into() },
                address: IpAddr::from([10, 0, 0, i]),
                tagged: Vec::new(),
                port: 80,
                weight: 1,
                warning: false,
            })
            .collect()
    }

    fn answer(n: u8, index: u64) -> Update {
        Update::Instances { source: q(), instances: instances(n), problems: vec![], index }
    }

    fn unchanged(index: u64) -> Update {
        Update::Unchanged { source: q(), index }
    }

    fn failure() -> Update {
        Update::Failed {
            source: q(),
            error: "connection refused".into(),
            consecutive_failures: 1,
            retry_in: Duration::from_millis(100),
        }
    }

    #[test]
    fn answers_replace_the_set_and_failures_only_mark_it_stale() {
        let mut d = discovery(EmptyPolicy::Keep);
        let now = Instant::now();
        assert!(d.view(&q()).unwrap().instances.is_none(), "unknown until the first answer");
        assert!(d.update(answer(3, 10), now));
        assert!(!d.update(answer(3, 11), now), "same set: no change");
        assert!(!d.update(failure(), now));
        let v = d.view(&q()).unwrap();
        assert!(v.stale());
        assert_eq!(v.instances.as_ref().unwrap().len(), 3, "fail static");
        assert!(d.update(answer(2, 12), now));
        assert!(!d.view(&q()).unwrap().stale());
    }

    #[test]
    fn an_unchanged_answer_counts_as_an_answer_but_not_as_a_change() {
        let mut d = discovery(EmptyPolicy::Keep);
        let start = Instant::now();
        let later = start + Duration::from_secs(55);
        assert!(d.update(answer(3, 10), start));
        assert!(!d.update(failure(), start));
        assert!(!d.update(unchanged(10), later));
        let v = d.view(&q()).unwrap();
        assert!(!v.stale(), "an answer clears the failures");
        assert_eq!((v.synced_at, v.changed_at, v.index), (Some(later), Some(start), 10));
        assert_eq!(v.instances.as_ref().unwrap().len(), 3);

        let even_later = later + Duration::from_secs(1);
        assert!(!d.update(answer(3, 11), even_later), "the same set again");
        assert_eq!(d.view(&q()).unwrap().changed_at, Some(start));
        assert!(d.update(answer(2, 12), even_later));
        assert_eq!(d.view(&q()).unwrap().changed_at, Some(even_later));
        assert!(!d.update(
            Update::Unchanged {
                source: Source::Consul(ServiceQuery { service: "web".into(), tag: Some("x".into()) }),
                index: 1
            },
            even_later
        ));
    }

    #[test]
    fn an_empty_set_is_kept_by_default_and_applied_on_request() {
        let mut keep = discovery(EmptyPolicy::Keep);
        let now = Instant::now();
        keep.update(answer(3, 1), now);
        assert!(!keep.update(answer(0, 2), now));
        assert!(!keep.update(answer(0, 3), now));
        let v = keep.view(&q()).unwrap();
        assert_eq!(v.instances.as_ref().unwrap().len(), 3);
        assert!(v.empty_kept);
        assert_eq!(v.empty_alarms, 1, "one alarm per episode");

        let mut apply = discovery(EmptyPolicy::Apply);
        apply.update(answer(3, 1), now);
        assert!(apply.update(answer(0, 2), now));
        assert!(apply.view(&q()).unwrap().instances.as_ref().unwrap().is_empty());
    }

    #[test]
    fn an_empty_first_answer_keeps_what_the_tables_hold() {
        let mut d = discovery(EmptyPolicy::Keep);
        assert!(!d.update(answer(0, 1), Instant::now()));
        let v = d.view(&q()).unwrap();
        assert_eq!((v.instances.as_ref(), v.empty_kept, v.empty_alarms), (None, true, 1));
        assert!(d.update(answer(2, 2), Instant::now()), "the first real set applies");

        let mut apply = discovery(EmptyPolicy::Apply);
        assert!(apply.update(answer(0, 1), Instant::now()));
        assert_eq!(apply.view(&q()).unwrap().instances, Some(vec![]));
    }

    #[test]
    fn updates_for_services_no_longer_watched_are_ignored() {
        let mut d = discovery(EmptyPolicy::Keep);
        d.watch_only(&[]);
        assert!(!d.update(answer(1, 1), Instant::now()));
        assert!(d.services().is_empty());
    }

    #[test]
    fn backoff_doubles_from_base_to_cap_within_jitter_bounds() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(30);
        for (failures, ceiling_ms) in
            [(1, 100), (2, 200), (3, 400), (4, 800), (9, 25_600), (10, 30_000), (50, 30_000)]
        {
            let ceiling = Duration::from_millis(ceiling_ms);
            assert_eq!(backoff(failures, base, cap, 0), ceiling / 2, "failures {failures}");
            let span = u64::try_from((ceiling - ceiling / 2).as_nanos()).unwrap();
            assert_eq!(backoff(failures, base, cap, span), ceiling, "failures {failures}");
            for random in [1, 12_345, 987_654_321_012, u64::MAX] {
                let d = backoff(failures, base, cap, random);
                assert!(d >= ceiling / 2 && d <= ceiling, "failures {failures}: {d:?}");
            }
        }
        assert_eq!(backoff(u32::MAX, base, cap, 0), cap / 2);
        assert_eq!(backoff(0, base, cap, 0), base / 2, "0 failures is treated as the first");
    }

    #[test]
    fn backoff_jitter_spreads() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(30);
        let delays: std::collections::HashSet<_> = (0..20).map(|_| backoff(5, base, cap, random())).collect();
        assert!(delays.len() > 10, "{delays:?}");
    }

    #[test]
    fn problems_are_reported_once_per_appearance() {
        let a = "5 instances; using the first 3".to_owned();
        let b = "instance n/x: port -1 is out of range".to_owned();
        assert_eq!(new_problems(&[], std::slice::from_ref(&a)), [&a]);
        assert!(new_problems(std::slice::from_ref(&a), std::slice::from_ref(&a)).is_empty());
        assert_eq!(new_problems(std::slice::from_ref(&a), &[a.clone(), b.clone()]), [&b]);
        // Gone, then back: reported again.
        assert_eq!(new_problems(&[], std::slice::from_ref(&a)), [&a]);
    }
}
