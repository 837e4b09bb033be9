//! Deadlines of the instance lifecycle.

use std::time::Duration;

use crate::policy::action::TimeoutReason;
use crate::policy::snapshot::{InstanceState, InstanceView};

/// How long an instance may stay in each state before it is terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From intent to cloud id.
    pub launch: Duration,
    /// From cloud id to agent registration.
    pub boot: Duration,
    /// Between agent heartbeats.
    pub heartbeat: Duration,
}

impl Default for Timeouts {
    /// Returns 5 min for the launch, 15 min for boot and registration, and 2 min between heartbeats.
    ///
    /// NOTE: 5 min and 2 min are estimates. A cloud call without an id after 5 min is assumed failed, and 2 min
    /// assumes agents send heartbeats several times a minute. The 15 min leave room for images that pull
    /// containers at boot.
    fn default() -> Self {
        Self {
            launch: Duration::from_secs(5 * 60),
            boot: Duration::from_secs(15 * 60),
            heartbeat: Duration::from_secs(2 * 60),
        }
    }
}

impl Timeouts {
    /// Returns the deadline `instance` has missed at `now`, if any.
    pub fn check(&self, instance: &InstanceView<'_>, now: Duration) -> Option<TimeoutReason> {
        let in_state = now.saturating_sub(instance.state_since);
        match instance.state {
            InstanceState::Requested | InstanceState::Launching if in_state > self.launch => {
                Some(TimeoutReason::LaunchTimedOut)
            }
            InstanceState::Booting if in_state > self.boot => {
                Some(TimeoutReason::RegistrationTimedOut)
            }
            InstanceState::Idle | InstanceState::Busy => {
                let last_beat = instance.last_heartbeat.unwrap_or(instance.state_since);
                (now.saturating_sub(last_beat) > self.heartbeat)
                    .then_some(TimeoutReason::HeartbeatLost)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn instance(
        state: InstanceState,
        state_since: Duration,
        last_heartbeat: Option<Duration>,
    ) -> InstanceView<'static> {
        InstanceView {
            id: "i-1",
            queue: "gpu",
            resource: "spot",
            offering: "g5/a/spot",
            state,
            state_since,
            last_heartbeat,
            hourly_price_usd: 1.0,
        }
    }

    #[test]
    fn timeouts_by_state() {
        let timeouts = Timeouts::default();
        let now = 60 * MINUTE;
        let cases = [
            (
                InstanceState::Requested,
                now - 6 * MINUTE,
                None,
                Some(TimeoutReason::LaunchTimedOut),
            ),
            (InstanceState::Launching, now - 5 * MINUTE, None, None),
            (
                InstanceState::Launching,
                now - 6 * MINUTE,
                None,
                Some(TimeoutReason::LaunchTimedOut),
            ),
            (InstanceState::Booting, now - 14 * MINUTE, None, None),
            (
                InstanceState::Booting,
                now - 16 * MINUTE,
                None,
                Some(TimeoutReason::RegistrationTimedOut),
            ),
            (
                InstanceState::Idle,
                now - 30 * MINUTE,
                Some(now - MINUTE),
                None,
            ),
            (
                InstanceState::Idle,
                now - 30 * MINUTE,
                Some(now - 3 * MINUTE),
                Some(TimeoutReason::HeartbeatLost),
            ),
            (
                InstanceState::Busy,
                now - 30 * MINUTE,
                Some(now - 3 * MINUTE),
                Some(TimeoutReason::HeartbeatLost),
            ),
            (
                InstanceState::Busy,
                now - 3 * MINUTE,
                None,
                Some(TimeoutReason::HeartbeatLost),
            ),
            (InstanceState::Draining, now - 60 * MINUTE, None, None),
            (InstanceState::Terminating, now - 60 * MINUTE, None, None),
        ];
        for (state, since, heartbeat, expected) in cases {
            let view = instance(state, since, heartbeat);
            assert_eq!(
                timeouts.check(&view, now),
                expected,
                "{state:?} since {since:?}, heartbeat {heartbeat:?}"
            );
        }
    }
}
