//! Limits and timers that the scaling policy applies.

use std::time::Duration;

use crate::policy::backoff::BackoffSchedule;
use crate::policy::timeouts::Timeouts;

/// Policy settings for the whole cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// Queues in the order their shortfall is served when cluster-wide limits are tight.
    pub queues: Vec<QueueConfig>,
    /// Maximum of non-terminated instances over all queues.
    pub cluster_max_instances: u32,
    /// Maximum sum of the hourly prices of non-terminated instances, in USD per hour; `None` means no budget.
    pub hourly_budget_usd: Option<f64>,
    /// Maximum number of instances launched in one tick, so a burst of tasks cannot turn into an API storm.
    pub max_launches_per_tick: u32,
    /// How long an agent stays idle before it requests termination.
    pub max_idle: Duration,
    pub timeouts: Timeouts,
    pub backoff: BackoffSchedule,
}

/// Policy settings for one queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub name: String,
    /// Resources in priority order: the shortfall goes to the first one with room, the rest to the next.
    pub resources: Vec<ResourceConfig>,
    /// Maximum of non-terminated instances serving this queue.
    pub max_instances: u32,
    /// Instances kept even when the queue is empty.
    pub min_instances: u32,
    /// Idle instances kept ready beyond the waiting tasks, so the next task starts without a boot.
    pub min_idle: u32,
}

/// One kind of machine a queue can use (for example "gpu-spot").
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceConfig {
    pub name: String,
    /// Maximum of non-terminated instances of this resource.
    pub max_instances: u32,
    /// Offerings (instance type x zone x market) in the order they are tried.
    pub offerings: Vec<OfferingConfig>,
}

/// One place a resource can be launched, with its price.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferingConfig {
    /// Identifier such as `g5.xlarge/us-east-1a/spot`, also the key of its backoff.
    pub id: String,
    pub hourly_price_usd: f64,
}

impl PolicyConfig {
    /// Looks up a queue by name.
    pub fn queue(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|queue| queue.name == name)
    }
}

impl QueueConfig {
    /// Looks up a resource of this queue by name.
    pub fn resource(&self, name: &str) -> Option<&ResourceConfig> {
        self.resources.iter().find(|resource| resource.name == name)
    }
}
