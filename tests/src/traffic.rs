//! Traffic that must not break: long-lived conversations and a steady
//! stream of new connections, run while the load balancer changes.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{netns::Netns, servers::tcp_ask};

/// A connection that asks every 100 ms and must always get an answer from
/// the same backend.
pub struct Conversation {
    pub backend: String,
    /// The client's end of the connection.
    pub local: SocketAddr,
    thread: JoinHandle<Result<usize, String>>,
}

impl Conversation {
    /// Opens a connection to `addr` from `client` and starts talking.
    pub fn start(client: &Netns, addr: SocketAddr, stop: &Arc<AtomicBool>) -> Conversation {
        Self::every(client, addr, Duration::from_millis(100), stop)
    }

    /// A conversation that asks once per `period`.
    pub fn every(client: &Netns, addr: SocketAddr, period: Duration, stop: &Arc<AtomicBool>) -> Conversation {
        let conn = client.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3))).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let local = conn.local_addr().unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut writer = conn;
        let mut ask = move || -> Result<String, String> {
            writer.write_all(b"ping\n").map_err(|e| format!("send: {e}"))?;
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => Err("connection closed".into()),
                Ok(_) => Ok(line.trim().to_owned()),
                Err(e) => Err(format!("no answer: {e}")),
            }
        };
        let backend = ask().expect("first exchange");
        let expected = backend.clone();
        let stop = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut exchanges = 1;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(period);
                let answer = ask().map_err(|e| format!("{expected}, after {exchanges} exchanges: {e}"))?;
                if answer != expected {
                    return Err(format!("moved from {expected} to {answer}"));
                }
                exchanges += 1;
            }
            Ok(exchanges)
        });
        Conversation { backend, local, thread }
    }

    /// Exchanges made, or how it broke.
    pub fn finish(self) -> Result<usize, String> {
        self.thread.join().expect("conversation thread")
    }
}

/// The exchanges `talks` made in all; fails the test on one that broke.
pub fn finish_all(talks: Vec<Conversation>) -> usize {
    let mut exchanges = 0;
    for talk in talks {
        let backend = talk.backend.clone();
        exchanges += talk.finish().unwrap_or_else(|e| panic!("a conversation with {backend} broke: {e}"));
    }
    exchanges
}

/// New connections, one every `every`, from `client` to `addr`.
pub struct Arrivals {
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    troubles: Arc<Mutex<Vec<Trouble>>>,
    thread: JoinHandle<()>,
}

/// A connection that failed, or took long enough that its SYN must have
/// been sent again.
#[derive(Clone, Debug)]
pub struct Trouble {
    /// When it was tried, since the stream began.
    pub at: Duration,
    pub took: Duration,
    /// Why it failed; `None`: it succeeded, late.
    pub error: Option<String>,
}

/// What a stream of new connections saw.
#[derive(Debug)]
pub struct Arrived {
    pub ok: u64,
    pub failed: u64,
    pub troubles: Vec<Trouble>,
}

impl Arrived {
    pub fn errors(&self) -> Vec<String> {
        self.troubles.iter().filter_map(|t| t.error.clone()).collect()
    }

    /// From the first trouble's start to the last one's end: how long new
    /// connections could not be made at once.
    pub fn gap(&self) -> Duration {
        let start = self.troubles.iter().map(|t| t.at).min().unwrap_or_default();
        let end = self.troubles.iter().map(|t| t.at + t.took).max().unwrap_or_default();
        end.saturating_sub(start)
    }
}

/// A connection slower than this needed a retransmission.
const SLOW: Duration = Duration::from_millis(200);

impl Arrivals {
    pub fn start(client: &Netns, addr: SocketAddr, every: Duration, stop: &Arc<AtomicBool>) -> Arrivals {
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let troubles = Arc::new(Mutex::new(Vec::new()));
        let (o, f, t, s) = (ok.clone(), failed.clone(), troubles.clone(), stop.clone());
        let thread = client.spawn(move || {
            let began = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let at = began.elapsed();
                let result = tcp_ask(addr);
                let took = began.elapsed() - at;
                match result {
                    Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                    Err(_) => f.fetch_add(1, Ordering::Relaxed),
                };
                if result.is_err() || took > SLOW {
                    let error = result.err().map(|e| e.to_string());
                    t.lock().unwrap().push(Trouble { at, took, error });
                }
                std::thread::sleep(every);
            }
        });
        Arrivals { ok, failed, troubles, thread }
    }

    pub fn finish(self) -> Arrived {
        self.thread.join().expect("arrivals thread");
        let troubles = self.troubles.lock().unwrap().clone();
        Arrived { ok: self.ok.load(Ordering::Relaxed), failed: self.failed.load(Ordering::Relaxed), troubles }
    }
}
