//! Instance metadata service client, IMDSv2 only: every read carries a session token from `PUT
//! /latest/api/token`, and the client never falls back to token-less IMDSv1 reads.

use std::time::Duration;

use reqwest::StatusCode;
use tokio::sync::Mutex;
use url::Url;

/// Lifetime requested for a session token. EC2 allows up to 6 hours.
const TOKEN_TTL_SECONDS: u32 = 21_600;

/// Errors of instance metadata reads.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error(
        "instance metadata request {path} to {endpoint} failed: {reason}; check imds.endpoint and that the instance allows IMDSv2 (HttpTokens=required, hop limit >= 1)"
    )]
    Request {
        endpoint: String,
        path: &'static str,
        reason: String,
    },
    #[error("instance metadata {path} returned HTTP {status}: {body}")]
    Status {
        path: &'static str,
        status: u16,
        body: String,
    },
}

/// A spot interruption or rebalance notice read from the metadata service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// `spot/instance-action`: the cloud stops or terminates the instance at `action_time_unix_ms` (0 if the
    /// time did not parse).
    SpotAction {
        action: String,
        action_time_unix_ms: i64,
    },
    /// `events/recommendations/rebalance`: the instance is at elevated risk of interruption.
    Rebalance { notice_time_unix_ms: i64 },
}

/// An IMDSv2 client that caches its session token and fetches a new one when the service rejects it.
pub struct ImdsClient {
    http: reqwest::Client,
    endpoint: Url,
    token: Mutex<Option<String>>,
}

impl ImdsClient {
    pub fn new(endpoint: Url) -> Result<ImdsClient, ImdsError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|error| ImdsError::Request {
                endpoint: endpoint.to_string(),
                path: "(client)",
                reason: error.to_string(),
            })?;
        Ok(ImdsClient {
            http,
            endpoint,
            token: Mutex::new(None),
        })
    }

    /// Reads `meta-data/instance-id`.
    pub async fn instance_id(&self) -> Result<String, ImdsError> {
        let path = "latest/meta-data/instance-id";
        match self.get(path).await? {
            Some(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
            _ => Err(ImdsError::Status {
                path,
                status: 404,
                body: "no instance id".to_owned(),
            }),
        }
    }

    /// Reads the spot interruption notice and then the rebalance recommendation; `None` when neither is set.
    pub async fn notice(&self) -> Result<Option<Notice>, ImdsError> {
        if let Some(body) = self.get("latest/meta-data/spot/instance-action").await? {
            return Ok(Some(parse_spot_action(&body)));
        }
        if let Some(body) = self
            .get("latest/meta-data/events/recommendations/rebalance")
            .await?
        {
            return Ok(Some(parse_rebalance(&body)));
        }
        Ok(None)
    }

    /// Sends a token-authenticated GET; `Ok(None)` on HTTP 404, which IMDS returns for an unset notice.
    async fn get(&self, path: &'static str) -> Result<Option<String>, ImdsError> {
        let mut refreshed = false;
        loop {
            let token = self.token(path).await?;
            let response = self
                .http
                .get(self.url(path))
                .header("X-aws-ec2-metadata-token", &token)
                .send()
                .await
                .map_err(|error| self.request_error(path, error))?;
            let status = response.status();
            let body = response
                .text()
                .await
                .map_err(|error| self.request_error(path, error))?;
            match status {
                StatusCode::OK => return Ok(Some(body)),
                StatusCode::NOT_FOUND => return Ok(None),
                StatusCode::UNAUTHORIZED if !refreshed => {
                    tracing::debug!(path, "IMDS session token rejected, fetching a new one");
                    refreshed = true;
                    *self.token.lock().await = None;
                }
                status => {
                    return Err(ImdsError::Status {
                        path,
                        status: status.as_u16(),
                        body,
                    });
                }
            }
        }
    }

    async fn token(&self, path: &'static str) -> Result<String, ImdsError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref() {
            return Ok(token.clone());
        }
        let response = self
            .http
            .put(self.url("latest/api/token"))
            .header(
                "X-aws-ec2-metadata-token-ttl-seconds",
                TOKEN_TTL_SECONDS.to_string(),
            )
            .send()
            .await
            .map_err(|error| self.request_error(path, error))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|error| self.request_error(path, error))?;
        if status != StatusCode::OK {
            return Err(ImdsError::Status {
                path: "latest/api/token",
                status: status.as_u16(),
                body,
            });
        }
        *cached = Some(body.clone());
        Ok(body)
    }

    fn url(&self, path: &str) -> Url {
        let mut base = self.endpoint.clone();
        base.set_path(path);
        base
    }

    fn request_error(&self, path: &'static str, error: reqwest::Error) -> ImdsError {
        let mut reason = error.to_string();
        let mut cause = std::error::Error::source(&error);
        while let Some(inner) = cause {
            reason.push_str(": ");
            reason.push_str(&inner.to_string());
            cause = inner.source();
        }
        ImdsError::Request {
            endpoint: self.endpoint.to_string(),
            path,
            reason,
        }
    }
}

/// Parses `{"action": "terminate", "time": "2026-12-04T21:00:00Z"}`.
fn parse_spot_action(body: &str) -> Notice {
    let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let action = value
        .get("action")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("terminate")
        .to_owned();
    let action_time_unix_ms = value
        .get("time")
        .and_then(serde_json::Value::as_str)
        .and_then(parse_rfc3339_ms)
        .unwrap_or(0);
    Notice::SpotAction {
        action,
        action_time_unix_ms,
    }
}

/// Parses `{"noticeTime": "2026-12-04T21:00:00Z"}`.
fn parse_rebalance(body: &str) -> Notice {
    let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let notice_time_unix_ms = value
        .get("noticeTime")
        .and_then(serde_json::Value::as_str)
        .and_then(parse_rfc3339_ms)
        .unwrap_or(0);
    Notice::Rebalance {
        notice_time_unix_ms,
    }
}

/// Parses the UTC form `YYYY-MM-DDTHH:MM:SSZ` that IMDS uses into milliseconds since the UNIX epoch.
fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date_parts = date.split('-').map(str::parse::<i64>);
    let (year, month, day) = (
        date_parts.next()?.ok()?,
        date_parts.next()?.ok()?,
        date_parts.next()?.ok()?,
    );
    let time = time.split('.').next()?;
    let mut time_parts = time.split(':').map(str::parse::<i64>);
    let (hour, minute, second) = (
        time_parts.next()?.ok()?,
        time_parts.next()?.ok()?,
        time_parts.next()?.ok()?,
    );
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spot_action_time_parses() {
        let notice =
            parse_spot_action(r#"{"action": "terminate", "time": "2026-12-04T21:00:05Z"}"#);
        assert_eq!(
            notice,
            Notice::SpotAction {
                action: "terminate".to_owned(),
                action_time_unix_ms: 1_796_418_005_000,
            }
        );
    }

    #[test]
    fn epoch_is_zero() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2000-03-01T00:00:00Z"),
            Some(951_868_800_000)
        );
        assert_eq!(parse_rfc3339_ms("not a time"), None);
    }

    #[test]
    fn rebalance_without_time_is_zero() {
        assert_eq!(
            parse_rebalance("{}"),
            Notice::Rebalance {
                notice_time_unix_ms: 0
            }
        );
    }
}
