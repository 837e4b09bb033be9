//! Actions the policy requests from the actors.

use std::fmt;

use crate::policy::snapshot::InstanceState;

/// One step for the actors, with the reason where something is not done.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Launch `count` instances of `resource` on `offering` for `queue`.
    Launch {
        queue: String,
        resource: String,
        offering: String,
        count: u32,
    },
    /// Part of a queue's shortfall that no limit allowed to launch in this tick.
    Hold {
        queue: String,
        missing: u32,
        reason: HoldReason,
    },
    /// Let an idle instance terminate; the grant must be recorded before the agent is notified.
    Grant { instance: String },
    /// Keep an instance that asked to terminate.
    Refuse {
        instance: String,
        reason: RefuseReason,
    },
    /// Terminate an instance that missed a deadline.
    Terminate {
        instance: String,
        reason: TimeoutReason,
    },
}

/// The limit that stopped the rest of a shortfall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldReason {
    /// Every resource of the queue is at its `max_instances`.
    ResourceMax,
    QueueMax,
    ClusterMax,
    HourlyBudget,
    TickLaunchLimit,
    /// Every offering with room is in backoff after capacity errors or failed launches.
    AllOfferingsBackedOff,
    /// The queue has no resource with an offering.
    NoOffering,
}

/// Reason an instance must stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// Only idle instances may terminate; a busy one would lose its task.
    NotIdle(InstanceState),
    /// The instance's queue has tasks waiting that it can take.
    TasksWaiting(u32),
    /// Terminating would leave fewer than `min_idle` idle instances.
    WarmPool,
    /// Terminating would leave fewer than `min_instances` instances.
    MinInstances,
    /// The registry has no non-terminated instance with this id.
    UnknownInstance,
}

/// The deadline an instance missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutReason {
    /// Requested or launching for longer than the launch timeout: the cloud call never returned an id.
    LaunchTimedOut,
    /// Booting for longer than the boot timeout: the agent never registered.
    RegistrationTimedOut,
    /// No agent heartbeat for longer than the heartbeat timeout.
    HeartbeatLost,
}

impl fmt::Display for HoldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::ResourceMax => "every resource of the queue is at its max_instances",
            Self::QueueMax => "the queue is at its max_instances",
            Self::ClusterMax => "the cluster is at its max_instances",
            Self::HourlyBudget => "the next instance would exceed the hourly budget",
            Self::TickLaunchLimit => "the per-tick launch limit is reached",
            Self::AllOfferingsBackedOff => {
                "every offering with room is in backoff after capacity errors or failed launches"
            }
            Self::NoOffering => "the queue has no resource with an offering",
        };
        f.write_str(text)
    }
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotIdle(state) => write!(f, "instance is {state:?}, not idle"),
            Self::TasksWaiting(waiting) => {
                write!(f, "{waiting} tasks wait in the instance's queue")
            }
            Self::WarmPool => {
                f.write_str("the queue would have fewer than min_idle idle instances")
            }
            Self::MinInstances => {
                f.write_str("the queue would have fewer than min_instances instances")
            }
            Self::UnknownInstance => f.write_str("no non-terminated instance has this id"),
        }
    }
}

impl fmt::Display for TimeoutReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Self::LaunchTimedOut => "launch timed out before the cloud returned an instance id",
            Self::RegistrationTimedOut => "boot timed out before the agent registered",
            Self::HeartbeatLost => "agent heartbeat lost",
        };
        f.write_str(text)
    }
}
