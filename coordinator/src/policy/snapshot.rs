//! The state of the fleet at one moment, which the policy decides on.
//!
//! The snapshot borrows its names from the caller's records, so building one per tick costs no string copies.

use std::time::Duration;

use crate::policy::backoff::OfferingBackoff;

/// The state of every queue and non-terminated instance at `now`.
///
/// All times are offsets from one epoch that the caller picks, such as wall-clock time in the coordinator or zero in
/// the simulator. The policy only compares them with each other.
#[derive(Debug, Clone, Default)]
pub struct Snapshot<'a> {
    pub now: Duration,
    /// Waiting tasks per queue; a configured queue that is missing here has none.
    pub queues: Vec<QueueView<'a>>,
    /// Every instance that is not terminated yet. Terminated instances must be left out.
    pub instances: Vec<InstanceView<'a>>,
    /// Offerings that failed with capacity errors; expired entries are ignored.
    pub backoffs: Vec<OfferingBackoff>,
    /// Ids of idle instances whose agent asked to terminate.
    pub termination_requests: Vec<&'a str>,
    /// Instances already launched in this tick, counted against the per-tick launch limit when the policy runs
    /// again after a capacity error.
    pub launches_this_tick: u32,
}

/// One queue's backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueView<'a> {
    pub name: &'a str,
    pub waiting: u32,
}

/// One non-terminated instance as the registry records it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceView<'a> {
    pub id: &'a str,
    pub queue: &'a str,
    pub resource: &'a str,
    pub offering: &'a str,
    pub state: InstanceState,
    /// When the instance entered `state`.
    pub state_since: Duration,
    /// Last heartbeat of its agent; `None` before the agent registered.
    pub last_heartbeat: Option<Duration>,
    pub hourly_price_usd: f64,
}

/// Lifecycle of an instance before it is terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// The launch intent is stored, the cloud call not made yet.
    Requested,
    /// The cloud call is made, the cloud id not known yet.
    Launching,
    /// The cloud id is known, the agent has not registered yet.
    Booting,
    Idle,
    Busy,
    /// Termination granted; the agent is closing its gate.
    Draining,
    Terminating,
}

impl InstanceState {
    /// Tells whether the instance will be able to take a task without a new launch.
    pub fn is_starting(self) -> bool {
        matches!(self, Self::Requested | Self::Launching | Self::Booting)
    }

    /// Tells whether the instance is on its way out and no longer counts towards `min_instances`.
    pub fn is_leaving(self) -> bool {
        matches!(self, Self::Draining | Self::Terminating)
    }
}

impl<'a> Snapshot<'a> {
    /// Returns the number of waiting tasks of a queue.
    pub fn waiting(&self, queue: &str) -> u32 {
        self.queues
            .iter()
            .filter(|view| view.name == queue)
            .map(|view| view.waiting)
            .sum()
    }

    /// Returns the live hourly spend: the sum of the hourly prices of all non-terminated instances.
    pub fn hourly_spend_usd(&self) -> f64 {
        self.instances
            .iter()
            .map(|instance| instance.hourly_price_usd)
            .sum()
    }

    /// Tells whether launches on `offering` are suspended at `now`.
    pub fn is_backed_off(&self, offering: &str) -> bool {
        self.backoffs
            .iter()
            .any(|backoff| backoff.offering == offering && backoff.is_active(self.now))
    }
}
