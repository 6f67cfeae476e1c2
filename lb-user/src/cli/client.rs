//! The CLI's side of the admin API.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, bail};

use crate::{
    cli::target::Target,
    observe::{admin::Change, pinned, status::Status},
};

pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
}

/// Why a request did not get an answer from the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the daemon's admin API at {url} is not reachable")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl AdminClient {
    pub fn new(target: &Target) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(10))
            .build()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(Self { base: target.admin.clone(), token: target.token.clone(), http, runtime })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn send(&self, req: reqwest::RequestBuilder) -> Result<(u16, Vec<u8>), ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        self.runtime.block_on(async {
            let resp = req.send().await.map_err(|source| {
                if source.is_connect() || source.is_timeout() {
                    ClientError::Unreachable { url: self.base.clone(), source }
                } else {
                    ClientError::Other(anyhow::Error::from(source))
                }
            })?;
            let status = resp.status().as_u16();
            let body = resp.bytes().await.map_err(anyhow::Error::from)?;
            Ok((status, body.to_vec()))
        })
    }

    fn checked(&self, req: reqwest::RequestBuilder) -> Result<Vec<u8>, ClientError> {
        let (status, body) = self.send(req)?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Other(anyhow::anyhow!("{} answered {status}: {message}", self.base)));
        }
        Ok(body)
    }

    pub fn status(&self) -> Result<Status, ClientError> {
        let body = self.checked(self.http.get(format!("{}/api/v1/status", self.base)))?;
        Ok(serde_json::from_slice(&body).context("unexpected status JSON from the admin API")?)
    }

    /// Switches announcing; the daemon's `withdraw_wait` in seconds.
    pub fn announce(&self, on: bool) -> anyhow::Result<Option<f64>> {
        let url = format!("{}/api/v1/announce/{}", self.base, if on { "on" } else { "off" });
        let req = self.http.post(url).header(reqwest::header::CONTENT_TYPE, "application/json");
        let body = match self.checked(req) {
            Ok(body) => body,
            Err(ClientError::Unreachable { url, .. }) => {
                bail!(
                    "the daemon's admin API at {url} is not reachable: announcing needs a running `xlb run`"
                )
            }
            Err(ClientError::Other(e)) => return Err(e),
        };
        let answer: serde_json::Value = serde_json::from_slice(&body).context("unexpected answer")?;
        Ok(answer["withdraw_wait"].as_f64())
    }

    pub fn change(&self, vip: &str, backend: IpAddr, change: Change) -> anyhow::Result<()> {
        let base = format!("{}/api/v1/vips/{vip}/backends/{backend}", self.base);
        let req = match change {
            Change::Drain => self
                .http
                .post(format!("{base}/drain"))
                .header(reqwest::header::CONTENT_TYPE, "application/json"),
            Change::Undrain => self
                .http
                .post(format!("{base}/undrain"))
                .header(reqwest::header::CONTENT_TYPE, "application/json"),
            Change::Weight(w) => self
                .http
                .put(format!("{base}/weight"))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::json!({ "weight": w }).to_string()),
        };
        match self.checked(req) {
            Ok(_) => Ok(()),
            Err(ClientError::Unreachable { url, .. }) => {
                bail!("the daemon's admin API at {url} is not reachable: changes need a running `xlb run`")
            }
            Err(ClientError::Other(e)) => Err(e),
        }
    }
}

/// The status from the daemon, or from the pinned maps when it does not
/// answer; with a sentence saying which.
pub fn status(target: &Target) -> anyhow::Result<(Status, String)> {
    let client = AdminClient::new(target)?;
    match client.status() {
        Ok(s) => Ok((s, format!("via the daemon's admin API at {}", client.url()))),
        Err(ClientError::Unreachable { url, .. }) => {
            let s = pinned::read(&target.pin_dir, target.interface.as_deref(), target.files().as_ref())?;
            Ok((s, format!("from the pinned maps (the daemon's admin API at {url} does not answer)")))
        }
        Err(ClientError::Other(e)) => Err(e),
    }
}
