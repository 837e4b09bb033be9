//! Behaviour of the fleet policy and the ClearML model in the simulator, on small hand-made traces.

use std::path::PathBuf;

use fleet_tests::sim::{
    ClearmlSettings, CloudConfig, Comparison, FleetSettings, PolicyChoice, Report, Scenario,
    TaskSpec, Trace, TraceOptions, TraceSource, trace,
};

fn burst(tasks: usize, runtime_s: f64) -> Trace {
    Trace {
        name: format!("burst-{tasks}"),
        tasks: vec![
            TaskSpec {
                arrival_s: 0.0,
                runtime_s
            };
            tasks
        ],
    }
}

fn comparison(max_spot: u32, max_on_demand: u32, cloud: CloudConfig) -> Comparison {
    Comparison {
        scenario: Scenario::gpu_queue(max_spot, max_on_demand, 15.0 * 60.0),
        cloud,
        fleet: FleetSettings::default(),
        clearml: ClearmlSettings::default(),
    }
}

fn run(comparison: &Comparison, trace: &Trace) -> (Report, Report) {
    let mut reports = comparison.run(trace, PolicyChoice::Both);
    let clearml = reports.pop().expect("clearml report");
    let fleet = reports.pop().expect("fleet report");
    assert_eq!(fleet.policy, "fleet");
    assert_eq!(clearml.policy, "clearml");
    (fleet, clearml)
}

#[test]
fn clearml_model_overallocates_two_resources() {
    let (fleet, clearml) = run(&comparison(3, 5, CloudConfig::default()), &burst(5, 3600.0));

    // ClearML adds min(5, 3) spot and then min(5, 5) on-demand instances for 5 tasks.
    assert_eq!(clearml.launches, 8);
    assert_eq!(fleet.launches, 5);
    assert_eq!(fleet.tasks_lost, 0);
    assert_eq!(clearml.tasks_lost, 0);
}

#[test]
fn idle_instance_released_after_max_idle() {
    let (fleet, clearml) = run(
        &comparison(10, 10, CloudConfig::default()),
        &burst(1, 600.0),
    );

    assert_eq!(fleet.launches, 1);
    // Boot (about 2 min) + run (10 min) + max idle (15 min) + at most one tick (10 s) + shutdown (30 s).
    let hours = fleet.instance_hours;
    assert!(
        hours > 27.0 / 60.0 && hours < 29.0 / 60.0,
        "fleet billed {hours} h"
    );
    assert!(
        clearml.instance_hours >= fleet.instance_hours,
        "clearml {} h < fleet {hours} h",
        clearml.instance_hours
    );
}

#[test]
fn fleet_requeues_tasks_on_spot_interruption() {
    let cloud = CloudConfig {
        spot_interruptions_per_hour: 1.0,
        ..CloudConfig::default()
    };
    let (fleet, clearml) = run(&comparison(60, 0, cloud), &burst(50, 3600.0));

    assert!(fleet.spot_interruptions > 0);
    assert!(fleet.tasks_requeued > 0);
    assert_eq!(fleet.tasks_lost, 0);
    // A re-enqueued task goes to an idle instance at once or waits for one boot, so even a task interrupted ten
    // times waits well under an hour. A task left in the queue beside an idle instance waited for hours.
    assert!(fleet.max_wait_s < 3600.0, "max wait {} s", fleet.max_wait_s);
    assert!(clearml.spot_interruptions > 0);
    assert!(
        clearml.tasks_lost > 0,
        "an interrupted ClearML worker loses its task"
    );
}

#[test]
fn capacity_errors_move_fleet_to_next_resource() {
    let cloud = CloudConfig {
        capacity_error_rate: 1.0,
        ..CloudConfig::default()
    };
    let (fleet, _) = run(&comparison(20, 20, cloud), &burst(10, 1800.0));

    assert_eq!(fleet.tasks_lost, 0);
    assert!(fleet.capacity_errors >= 1);
    assert_eq!(fleet.launches, 10);
    // Every task starts after one boot, so the fallback happened in the tick of the capacity error.
    assert!(fleet.max_wait_s < 300.0, "max wait {} s", fleet.max_wait_s);
    let on_demand_cost = fleet.instance_hours * 1.006;
    assert!(
        (fleet.cost_usd - on_demand_cost).abs() < 1e-6,
        "only on-demand instances ran"
    );
}

#[test]
fn fleet_replaces_instances_that_never_register() {
    let cloud = CloudConfig {
        boot_failure_rate: 0.5,
        ..CloudConfig::default()
    };
    let (fleet, clearml) = run(&comparison(20, 20, cloud), &burst(10, 1800.0));

    assert_eq!(fleet.tasks_lost, 0);
    assert!(fleet.launches > 10, "failed boots were replaced");
    assert_eq!(clearml.tasks_lost, 0);
}

#[test]
fn same_seed_gives_same_reports() {
    let options = TraceOptions {
        traces_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/traces")),
        seed: 7,
        tasks: Some(300),
        rate_per_hour: 6.0,
        replicas_as_tasks: true,
    };
    let trace = trace::load(&TraceSource::Poisson, &options).expect("poisson trace");
    let comparison = comparison(100, 100, CloudConfig::default());

    let first = serde_json::to_string(&comparison.run(&trace, PolicyChoice::Both)).expect("json");
    let second = serde_json::to_string(&comparison.run(&trace, PolicyChoice::Both)).expect("json");
    assert_eq!(first, second);
}

#[test]
fn pollux_trace_enqueues_replicas_as_tasks() {
    let mut options = TraceOptions {
        traces_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/traces")),
        seed: 1,
        tasks: None,
        rate_per_hour: 6.0,
        replicas_as_tasks: true,
    };
    let replicas = trace::load(&TraceSource::Pollux(1), &options).expect("pollux-1");
    assert_eq!(replicas.tasks.len(), 1029);
    assert_eq!(replicas.tasks[0].arrival_s, 107.0);

    options.replicas_as_tasks = false;
    let jobs = trace::load(&TraceSource::Pollux(1), &options).expect("pollux-1");
    assert_eq!(jobs.tasks.len(), 160);
}

#[test]
fn unknown_trace_name_rejected() {
    let error = "pollux-9"
        .parse::<TraceSource>()
        .expect_err("pollux-9 does not exist");
    assert!(
        error.to_string().contains("pollux-1 to pollux-8"),
        "{error}"
    );
}
