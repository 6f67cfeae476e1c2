//! A key's value, read: the shapes services and registrators write. Pure.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::{config::MAX_WEIGHT, model::Unusable};

/// The longest value read; a longer one is not an instance record.
pub const MAX_VALUE: usize = 4096;

/// What a value says about its instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub address: IpAddr,
    /// 0: not said.
    pub port: u16,
    pub weight: u32,
    pub state: State,
}

/// `state` in a JSON value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// A backend (the default).
    #[default]
    Up,
    /// A backend that takes no new flows (as weight 0).
    Drain,
    /// Not a backend, though its key stays.
    Down,
}

/// Why a value is not a record. The key is left out and this is reported.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Bad {
    #[error("the value is {0} bytes, over {MAX_VALUE}")]
    TooLarge(usize),
    #[error("the value is not UTF-8 text")]
    NotText,
    #[error("the value is neither JSON nor IP or IP:port ({0})")]
    Unreadable(String),
    #[error("the JSON value is not an instance ({0})")]
    Json(String),
    #[error("address {0:?} is not an IP address")]
    Address(String),
    #[error("address {address} is {why}")]
    Unusable { address: IpAddr, why: Unusable },
    #[error("weight {0} is over {MAX_WEIGHT}")]
    Weight(u32),
}

/// The JSON form; fields other tools add are ignored.
#[derive(Deserialize)]
struct Json {
    address: String,
    #[serde(default)]
    port: u16,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    state: State,
}

fn one() -> u32 {
    1
}

/// Reads a value: a JSON object `{"address": "10.0.0.11", "port": 80,
/// "weight": 2, "state": "up"}` (address required; port not said, weight
/// 1, state `up` by default), or a bare `IP`, `IP:port` or `[IPv6]:port`.
pub fn parse(value: &[u8]) -> Result<Record, Bad> {
    if value.len() > MAX_VALUE {
        return Err(Bad::TooLarge(value.len()));
    }
    let text = std::str::from_utf8(value).map_err(|_| Bad::NotText)?.trim();
    let record = if text.starts_with('{') {
        let json: Json = serde_json::from_str(text).map_err(|e| Bad::Json(e.to_string()))?;
        let address = json.address.trim().parse().map_err(|_| Bad::Address(json.address.clone()))?;
        Record { address, port: json.port, weight: json.weight, state: json.state }
    } else if let Ok(address) = text.parse::<IpAddr>() {
        Record { address, port: 0, weight: 1, state: State::Up }
    } else if let Ok(socket) = text.parse::<SocketAddr>() {
        Record { address: socket.ip(), port: socket.port(), weight: 1, state: State::Up }
    } else {
        let shown: String = text.chars().take(40).collect();
        return Err(Bad::Unreadable(format!("{shown:?}")));
    };
    if let Some(why) = Unusable::of(record.address) {
        return Err(Bad::Unusable { address: record.address, why });
    }
    if record.weight > MAX_WEIGHT {
        return Err(Bad::Weight(record.weight));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Record {
        parse(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn json_values_with_defaults() {
        assert_eq!(
            ok(r#"{"address": "10.0.0.11", "port": 80, "weight": 2, "state": "drain"}"#),
            Record { address: ip("10.0.0.11"), port: 80, weight: 2, state: State::Drain }
        );
        assert_eq!(
            ok(r#" {"address":"fd00::11","name":"web-1","tags":["a"]} "#),
            Record { address: ip("fd00::11"), port: 0, weight: 1, state: State::Up },
            "unknown fields ignored"
        );
        assert_eq!(ok(r#"{"address": "10.0.0.1", "state": "down"}"#).state, State::Down);
        assert_eq!(ok(r#"{"address": "10.0.0.1", "weight": 0}"#).weight, 0);
    }

    #[test]
    fn bare_addresses() {
        assert_eq!(
            ok("10.0.0.12"),
            Record { address: ip("10.0.0.12"), port: 0, weight: 1, state: State::Up }
        );
        assert_eq!(ok("10.0.0.12:8080\n").port, 8080);
        assert_eq!(
            ok("[fd00::12]:443"),
            Record { address: ip("fd00::12"), port: 443, weight: 1, state: State::Up }
        );
        assert_eq!(ok("fd00::12").address, ip("fd00::12"));
    }

    #[test]
    fn bad_values_say_why() {
        let bad = |v: &[u8]| parse(v).unwrap_err();
        assert_eq!(bad(&vec![b' '; MAX_VALUE + 1]), Bad::TooLarge(MAX_VALUE + 1));
        assert_eq!(bad(&[0xff, 0xfe]), Bad::NotText);
        assert!(matches!(bad(b"web-1.internal:80"), Bad::Unreadable(_)));
        assert!(matches!(bad(b""), Bad::Unreadable(_)));
        assert!(matches!(bad(br#"{"port": 80}"#), Bad::Json(m) if m.contains("address")));
        assert!(matches!(bad(br#"{"address": "10.0.0.1", "state": "sleeping"}"#), Bad::Json(_)));
        assert!(matches!(bad(br#"{"address": "10.0.0.1", "port": 70000}"#), Bad::Json(_)));
        assert!(matches!(bad(br#"{"address": "10.0.0.1""#), Bad::Json(_)));
        assert_eq!(bad(br#"{"address": "web-1"}"#), Bad::Address("web-1".into()));
        assert!(matches!(bad(b"127.0.0.1"), Bad::Unusable { .. }));
        assert!(matches!(bad(b"0.0.0.0:80"), Bad::Unusable { .. }));
        assert_eq!(bad(br#"{"address": "10.0.0.1", "weight": 100000}"#), Bad::Weight(100_000));
    }
}
