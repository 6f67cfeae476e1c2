//! A real etcd server (Debian's `etcd-server`) for a test, driven with
//! `etcdctl`: its own data directory and free ports on 127.0.0.1, in the
//! test's network namespace or the host's, killed and removed on drop.
//! Also a TCP relay that a test can cut, to take etcd away from xlb while
//! etcdctl still reaches it.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// How long a fresh etcd may take to answer.
const READY: Duration = Duration::from_secs(20);

/// One member's addresses.
#[derive(Clone, Debug)]
struct Member {
    name: String,
    client: u16,
    peer: u16,
}

pub struct Etcd {
    /// The network namespace it runs in (`None`: the host's).
    ns: Option<PathBuf>,
    dir: PathBuf,
    members: Vec<Member>,
    children: Vec<Option<Child>>,
    /// `user:password` for etcdctl once auth is on.
    root: Option<String>,
    /// Its certificates, when it serves TLS.
    pub tls: Option<TlsFiles>,
}

/// A test CA, the server's certificate (for IP 127.0.0.1) and a client
/// certificate, PEM files made with openssl.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Makes a fresh CA and its two certificates in `dir`.
    pub fn make(dir: &std::path::Path) -> anyhow::Result<TlsFiles> {
        let p = |name: &str| dir.join(name);
        let s = |path: PathBuf| path.to_str().expect("utf-8 path").to_owned();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let (ca, ca_key) = (s(p("ca.pem")), s(p("ca.key")));
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend(["-keyout", &ca_key, "-out", &ca, "-days", "2", "-subj", "/CN=xlb-test-ca"]);
        args.extend([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]);
        crate::cmd::run("openssl", &args)?;
        for (name, cn) in [("server", "127.0.0.1"), ("client", "xlb")] {
            let (key, csr, cert, ext) = (
                s(p(&format!("{name}.key"))),
                s(p(&format!("{name}.csr"))),
                s(p(&format!("{name}.pem"))),
                s(p(&format!("{name}.ext"))),
            );
            let mut args = vec!["req"];
            args.extend(ec);
            let subject = format!("/CN={cn}");
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            crate::cmd::run("openssl", &args)?;
            std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")?;
            crate::cmd::run(
                "openssl",
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &ca,
                    "-CAkey",
                    &ca_key,
                    "-CAcreateserial",
                    "-out",
                    &cert,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            )?;
        }
        Ok(TlsFiles {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
        })
    }
}

impl Etcd {
    /// A one-member cluster in the host's namespace.
    pub fn start() -> anyhow::Result<Etcd> {
        Self::cluster(None, 1)
    }

    /// A one-member cluster in network namespace `ns` (a path under
    /// /run/netns).
    pub fn start_in(ns: PathBuf) -> anyhow::Result<Etcd> {
        Self::cluster(Some(ns), 1)
    }

    /// A one-member cluster serving only TLS clients with a certificate
    /// from its CA.
    pub fn start_tls() -> anyhow::Result<Etcd> {
        Self::launch(None, 1, true)
    }

    /// A cluster of `size` members on one host.
    pub fn cluster(ns: Option<PathBuf>, size: usize) -> anyhow::Result<Etcd> {
        Self::launch(ns, size, false)
    }

    fn launch(ns: Option<PathBuf>, size: usize, tls: bool) -> anyhow::Result<Etcd> {
        anyhow::ensure!(crate::cmd::which("etcd").is_some(), "no etcd: run ./scripts/setup.sh (etcd-server)");
        let id = crate::unique_id();
        let dir = std::env::temp_dir().join(format!("xlb-etcd-{id}"));
        std::fs::create_dir_all(&dir)?;
        let ports = free_ports(&ns, size * 2)?;
        let members: Vec<Member> = (0..size)
            .map(|i| Member { name: format!("m{i}"), client: ports[2 * i], peer: ports[2 * i + 1] })
            .collect();
        let tls = if tls { Some(TlsFiles::make(&dir)?) } else { None };
        let mut etcd = Etcd { ns, dir, members, children: Vec::new(), root: None, tls };
        etcd.children = (0..size).map(|_| None).collect();
        for i in 0..size {
            etcd.spawn(i)?;
        }
        etcd.wait_ready()?;
        Ok(etcd)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &self.members[i];
        let cluster: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer)).collect();
        let client = self.endpoint_of(i);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let data = self.dir.join(&m.name);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))?;
        let mut args: Vec<String> = vec![
            format!("--name={}", m.name),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={}", cluster.join(",")),
            "--initial-cluster-state=new".into(),
            format!("--initial-cluster-token=xlb-test-{}", self.dir.display()),
            "--heartbeat-interval=50".into(),
            "--election-timeout=500".into(),
            "--log-level=warn".into(),
            "--logger=zap".into(),
        ];
        if let Some(tls) = &self.tls {
            args.push(format!("--cert-file={}", tls.server_cert.display()));
            args.push(format!("--key-file={}", tls.server_key.display()));
            args.push(format!("--trusted-ca-file={}", tls.ca.display()));
            args.push("--client-cert-auth".into());
        }
        let child = self
            .command("etcd")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start etcd")?;
        self.children[i] = Some(child);
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        match &self.ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let alive: Vec<usize> = (0..self.members.len()).filter(|i| self.children[*i].is_some()).collect();
            let ok = alive.iter().all(|i| {
                self.ctl_at(&[self.endpoint_of(*i)], &["endpoint", "health", "--command-timeout=1s"]).is_ok()
            });
            if ok {
                return Ok(());
            }
            if started.elapsed() > READY {
                bail!("etcd not ready after {READY:?}; log: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn tls_args(&self, c: &mut Command) {
        if let Some(tls) = &self.tls {
            c.arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", tls.client_cert.display()))
                .arg(format!("--key={}", tls.client_key.display()));
        }
    }

    /// The members' logs.
    pub fn log(&self) -> String {
        self.members
            .iter()
            .map(|m| std::fs::read_to_string(self.dir.join(format!("{}.log", m.name))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn endpoint_of(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client)
    }

    /// The first member's client URL.
    pub fn endpoint(&self) -> String {
        self.endpoint_of(0)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint_of(i)).collect()
    }

    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client
    }

    /// `etcdctl ARGS…` against every running member.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let alive: Vec<String> = (0..self.members.len())
            .filter(|i| self.children[*i].is_some())
            .map(|i| self.endpoint_of(i))
            .collect();
        self.ctl_at(&alive, args)
    }

    fn ctl_at(&self, endpoints: &[String], args: &[&str]) -> anyhow::Result<String> {
        let mut c = self.command("etcdctl");
        c.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", endpoints.join(",")));
        if let Some(root) = &self.root {
            c.arg(format!("--user={root}"));
        }
        self.tls_args(&mut c);
        let out = c.args(args).output().context("cannot run etcdctl")?;
        if !out.status.success() {
            bail!("etcdctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Puts `key`; in a cluster, again while a leader change refuses it.
    pub fn put(&self, key: &str, value: &str) {
        let started = Instant::now();
        loop {
            match self.ctl(&["put", key, value]) {
                Ok(_) => return,
                Err(e) if self.members.len() > 1 && started.elapsed() < READY => {
                    eprintln!("etcd put {key} refused, again: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Puts many keys, 128 to a transaction (etcd's default limit).
    /// Values must not hold spaces or newlines (etcdctl's txn syntax).
    pub fn put_many(&self, pairs: &[(String, String)]) -> anyhow::Result<()> {
        for batch in pairs.chunks(128) {
            let mut script = String::from("\n");
            for (k, v) in batch {
                anyhow::ensure!(!v.contains([' ', '\n']) && !k.contains([' ', '\n']), "{k:?}: {v:?}");
                script.push_str(&format!("put {k} {v}\n"));
            }
            script.push_str("\n\n");
            let mut c = self.command("etcdctl");
            c.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.endpoints().join(",")));
            self.tls_args(&mut c);
            let mut child =
                c.arg("txn").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
            child.stdin.take().expect("stdin").write_all(script.as_bytes())?;
            let out = child.wait_with_output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            anyhow::ensure!(
                out.status.success() && stdout.starts_with("SUCCESS"),
                "etcdctl txn: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Puts `key` with a lease of `ttl` seconds that nobody keeps alive.
    pub fn put_leased(&self, key: &str, value: &str, ttl: u32) {
        let granted = self.ctl(&["lease", "grant", &ttl.to_string()]).unwrap();
        // "lease 694d77aa9e8c2a0e granted with TTL(2s)"
        let lease = granted.split_whitespace().nth(1).expect("a lease id").to_owned();
        self.ctl(&["put", "--lease", &lease, key, value]).unwrap();
    }

    pub fn delete(&self, key: &str) {
        self.ctl(&["del", key]).unwrap();
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        let out = self.ctl(&["endpoint", "status", "-w", "json"]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["Status"]["header"]["revision"].as_i64().expect("a revision")
    }

    /// Compacts history up to the current revision.
    pub fn compact(&self) {
        let rev = self.revision();
        self.ctl(&["compaction", &rev.to_string()]).unwrap();
    }

    /// Turns auth on with a root user; etcdctl goes on as root.
    pub fn enable_auth(&mut self) {
        self.ctl(&["user", "add", "root:rootpw"]).unwrap();
        self.ctl(&["auth", "enable"]).unwrap();
        self.root = Some("root:rootpw".into());
    }

    /// Stops member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data and ports.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_ready()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` distinct free TCP ports on 127.0.0.1 (in `ns`, if given: ports are
/// per namespace).
fn free_ports(ns: &Option<PathBuf>, n: usize) -> anyhow::Result<Vec<u16>> {
    let pick = move || -> anyhow::Result<Vec<u16>> {
        let listeners: Vec<TcpListener> =
            (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
        Ok(listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<Result<_, _>>()?)
    };
    match ns {
        None => pick(),
        Some(ns) => {
            let ns = ns.clone();
            std::thread::spawn(move || {
                crate::netns::enter(&ns)?;
                pick()
            })
            .join()
            .expect("the port picker")
        }
    }
}

/// A TCP relay on 127.0.0.1 to a target port, that a test can cut: every
/// relayed connection is shut and new ones are refused until it is
/// restored.
pub struct Relay {
    pub port: u16,
    cut: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    pub fn start(target: u16) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, s, st) = (cut.clone(), stop.clone(), streams.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((inbound, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if c.load(Ordering::Relaxed) {
                    drop(inbound);
                    continue;
                }
                let _ = inbound.set_nonblocking(false);
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                for stream in [&inbound, &outbound] {
                    if let Ok(clone) = stream.try_clone() {
                        st.lock().unwrap().push(clone);
                    }
                }
                pipe(inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                pipe(outbound, inbound);
            }
        });
        Ok(Relay { port, cut, streams, stop })
    }

    /// Shuts every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0_u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
