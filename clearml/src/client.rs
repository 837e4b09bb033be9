//! The transport: login, bearer token, timeouts, retries.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::config::ClientConfig;
use crate::envelope;
use crate::error::Error;

/// Whether a request may be sent again after a failure whose outcome is unknown (a timeout, a dropped
/// connection, an HTTP 5xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Repeating the request leaves the server in the same state: reads, and writes such as
    /// `workers.status_report` that replace a value.
    Safe,
    /// The first attempt may have taken effect, and a second one could change more: for example
    /// `queues.get_next_task`, whose lost response means a task already left the queue.
    Never,
}

/// An async client for the ClearML REST API. Cheap to clone; clones share the HTTP pool and the token.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: ClientConfig,
    /// The bearer token of the current session; `None` until the first login.
    token: Mutex<Option<String>>,
}

#[derive(Serialize)]
struct Empty {}

#[derive(serde::Deserialize)]
struct LoginResponse {
    token: String,
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("clearml-fleet/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| Error::InvalidConfig {
                reason: format!("cannot build the HTTP client: {source}"),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                config,
                token: Mutex::new(None),
            }),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Logs in with the access and secret key and stores the token for later calls.
    ///
    /// Calls log in on their own when they have no token, so calling this is only needed to check the
    /// credentials early.
    pub async fn login(&self) -> Result<(), Error> {
        let mut token = self.inner.token.lock().await;
        *token = Some(self.fetch_token().await?);
        Ok(())
    }

    /// Sends one call and decodes its `data` into `Resp`.
    ///
    /// Without a token the client logs in first. On HTTP 401 it logs in again once and repeats the call,
    /// because the token may have expired. Transient failures are retried with backoff only when `retry`
    /// is [`Retry::Safe`].
    pub async fn call<Req, Resp>(
        &self,
        endpoint: &str,
        request: &Req,
        retry: Retry,
    ) -> Result<Resp, Error>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let body = serde_json::to_vec(request).map_err(|source| Error::InvalidConfig {
            reason: format!("cannot encode the request for {endpoint}: {source}"),
        })?;

        let mut relogged = false;
        loop {
            let token = self.current_token().await?;
            match self.send_with_retries(endpoint, &body, &token, retry).await {
                Err(err) if err.is_unauthorized() && !relogged => {
                    debug!(endpoint, "token rejected, logging in again");
                    relogged = true;
                    self.replace_token(&token).await?;
                }
                result => return result,
            }
        }
    }

    async fn send_with_retries<Resp: DeserializeOwned>(
        &self,
        endpoint: &str,
        body: &[u8],
        token: &str,
        retry: Retry,
    ) -> Result<Resp, Error> {
        let policy = &self.inner.config.retry;
        let mut attempt = 1;
        loop {
            let result = self.send_once(endpoint, body, Auth::Bearer(token)).await;
            match result {
                Err(err)
                    if retry == Retry::Safe
                        && err.is_transient()
                        && attempt < policy.max_attempts =>
                {
                    let delay = policy.backoff(attempt, jitter_unit());
                    warn!(endpoint, attempt, delay_ms = delay.as_millis() as u64, error = %err, "retrying ClearML API call");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn current_token(&self) -> Result<String, Error> {
        let mut token = self.inner.token.lock().await;
        if let Some(token) = token.as_ref() {
            return Ok(token.clone());
        }
        let fresh = self.fetch_token().await?;
        *token = Some(fresh.clone());
        Ok(fresh)
    }

    /// Replaces `rejected` with a new token, unless another call already did.
    async fn replace_token(&self, rejected: &str) -> Result<(), Error> {
        let mut token = self.inner.token.lock().await;
        if token.as_deref() == Some(rejected) || token.is_none() {
            *token = Some(self.fetch_token().await?);
        }
        Ok(())
    }

    async fn fetch_token(&self) -> Result<String, Error> {
        let endpoint = "auth.login";
        let policy = &self.inner.config.retry;
        let body = serde_json::to_vec(&Empty {}).expect("an empty struct always encodes");
        let mut attempt = 1;
        loop {
            let result: Result<LoginResponse, Error> =
                self.send_once(endpoint, &body, Auth::Basic).await;
            match result {
                Err(err) if err.is_transient() && attempt < policy.max_attempts => {
                    let delay = policy.backoff(attempt, jitter_unit());
                    warn!(endpoint, attempt, delay_ms = delay.as_millis() as u64, error = %err, "retrying ClearML login");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(err) => return Err(err),
                Ok(response) => return Ok(response.token),
            }
        }
    }

    async fn send_once<Resp: DeserializeOwned>(
        &self,
        endpoint: &str,
        body: &[u8],
        auth: Auth<'_>,
    ) -> Result<Resp, Error> {
        let config = &self.inner.config;
        let url = endpoint_url(config, endpoint)?;
        let request = self
            .inner
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        let request = match auth {
            Auth::Basic => request.basic_auth(&config.access_key, Some(config.secret_key.expose())),
            Auth::Bearer(token) => request.bearer_auth(token),
        };

        let response = request
            .send()
            .await
            .map_err(|source| transport_error(endpoint, config.request_timeout, source))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|source| transport_error(endpoint, config.request_timeout, source))?;
        decode_response(endpoint, status, &bytes)
    }
}

enum Auth<'a> {
    Basic,
    Bearer(&'a str),
}

fn endpoint_url(config: &ClientConfig, endpoint: &str) -> Result<url::Url, Error> {
    let path = format!("v{}/{}", config.api_version, endpoint);
    let mut base = config.api_server.clone();
    if !base.path().ends_with('/') {
        let with_slash = format!("{}/", base.path());
        base.set_path(&with_slash);
    }
    base.join(&path).map_err(|source| Error::InvalidConfig {
        reason: format!("cannot build the URL for {endpoint} from {base}: {source}"),
    })
}

fn decode_response<Resp: DeserializeOwned>(
    endpoint: &str,
    status: StatusCode,
    body: &[u8],
) -> Result<Resp, Error> {
    envelope::decode(endpoint, status.as_u16(), body)
}

fn transport_error(endpoint: &str, timeout: Duration, source: reqwest::Error) -> Error {
    if source.is_timeout() {
        return Error::Timeout {
            endpoint: endpoint.to_owned(),
            after: timeout,
        };
    }
    // reqwest's Display stops at the outermost error; the cause chain contains the useful part
    // ("connection refused").
    let mut reason = source.to_string();
    let mut cause = std::error::Error::source(&source);
    while let Some(inner) = cause {
        reason.push_str(": ");
        reason.push_str(&inner.to_string());
        cause = inner.source();
    }
    Error::Connection {
        endpoint: endpoint.to_owned(),
        reason,
    }
}

/// Returns a number in [0, 1) for retry jitter. It needs to differ between clients, not to be unpredictable,
/// so the sub-second part of the wall clock is enough.
fn jitter_unit() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_url_puts_version_in_path() {
        let config = ClientConfig::new("http://127.0.0.1:8008", "k", "s").unwrap();
        let url = endpoint_url(&config, "queues.get_all").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:8008/v2.23/queues.get_all");
    }

    #[test]
    fn endpoint_url_keeps_base_path() {
        let config = ClientConfig::new("https://example.invalid/api", "k", "s").unwrap();
        let url = endpoint_url(&config, "auth.login").unwrap();
        assert_eq!(url.as_str(), "https://example.invalid/api/v2.23/auth.login");
    }
}
