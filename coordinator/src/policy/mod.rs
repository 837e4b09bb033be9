//! The scaling policy: pure decisions from a snapshot of the fleet and the time.
//!
//! [`decide`] reads no clock and does no I/O, so the queue actors, the unit tests and the simulator all run the
//! same code. Each tick it:
//! 1. terminates instances that missed a lifecycle deadline ([`Timeouts`]);
//! 2. grants or refuses the termination requests of idle agents;
//! 3. launches what each queue still lacks, over its resources in priority order, within the resource, queue and
//!    cluster maximums, the hourly budget and the per-tick launch limit, skipping offerings in backoff.
//!
//! After a launch fails with a capacity error, the caller records an [`OfferingBackoff`], adds the instances
//! already launched to [`Snapshot::launches_this_tick`] and calls [`decide`] again in the same tick, which moves
//! the shortfall to the next offering.

mod action;
mod allocate;
mod backoff;
mod config;
mod grant;
mod snapshot;
mod timeouts;
mod usage;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;

use std::collections::HashSet;

pub use action::{Action, HoldReason, RefuseReason, TimeoutReason};
pub use backoff::{BackoffSchedule, OfferingBackoff};
pub use config::{OfferingConfig, PolicyConfig, QueueConfig, ResourceConfig};
pub use snapshot::{InstanceState, InstanceView, QueueView, Snapshot};
pub use timeouts::Timeouts;

use usage::Usage;

/// Decides the actions for one tick: terminations for missed deadlines, then grants and refusals, then launches.
pub fn decide(config: &PolicyConfig, snapshot: &Snapshot<'_>) -> Vec<Action> {
    let mut actions = Vec::new();

    let mut released: HashSet<&str> = HashSet::new();
    for instance in &snapshot.instances {
        if let Some(reason) = config.timeouts.check(instance, snapshot.now) {
            released.insert(instance.id);
            actions.push(Action::Terminate {
                instance: instance.id.to_string(),
                reason,
            });
        }
    }

    let mut usage = Usage::count(snapshot, &released);
    actions.extend(grant::decide_requests(
        config, snapshot, &released, &mut usage,
    ));

    actions.extend(allocate::allocate(config, snapshot, &mut usage));
    actions
}
