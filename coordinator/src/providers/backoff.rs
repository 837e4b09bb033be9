//! Backoff state of all offerings of a provider, as a plain value with time as an input.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::policy::{BackoffSchedule, OfferingBackoff};

/// Offerings in backoff after capacity errors, keyed by `Offering::key()`.
///
/// No method reads a clock: `now` (time since the Unix epoch) is an argument, so the coordinator can persist the
/// entries and tests can drive time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferingBackoffs {
    schedule: BackoffSchedule,
    entries: BTreeMap<String, OfferingBackoff>,
}

impl OfferingBackoffs {
    pub fn new(schedule: BackoffSchedule) -> Self {
        Self {
            schedule,
            entries: BTreeMap::new(),
        }
    }

    /// Restores persisted entries.
    pub fn from_entries(
        schedule: BackoffSchedule,
        entries: impl IntoIterator<Item = OfferingBackoff>,
    ) -> Self {
        let entries = entries
            .into_iter()
            .map(|entry| (entry.offering.clone(), entry))
            .collect();
        Self { schedule, entries }
    }

    /// Returns every entry, active or expired, for persisting.
    pub fn entries(&self) -> impl Iterator<Item = &OfferingBackoff> {
        self.entries.values()
    }

    /// Returns the backoff of `offering` if it is still active at `now`.
    pub fn active(&self, offering: &str, now: Duration) -> Option<&OfferingBackoff> {
        self.entries
            .get(offering)
            .filter(|backoff| backoff.is_active(now))
    }

    /// Records a capacity error of `offering` at `now` and returns its new backoff.
    ///
    /// An expired entry still counts: a capacity error right after the backoff ends doubles the delay, and only
    /// a successful launch resets it.
    pub fn record_capacity_error(&mut self, offering: &str, now: Duration) -> OfferingBackoff {
        let previous = self.entries.get(offering);
        let backoff = OfferingBackoff::after_failure(offering, previous, now, &self.schedule);
        self.entries.insert(offering.to_owned(), backoff.clone());
        backoff
    }

    /// Clears the backoff of `offering` after a successful launch.
    pub fn record_success(&mut self, offering: &str) {
        self.entries.remove(offering);
    }

    /// Returns the earliest end of the active backoffs among `offerings`, if any is active at `now`.
    pub fn earliest_end<'a>(
        &self,
        offerings: impl IntoIterator<Item = &'a str>,
        now: Duration,
    ) -> Option<Duration> {
        offerings
            .into_iter()
            .filter_map(|offering| self.active(offering, now))
            .map(|backoff| backoff.until)
            .min()
    }
}

impl Default for OfferingBackoffs {
    fn default() -> Self {
        Self::new(BackoffSchedule::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);
    const OFFERING: &str = "m5.large/us-east-1a/spot";

    #[test]
    fn capacity_error_starts_three_minute_backoff() {
        let mut backoffs = OfferingBackoffs::default();
        let now = 100 * MINUTE;

        let backoff = backoffs.record_capacity_error(OFFERING, now);

        assert_eq!(backoff.until, now + 3 * MINUTE);
        assert!(backoffs.active(OFFERING, now + 2 * MINUTE).is_some());
        assert!(backoffs.active(OFFERING, now + 3 * MINUTE).is_none());
    }

    #[test]
    fn repeated_errors_double_up_to_thirty_minutes() {
        let mut backoffs = OfferingBackoffs::default();
        let mut now = Duration::ZERO;
        let mut delays = Vec::new();

        for _ in 0..6 {
            let backoff = backoffs.record_capacity_error(OFFERING, now);
            delays.push(backoff.until - now);
            now = backoff.until;
        }

        assert_eq!(
            delays,
            [3, 6, 12, 24, 30, 30].map(|minutes| minutes * MINUTE)
        );
    }

    #[test]
    fn success_resets_backoff() {
        let mut backoffs = OfferingBackoffs::default();
        backoffs.record_capacity_error(OFFERING, Duration::ZERO);
        backoffs.record_success(OFFERING);

        let backoff = backoffs.record_capacity_error(OFFERING, 10 * MINUTE);

        assert_eq!(backoff.failures, 1);
        assert_eq!(backoff.until, 13 * MINUTE);
    }

    #[test]
    fn other_offerings_are_unaffected() {
        let mut backoffs = OfferingBackoffs::default();
        backoffs.record_capacity_error(OFFERING, Duration::ZERO);

        assert!(
            backoffs
                .active("m5.large/us-east-1b/spot", MINUTE)
                .is_none()
        );
    }

    #[test]
    fn entries_round_trip_for_persistence() {
        let mut backoffs = OfferingBackoffs::default();
        backoffs.record_capacity_error(OFFERING, Duration::ZERO);
        let saved: Vec<OfferingBackoff> = backoffs.entries().cloned().collect();

        let restored = OfferingBackoffs::from_entries(BackoffSchedule::default(), saved);

        assert_eq!(restored, backoffs);
    }

    #[test]
    fn earliest_end_ignores_inactive_offerings() {
        let mut backoffs = OfferingBackoffs::default();
        backoffs.record_capacity_error("a", Duration::ZERO);
        backoffs.record_capacity_error("b", MINUTE);

        assert_eq!(
            backoffs.earliest_end(["a", "b", "c"], 2 * MINUTE),
            Some(3 * MINUTE)
        );
        assert_eq!(backoffs.earliest_end(["c"], 2 * MINUTE), None);
    }
}
