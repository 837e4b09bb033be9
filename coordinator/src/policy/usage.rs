//! Counts of instances against limits and as supply, built once per decision.

use std::collections::{HashMap, HashSet};

use crate::policy::snapshot::{InstanceState, Snapshot};

/// Instances of one queue, by what they mean for its shortfall.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueUsage {
    /// Every non-terminated instance, which is what `max_instances` limits.
    pub total: u32,
    /// Idle instances that stay, so they can take a task now.
    pub idle: u32,
    /// Requested, launching or booting instances that stay, so they will take a task soon.
    pub starting: u32,
    /// Instances that are neither leaving nor released, which is what `min_instances` keeps.
    pub staying: u32,
}

/// Every count a decision checks, updated as the decision grants terminations and adds launches.
#[derive(Debug, Clone, Default)]
pub(crate) struct Usage<'a> {
    /// Non-terminated instances per (queue, resource).
    pub resources: HashMap<(&'a str, &'a str), u32>,
    pub queues: HashMap<&'a str, QueueUsage>,
    /// Non-terminated instances in the cluster.
    pub cluster: u32,
    /// Sum of the hourly prices of non-terminated instances.
    pub hourly_spend_usd: f64,
    /// Instances launched in this tick.
    pub launches: u32,
}

impl<'a> Usage<'a> {
    /// Counts the snapshot's instances. Instances in `released` (timed out or granted in this decision) still
    /// count against every max until they are terminated, but no longer as supply.
    pub fn count(snapshot: &Snapshot<'a>, released: &HashSet<&str>) -> Self {
        let mut usage = Usage {
            launches: snapshot.launches_this_tick,
            ..Usage::default()
        };

        for instance in &snapshot.instances {
            usage.cluster += 1;
            usage.hourly_spend_usd += instance.hourly_price_usd;
            *usage
                .resources
                .entry((instance.queue, instance.resource))
                .or_default() += 1;

            let queue = usage.queues.entry(instance.queue).or_default();
            queue.total += 1;
            if released.contains(instance.id) || instance.state.is_leaving() {
                continue;
            }
            queue.staying += 1;
            if instance.state == InstanceState::Idle {
                queue.idle += 1;
            } else if instance.state.is_starting() {
                queue.starting += 1;
            }
        }
        usage
    }

    /// Returns the counts of one queue, zero for a queue without instances.
    pub fn queue(&self, name: &str) -> QueueUsage {
        self.queues.get(name).copied().unwrap_or_default()
    }

    /// Returns the non-terminated instances of one resource of one queue.
    pub fn resource(&self, queue: &str, resource: &str) -> u32 {
        self.resources.get(&(queue, resource)).copied().unwrap_or(0)
    }

    /// Records that an idle instance of `queue` was granted termination.
    pub fn release_idle(&mut self, queue: &'a str) {
        let usage = self.queues.entry(queue).or_default();
        usage.idle = usage.idle.saturating_sub(1);
        usage.staying = usage.staying.saturating_sub(1);
    }

    /// Records `count` new instances of `resource` for `queue` at `hourly_price_usd` each.
    pub fn add_launch(
        &mut self,
        queue: &'a str,
        resource: &'a str,
        count: u32,
        hourly_price_usd: f64,
    ) {
        *self.resources.entry((queue, resource)).or_default() += count;
        let usage = self.queues.entry(queue).or_default();
        usage.total += count;
        usage.starting += count;
        usage.staying += count;
        self.cluster += count;
        self.hourly_spend_usd += f64::from(count) * hourly_price_usd;
        self.launches += count;
    }
}
