//! Backoff of offerings after capacity errors.

use std::time::Duration;

/// Delays after consecutive capacity errors of one offering: `initial`, doubling on each failure, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffSchedule {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for BackoffSchedule {
    /// 3 min doubling to 30 min: short enough to retry spot capacity that often returns within minutes, long
    /// enough not to spend every tick on an offering that stays empty.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(3 * 60),
            max: Duration::from_secs(30 * 60),
        }
    }
}

impl BackoffSchedule {
    /// Returns the delay after the `failures`-th consecutive failure (1 for the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        let delay = self.initial.saturating_mul(1u32 << doublings);
        delay.min(self.max)
    }
}

/// An offering that failed with a capacity error and is skipped until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferingBackoff {
    pub offering: String,
    /// Consecutive capacity errors; a successful launch removes the backoff.
    pub failures: u32,
    pub until: Duration,
}

impl OfferingBackoff {
    /// Builds the backoff after a capacity error at `now`, continuing the count of `previous` if there was one.
    pub fn after_failure(
        offering: &str,
        previous: Option<&OfferingBackoff>,
        now: Duration,
        schedule: &BackoffSchedule,
    ) -> Self {
        let failures = previous.map_or(0, |backoff| backoff.failures) + 1;
        Self {
            offering: offering.to_string(),
            failures,
            until: now + schedule.delay(failures),
        }
    }

    /// Tells whether launches on the offering are still suspended at `now`.
    pub fn is_active(&self, now: Duration) -> bool {
        now < self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn delay_doubles_from_three_minutes_to_thirty() {
        let schedule = BackoffSchedule::default();
        let delays: Vec<Duration> = (1..=6).map(|failures| schedule.delay(failures)).collect();
        assert_eq!(
            delays,
            vec![
                3 * MINUTE,
                6 * MINUTE,
                12 * MINUTE,
                24 * MINUTE,
                30 * MINUTE,
                30 * MINUTE
            ]
        );
    }

    #[test]
    fn delay_saturates_for_huge_failure_counts() {
        let schedule = BackoffSchedule::default();
        assert_eq!(schedule.delay(u32::MAX), 30 * MINUTE);
    }

    #[test]
    fn repeated_failure_extends_backoff() {
        let schedule = BackoffSchedule::default();
        let first = OfferingBackoff::after_failure("a/spot", None, MINUTE, &schedule);
        assert_eq!(first.failures, 1);
        assert_eq!(first.until, 4 * MINUTE);

        let second = OfferingBackoff::after_failure("a/spot", Some(&first), 10 * MINUTE, &schedule);
        assert_eq!(second.failures, 2);
        assert_eq!(second.until, 16 * MINUTE);
    }

    #[test]
    fn backoff_ends_at_until() {
        let backoff = OfferingBackoff {
            offering: "a/spot".into(),
            failures: 1,
            until: 4 * MINUTE,
        };
        assert!(backoff.is_active(4 * MINUTE - Duration::from_millis(1)));
        assert!(!backoff.is_active(4 * MINUTE));
    }
}
