//! Active health checks: a VIP's `check = { … }`, or the top-level
//! `[check]` every VIP without its own inherits.

use std::time::Duration;

use serde::Deserialize;

/// How xlb probes a VIP's backends, at their real addresses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Check {
    pub probe: Probe,
    /// `None`: the VIP's port.
    pub port: Option<u16>,
    pub interval: Duration,
    /// Per probe; at most `interval`.
    pub timeout: Duration,
    /// Consecutive passes that bring a backend in.
    pub rise: u32,
    /// Consecutive failures that take it out.
    pub fall: u32,
    pub on_fail: OnFail,
    pub on_all_failed: OnAllFailed,
    /// Whether a backend added while xlb runs waits for its first `rise`
    /// passes before taking traffic.
    pub new_backends: NewBackends,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Probe {
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 GET.
    Http(HttpProbe),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpProbe {
    pub path: String,
    /// The Host header; `None`: the backend's address.
    pub host: Option<String>,
    /// Statuses that pass, inclusive.
    pub status: (u16, u16),
    /// A substring the body must contain (in its first 64 KiB).
    pub body: Option<String>,
}

/// What a failing backend does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFail {
    /// Leaves the table at once; its recorded flows move.
    #[default]
    Remove,
    /// Drains: no new flows, established ones stay.
    Drain,
}

/// What a VIP does when every backend fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAllFailed {
    /// Panic mode: keeps them all, with an alarm (a check failing
    /// everywhere is more likely the checker's problem than theirs).
    #[default]
    Keep,
    /// Empties the VIP.
    Empty,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewBackends {
    /// Out until the first `rise` passes.
    #[default]
    Wait,
    /// In at once, out if they then fail.
    Up,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Tcp,
    Http,
    /// No check (to opt one VIP out of the top-level `[check]`).
    None,
}

/// `check` as the file spells it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckFile {
    kind: Kind,
    port: Option<u16>,
    #[serde(default = "default_interval_ms")]
    interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_rise_fall")]
    rise: u32,
    #[serde(default = "default_rise_fall")]
    fall: u32,
    #[serde(default)]
    on_fail: OnFail,
    #[serde(default)]
    on_all_failed: OnAllFailed,
    #[serde(default)]
    new_backends: NewBackends,
    path: Option<String>,
    host: Option<String>,
    status: Option<String>,
    body: Option<String>,
}

fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    500
}
fn default_rise_fall() -> u32 {
    2
}

/// Bounds that keep a typo from flooding backends or never noticing.
const MIN_INTERVAL_MS: u64 = 100;
const MAX_INTERVAL_MS: u64 = 3_600_000;
const MAX_RISE_FALL: u32 = 100;

impl CheckFile {
    /// The check, or the field that is wrong (relative to the check) and why.
    pub(super) fn validate(&self) -> Result<Option<Check>, (String, String)> {
        let bad = |field: &str, message: String| Err((field.to_owned(), message));
        let http_only =
            [("path", &self.path), ("host", &self.host), ("status", &self.status), ("body", &self.body)];
        let probe = match self.kind {
            Kind::None => return Ok(None),
            Kind::Tcp => {
                if let Some((field, _)) = http_only.iter().find(|(_, v)| v.is_some()) {
                    return bad(field, "applies to kind = \"http\" only".into());
                }
                Probe::Tcp
            }
            Kind::Http => Probe::Http(self.http()?),
        };
        if self.port == Some(0) {
            return bad("port", "must be 1..=65535".into());
        }
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return bad(
                "interval_ms",
                format!("{} ms is outside {MIN_INTERVAL_MS}..={MAX_INTERVAL_MS}", self.interval_ms),
            );
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return bad(
                "timeout_ms",
                format!("{} ms must be 1..=interval_ms ({} ms)", self.timeout_ms, self.interval_ms),
            );
        }
        for (field, n) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=MAX_RISE_FALL).contains(&n) {
                return bad(field, format!("{n} is outside 1..={MAX_RISE_FALL}"));
            }
        }
        Ok(Some(Check {
            probe,
            port: self.port,
            interval: Duration::from_millis(self.interval_ms),
            timeout: Duration::from_millis(self.timeout_ms),
            rise: self.rise,
            fall: self.fall,
            on_fail: self.on_fail,
            on_all_failed: self.on_all_failed,
            new_backends: self.new_backends,
        }))
    }

    fn http(&self) -> Result<HttpProbe, (String, String)> {
        let path = self.path.clone().unwrap_or_else(|| "/".into());
        // They go into the request line and headers as they are.
        let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
        if !path.starts_with('/') || !printable(&path) {
            return Err((
                "path".into(),
                format!("{path:?} must start with '/' and hold no spaces or control characters"),
            ));
        }
        if let Some(host) = &self.host
            && (host.is_empty() || !printable(host))
        {
            return Err(("host".into(), format!("{host:?} must be a non-empty name without spaces")));
        }
        let status = match &self.status {
            None => (200, 399),
            Some(text) => status_range(text).ok_or_else(|| {
                (
                    "status".to_owned(),
                    format!("{text:?} must be a status (\"200\") or a range (\"200-299\") within 100-599"),
                )
            })?,
        };
        if self.body.as_deref() == Some("") {
            return Err(("body".into(), "must not be empty (leave it out to not check the body)".into()));
        }
        Ok(HttpProbe { path, host: self.host.clone(), status, body: self.body.clone() })
    }
}

fn status_range(text: &str) -> Option<(u16, u16)> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let (low, high): (u16, u16) = (low.trim().parse().ok()?, high.trim().parse().ok()?);
    (100 <= low && low <= high && high <= 599).then_some((low, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Option<Check>, (String, String)> {
        toml::from_str::<CheckFile>(text).unwrap().validate()
    }

    #[test]
    fn defaults_are_haproxy_like() {
        let c = check("kind = \"tcp\"").unwrap().unwrap();
        assert_eq!(c.probe, Probe::Tcp);
        assert_eq!(
            (c.interval, c.timeout, c.rise, c.fall),
            (Duration::from_secs(1), Duration::from_millis(500), 2, 2)
        );
        assert_eq!(
            (c.on_fail, c.on_all_failed, c.new_backends),
            (OnFail::Remove, OnAllFailed::Keep, NewBackends::Wait)
        );
        let h = check("kind = \"http\"").unwrap().unwrap();
        assert_eq!(
            h.probe,
            Probe::Http(HttpProbe { path: "/".into(), host: None, status: (200, 399), body: None })
        );
        assert_eq!(check("kind = \"none\"").unwrap(), None);
    }

    #[test]
    fn errors_name_the_field() {
        let field = |text: &str| check(text).unwrap_err().0;
        assert_eq!(field("kind = \"tcp\"\npath = \"/x\""), "path");
        assert_eq!(field("kind = \"http\"\npath = \"x\""), "path");
        assert_eq!(field("kind = \"http\"\npath = \"/a b\""), "path");
        assert_eq!(field("kind = \"http\"\nstatus = \"299-200\""), "status");
        assert_eq!(field("kind = \"http\"\nstatus = \"2xx\""), "status");
        assert_eq!(field("kind = \"tcp\"\ninterval_ms = 10"), "interval_ms");
        assert_eq!(field("kind = \"tcp\"\ntimeout_ms = 2000"), "timeout_ms");
        assert_eq!(field("kind = \"tcp\"\nrise = 0"), "rise");
        assert_eq!(field("kind = \"tcp\"\nport = 0"), "port");
        let c = check("kind = \"http\"\nstatus = \"204\"\nbody = \"ok\"").unwrap().unwrap();
        assert!(matches!(c.probe, Probe::Http(HttpProbe { status: (204, 204), .. })));
    }
}
