//! The wall clock behind a trait, so backoff decisions take time as an input.

use std::time::{Duration, SystemTime};

/// A source of the current time as a duration since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now(&self) -> Duration;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        // A clock before 1970 is a broken host; zero keeps every backoff decision well defined.
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
    }
}
