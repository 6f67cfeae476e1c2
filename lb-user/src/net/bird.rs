//! BIRD's control socket, read for the state of its sessions. xlb never
//! configures BIRD: the operator's config is BIRD's own.

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

/// How long one query may take.
const TIMEOUT: Duration = Duration::from_secs(1);

/// One row of `show protocols`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protocol {
    pub name: String,
    /// "BGP", "BFD", "Kernel", …
    pub proto: String,
    /// "up", "down", "start", …
    pub state: String,
    /// The session's detail, e.g. "Established" or "Active  Socket: Connection refused".
    pub info: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    #[error("cannot reach BIRD at {path} (is bird running, with this control socket?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("BIRD at {path} did not answer within {TIMEOUT:?}")]
    Timeout { path: String },
    #[error("BIRD at {path}: {message}")]
    Answer { path: String, message: String },
}

/// `show protocols` over the control socket at `path`.
pub async fn protocols(path: &Path) -> Result<Vec<Protocol>, BirdError> {
    let shown = path.display().to_string();
    match tokio::time::timeout(TIMEOUT, query(path, "show protocols")).await {
        Err(_) => Err(BirdError::Timeout { path: shown }),
        Ok(Err(QueryError::Io(source))) => Err(BirdError::Connect { path: shown, source }),
        Ok(Err(QueryError::Answer(message))) => Err(BirdError::Answer { path: shown, message }),
        Ok(Ok(lines)) => Ok(parse_protocols(&lines)),
    }
}

enum QueryError {
    Io(std::io::Error),
    Answer(String),
}

impl From<std::io::Error> for QueryError {
    fn from(e: std::io::Error) -> Self {
        QueryError::Io(e)
    }
}

/// Sends `command` and collects the reply's lines as (code, text): BIRD
/// prefixes each with a four-digit code and '-' (more follow) or ' ' (the
/// last); a line starting with a space continues the previous code.
async fn query(path: &Path, command: &str) -> Result<Vec<(u16, String)>, QueryError> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    // The greeting: "0001 BIRD 2.0.12 ready."
    lines.next_line().await?;
    write.write_all(format!("{command}\n").as_bytes()).await?;
    let mut reply = Vec::new();
    let mut code = 0;
    while let Some(line) = lines.next_line().await? {
        if let Some(text) = line.strip_prefix(' ') {
            reply.push((code, text.to_owned()));
            continue;
        }
        let (Some(digits), Some(more)) = (line.get(..4), line.get(4..5)) else {
            return Err(QueryError::Answer(format!("unexpected line {line:?}")));
        };
        code = digits.parse().map_err(|_| QueryError::Answer(format!("unexpected line {line:?}")))?;
        let text = line.get(5..).unwrap_or("").to_owned();
        if code >= 8000 {
            return Err(QueryError::Answer(text));
        }
        reply.push((code, text));
        if more == " " {
            return Ok(reply);
        }
    }
    Err(QueryError::Answer("the reply ended early".into()))
}

/// The table rows (code 1002) of `show protocols`.
fn parse_protocols(lines: &[(u16, String)]) -> Vec<Protocol> {
    lines
        .iter()
        .filter(|(code, _)| *code == 1002)
        .filter_map(|(_, text)| {
            let fields: Vec<&str> = text.split_whitespace().collect();
            let [name, proto, _table, state, _since, info @ ..] = fields.as_slice() else { return None };
            Some(Protocol {
                name: name.to_string(),
                proto: proto.to_string(),
                state: state.to_string(),
                info: info.join(" "),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_rows_are_read_from_birds_reply() {
        let reply = [
            (2002, "Name       Proto      Table      State  Since         Info".to_owned()),
            (1002, "device1    Device     ---        up     21:10:11.120  ".to_owned()),
            (1002, "kxlb4      Kernel     master4    up     21:10:11.120  ".to_owned()),
            (1002, "up4        BGP        ---        up     21:10:14.502  Established   ".to_owned()),
            (1002, "up6        BGP        ---        start  21:10:11.120  Active        Socket: Connection refused".to_owned()),
            (0, String::new()),
        ];
        let rows = parse_protocols(&reply);
        assert_eq!(rows.len(), 4);
        assert_eq!(
            (rows[2].name.as_str(), rows[2].state.as_str(), rows[2].info.as_str()),
            ("up4", "up", "Established")
        );
        assert_eq!(rows[3].info, "Active Socket: Connection refused");
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_clear_error() {
        let err = protocols(Path::new("/nonexistent/bird.ctl")).await.unwrap_err();
        assert!(err.to_string().contains("cannot reach BIRD at /nonexistent/bird.ctl"), "{err}");
    }
}
