//! What service discovery says, as the daemon acts on it: per watched
//! Consul service, the instance set in force, and whether it is fresh.
//!
//! Fail static: a failed query changes nothing but the `stale` flag, and a
//! set that turns empty is kept (by default) with the alarm raised. Only a
//! successful, non-empty answer replaces the set.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::{info, warn};

pub mod consul;

use consul::{EmptyPolicy, Instance, ServiceQuery, Update};

#[derive(Debug, Default)]
pub struct ServiceView {
    /// The instances in force; `None` until Consul first answers.
    pub instances: Option<Vec<Instance>>,
    /// Consul's index of the last answer.
    pub index: u64,
    /// When Consul last answered, whether or not anything changed.
    pub synced_at: Option<Instant>,
    /// When the instances in force last changed.
    pub changed_at: Option<Instant>,
    /// What in Consul's last answer was skipped or changed, and why.
    pub problems: Vec<String>,
    /// Queries failed since the last answer (non-zero: stale).
    pub failures: u32,
    pub errors_total: u64,
    pub last_error: Option<String>,
    /// Consul answered with no instances and the last set was kept.
    pub empty_kept: bool,
    /// Times that happened.
    pub empty_alarms: u64,
}

impl ServiceView {
    pub fn stale(&self) -> bool {
        self.failures > 0
    }

    /// Seconds since Consul last answered.
    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.synced_at.map(|t| now.saturating_duration_since(t))
    }

    /// Consul answered at `now` with `index`: the view is in sync again.
    fn answered(&mut self, query: &ServiceQuery, index: u64, now: Instant) {
        if self.failures > 0 {
            info!(service = %query, failures = self.failures, "Consul answers again; discovery in sync");
        }
        self.failures = 0;
        self.synced_at = Some(now);
        self.index = index;
    }
}

#[derive(Debug, Default)]
pub struct Discovery {
    services: BTreeMap<ServiceQuery, ServiceView>,
    on_empty: EmptyPolicy,
}

impl Discovery {
    pub fn new(on_empty: EmptyPolicy) -> Self {
        Self { services: BTreeMap::new(), on_empty }
    }

    /// Follows exactly `queries` from now on: new ones start unknown,
    /// dropped ones are forgotten.
    pub fn watch_only(&mut self, queries: &[ServiceQuery]) {
        self.services.retain(|q, _| queries.contains(q));
        for q in queries {
            self.services.entry(q.clone()).or_default();
        }
    }

    pub fn set_policy(&mut self, on_empty: EmptyPolicy) {
        self.on_empty = on_empty;
    }

    pub fn services(&self) -> &BTreeMap<ServiceQuery, ServiceView> {
        &self.services
    }

    pub fn view(&self, query: &ServiceQuery) -> Option<&ServiceView> {
        self.services.get(query)
    }

    /// Takes in a watcher's update; returns whether the instances in force
    /// changed.
    pub fn update(&mut self, update: Update, now: Instant) -> bool {
        match update {
            Update::Unchanged { query, index } => {
                if let Some(view) = self.services.get_mut(&query) {
                    view.answered(&query, index, now);
                }
                false
            }
            Update::Instances { query, instances, problems, index } => {
                let Some(view) = self.services.get_mut(&query) else { return false };
                view.answered(&query, index, now);
                view.problems = problems.iter().map(ToString::to_string).collect();
                // Before a first answer the VIP holds what its pinned tables
                // hold (after a restart): an empty first answer must not
                // flush that either.
                let had_some = view.instances.as_ref().is_none_or(|i| !i.is_empty());
                if instances.is_empty() && had_some && self.on_empty == EmptyPolicy::Keep {
                    if !view.empty_kept {
                        view.empty_alarms += 1;
                        warn!(
                            service = %query,
                            kept = view.instances.as_ref().map_or(0, Vec::len),
                            "Consul reports no healthy instance; keeping the last set (on_empty = \"keep\")"
                        );
                    }
                    view.empty_kept = true;
                    return false;
                }
                if view.empty_kept {
                    info!(service = %query, instances = instances.len(), "healthy instances are back");
                }
                view.empty_kept = false;
                let changed = view.instances.as_ref() != Some(&instances);
                if changed {
                    view.changed_at = Some(now);
                }
                view.instances = Some(instances);
                changed
            }
            Update::Failed { query, error, consecutive_failures, retry_in } => {
                let Some(view) = self.services.get_mut(&query) else { return false };
                if view.failures == 0 {
                    warn!(
                        service = %query,
                        %error,
                        retry_in = ?retry_in,
                        "Consul query failed; keeping the last known backends (discovery stale)"
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
    use std::net::IpAddr;

    use super::*;

    fn q() -> ServiceQuery {
        ServiceQuery { service: "web".into(), tag: None }
    }

    fn instances(n: u8) -> Vec<Instance> {
        (1..=n)
            .map(|i| Instance {
                node: format!("n{i}"),
                id: "web".into(),
                address: IpAddr::from([10, 0, 0, i]),
                tagged: Vec::new(),
                port: 80,
                weight: 1,
                warning: false,
            })
            .collect()
    }

    fn answer(n: u8, index: u64) -> Update {
        Update::Instances { query: q(), instances: instances(n), problems: vec![], index }
    }

    fn unchanged(index: u64) -> Update {
        Update::Unchanged { query: q(), index }
    }

    fn failure() -> Update {
        Update::Failed {
            query: q(),
            error: "connection refused".into(),
            consecutive_failures: 1,
            retry_in: Duration::from_millis(100),
        }
    }

    #[test]
    fn answers_replace_the_set_and_failures_only_mark_it_stale() {
        let mut d = Discovery::new(EmptyPolicy::Keep);
        d.watch_only(&[q()]);
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
        let mut d = Discovery::new(EmptyPolicy::Keep);
        d.watch_only(&[q()]);
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
            Update::Unchanged { query: ServiceQuery { tag: Some("x".into()), ..q() }, index: 1 },
            even_later
        ));
    }

    #[test]
    fn an_empty_set_is_kept_by_default_and_applied_on_request() {
        let mut keep = Discovery::new(EmptyPolicy::Keep);
        keep.watch_only(&[q()]);
        let now = Instant::now();
        keep.update(answer(3, 1), now);
        assert!(!keep.update(answer(0, 2), now));
        assert!(!keep.update(answer(0, 3), now));
        let v = keep.view(&q()).unwrap();
        assert_eq!(v.instances.as_ref().unwrap().len(), 3);
        assert!(v.empty_kept);
        assert_eq!(v.empty_alarms, 1, "one alarm per episode");

        let mut apply = Discovery::new(EmptyPolicy::Apply);
        apply.watch_only(&[q()]);
        apply.update(answer(3, 1), now);
        assert!(apply.update(answer(0, 2), now));
        assert!(apply.view(&q()).unwrap().instances.as_ref().unwrap().is_empty());
    }

    #[test]
    fn an_empty_first_answer_keeps_what_the_tables_hold() {
        let mut d = Discovery::new(EmptyPolicy::Keep);
        d.watch_only(&[q()]);
        assert!(!d.update(answer(0, 1), Instant::now()));
        let v = d.view(&q()).unwrap();
        assert_eq!((v.instances.as_ref(), v.empty_kept, v.empty_alarms), (None, true, 1));
        assert!(d.update(answer(2, 2), Instant::now()), "the first real set applies");

        let mut apply = Discovery::new(EmptyPolicy::Apply);
        apply.watch_only(&[q()]);
        assert!(apply.update(answer(0, 1), Instant::now()));
        assert_eq!(apply.view(&q()).unwrap().instances, Some(vec![]));
    }

    #[test]
    fn updates_for_services_no_longer_watched_are_ignored() {
        let mut d = Discovery::new(EmptyPolicy::Keep);
        d.watch_only(&[q()]);
        d.watch_only(&[]);
        assert!(!d.update(answer(1, 1), Instant::now()));
        assert!(d.services().is_empty());
    }
}
