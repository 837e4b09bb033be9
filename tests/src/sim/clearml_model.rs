//! A model of the ClearML autoscaler's supervisor loop, `clearml/automation/auto_scaler.py` of clearml 2.1.12
//! (`AutoScaler.supervisor`, `update_idle_workers`, `stale_workers`), with the launch call of
//! `clearml/automation/aws_driver.py` (`AWSDriver.spin_up_worker`).
//!
//! Each poll follows the Python loop step by step:
//! 1. Workers that registered are removed from `spun_workers`.
//! 2. Instances spun up longer than `max_spin_up_time_min` ago that never registered are spun down.
//! 3. `idle_workers` gains every worker without a task that it does not hold yet, stamped with the poll time, and
//!    loses every worker that has a task. The stamp is kept until a poll finds the worker busy, so a worker that
//!    ran a task between two polls keeps its old stamp.
//! 4. If the queue has entries, the idle and spun-up workers of its resources are the free supply and
//!    `spin_up_count = entries - free`. For each resource in order, while fewer than `spin_up_count` are
//!    allocated, it adds `min(spin_up_count, max_instances - running - spun)`: the whole count again, not what is
//!    still missing, so a queue with two resources can get up to twice its need.
//! 5. It launches the allocated instances one at a time. `spin_up_worker` returns only after boto3's
//!    `wait_until_running`, which polls every 15 s, so every launch blocks the loop until its instance runs.
//! 6. Idle workers stamped more than `max_idle_time_min` ago are spun down unless their resource was counted as
//!    free supply in step 4, after `is_worker_still_idle` confirms that they still have no task.
//! 7. It sleeps `polling_interval_time_min`.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::sim::engine::{Autoscaler, SimState, World};

/// Settings of the ClearML autoscaler (`ScalerConfig` and the AWS driver's waiter), in seconds.
#[derive(Debug, Clone)]
pub struct ClearmlSettings {
    /// `polling_interval_time_min`, 5 min by default.
    pub poll_s: f64,
    /// `max_spin_up_time_min`, 30 min by default.
    pub max_spin_up_s: f64,
    /// Delay of boto3's `instance_running` waiter between two DescribeInstances calls.
    pub waiter_delay_s: f64,
    /// Time of the ClearML API calls of one poll (`queues.get_all`, `workers.get_all`, `queues.get_by_id`), which
    /// delays the spin-down step and the next poll.
    pub api_calls_s: f64,
}

impl Default for ClearmlSettings {
    fn default() -> Self {
        Self {
            poll_s: 300.0,
            max_spin_up_s: 1800.0,
            waiter_delay_s: 15.0,
            api_calls_s: 1.0,
        }
    }
}

/// The part of a poll that runs after its launches return.
enum Phase {
    Poll,
    SpinDown {
        required_idle_resources: HashSet<usize>,
    },
}

/// The state the supervisor loop keeps between polls. Worker ids are instance indexes, resources are indexes into
/// the scenario's resources; ordered maps stand in for Python's insertion-ordered dicts.
pub struct ClearmlModel {
    settings: ClearmlSettings,
    /// `idle_workers`: worker -> (idle stamp, resource).
    idle_workers: BTreeMap<usize, (f64, usize)>,
    /// `spun_workers`: worker -> (resource, spin time).
    spun_workers: BTreeMap<usize, (usize, f64)>,
    previous_workers: BTreeSet<usize>,
    phase: Phase,
}

impl ClearmlModel {
    pub fn new(settings: ClearmlSettings) -> Self {
        Self {
            settings,
            idle_workers: BTreeMap::new(),
            spun_workers: BTreeMap::new(),
            previous_workers: BTreeSet::new(),
            phase: Phase::Poll,
        }
    }

    /// Runs steps 1 to 5 and returns when the launches return and which resources stay.
    fn poll(&mut self, world: &mut World) -> (f64, HashSet<usize>) {
        let now = world.now;
        // `get_workers()`: every registered worker, with its task if it has one.
        let all_workers: Vec<(usize, usize, bool)> = world
            .live_instances()
            .filter_map(|(index, instance)| match instance.state {
                SimState::Idle { .. } => Some((index, instance.resource, false)),
                SimState::Busy { .. } | SimState::Draining => {
                    Some((index, instance.resource, true))
                }
                _ => None,
            })
            .collect();

        for &(worker, _, _) in &all_workers {
            if !self.previous_workers.contains(&worker)
                && self.spun_workers.remove(&worker).is_some()
            {
                self.previous_workers.insert(worker);
            }
        }

        let stale: Vec<usize> = self
            .spun_workers
            .iter()
            .filter(|(_, (_, spin_time))| now - spin_time > self.settings.max_spin_up_s)
            .map(|(&worker, _)| worker)
            .collect();
        for worker in stale {
            self.spun_workers.remove(&worker);
            world.terminate(worker);
        }

        self.update_idle_workers(&all_workers, now);

        let mut required_idle_resources = HashSet::new();
        let mut allocate_new_resources = Vec::new();
        let entries = world.waiting() as i64;
        if entries > 0 {
            let queue_resources = 0..world.scenario.resources.len();
            let mut free = 0i64;
            for &(_, resource) in self.idle_workers.values() {
                if queue_resources.contains(&resource) {
                    required_idle_resources.insert(resource);
                    free += 1;
                }
            }
            for &(resource, _) in self.spun_workers.values() {
                if queue_resources.contains(&resource) {
                    required_idle_resources.insert(resource);
                    free += 1;
                }
            }

            let spin_up_count = entries - free;
            let mut spin_up_resources: Vec<usize> = Vec::new();
            for resource in queue_resources {
                if spin_up_resources.len() as i64 >= spin_up_count {
                    break;
                }
                let running = all_workers
                    .iter()
                    .filter(|(_, r, _)| *r == resource)
                    .count() as i64;
                let spun = self
                    .spun_workers
                    .values()
                    .filter(|(r, _)| *r == resource)
                    .count() as i64;
                let max_allowed =
                    i64::from(world.scenario.resources[resource].max_instances) - running - spun;
                if max_allowed > 0 {
                    let count = spin_up_count.min(max_allowed).max(0) as usize;
                    spin_up_resources.extend(std::iter::repeat_n(resource, count));
                }
            }
            allocate_new_resources.extend(spin_up_resources);
        }

        let mut cursor = now;
        for resource in allocate_new_resources {
            match world.launch(resource, 1, cursor) {
                Ok(launched) => {
                    let (worker, boot) = launched[0];
                    let launched_at = world.instance(worker).launched_at;
                    let waits = (boot.pending_s / self.settings.waiter_delay_s).ceil();
                    cursor = launched_at + waits * self.settings.waiter_delay_s;
                    self.spun_workers.insert(worker, (resource, cursor));
                }
                // The exception is logged and the loop goes on with the next resource.
                Err(_) => cursor += world.cloud.config.launch_call_s,
            }
        }
        (cursor, required_idle_resources)
    }

    /// `update_idle_workers`: stamps newly idle workers with the poll time and drops busy ones.
    ///
    /// The Python code stamps with `max(register_time, last_activity_time, last_report_time)` of the worker; agents
    /// report every few seconds, so that is the poll time within seconds.
    fn update_idle_workers(&mut self, all_workers: &[(usize, usize, bool)], now: f64) {
        if all_workers.is_empty() {
            self.idle_workers.clear();
            return;
        }
        for &(worker, resource, has_task) in all_workers {
            if !has_task {
                self.idle_workers.entry(worker).or_insert((now, resource));
            } else {
                self.idle_workers.remove(&worker);
            }
        }
    }

    /// Runs step 6 at `world.now`, after the launches returned.
    fn spin_down(&mut self, world: &mut World, required_idle_resources: &HashSet<usize>) {
        let now = world.now;
        let workers: Vec<(usize, f64, usize)> = self
            .idle_workers
            .iter()
            .map(|(&worker, &(stamp, resource))| (worker, stamp, resource))
            .collect();
        for (worker, stamp, resource) in workers {
            if required_idle_resources.contains(&resource) {
                continue;
            }
            if now - stamp > world.scenario.max_idle_s {
                // `is_worker_still_idle` returns true for a worker that is gone, which is then spun down again.
                let still_idle = !matches!(
                    world.instance(worker).state,
                    SimState::Busy { .. } | SimState::Draining
                );
                if !still_idle {
                    continue;
                }
                world.terminate(worker);
                self.idle_workers.remove(&worker);
            }
        }
    }
}

impl Autoscaler for ClearmlModel {
    fn name(&self) -> &'static str {
        "clearml"
    }

    fn requeues_interrupted_tasks(&self) -> bool {
        false
    }

    fn wake(&mut self, world: &mut World) -> f64 {
        match std::mem::replace(&mut self.phase, Phase::Poll) {
            Phase::Poll => {
                let (launches_return_at, required_idle_resources) = self.poll(world);
                self.phase = Phase::SpinDown {
                    required_idle_resources,
                };
                launches_return_at + self.settings.api_calls_s
            }
            Phase::SpinDown {
                required_idle_resources,
            } => {
                self.spin_down(world, &required_idle_resources);
                world.now + self.settings.poll_s
            }
        }
    }
}
