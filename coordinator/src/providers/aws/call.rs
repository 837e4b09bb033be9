//! One EC2 call with the provider's error classification and retries.

use std::future::Future;

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::providers::ProviderError;
use crate::providers::error::{ErrorClass, classify};
use crate::providers::throttle::{RetryPolicy, SharedTokenBucket};

/// A failed EC2 call, reduced to what the classification needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    /// EC2 error code, absent for timeouts and connection failures.
    pub code: Option<String>,
    pub message: String,
    pub http_status: Option<u16>,
}

impl ApiFailure {
    pub fn class(&self) -> ErrorClass {
        classify(self.code.as_deref(), self.http_status)
    }

    pub fn code_or_kind(&self) -> &str {
        self.code.as_deref().unwrap_or("NoResponse")
    }

    /// Converts the failure into the provider error for a call that is not retried further.
    pub fn into_error(self, action: &'static str, attempts: u32) -> ProviderError {
        match self.class() {
            ErrorClass::Throttling => ProviderError::Throttled {
                action,
                attempts,
                code: self.code_or_kind().to_owned(),
            },
            ErrorClass::Transient => ProviderError::Unavailable {
                action,
                attempts,
                message: format!("{}: {}", self.code_or_kind(), self.message),
            },
            _ => ProviderError::Api {
                action,
                code: self.code_or_kind().to_owned(),
                message: self.message,
            },
        }
    }
}

impl<E> From<SdkError<E, HttpResponse>> for ApiFailure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    fn from(error: SdkError<E, HttpResponse>) -> Self {
        let http_status = error
            .raw_response()
            .map(|response| response.status().as_u16());
        match error.as_service_error() {
            Some(service) => ApiFailure {
                code: service.code().map(str::to_owned),
                message: service.message().unwrap_or("no message").to_owned(),
                http_status,
            },
            None => ApiFailure {
                code: None,
                message: DisplayErrorContext(&error).to_string(),
                http_status,
            },
        }
    }
}

/// Runs `send` until it succeeds, fails with an error that is not retried, or runs out of attempts.
///
/// Every attempt takes a token from the shared bucket first. Throttling and transient errors are retried after a
/// jittered exponential delay; capacity, configuration and other errors return at once with the attempt count.
pub async fn with_retries<T, F, Fut>(
    action: &'static str,
    bucket: &SharedTokenBucket,
    policy: &RetryPolicy,
    mut send: F,
) -> Result<T, (ApiFailure, u32)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiFailure>>,
{
    let mut attempt = 1;
    loop {
        bucket.acquire().await;
        let failure = match send().await {
            Ok(value) => return Ok(value),
            Err(failure) => failure,
        };

        let retryable = matches!(
            failure.class(),
            ErrorClass::Throttling | ErrorClass::Transient
        );
        if !retryable || attempt >= policy.max_attempts {
            return Err((failure, attempt));
        }

        let delay = policy.delay(attempt, rand::random::<f64>());
        tracing::warn!(
            action,
            attempt,
            code = failure.code_or_kind(),
            message = %failure.message,
            delay_ms = delay.as_millis() as u64,
            "EC2 call failed, retrying"
        );
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;

    fn failure(code: &str, status: u16) -> ApiFailure {
        ApiFailure {
            code: Some(code.to_owned()),
            message: "test".to_owned(),
            http_status: Some(status),
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_attempts: 4,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_retried_until_success() {
        let bucket = SharedTokenBucket::new(100, 100.0);
        let calls = AtomicU32::new(0);

        let result = with_retries("RunInstances", &bucket, &policy(), || async {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if call < 3 {
                Err(failure("RequestLimitExceeded", 503))
            } else {
                Ok(call)
            }
        })
        .await;

        assert_eq!(result, Ok(3));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_max_attempts() {
        let bucket = SharedTokenBucket::new(100, 100.0);
        let calls = AtomicU32::new(0);

        let result: Result<(), _> =
            with_retries("DescribeInstances", &bucket, &policy(), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(failure("InternalError", 500))
            })
            .await;

        let (last, attempts) = result.unwrap_err();
        assert_eq!(last.code.as_deref(), Some("InternalError"));
        assert_eq!(attempts, 4);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_error_is_not_retried() {
        let bucket = SharedTokenBucket::new(100, 100.0);
        let calls = AtomicU32::new(0);

        let result: Result<(), _> = with_retries("RunInstances", &bucket, &policy(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(failure("InsufficientInstanceCapacity", 500))
        })
        .await;

        assert_eq!(result.unwrap_err().1, 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
