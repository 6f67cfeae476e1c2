//! One probe of one backend: a TCP connect, or an HTTP/1.1 GET whose
//! status (and, if asked, body) is checked.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::config::check::{HttpProbe, Probe};

/// The most of an answer read: a health endpoint's answer is small, and a
/// backend must not make xlb buffer much.
const MAX_ANSWER: usize = 64 * 1024;

/// Probes `addr`; how long it took, or why it failed.
pub async fn run(addr: SocketAddr, probe: &Probe, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        match probe {
            Probe::Tcp => Ok(()),
            Probe::Http(http) => get(&mut stream, addr, http).await,
        }
    })
    .await;
    match outcome {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
    }
}

async fn get(stream: &mut TcpStream, addr: SocketAddr, http: &HttpProbe) -> Result<(), String> {
    let host = http.host.clone().unwrap_or_else(|| match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    });
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xlb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        http.path
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::with_capacity(1024);
    // On the heap: in the future it would make every probe task (TCP
    // ones too) 4 KiB larger.
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        answer.extend_from_slice(&chunk[..n]);
        if n == 0 || answer.len() >= MAX_ANSWER {
            break;
        }
        // Without a body to look for, the status line is enough.
        if http.body.is_none() && head_end(&answer).is_some() {
            break;
        }
    }
    judge(&answer, http)
}

fn head_end(answer: &[u8]) -> Option<usize> {
    answer.windows(4).position(|w| w == b"\r\n\r\n").map(|at| at + 4)
}

/// Whether an answer passes the check.
fn judge(answer: &[u8], http: &HttpProbe) -> Result<(), String> {
    if answer.is_empty() {
        return Err("closed without answering".into());
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let body_at = match response.parse(answer) {
        Ok(httparse::Status::Complete(at)) => at,
        Ok(httparse::Status::Partial) => return Err("incomplete HTTP answer".into()),
        Err(e) => return Err(format!("not an HTTP answer: {e}")),
    };
    let status = response.code.unwrap_or(0);
    let (low, high) = http.status;
    if !(low..=high).contains(&status) {
        return Err(format!("status {status}, expected {low}-{high}"));
    }
    if let Some(want) = &http.body {
        let body = &answer[body_at..];
        if !body.windows(want.len()).any(|w| w == want.as_bytes()) {
            return Err(format!("body does not contain {want:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: (u16, u16), body: Option<&str>) -> HttpProbe {
        HttpProbe { path: "/".into(), host: None, status, body: body.map(Into::into) }
    }

    #[test]
    fn answers_are_judged_by_status_and_body() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nall ok\n";
        assert_eq!(judge(ok, &http((200, 399), None)), Ok(()));
        assert_eq!(judge(ok, &http((200, 200), Some("ok"))), Ok(()));
        assert_eq!(
            judge(ok, &http((200, 200), Some("ready"))),
            Err("body does not contain \"ready\"".into())
        );
        let failing = b"HTTP/1.1 500 Internal Server Error\r\n\r\n";
        assert_eq!(judge(failing, &http((200, 399), None)), Err("status 500, expected 200-399".into()));
        assert!(
            judge(b"SSH-2.0-OpenSSH\r\n", &http((200, 399), None)).unwrap_err().starts_with("not an HTTP")
        );
        assert_eq!(judge(b"", &http((200, 399), None)), Err("closed without answering".into()));
    }
}
