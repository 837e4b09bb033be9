//! Deadline-bound waiting for a condition.

use std::future::Future;
use std::time::Duration;

use super::HarnessError;

/// Interval between two checks of a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Waits until `condition` returns true, checking every 50 ms, or fails after `timeout` naming `what`.
pub async fn wait_until(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Result<(), HarnessError> {
    wait_until_async(timeout, what, || std::future::ready(condition())).await
}

/// Waits until the future returned by `condition` resolves to true, or fails after `timeout` naming `what`.
///
/// A check that is still running at the deadline is cancelled.
pub async fn wait_until_async<F, Fut>(
    timeout: Duration,
    what: &str,
    mut condition: F,
) -> Result<(), HarnessError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        interval.tick().await;
        match tokio::time::timeout_at(deadline, condition()).await {
            Ok(true) => return Ok(()),
            Ok(false) if tokio::time::Instant::now() < deadline => continue,
            Ok(false) | Err(_) => {
                return Err(HarnessError::Timeout {
                    what: what.to_owned(),
                    waited: timeout,
                });
            }
        }
    }
}
