//! The idle and orphan decisions, as a pure function of the gate's state, the coordinator contact and the time.

use std::time::Duration;

use tokio::time::Instant;

/// Timeouts from the registration response, with defaults for the ones it leaves at 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub max_idle: Duration,
    pub heartbeat_interval: Duration,
    pub orphan_timeout: Duration,
    pub drain_grace: Duration,
    pub termination_retry: Duration,
}

impl Timeouts {
    pub fn from_proto(timeouts: Option<&fleet_proto::v1::AgentTimeouts>) -> Timeouts {
        let seconds = |value: u32, default: u64| {
            Duration::from_secs(if value == 0 {
                default
            } else {
                u64::from(value)
            })
        };
        let timeouts = timeouts.cloned().unwrap_or_default();
        Timeouts {
            max_idle: seconds(timeouts.max_idle_seconds, 300),
            heartbeat_interval: seconds(timeouts.heartbeat_interval_seconds, 15),
            // The same as the coordinator config's default, defaults.orphan_timeout_seconds.
            orphan_timeout: seconds(timeouts.orphan_timeout_seconds, 900),
            drain_grace: seconds(timeouts.drain_grace_seconds, 600),
            termination_retry: seconds(timeouts.termination_retry_seconds, 60),
        }
    }
}

/// Inputs of one check.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput {
    pub now: Instant,
    /// When the worker became idle; `None` while it runs a task and before clearml-agent first polled.
    pub idle_since: Option<Instant>,
    /// True while the worker runs a task.
    pub busy: bool,
    /// Last successful call to the coordinator.
    pub last_contact: Instant,
    /// Earliest time for the next termination request, after a refusal or a failed request.
    pub next_request_at: Instant,
}

/// The action a check calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckAction {
    Nothing,
    /// Idle for max_idle: close the gate and ask the coordinator.
    RequestTermination,
    /// No coordinator for orphan_timeout and idle: terminate without asking.
    TerminateOrphan,
    /// No coordinator for orphan_timeout but a task runs: take no new task, terminate when it ends.
    DrainOrphan,
}

pub fn check(input: CheckInput, timeouts: &Timeouts) -> CheckAction {
    let orphaned = input.now.duration_since(input.last_contact) >= timeouts.orphan_timeout;
    match (input.idle_since, orphaned) {
        _ if orphaned && input.busy => CheckAction::DrainOrphan,
        // A worker that never polled runs no task either, so an orphan terminates without waiting for it.
        _ if orphaned => CheckAction::TerminateOrphan,
        (Some(since), false)
            if input.now.duration_since(since) >= timeouts.max_idle
                && input.now >= input.next_request_at =>
        {
            CheckAction::RequestTermination
        }
        _ => CheckAction::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            max_idle: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(10),
            orphan_timeout: Duration::from_secs(300),
            drain_grace: Duration::from_secs(30),
            termination_retry: Duration::from_secs(20),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_machine_asks_after_max_idle() {
        let start = Instant::now();
        let input = |now| CheckInput {
            now,
            idle_since: Some(start),
            busy: false,
            last_contact: now,
            next_request_at: start,
        };

        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(
            check(input(Instant::now()), &timeouts()),
            CheckAction::Nothing
        );

        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            check(input(Instant::now()), &timeouts()),
            CheckAction::RequestTermination
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_request_waits_for_retry_time() {
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(120)).await;
        let now = Instant::now();
        let input = CheckInput {
            now,
            idle_since: Some(start),
            busy: false,
            last_contact: now,
            next_request_at: now + Duration::from_secs(20),
        };
        assert_eq!(check(input, &timeouts()), CheckAction::Nothing);
    }

    #[tokio::test(start_paused = true)]
    async fn busy_machine_never_asks() {
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(3_600)).await;
        let now = Instant::now();
        let input = CheckInput {
            now,
            idle_since: None,
            busy: true,
            last_contact: now,
            next_request_at: start,
        };
        assert_eq!(check(input, &timeouts()), CheckAction::Nothing);
    }

    #[tokio::test(start_paused = true)]
    async fn orphan_terminates_when_idle_and_drains_when_busy() {
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(299)).await;
        let early = CheckInput {
            now: Instant::now(),
            idle_since: Some(start),
            busy: false,
            last_contact: start,
            next_request_at: Instant::now() + Duration::from_secs(999),
        };
        assert_eq!(check(early, &timeouts()), CheckAction::Nothing);

        tokio::time::advance(Duration::from_secs(1)).await;
        let idle = CheckInput {
            now: Instant::now(),
            ..early
        };
        assert_eq!(check(idle, &timeouts()), CheckAction::TerminateOrphan);

        let busy = CheckInput {
            idle_since: None,
            busy: true,
            ..idle
        };
        assert_eq!(check(busy, &timeouts()), CheckAction::DrainOrphan);

        let starting = CheckInput {
            idle_since: None,
            busy: false,
            ..idle
        };
        assert_eq!(check(starting, &timeouts()), CheckAction::TerminateOrphan);
    }

    #[test]
    fn zero_timeouts_get_defaults() {
        let timeouts = Timeouts::from_proto(Some(&fleet_proto::v1::AgentTimeouts {
            max_idle_seconds: 5,
            ..Default::default()
        }));
        assert_eq!(timeouts.max_idle, Duration::from_secs(5));
        assert_eq!(timeouts.orphan_timeout, Duration::from_secs(900));
    }
}
