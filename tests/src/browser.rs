//! A headless Chromium driven through chromedriver (W3C WebDriver over
//! HTTP), both in a namespace of the test's: enough to load a page, read
//! and click elements, and take a screenshot.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{netns::Netns, unique_id};

/// W3C WebDriver's key for element references.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser<'a> {
    ns: &'a Netns,
    driver: Option<Child>,
    addr: SocketAddr,
    session: String,
    profile: std::path::PathBuf,
}

impl<'a> Browser<'a> {
    /// chromedriver on `port` of `ns`'s loopback, and a session with a
    /// fresh profile.
    pub fn start(ns: &'a Netns, port: u16) -> anyhow::Result<Browser<'a>> {
        let driver = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(["chromedriver", &format!("--port={port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start chromedriver (scripts/setup.sh installs chromium-driver)")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let profile = std::env::temp_dir().join(format!("xlb-chromium-{:06x}", unique_id()));
        let mut browser = Browser { ns, driver: Some(driver), addr, session: String::new(), profile };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ns.run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()) {
            if Instant::now() > deadline {
                bail!("chromedriver did not answer on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", browser.profile.display()),
        ];
        let capabilities = json!({ "capabilities": { "alwaysMatch": { "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args } } } });
        let session = browser.call("POST", "/session", Some(capabilities))?;
        browser.session = session["sessionId"].as_str().context("no session id")?.to_owned();
        Ok(browser)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, reply) = self.ns.run(|| exchange(self.addr, method, path, &body))?;
        let value: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
        if status != 200 {
            bail!("WebDriver {method} {path}: {status} {}", value["value"]["message"]);
        }
        Ok(value["value"].clone())
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub fn open(&self, url: &str) -> anyhow::Result<()> {
        self.call("POST", &self.session_path("/url"), Some(json!({ "url": url })))?;
        Ok(())
    }

    fn find(&self, css: &str) -> anyhow::Result<String> {
        let found = self.call(
            "POST",
            &self.session_path("/element"),
            Some(json!({ "using": "css selector", "value": css })),
        )?;
        Ok(found[ELEMENT].as_str().context("no element reference")?.to_owned())
    }

    /// The text of the first element matching `css`, if any. Read in the
    /// page in one go: the page redraws every second, and an element found
    /// first and read afterwards may be gone by then.
    pub fn text(&self, css: &str) -> Option<String> {
        let script = "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;";
        let value = self.call(
            "POST",
            &self.session_path("/execute/sync"),
            Some(json!({ "script": script, "args": [css] })),
        );
        value.ok()?.as_str().map(str::to_owned)
    }

    /// Clicks the first element matching `css` (found again if the page
    /// redrew it in between).
    pub fn click(&self, css: &str) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..5 {
            let id = self.find(css)?;
            match self.call("POST", &self.session_path(&format!("/element/{id}/click")), Some(json!({}))) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried"))
    }

    /// Polls until `css`'s text satisfies `ok`; the text.
    pub fn wait_text(&self, css: &str, limit: Duration, ok: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.text(css);
            if let Some(t) = text.as_deref().filter(|t| ok(t)) {
                return Ok(t.to_owned());
            }
            if Instant::now() > deadline {
                bail!("{css} is {text:?} after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `script` in the page as an async function body (its last
    /// argument is the callback to call with the result); the result.
    pub fn execute_async(&self, script: &str) -> anyhow::Result<Value> {
        self.call("POST", &self.session_path("/execute/async"), Some(json!({ "script": script, "args": [] })))
    }

    /// The page as a PNG.
    pub fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        let b64 = self.call("GET", &self.session_path("/screenshot"), None)?;
        use base64::Engine as _;
        Ok(base64::engine::general_purpose::STANDARD.decode(b64.as_str().context("no screenshot")?)?)
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &self.session_path(""), None);
        }
        if let Some(mut driver) = self.driver.take() {
            let _ = driver.kill();
            let _ = driver.wait();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// One request to chromedriver, which keeps connections open: the reply
/// is read by its Content-Length, not to the end of the stream.
fn exchange(addr: SocketAddr, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    use std::io::{BufRead as _, Read as _, Write as _};
    let conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    // Starting the browser (a new session) can take a while.
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    (&conn).write_all(head.as_bytes())?;
    (&conn).write_all(body.as_bytes())?;
    let mut reader = std::io::BufReader::new(&conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 =
        line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    let mut length = None;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let mut reply = Vec::new();
    match length {
        Some(n) => {
            reply.resize(n, 0);
            reader.read_exact(&mut reply)?;
        }
        None => {
            reader.read_to_end(&mut reply)?;
        }
    }
    Ok((status, reply))
}
