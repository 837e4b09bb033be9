//! Decisions on termination requests of idle agents.

use std::collections::{HashMap, HashSet};

use crate::policy::action::{Action, RefuseReason};
use crate::policy::config::PolicyConfig;
use crate::policy::snapshot::{InstanceState, InstanceView, Snapshot};
use crate::policy::usage::Usage;

/// Grants or refuses each termination request in the order received and updates `usage` for every grant.
///
/// An instance is granted only when it is idle and not needed: its queue has no waiting task, and losing it keeps
/// `min_idle` idle and `min_instances` instances. Requests of instances in `timed_out` get no action, because a
/// `Terminate` for them is already issued.
pub(crate) fn decide_requests<'a>(
    config: &PolicyConfig,
    snapshot: &Snapshot<'a>,
    timed_out: &HashSet<&'a str>,
    usage: &mut Usage<'a>,
) -> Vec<Action> {
    let instances: HashMap<&str, &InstanceView<'a>> = snapshot
        .instances
        .iter()
        .map(|instance| (instance.id, instance))
        .collect();
    let mut actions = Vec::new();
    let mut granted = HashSet::new();

    for &id in &snapshot.termination_requests {
        if timed_out.contains(id) || granted.contains(id) {
            continue;
        }

        let verdict = match instances.get(id) {
            None => Err(RefuseReason::UnknownInstance),
            Some(instance) => check_request(config, snapshot, instance, usage),
        };

        match verdict {
            Ok(queue) => {
                usage.release_idle(queue);
                granted.insert(id);
                actions.push(Action::Grant {
                    instance: id.to_string(),
                });
            }
            Err(reason) => actions.push(Action::Refuse {
                instance: id.to_string(),
                reason,
            }),
        }
    }
    actions
}

/// Returns the instance's queue if it may terminate, else why it must stay.
fn check_request<'a>(
    config: &PolicyConfig,
    snapshot: &Snapshot<'a>,
    instance: &InstanceView<'a>,
    usage: &Usage<'a>,
) -> Result<&'a str, RefuseReason> {
    if instance.state != InstanceState::Idle {
        return Err(RefuseReason::NotIdle(instance.state));
    }

    let waiting = snapshot.waiting(instance.queue);
    if waiting > 0 {
        return Err(RefuseReason::TasksWaiting(waiting));
    }

    // An instance of a queue that is no longer configured serves no queue, so no rule keeps it.
    let Some(queue) = config.queue(instance.queue) else {
        return Ok(instance.queue);
    };
    let counts = usage.queue(instance.queue);
    if counts.idle.saturating_sub(1) < queue.min_idle {
        return Err(RefuseReason::WarmPool);
    }
    if counts.staying.saturating_sub(1) < queue.min_instances {
        return Err(RefuseReason::MinInstances);
    }
    Ok(instance.queue)
}
