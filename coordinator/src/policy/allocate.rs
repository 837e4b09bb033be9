//! Launches that cover each queue's shortfall within every limit.

use crate::policy::action::{Action, HoldReason};
use crate::policy::config::{OfferingConfig, PolicyConfig, QueueConfig, ResourceConfig};
use crate::policy::snapshot::Snapshot;
use crate::policy::usage::Usage;

/// Returns how many instances `queue` lacks.
///
/// Demand is the waiting tasks plus the `min_idle` warm pool; supply is the idle instances plus those requested,
/// launching or booting. `min_instances` can raise the shortfall further.
pub(crate) fn shortfall(queue: &QueueConfig, waiting: u32, usage: &Usage<'_>) -> u32 {
    let counts = usage.queue(&queue.name);
    let demand = waiting.saturating_add(queue.min_idle);
    let supply = counts.idle + counts.starting;
    let for_demand = demand.saturating_sub(supply);
    let for_minimum = queue.min_instances.saturating_sub(counts.staying);
    for_demand.max(for_minimum)
}

/// Spreads each queue's shortfall over its resources and offerings in priority order and returns the launches,
/// plus a `Hold` with the limit that stopped whatever is still missing.
///
/// Each resource takes only what is still missing after the resources before it, so a queue never gets more
/// instances than its shortfall. Offerings in backoff are skipped, so their share moves to the next offering at
/// once. Queues are served in configuration order, so under a cluster-wide limit the first queues come first.
pub(crate) fn allocate<'a>(
    config: &'a PolicyConfig,
    snapshot: &Snapshot<'_>,
    usage: &mut Usage<'a>,
) -> Vec<Action> {
    let mut actions = Vec::new();

    for queue in &config.queues {
        let mut missing = shortfall(queue, snapshot.waiting(&queue.name), usage);
        if missing == 0 {
            continue;
        }

        let mut stopped_by = None;
        for resource in &queue.resources {
            for offering in &resource.offerings {
                if missing == 0 {
                    break;
                }
                if snapshot.is_backed_off(&offering.id) {
                    stopped_by.get_or_insert(HoldReason::AllOfferingsBackedOff);
                    continue;
                }

                let (room, limit) = room_for(config, queue, resource, offering, usage);
                let count = missing.min(room);
                if count < missing {
                    stopped_by = Some(limit);
                }
                if count == 0 {
                    continue;
                }

                usage.add_launch(
                    &queue.name,
                    &resource.name,
                    count,
                    offering.hourly_price_usd,
                );
                missing -= count;
                actions.push(Action::Launch {
                    queue: queue.name.clone(),
                    resource: resource.name.clone(),
                    offering: offering.id.clone(),
                    count,
                });
            }
        }

        if missing > 0 {
            actions.push(Action::Hold {
                queue: queue.name.clone(),
                missing,
                reason: stopped_by.unwrap_or(HoldReason::NoOffering),
            });
        }
    }
    actions
}

/// Returns how many more instances `offering` may launch now and the limit that sets that number.
fn room_for(
    config: &PolicyConfig,
    queue: &QueueConfig,
    resource: &ResourceConfig,
    offering: &OfferingConfig,
    usage: &Usage<'_>,
) -> (u32, HoldReason) {
    let queue_total = usage.queue(&queue.name).total;
    let limits = [
        (
            resource
                .max_instances
                .saturating_sub(usage.resource(&queue.name, &resource.name)),
            HoldReason::ResourceMax,
        ),
        (
            queue.max_instances.saturating_sub(queue_total),
            HoldReason::QueueMax,
        ),
        (
            config.cluster_max_instances.saturating_sub(usage.cluster),
            HoldReason::ClusterMax,
        ),
        (
            budget_room(config, offering, usage),
            HoldReason::HourlyBudget,
        ),
        (
            config.max_launches_per_tick.saturating_sub(usage.launches),
            HoldReason::TickLaunchLimit,
        ),
    ];
    limits
        .into_iter()
        .min_by_key(|(room, _)| *room)
        .expect("the list of limits is not empty")
}

/// Returns how many instances of `offering` fit in what is left of the hourly budget.
fn budget_room(config: &PolicyConfig, offering: &OfferingConfig, usage: &Usage<'_>) -> u32 {
    let Some(budget) = config.hourly_budget_usd else {
        return u32::MAX;
    };
    if offering.hourly_price_usd <= 0.0 {
        return u32::MAX;
    }
    // The tolerance keeps a budget of exactly N prices from rounding down to N - 1.
    let left = budget - usage.hourly_spend_usd + 1e-9;
    if left <= 0.0 {
        return 0;
    }
    let room = (left / offering.hourly_price_usd).floor();
    if room >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        room as u32
    }
}
