//! Backend servers that answer with their name, and the client side.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{lab::Backend, netns::Netns};

/// On each backend: a TCP server answering every line with the backend's
/// name, and a UDP server answering every datagram with it. Both listen on
/// the wildcard address, so replies to the VIP leave from the VIP.
pub struct NameServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

pub fn start(backends: &[Backend], tcp_port: u16, udp_port: u16) -> NameServers {
    let hosts: Vec<(&Netns, &str)> = backends.iter().map(|b| (&b.ns, b.name.as_str())).collect();
    start_in(&hosts, tcp_port, udp_port)
}

/// Name servers in each (namespace, name) of `hosts`.
pub fn start_in(hosts: &[(&Netns, &str)], tcp_port: u16, udp_port: u16) -> NameServers {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (ns, name) in hosts {
        let (tcp, udp) = ns.run(|| {
            let tcp = TcpListener::bind(("::", tcp_port)).expect("bind tcp");
            let udp = UdpSocket::bind(("::", udp_port)).expect("bind udp");
            (tcp, udp)
        });
        tcp.set_nonblocking(true).expect("nonblocking");
        udp.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let (tcp_name, flag) = (name.to_string(), stop.clone());
        threads.push(std::thread::spawn(move || serve_tcp(tcp, tcp_name, flag)));
        let name = name.to_string();
        let flag = stop.clone();
        threads.push(std::thread::spawn(move || serve_udp(udp, name, flag)));
    }
    NameServers { stop, threads }
}

fn serve_tcp(listener: TcpListener, name: String, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                let name = name.clone();
                let stop = stop.clone();
                std::thread::spawn(move || answer_lines(conn, &name, &stop));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn answer_lines(conn: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn serve_udp(socket: UdpSocket, name: String, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(name.as_bytes(), from);
        }
    }
}

impl Drop for NameServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP connection: connect, send a line, read the answer line.
pub fn tcp_ask(addr: SocketAddr) -> std::io::Result<String> {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    (&conn).write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

/// `n` TCP connections to `addr`; answers counted by backend name. Any
/// failed connection fails the call.
pub fn tcp_spread(addr: SocketAddr, n: usize) -> std::io::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        *counts.entry(tcp_ask(addr)?).or_default() += 1;
    }
    Ok(counts)
}

/// How a [`HealthServer`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// 200 with body "ok".
    Ok,
    /// 500.
    Error,
    /// 200 with a body that does not say "ok".
    WrongBody,
    /// Accepts and reads, never answers.
    Silent,
}

/// An HTTP health endpoint in a namespace whose answer the test changes.
pub struct HealthServer {
    mode: Arc<std::sync::Mutex<Health>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HealthServer {
    pub fn start(ns: &Netns, port: u16) -> HealthServer {
        let listener = ns.run(|| TcpListener::bind(("::", port)).expect("bind health port"));
        listener.set_nonblocking(true).expect("nonblocking");
        let mode = Arc::new(std::sync::Mutex::new(Health::Ok));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (mode.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut silent = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
                let mut request = [0u8; 2048];
                let _ = std::io::Read::read(&mut conn, &mut request);
                let answer: &[u8] = match *m.lock().unwrap() {
                    Health::Ok => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                    Health::Error => b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    Health::WrongBody => b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nstarting\n",
                    Health::Silent => {
                        silent.push(conn);
                        continue;
                    }
                };
                let _ = conn.write_all(answer);
            }
        });
        HealthServer { mode, stop, thread: Some(thread) }
    }

    pub fn set(&self, mode: Health) {
        *self.mode.lock().unwrap() = mode;
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
