//! Rate limiting of cloud calls: a token bucket shared by all queues, and jittered exponential retry delays.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A token bucket with time as an input: `capacity` tokens, refilled at `refill_per_second`.
///
/// Each cloud call takes one token. EC2 throttles each account with token buckets per action, so one bucket in
/// front of all queues keeps a burst of launches in one queue from starving the describe calls of the others.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    capacity: f64,
    refill_per_second: f64,
    tokens: f64,
    /// Time of the last refill, as a duration since an arbitrary origin chosen by the caller.
    refilled_at: Duration,
}

impl TokenBucket {
    /// Creates a full bucket.
    ///
    /// # Panics
    /// When `capacity` is below 1 or `refill_per_second` is not positive, because such a bucket never lends a
    /// token.
    pub fn new(capacity: u32, refill_per_second: f64, now: Duration) -> Self {
        assert!(
            capacity >= 1,
            "a token bucket needs a capacity of at least 1 token"
        );
        assert!(
            refill_per_second > 0.0,
            "a token bucket needs a positive refill rate, got {refill_per_second}"
        );
        Self {
            capacity: f64::from(capacity),
            refill_per_second,
            tokens: f64::from(capacity),
            refilled_at: now,
        }
    }

    /// Takes one token at `now`, or returns how long to wait until one is available.
    pub fn try_take(&mut self, now: Duration) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        Err(Duration::from_secs_f64(missing / self.refill_per_second))
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.refill_per_second).min(self.capacity);
        self.refilled_at = self.refilled_at.max(now);
    }
}

/// A token bucket shared by every caller of one cloud account, measured on tokio's clock.
#[derive(Debug, Clone)]
pub struct SharedTokenBucket {
    bucket: Arc<Mutex<TokenBucket>>,
    origin: tokio::time::Instant,
}

impl SharedTokenBucket {
    pub fn new(capacity: u32, refill_per_second: f64) -> Self {
        Self {
            bucket: Arc::new(Mutex::new(TokenBucket::new(
                capacity,
                refill_per_second,
                Duration::ZERO,
            ))),
            origin: tokio::time::Instant::now(),
        }
    }

    /// Waits until a token is available and takes it.
    pub async fn acquire(&self) {
        loop {
            let now = self.origin.elapsed();
            let wait = {
                let mut bucket = self
                    .bucket
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                bucket.try_take(now)
            };
            match wait {
                Ok(()) => return,
                Err(delay) => tokio::time::sleep(delay).await,
            }
        }
    }
}

/// Retry delays for throttled and transient cloud calls: exponential from `base`, capped at `max_delay`, with
/// "equal jitter" (half the delay fixed, half random) so retries of many callers spread out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max_delay: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    /// 0.5 s doubling to 20 s, 6 attempts: a throttled call gives up after about 25 s at most, which is well
    /// within one scaling tick of a queue that waits on it.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            max_delay: Duration::from_secs(20),
            max_attempts: 6,
        }
    }
}

impl RetryPolicy {
    /// Returns the delay before retry number `retry` (1 for the first retry), given `random` in [0, 1).
    pub fn delay(&self, retry: u32, random: f64) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        let ceiling = self
            .base
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay);
        let half = ceiling / 2;
        half + half.mul_f64(random.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn bucket_lends_capacity_then_waits_for_refill() {
        let mut bucket = TokenBucket::new(2, 4.0, Duration::ZERO);

        assert_eq!(bucket.try_take(Duration::ZERO), Ok(()));
        assert_eq!(bucket.try_take(Duration::ZERO), Ok(()));
        assert_eq!(bucket.try_take(Duration::ZERO), Err(SECOND / 4));
        assert_eq!(bucket.try_take(SECOND / 4), Ok(()));
    }

    #[test]
    fn bucket_never_exceeds_capacity() {
        let mut bucket = TokenBucket::new(2, 100.0, Duration::ZERO);

        for _ in 0..2 {
            assert_eq!(bucket.try_take(100 * SECOND), Ok(()));
        }
        assert!(bucket.try_take(100 * SECOND).is_err());
    }

    #[test]
    fn retry_delay_doubles_within_jitter_bounds() {
        let policy = RetryPolicy {
            base: SECOND,
            max_delay: 8 * SECOND,
            max_attempts: 6,
        };
        let expected_ceilings = [1, 2, 4, 8, 8].map(|seconds| seconds * SECOND);

        for (index, ceiling) in expected_ceilings.into_iter().enumerate() {
            let retry = index as u32 + 1;
            assert_eq!(policy.delay(retry, 0.0), ceiling / 2, "retry {retry}");
            assert_eq!(policy.delay(retry, 1.0), ceiling, "retry {retry}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shared_bucket_spaces_calls_at_refill_rate() {
        let bucket = SharedTokenBucket::new(1, 10.0);
        let start = tokio::time::Instant::now();

        for _ in 0..4 {
            bucket.acquire().await;
        }

        // One token up front, then three refills of 100 ms each.
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }
}
