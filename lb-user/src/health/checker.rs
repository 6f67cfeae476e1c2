//! The probe tasks: one per target, started and stopped as the set of
//! targets changes.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher as _, Hasher as _},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{sync::Semaphore, task::JoinHandle, time::Instant};
use tracing::{info, warn};

use super::{Progress, State, Target, probe};

/// Probes in flight at once, whatever the number of backends.
const CONCURRENCY: usize = 512;

/// Told when a backend's verdict changed (several changes before anyone
/// looks make one notification).
pub type Notify = Arc<tokio::sync::Notify>;

pub struct Checker {
    tasks: HashMap<Target, JoinHandle<()>>,
    table: Arc<Mutex<HashMap<Target, Progress>>>,
    permits: Arc<Semaphore>,
    notify: Notify,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.tasks.values().for_each(JoinHandle::abort);
    }
}

impl Checker {
    pub fn new(notify: Notify) -> Self {
        Checker {
            tasks: HashMap::new(),
            table: Arc::default(),
            permits: Arc::new(Semaphore::new(CONCURRENCY)),
            notify,
        }
    }

    /// Probes exactly `targets` from now on. A new one starts in the state
    /// `initial` gives it; a dropped one stops and is forgotten. Whether
    /// any was new.
    pub fn follow(
        &mut self,
        targets: impl IntoIterator<Item = Target>,
        initial: impl Fn(&Target) -> State,
    ) -> bool {
        let wanted: HashSet<Target> = targets.into_iter().collect();
        self.tasks.retain(|t, task| {
            let keep = wanted.contains(t);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut table = self.table.lock().expect("health table");
        table.retain(|t, _| wanted.contains(t));
        let mut added = false;
        for target in wanted {
            if self.tasks.contains_key(&target) {
                continue;
            }
            added = true;
            let state = initial(&target);
            table.insert(target.clone(), Progress::new(state, SystemTime::now()));
            // A backend waiting to be admitted is probed at once; one
            // already serving at a random point of its first period, so
            // many backends do not probe in step.
            let first = match state {
                State::Up => target.check.interval.mul_f64(random_fraction()),
                State::Unknown | State::Down => Duration::ZERO,
            };
            let task = tokio::spawn(probe_forever(
                target.clone(),
                first,
                self.table.clone(),
                self.permits.clone(),
                self.notify.clone(),
            ));
            self.tasks.insert(target, task);
        }
        added
    }

    /// Every target's verdict.
    pub fn states(&self) -> HashMap<Target, State> {
        self.table.lock().expect("health table").iter().map(|(t, p)| (t.clone(), p.state)).collect()
    }

    /// Every target's history, for status.
    pub fn progress(&self) -> HashMap<Target, Progress> {
        self.table.lock().expect("health table").clone()
    }
}

async fn probe_forever(
    target: Target,
    first: Duration,
    table: Arc<Mutex<HashMap<Target, Progress>>>,
    permits: Arc<Semaphore>,
    notify: Notify,
) {
    let check = &target.check;
    let mut next = Instant::now() + first;
    loop {
        tokio::time::sleep_until(next).await;
        // ±10% on every period keeps probes of many backends spread out.
        next += check.interval.mul_f64(0.9 + 0.2 * random_fraction());
        let result = {
            let Ok(_permit) = permits.acquire().await else { return };
            probe::run(target.addr, &check.probe, check.timeout).await
        };
        let changed = {
            let mut table = table.lock().expect("health table");
            let Some(progress) = table.get_mut(&target) else { return };
            let error = result.as_ref().err().cloned();
            progress.record(result, check, SystemTime::now()).map(|state| (state, error))
        };
        match &changed {
            Some((State::Down, error)) => warn!(
                backend = %target.addr,
                error = error.as_deref().unwrap_or(""),
                fall = check.fall,
                "health check failing: backend down"
            ),
            Some((state, _)) => info!(
                backend = %target.addr,
                state = state.as_str(), rise = check.rise, "health check passing: backend up"),
            None => {}
        }
        if changed.is_some() {
            notify.notify_one();
        }
        // A probe that took longer than the period must not make the next
        // ones run back to back.
        next = next.max(Instant::now());
    }
}

/// A fraction in [0, 1) from the standard library's per-process random keys.
fn random_fraction() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
