//! Properties of `decide` over random fleets.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const NOW: Duration = Duration::from_secs(100 * 3600);
const QUEUES: [&str; 2] = ["gpu", "cpu"];
const RESOURCES: [&str; 3] = ["r0", "r1", "r2"];
const OFFERINGS: [&str; 2] = ["o0", "o1"];

/// A random fleet with owned names, from which each test borrows a `Snapshot`.
#[derive(Debug, Clone)]
struct Fleet {
    config: PolicyConfig,
    waiting: Vec<u32>,
    instances: Vec<OwnedInstance>,
    backed_off: Vec<String>,
    requests: Vec<usize>,
    launches_this_tick: u32,
}

#[derive(Debug, Clone)]
struct OwnedInstance {
    id: String,
    queue: String,
    resource: String,
    offering: String,
    state: InstanceState,
    minutes_in_state: u64,
    hourly_price_usd: f64,
}

fn offering_id(queue: &str, resource: &str, offering: &str) -> String {
    format!("{queue}/{resource}/{offering}")
}

fn state() -> impl Strategy<Value = InstanceState> {
    prop_oneof![
        Just(InstanceState::Requested),
        Just(InstanceState::Launching),
        Just(InstanceState::Booting),
        Just(InstanceState::Idle),
        Just(InstanceState::Busy),
        Just(InstanceState::Draining),
        Just(InstanceState::Terminating),
    ]
}

fn queue_config(name: &'static str) -> impl Strategy<Value = QueueConfig> {
    let resource = (0u32..8, prop::collection::vec(0.1f64..4.0, 1..=2));
    (
        prop::collection::vec(resource, 1..=3),
        0u32..20,
        0u32..3,
        0u32..3,
    )
        .prop_map(
            move |(resources, max_instances, min_instances, min_idle)| QueueConfig {
                name: name.to_string(),
                resources: resources
                    .into_iter()
                    .enumerate()
                    .map(|(r, (max_instances, prices))| ResourceConfig {
                        name: RESOURCES[r].to_string(),
                        max_instances,
                        offerings: prices
                            .into_iter()
                            .enumerate()
                            .map(|(o, hourly_price_usd)| OfferingConfig {
                                id: offering_id(name, RESOURCES[r], OFFERINGS[o]),
                                hourly_price_usd,
                            })
                            .collect(),
                    })
                    .collect(),
                max_instances,
                min_instances,
                min_idle,
            },
        )
}

fn policy_config() -> impl Strategy<Value = PolicyConfig> {
    (
        queue_config(QUEUES[0]),
        prop::option::of(queue_config(QUEUES[1])),
        0u32..30,
        prop::option::of(0.0f64..40.0),
        0u32..15,
    )
        .prop_map(
            |(first, second, cluster_max_instances, hourly_budget_usd, max_launches_per_tick)| {
                PolicyConfig {
                    queues: std::iter::once(first).chain(second).collect(),
                    cluster_max_instances,
                    hourly_budget_usd,
                    max_launches_per_tick,
                    max_idle: Duration::from_secs(15 * 60),
                    timeouts: Timeouts::default(),
                    backoff: BackoffSchedule::default(),
                }
            },
        )
}

fn fleet() -> impl Strategy<Value = Fleet> {
    policy_config().prop_flat_map(|config| {
        let offerings: Vec<(String, String, String, f64)> = config
            .queues
            .iter()
            .flat_map(|queue| {
                queue.resources.iter().flat_map(move |resource| {
                    resource.offerings.iter().map(move |offering| {
                        (
                            queue.name.clone(),
                            resource.name.clone(),
                            offering.id.clone(),
                            offering.hourly_price_usd,
                        )
                    })
                })
            })
            .collect();
        let ids: Vec<String> = offerings.iter().map(|(_, _, id, _)| id.clone()).collect();
        let instance = (prop::sample::select(offerings), state(), 0u64..30);
        (
            Just(config.clone()),
            prop::collection::vec(0u32..25, config.queues.len()),
            prop::collection::vec(instance, 0..30),
            prop::sample::subsequence(ids.clone(), 0..=ids.len()),
            prop::collection::vec(0usize..30, 0..6),
            0u32..5,
        )
            .prop_map(
                |(config, waiting, instances, backed_off, requests, launches_this_tick)| Fleet {
                    config,
                    waiting,
                    instances: instances
                        .into_iter()
                        .enumerate()
                        .map(
                            |(n, ((queue, resource, offering, price), state, minutes_in_state))| {
                                OwnedInstance {
                                    id: format!("i-{n}"),
                                    queue,
                                    resource,
                                    offering,
                                    state,
                                    minutes_in_state,
                                    hourly_price_usd: price,
                                }
                            },
                        )
                        .collect(),
                    backed_off,
                    requests,
                    launches_this_tick,
                },
            )
    })
}

impl Fleet {
    fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            now: NOW,
            queues: self
                .config
                .queues
                .iter()
                .zip(&self.waiting)
                .map(|(queue, &waiting)| QueueView {
                    name: &queue.name,
                    waiting,
                })
                .collect(),
            instances: self
                .instances
                .iter()
                .map(|instance| InstanceView {
                    id: &instance.id,
                    queue: &instance.queue,
                    resource: &instance.resource,
                    offering: &instance.offering,
                    state: instance.state,
                    state_since: NOW - Duration::from_secs(60 * instance.minutes_in_state),
                    // Heartbeats lag by up to three minutes, so some registered instances time out.
                    last_heartbeat: Some(NOW - Duration::from_secs(6 * instance.minutes_in_state)),
                    hourly_price_usd: instance.hourly_price_usd,
                })
                .collect(),
            backoffs: self
                .backed_off
                .iter()
                .map(|offering| OfferingBackoff {
                    offering: offering.clone(),
                    failures: 1,
                    until: NOW + Duration::from_secs(60),
                })
                .collect(),
            termination_requests: self
                .requests
                .iter()
                .filter_map(|&n| self.instances.get(n).map(|instance| instance.id.as_str()))
                .collect(),
            launches_this_tick: self.launches_this_tick,
        }
    }
}

/// Returns launched instances per queue.
fn launched_per_queue(actions: &[Action]) -> HashMap<String, u32> {
    let mut launched = HashMap::new();
    for action in actions {
        if let Action::Launch { queue, count, .. } = action {
            *launched.entry(queue.clone()).or_default() += count;
        }
    }
    launched
}

fn price_of(config: &PolicyConfig, offering: &str) -> f64 {
    config
        .queues
        .iter()
        .flat_map(|queue| &queue.resources)
        .flat_map(|resource| &resource.offerings)
        .find(|candidate| candidate.id == offering)
        .map(|candidate| candidate.hourly_price_usd)
        .expect("launch names a configured offering")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn launches_never_exceed_a_limit(fleet in fleet()) {
        let snapshot = fleet.snapshot();
        let actions = decide(&fleet.config, &snapshot);

        let mut per_resource: HashMap<(String, String), u32> = HashMap::new();
        let mut per_queue: HashMap<String, u32> = HashMap::new();
        for instance in &fleet.instances {
            *per_resource.entry((instance.queue.clone(), instance.resource.clone())).or_default() += 1;
            *per_queue.entry(instance.queue.clone()).or_default() += 1;
        }
        let before_resource = per_resource.clone();
        let before_queue = per_queue.clone();
        let before_cluster = fleet.instances.len() as u32;
        let before_spend = snapshot.hourly_spend_usd();

        let mut cluster = before_cluster;
        let mut spend = before_spend;
        let mut launched = 0;
        for action in &actions {
            if let Action::Launch { queue, resource, offering, count } = action {
                prop_assert!(*count > 0, "empty launch {action:?}");
                prop_assert!(!snapshot.is_backed_off(offering), "launch on backed-off {offering}");
                *per_resource.entry((queue.clone(), resource.clone())).or_default() += count;
                *per_queue.entry(queue.clone()).or_default() += count;
                cluster += count;
                spend += f64::from(*count) * price_of(&fleet.config, offering);
                launched += count;
            }
        }

        for queue in &fleet.config.queues {
            for resource in &queue.resources {
                let key = (queue.name.clone(), resource.name.clone());
                let after = per_resource.get(&key).copied().unwrap_or(0);
                let before = before_resource.get(&key).copied().unwrap_or(0);
                prop_assert!(after <= resource.max_instances.max(before), "resource {key:?}: {after} > {}", resource.max_instances);
            }
            let after = per_queue.get(&queue.name).copied().unwrap_or(0);
            let before = before_queue.get(&queue.name).copied().unwrap_or(0);
            prop_assert!(after <= queue.max_instances.max(before), "queue {}: {after} > {}", queue.name, queue.max_instances);
        }
        prop_assert!(cluster <= fleet.config.cluster_max_instances.max(before_cluster));
        if let Some(budget) = fleet.config.hourly_budget_usd {
            prop_assert!(spend <= budget.max(before_spend) + 1e-6, "spend {spend} > budget {budget}");
        }
        prop_assert!(
            launched <= fleet.config.max_launches_per_tick.saturating_sub(fleet.launches_this_tick),
            "{launched} launches over the tick limit"
        );
    }

    #[test]
    fn nothing_launched_when_supply_covers_demand(fleet in fleet()) {
        let snapshot = fleet.snapshot();
        let actions = decide(&fleet.config, &snapshot);
        let launched = launched_per_queue(&actions);

        for (queue, &waiting) in fleet.config.queues.iter().zip(&fleet.waiting) {
            let mut supply = 0;
            let mut staying = 0;
            for instance in snapshot.instances.iter().filter(|instance| instance.queue == queue.name) {
                if fleet.config.timeouts.check(instance, NOW).is_some() {
                    continue;
                }
                if !matches!(instance.state, InstanceState::Draining | InstanceState::Terminating) {
                    staying += 1;
                }
                if matches!(
                    instance.state,
                    InstanceState::Idle | InstanceState::Requested | InstanceState::Launching | InstanceState::Booting
                ) {
                    supply += 1;
                }
            }
            let covered = supply >= waiting + queue.min_idle && staying >= queue.min_instances;
            if covered {
                prop_assert_eq!(launched.get(&queue.name).copied().unwrap_or(0), 0, "queue {} is covered", queue.name);
            }
        }
    }

    #[test]
    fn busy_instance_never_granted(fleet in fleet()) {
        let snapshot = fleet.snapshot();
        let states: HashMap<&str, InstanceState> =
            snapshot.instances.iter().map(|instance| (instance.id, instance.state)).collect();
        for action in decide(&fleet.config, &snapshot) {
            if let Action::Grant { instance } = &action {
                prop_assert_eq!(states.get(instance.as_str()).copied(), Some(InstanceState::Idle));
            }
        }
    }

    #[test]
    fn launches_never_decrease_when_demand_grows(fleet in fleet(), queue in 0usize..2, extra in 1u32..20) {
        let queue = queue % fleet.config.queues.len();
        let name = fleet.config.queues[queue].name.clone();
        let before = launched_per_queue(&decide(&fleet.config, &fleet.snapshot()));

        let mut busier = fleet.clone();
        busier.waiting[queue] += extra;
        let after = launched_per_queue(&decide(&busier.config, &busier.snapshot()));

        let before_queue = before.get(&name).copied().unwrap_or(0);
        let after_queue = after.get(&name).copied().unwrap_or(0);
        prop_assert!(after_queue >= before_queue, "queue {name}: {after_queue} < {before_queue}");
        if fleet.config.queues.len() == 1 {
            prop_assert!(after.values().sum::<u32>() >= before.values().sum::<u32>());
        }
    }
}
