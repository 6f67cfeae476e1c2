//! Traffic that must not break: long-lived conversations and a steady
//! stream of new connections, run while the load balancer changes.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{netns::Netns, servers::tcp_ask};

/// A connection that asks every 100 ms and must always get an answer from
/// the same backend.
pub struct Conversation {
    pub backend: String,
    thread: JoinHandle<Result<usize, String>>,
}

impl Conversation {
    /// Opens a connection to `addr` from `client` and starts talking.
    pub fn start(client: &Netns, addr: SocketAddr, stop: &Arc<AtomicBool>) -> Conversation {
        let conn = client.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3))).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
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
                std::thread::sleep(Duration::from_millis(100));
                let answer = ask().map_err(|e| format!("{expected}, after {exchanges} exchanges: {e}"))?;
                if answer != expected {
                    return Err(format!("moved from {expected} to {answer}"));
                }
                exchanges += 1;
            }
            Ok(exchanges)
        });
        Conversation { backend, thread }
    }

    /// Exchanges made, or how it broke.
    pub fn finish(self) -> Result<usize, String> {
        self.thread.join().expect("conversation thread")
    }
}

/// New connections, one every `every`, from `client` to `addr`.
pub struct Arrivals {
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub errors: Arc<std::sync::Mutex<Vec<String>>>,
    thread: JoinHandle<()>,
}

impl Arrivals {
    pub fn start(client: &Netns, addr: SocketAddr, every: Duration, stop: &Arc<AtomicBool>) -> Arrivals {
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (o, f, e, s) = (ok.clone(), failed.clone(), errors.clone(), stop.clone());
        let thread = client.spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match tcp_ask(addr) {
                    Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                    Err(err) => {
                        e.lock().unwrap().push(err.to_string());
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(every);
            }
        });
        Arrivals { ok, failed, errors, thread }
    }

    pub fn finish(self) -> (u64, u64, Vec<String>) {
        self.thread.join().expect("arrivals thread");
        let errors = self.errors.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed), errors)
    }
}
