use std::time::Duration;

use url::Url;

use crate::error::Error;
use crate::secret::Secret;

/// API version sent in every request path (`/v2.23/queues.get_all`).
///
/// clearml-server accepts any version up to its own maximum; 2.23 is served by clearml-server 1.9 and
/// every 2.x release, and it has every field this client reads.
pub const DEFAULT_API_VERSION: &str = "2.23";

/// Settings of a [`crate::Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL of the ClearML API server, for example `http://127.0.0.1:8008`.
    pub api_server: Url,
    pub access_key: String,
    pub secret_key: Secret,
    /// Version in the request path; see [`DEFAULT_API_VERSION`].
    pub api_version: String,
    /// Limit on one HTTP request, from connect to the last byte of the response.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub retry: RetryPolicy,
}

impl ClientConfig {
    /// Builds a config with the defaults: API 2.23, 30 s per request, 5 s to connect, 4 attempts for
    /// calls that are safe to retry.
    pub fn new(
        api_server: &str,
        access_key: impl Into<String>,
        secret_key: impl Into<Secret>,
    ) -> Result<Self, Error> {
        let api_server = Url::parse(api_server).map_err(|source| Error::InvalidConfig {
            reason: format!(
                "api_server {api_server:?} is not a valid URL ({source}); expected for example http://127.0.0.1:8008"
            ),
        })?;
        if !matches!(api_server.scheme(), "http" | "https") {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "api_server {api_server} has scheme {:?}; use http or https",
                    api_server.scheme()
                ),
            });
        }
        let access_key = access_key.into();
        if access_key.is_empty() {
            return Err(Error::InvalidConfig {
                reason: "access_key is empty; set the ClearML API access key".to_owned(),
            });
        }

        Ok(Self {
            api_server,
            access_key,
            secret_key: secret_key.into(),
            api_version: DEFAULT_API_VERSION.to_owned(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        })
    }
}

/// Exponential backoff for calls that are safe to repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included; 1 disables retries.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Backoff before attempt `attempt + 1`, where `attempt` counts from 1: half of the doubled delay is
    /// fixed and the other half is random, so clients that failed together do not retry together.
    pub fn backoff(&self, attempt: u32, random_unit: f64) -> Duration {
        let doubled = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let capped = doubled.min(self.max_backoff);
        capped / 2 + capped.mul_f64(random_unit.clamp(0.0, 1.0) / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert_eq!(policy.backoff(1, 0.0), Duration::from_millis(50));
        assert_eq!(policy.backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(policy.backoff(2, 1.0), Duration::from_millis(200));
        assert_eq!(policy.backoff(3, 0.0), Duration::from_millis(200));
        assert_eq!(policy.backoff(9, 1.0), Duration::from_secs(1));
        assert_eq!(policy.backoff(40, 1.0), Duration::from_secs(1));
    }

    #[test]
    fn config_rejects_bad_url_with_example() {
        let err = ClientConfig::new("not a url", "key", "secret").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("\"not a url\""), "{message}");
        assert!(message.contains("http://127.0.0.1:8008"), "{message}");
    }

    #[test]
    fn config_rejects_other_schemes() {
        let err = ClientConfig::new("ftp://example.invalid", "key", "secret").unwrap_err();
        assert!(err.to_string().contains("use http or https"), "{err}");
    }

    #[test]
    fn config_rejects_empty_access_key() {
        let err = ClientConfig::new("http://127.0.0.1:8008", "", "secret").unwrap_err();
        assert!(err.to_string().contains("access_key is empty"), "{err}");
    }
}
