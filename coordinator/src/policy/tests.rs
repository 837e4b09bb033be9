//! Scenario tests of `decide`: one snapshot in, the exact actions out.

use std::time::Duration;

use super::*;

const MINUTE: Duration = Duration::from_secs(60);
const NOW: Duration = Duration::from_secs(10 * 3600);

/// Builds one queue "gpu" with the given (resource, max_instances) in priority order. Each resource has one offering
/// named `<resource>/offering` at 1 USD per hour, and no other limit binds.
fn config(resources: &[(&str, u32)]) -> PolicyConfig {
    PolicyConfig {
        queues: vec![QueueConfig {
            name: "gpu".into(),
            resources: resources
                .iter()
                .map(|(name, max_instances)| ResourceConfig {
                    name: (*name).into(),
                    max_instances: *max_instances,
                    offerings: vec![OfferingConfig {
                        id: format!("{name}/offering"),
                        hourly_price_usd: 1.0,
                    }],
                })
                .collect(),
            max_instances: 1000,
            min_instances: 0,
            min_idle: 0,
        }],
        cluster_max_instances: 1000,
        hourly_budget_usd: None,
        max_launches_per_tick: 1000,
        max_idle: 15 * MINUTE,
        timeouts: Timeouts::default(),
        backoff: BackoffSchedule::default(),
    }
}

/// Builds an instance of queue "gpu" that entered `state` a minute ago and has a fresh heartbeat.
fn instance(
    id: &'static str,
    resource: &'static str,
    state: InstanceState,
) -> InstanceView<'static> {
    let offering = match resource {
        "a" => "a/offering",
        "b" => "b/offering",
        _ => "other/offering",
    };
    InstanceView {
        id,
        queue: "gpu",
        resource,
        offering,
        state,
        state_since: NOW - MINUTE,
        last_heartbeat: Some(NOW),
        hourly_price_usd: 1.0,
    }
}

fn snapshot(waiting: u32, instances: Vec<InstanceView<'static>>) -> Snapshot<'static> {
    Snapshot {
        now: NOW,
        queues: vec![QueueView {
            name: "gpu",
            waiting,
        }],
        instances,
        ..Snapshot::default()
    }
}

/// Returns the (resource, count) of every launch, in order.
fn launches(actions: &[Action]) -> Vec<(String, u32)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Launch {
                resource, count, ..
            } => Some((resource.clone(), *count)),
            _ => None,
        })
        .collect()
}

fn holds(actions: &[Action]) -> Vec<(u32, HoldReason)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Hold {
                missing, reason, ..
            } => Some((*missing, *reason)),
            _ => None,
        })
        .collect()
}

fn launch(resource: &str, count: u32) -> (String, u32) {
    (resource.to_string(), count)
}

#[test]
fn shortfall_split_in_priority_order() {
    let actions = decide(&config(&[("a", 3), ("b", 5)]), &snapshot(5, vec![]));
    assert_eq!(launches(&actions), vec![launch("a", 3), launch("b", 2)]);
    assert_eq!(holds(&actions), vec![]);
}

/// (case, waiting tasks, instances, expected launches)
type SupplyCase = (
    &'static str,
    u32,
    Vec<InstanceView<'static>>,
    Vec<(String, u32)>,
);

#[test]
fn supply_and_max_by_state() {
    use InstanceState::*;

    let cases: Vec<SupplyCase> = vec![
        ("nothing waits", 0, vec![], vec![]),
        (
            "requested, launching and booting instances are supply",
            5,
            vec![
                instance("i-1", "a", Requested),
                instance("i-2", "a", Launching),
                instance("i-3", "b", Booting),
            ],
            vec![launch("a", 1), launch("b", 1)],
        ),
        (
            "idle instances are supply",
            2,
            vec![instance("i-1", "a", Idle), instance("i-2", "a", Idle)],
            vec![],
        ),
        (
            "busy instances are no supply but count against the max",
            3,
            vec![instance("i-1", "a", Busy), instance("i-2", "a", Busy)],
            vec![launch("a", 1), launch("b", 2)],
        ),
        (
            "booting instances count against the max",
            4,
            vec![
                instance("i-1", "a", Booting),
                instance("i-2", "a", Booting),
                instance("i-3", "a", Booting),
            ],
            vec![launch("b", 1)],
        ),
        (
            "draining and terminating instances count against the max but are no supply",
            3,
            vec![
                instance("i-1", "a", Draining),
                instance("i-2", "a", Terminating),
            ],
            vec![launch("a", 1), launch("b", 2)],
        ),
    ];

    for (case, waiting, instances, expected) in cases {
        let actions = decide(
            &config(&[("a", 3), ("b", 5)]),
            &snapshot(waiting, instances),
        );
        assert_eq!(launches(&actions), expected, "{case}");
    }
}

#[test]
fn resource_max_holds_the_rest() {
    let actions = decide(&config(&[("a", 3), ("b", 5)]), &snapshot(10, vec![]));
    assert_eq!(launches(&actions), vec![launch("a", 3), launch("b", 5)]);
    assert_eq!(holds(&actions), vec![(2, HoldReason::ResourceMax)]);
}

#[test]
fn budget_stops_launches_with_reason() {
    let mut config = config(&[("a", 10)]);
    config.hourly_budget_usd = Some(3.0);
    let actions = decide(
        &config,
        &snapshot(5, vec![instance("i-1", "a", InstanceState::Busy)]),
    );
    assert_eq!(launches(&actions), vec![launch("a", 2)]);
    assert_eq!(holds(&actions), vec![(3, HoldReason::HourlyBudget)]);
}

#[test]
fn queue_cluster_tick_limits_hold() {
    let base = config(&[("a", 10)]);

    let mut queue_max = base.clone();
    queue_max.queues[0].max_instances = 4;
    let mut cluster_max = base.clone();
    cluster_max.cluster_max_instances = 3;
    let mut tick_limit = base.clone();
    tick_limit.max_launches_per_tick = 2;

    let cases = [
        (queue_max, 3, HoldReason::QueueMax),
        (cluster_max, 2, HoldReason::ClusterMax),
        (tick_limit, 2, HoldReason::TickLaunchLimit),
    ];
    for (config, launched, reason) in cases {
        let actions = decide(
            &config,
            &snapshot(5, vec![instance("i-1", "a", InstanceState::Busy)]),
        );
        assert_eq!(
            launches(&actions),
            vec![launch("a", launched)],
            "{reason:?}"
        );
        assert_eq!(holds(&actions), vec![(5 - launched, reason)], "{reason:?}");
    }
}

#[test]
fn earlier_launches_count_against_tick_limit() {
    let mut config = config(&[("a", 10)]);
    config.max_launches_per_tick = 4;
    let mut snapshot = snapshot(5, vec![]);
    snapshot.launches_this_tick = 3;
    let actions = decide(&config, &snapshot);
    assert_eq!(launches(&actions), vec![launch("a", 1)]);
    assert_eq!(holds(&actions), vec![(4, HoldReason::TickLaunchLimit)]);
}

#[test]
fn warm_pool_launched_and_kept() {
    let mut config = config(&[("a", 10)]);
    config.queues[0].min_idle = 2;

    let empty = decide(&config, &snapshot(0, vec![]));
    assert_eq!(launches(&empty), vec![launch("a", 2)]);

    let with_tasks = decide(&config, &snapshot(3, vec![]));
    assert_eq!(launches(&with_tasks), vec![launch("a", 5)]);

    let mut warm = snapshot(
        0,
        vec![
            instance("i-1", "a", InstanceState::Idle),
            instance("i-2", "a", InstanceState::Idle),
        ],
    );
    warm.termination_requests = vec!["i-1", "i-2"];
    let actions = decide(&config, &warm);
    assert_eq!(
        actions,
        vec![
            Action::Refuse {
                instance: "i-1".into(),
                reason: RefuseReason::WarmPool
            },
            Action::Refuse {
                instance: "i-2".into(),
                reason: RefuseReason::WarmPool
            },
        ]
    );
}

#[test]
fn warm_pool_grants_only_the_surplus() {
    let mut config = config(&[("a", 10)]);
    config.queues[0].min_idle = 1;
    let mut warm = snapshot(
        0,
        vec![
            instance("i-1", "a", InstanceState::Idle),
            instance("i-2", "a", InstanceState::Idle),
        ],
    );
    warm.termination_requests = vec!["i-1", "i-2"];
    let actions = decide(&config, &warm);
    assert_eq!(
        actions,
        vec![
            Action::Grant {
                instance: "i-1".into()
            },
            Action::Refuse {
                instance: "i-2".into(),
                reason: RefuseReason::WarmPool
            },
        ]
    );
}

#[test]
fn min_instances_launched_and_kept() {
    let mut config = config(&[("a", 10)]);
    config.queues[0].min_instances = 2;

    let actions = decide(
        &config,
        &snapshot(0, vec![instance("i-1", "a", InstanceState::Busy)]),
    );
    assert_eq!(launches(&actions), vec![launch("a", 1)]);

    let mut idle = snapshot(
        0,
        vec![
            instance("i-1", "a", InstanceState::Idle),
            instance("i-2", "a", InstanceState::Busy),
        ],
    );
    idle.termination_requests = vec!["i-1"];
    let actions = decide(&config, &idle);
    assert_eq!(
        actions,
        vec![Action::Refuse {
            instance: "i-1".into(),
            reason: RefuseReason::MinInstances
        }]
    );
}

#[test]
fn capacity_backoff_moves_shortfall() {
    let config = config(&[("a", 10), ("b", 10)]);
    let mut snapshot = snapshot(5, vec![]);
    snapshot.backoffs = vec![OfferingBackoff {
        offering: "a/offering".into(),
        failures: 1,
        until: NOW + 3 * MINUTE,
    }];
    let actions = decide(&config, &snapshot);
    assert_eq!(launches(&actions), vec![launch("b", 5)]);
}

#[test]
fn rerun_after_capacity_error_uses_fallback() {
    let config = config(&[("a", 10), ("b", 10)]);
    let first = decide(&config, &snapshot(5, vec![]));
    assert_eq!(launches(&first), vec![launch("a", 5)]);

    // The launch of 5 on a failed: nothing was launched, a is backed off, and the policy runs again.
    let mut rerun = snapshot(5, vec![]);
    rerun.backoffs = vec![OfferingBackoff::after_failure(
        "a/offering",
        None,
        NOW,
        &config.backoff,
    )];
    let second = decide(&config, &rerun);
    assert_eq!(launches(&second), vec![launch("b", 5)]);
}

#[test]
fn expired_backoff_is_ignored() {
    let config = config(&[("a", 10), ("b", 10)]);
    let mut snapshot = snapshot(2, vec![]);
    snapshot.backoffs = vec![OfferingBackoff {
        offering: "a/offering".into(),
        failures: 3,
        until: NOW,
    }];
    assert_eq!(launches(&decide(&config, &snapshot)), vec![launch("a", 2)]);
}

#[test]
fn all_offerings_backed_off_holds() {
    let config = config(&[("a", 10)]);
    let mut snapshot = snapshot(2, vec![]);
    snapshot.backoffs = vec![OfferingBackoff {
        offering: "a/offering".into(),
        failures: 1,
        until: NOW + MINUTE,
    }];
    let actions = decide(&config, &snapshot);
    assert_eq!(launches(&actions), vec![]);
    assert_eq!(
        holds(&actions),
        vec![(2, HoldReason::AllOfferingsBackedOff)]
    );
}

#[test]
fn termination_refused_while_tasks_wait() {
    let mut snapshot = snapshot(2, vec![instance("i-1", "a", InstanceState::Idle)]);
    snapshot.termination_requests = vec!["i-1"];
    let actions = decide(&config(&[("a", 10)]), &snapshot);
    assert_eq!(
        actions[0],
        Action::Refuse {
            instance: "i-1".into(),
            reason: RefuseReason::TasksWaiting(2)
        }
    );
    // The idle instance stays supply: one of the two tasks still needs a launch.
    assert_eq!(launches(&actions), vec![launch("a", 1)]);
}

#[test]
fn termination_decisions_by_state() {
    use InstanceState::*;

    let cases = [
        (
            Idle,
            Action::Grant {
                instance: "i-1".into(),
            },
        ),
        (
            Busy,
            Action::Refuse {
                instance: "i-1".into(),
                reason: RefuseReason::NotIdle(Busy),
            },
        ),
        (
            Booting,
            Action::Refuse {
                instance: "i-1".into(),
                reason: RefuseReason::NotIdle(Booting),
            },
        ),
        (
            Draining,
            Action::Refuse {
                instance: "i-1".into(),
                reason: RefuseReason::NotIdle(Draining),
            },
        ),
    ];
    for (state, expected) in cases {
        let mut snapshot = snapshot(0, vec![instance("i-1", "a", state)]);
        snapshot.termination_requests = vec!["i-1"];
        assert_eq!(
            decide(&config(&[("a", 10)]), &snapshot),
            vec![expected],
            "{state:?}"
        );
    }
}

#[test]
fn termination_of_unknown_instance_refused() {
    let mut snapshot = snapshot(0, vec![]);
    snapshot.termination_requests = vec!["i-404"];
    assert_eq!(
        decide(&config(&[("a", 10)]), &snapshot),
        vec![Action::Refuse {
            instance: "i-404".into(),
            reason: RefuseReason::UnknownInstance
        }]
    );
}

#[test]
fn timed_out_boot_replaced_at_once() {
    let mut stuck = instance("i-1", "a", InstanceState::Booting);
    stuck.state_since = NOW - 16 * MINUTE;
    let actions = decide(&config(&[("a", 10)]), &snapshot(1, vec![stuck]));
    assert_eq!(
        actions[0],
        Action::Terminate {
            instance: "i-1".into(),
            reason: TimeoutReason::RegistrationTimedOut
        }
    );
    assert_eq!(launches(&actions), vec![launch("a", 1)]);
}

#[test]
fn timed_out_instance_counts_against_max() {
    let mut stuck = instance("i-1", "a", InstanceState::Booting);
    stuck.state_since = NOW - 16 * MINUTE;
    let actions = decide(&config(&[("a", 1), ("b", 10)]), &snapshot(1, vec![stuck]));
    assert_eq!(launches(&actions), vec![launch("b", 1)]);
}

#[test]
fn queues_share_cluster_max_in_order() {
    let mut config = config(&[("a", 10)]);
    let mut second = config.queues[0].clone();
    second.name = "cpu".into();
    config.queues.push(second);
    config.cluster_max_instances = 4;

    let mut snapshot = snapshot(3, vec![]);
    snapshot.queues.push(QueueView {
        name: "cpu",
        waiting: 3,
    });
    let actions = decide(&config, &snapshot);
    assert_eq!(
        actions,
        vec![
            Action::Launch {
                queue: "gpu".into(),
                resource: "a".into(),
                offering: "a/offering".into(),
                count: 3
            },
            Action::Launch {
                queue: "cpu".into(),
                resource: "a".into(),
                offering: "a/offering".into(),
                count: 1
            },
            Action::Hold {
                queue: "cpu".into(),
                missing: 2,
                reason: HoldReason::ClusterMax
            },
        ]
    );
}
