//! Active health checks: xlb probes each backend of a VIP with a `check`
//! at its real address, and a backend takes traffic only while it passes.
//!
//! One task per probed (address, check) runs on its own period with
//! jitter; a semaphore bounds how many probes are in flight. Each task
//! keeps its backend's [`Progress`] (HAProxy's rise/fall) in a table the
//! daemon reads when it builds the desired state, and says when a verdict
//! changed, so the daemon rebuilds at once.

pub mod checker;
mod probe;

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

pub use checker::Checker;

use crate::config::Check;

/// One probed backend: checks that are the same for several VIPs sharing
/// a backend run once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub addr: SocketAddr,
    pub check: Check,
}

/// A backend's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Added while xlb runs and not yet passed `rise` times (nor failed
    /// `fall` times).
    Unknown,
    Up,
    Down,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Down => "down",
        }
    }
}

/// A backend's check history, as status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub state: State,
    /// Since when it has been in `state`.
    pub since: SystemTime,
    pub consecutive_failures: u32,
    consecutive_passes: u32,
    /// Why the last failing probe failed.
    pub last_error: Option<String>,
    /// How long the last passing probe took.
    pub last_latency: Option<Duration>,
    pub probes: u64,
    pub failures: u64,
}

impl Progress {
    pub fn new(state: State, now: SystemTime) -> Self {
        Progress {
            state,
            since: now,
            consecutive_failures: 0,
            consecutive_passes: 0,
            last_error: None,
            last_latency: None,
            probes: 0,
            failures: 0,
        }
    }

    /// Takes in a probe's result; the new state if it changed.
    pub fn record(
        &mut self,
        result: Result<Duration, String>,
        check: &Check,
        now: SystemTime,
    ) -> Option<State> {
        self.probes += 1;
        let next = match result {
            Ok(latency) => {
                self.last_latency = Some(latency);
                self.consecutive_passes += 1;
                self.consecutive_failures = 0;
                (self.state != State::Up && self.consecutive_passes >= check.rise).then_some(State::Up)
            }
            Err(error) => {
                self.last_error = Some(error);
                self.failures += 1;
                self.consecutive_failures += 1;
                self.consecutive_passes = 0;
                (self.state != State::Down && self.consecutive_failures >= check.fall).then_some(State::Down)
            }
        };
        if let Some(state) = next {
            self.state = state;
            self.since = now;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::check::{NewBackends, OnAllFailed, OnFail, Probe};

    fn check(rise: u32, fall: u32) -> Check {
        Check {
            probe: Probe::Tcp,
            port: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise,
            fall,
            on_fail: OnFail::Remove,
            on_all_failed: OnAllFailed::Keep,
            new_backends: NewBackends::Wait,
        }
    }

    const PASS: Result<Duration, &str> = Ok(Duration::from_millis(1));

    fn run(p: &mut Progress, c: &Check, results: &[Result<Duration, &str>]) -> Vec<Option<State>> {
        results.iter().map(|r| p.record(r.map_err(str::to_owned), c, SystemTime::now())).collect()
    }

    #[test]
    fn rise_and_fall_count_consecutive_results() {
        let c = check(2, 3);
        let mut p = Progress::new(State::Unknown, SystemTime::now());
        assert_eq!(run(&mut p, &c, &[PASS, PASS]), [None, Some(State::Up)]);
        // Failures interrupted by a pass start over.
        assert_eq!(run(&mut p, &c, &[Err("x"), Err("x"), PASS, Err("x"), Err("x")]), [None; 5]);
        assert_eq!(run(&mut p, &c, &[Err("refused")]), [Some(State::Down)]);
        assert_eq!((p.consecutive_failures, p.last_error.as_deref()), (3, Some("refused")));
        assert_eq!(run(&mut p, &c, &[Err("x"), PASS, PASS]), [None, None, Some(State::Up)]);
        assert_eq!((p.probes, p.failures), (11, 6));
    }

    #[test]
    fn an_unknown_backend_that_fails_goes_down() {
        let c = check(2, 2);
        let mut p = Progress::new(State::Unknown, SystemTime::now());
        assert_eq!(run(&mut p, &c, &[Err("timeout"), Err("timeout")]), [None, Some(State::Down)]);
    }
}
