//! The fleet autoscaler in the simulator: the real policy, fed from the simulated world each tick.

use std::time::Duration;

use fleet_coordinator::policy::{
    Action, BackoffSchedule, InstanceState, InstanceView, OfferingBackoff, OfferingConfig,
    PolicyConfig, QueueConfig, QueueView, ResourceConfig, Snapshot, Timeouts, decide,
};

use crate::sim::engine::{Autoscaler, SimState, World};
use crate::sim::scenario::Scenario;

/// Fleet settings that the ClearML autoscaler has no counterpart for.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Seconds between policy ticks.
    pub tick_s: f64,
    pub max_launches_per_tick: u32,
    pub min_idle: u32,
    pub min_instances: u32,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            tick_s: 10.0,
            max_launches_per_tick: 100,
            min_idle: 0,
            min_instances: 0,
        }
    }
}

/// The scaling policy of `fleet_coordinator::policy`, run every tick like the queue actor runs it.
pub struct FleetModel {
    config: PolicyConfig,
    tick_s: f64,
    backoffs: Vec<OfferingBackoff>,
}

impl FleetModel {
    /// Builds the policy configuration of `scenario`: the queue and cluster maximums equal the sum of the
    /// resources' maximums, so only the limits the ClearML autoscaler also has bind, and there is no budget.
    pub fn new(scenario: &Scenario, settings: &FleetSettings) -> Self {
        let total = scenario.total_max_instances();
        let queue = QueueConfig {
            name: scenario.queue.clone(),
            resources: scenario
                .resources
                .iter()
                .map(|resource| ResourceConfig {
                    name: resource.name.clone(),
                    max_instances: resource.max_instances,
                    offerings: vec![OfferingConfig {
                        id: resource.offering.clone(),
                        hourly_price_usd: resource.hourly_price_usd,
                    }],
                })
                .collect(),
            max_instances: total,
            min_instances: settings.min_instances,
            min_idle: settings.min_idle,
        };
        let config = PolicyConfig {
            queues: vec![queue],
            cluster_max_instances: total,
            hourly_budget_usd: None,
            max_launches_per_tick: settings.max_launches_per_tick,
            max_idle: Duration::from_secs_f64(scenario.max_idle_s),
            timeouts: Timeouts::default(),
            backoff: BackoffSchedule::default(),
        };
        Self {
            config,
            tick_s: settings.tick_s,
            backoffs: Vec::new(),
        }
    }

    /// Tells whether `decide` would return nothing: no task waits, no instance can time out, no agent requests
    /// termination and no warm pool or minimum is configured. Skipping those ticks keeps long traces fast.
    fn is_quiet(&self, world: &World) -> bool {
        let queue = &self.config.queues[0];
        if world.waiting() > 0 || queue.min_idle > 0 || queue.min_instances > 0 {
            return false;
        }
        let booting = world
            .live_instances()
            .any(|(_, instance)| instance.state == SimState::Booting);
        let requesting = world
            .idle_instances()
            .any(|(_, instance)| self.requests_termination(world, instance));
        !booting && !requesting
    }

    fn requests_termination(
        &self,
        world: &World,
        instance: &crate::sim::engine::SimInstance,
    ) -> bool {
        match instance.state {
            SimState::Idle { since } => world.now - since >= self.config.max_idle.as_secs_f64(),
            _ => false,
        }
    }

    /// Builds the snapshot the coordinator's registry would hold at `world.now`.
    fn snapshot<'w>(&'w self, world: &'w World, launches_this_tick: u32) -> Snapshot<'w> {
        let now = world.now;
        let scenario = &world.scenario;
        let mut termination_requests = Vec::new();
        let instances = world
            .live_instances()
            .map(|(_, instance)| {
                let resource = &scenario.resources[instance.resource];
                let state = match instance.state {
                    SimState::Booting if now < instance.launched_at => InstanceState::Launching,
                    SimState::Booting => InstanceState::Booting,
                    SimState::Idle { .. } => InstanceState::Idle,
                    SimState::Busy { .. } => InstanceState::Busy,
                    SimState::Draining => InstanceState::Draining,
                    SimState::Terminating | SimState::Terminated => InstanceState::Terminating,
                };
                if self.requests_termination(world, instance) {
                    termination_requests.push(instance.name.as_str());
                }
                // The simulated agents never miss a heartbeat.
                let last_heartbeat = matches!(state, InstanceState::Idle | InstanceState::Busy)
                    .then(|| Duration::from_secs_f64(now));
                InstanceView {
                    id: &instance.name,
                    queue: &scenario.queue,
                    resource: &resource.name,
                    offering: &resource.offering,
                    state,
                    state_since: Duration::from_secs_f64(instance.state_since.max(0.0)),
                    last_heartbeat,
                    hourly_price_usd: resource.hourly_price_usd,
                }
            })
            .collect();
        Snapshot {
            now: Duration::from_secs_f64(now),
            queues: vec![QueueView {
                name: &scenario.queue,
                waiting: world.waiting() as u32,
            }],
            instances,
            backoffs: self.backoffs.clone(),
            termination_requests,
            launches_this_tick,
        }
    }

    /// Applies the actions and returns whether a launch failed with a capacity error.
    fn apply(
        &mut self,
        world: &mut World,
        actions: Vec<Action>,
        launched: &mut u32,
        call_at: &mut f64,
    ) -> bool {
        let mut capacity_error = false;
        for action in actions {
            match action {
                Action::Grant { instance } | Action::Terminate { instance, .. } => {
                    if let Some(index) = world.instance_index(&instance) {
                        world.terminate(index);
                    }
                }
                Action::Launch {
                    resource,
                    offering,
                    count,
                    ..
                } => {
                    let index = world
                        .scenario
                        .resource_index(&resource)
                        .expect("the policy launches only configured resources");
                    let now = Duration::from_secs_f64(world.now);
                    match world.launch(index, count, *call_at) {
                        Ok(_) => {
                            *launched += count;
                            self.backoffs.retain(|backoff| backoff.offering != offering);
                        }
                        Err(_) => {
                            let previous = self
                                .backoffs
                                .iter()
                                .find(|backoff| backoff.offering == offering);
                            let next = OfferingBackoff::after_failure(
                                &offering,
                                previous,
                                now,
                                &self.config.backoff,
                            );
                            self.backoffs.retain(|backoff| backoff.offering != offering);
                            self.backoffs.push(next);
                            capacity_error = true;
                        }
                    }
                    *call_at += world.cloud.config.launch_call_s;
                }
                Action::Hold { .. } | Action::Refuse { .. } => {}
            }
        }
        capacity_error
    }
}

impl Autoscaler for FleetModel {
    fn name(&self) -> &'static str {
        "fleet"
    }

    fn requeues_interrupted_tasks(&self) -> bool {
        true
    }

    /// Runs the policy, and after a capacity error runs it again in the same tick so the shortfall moves to the
    /// next offering. There are at most as many reruns as offerings.
    fn wake(&mut self, world: &mut World) -> f64 {
        let now = Duration::from_secs_f64(world.now);
        self.backoffs.retain(|backoff| backoff.is_active(now));
        if self.is_quiet(world) {
            return world.now + self.tick_s;
        }

        let offerings = world.scenario.resources.len();
        let mut launched = 0;
        let mut call_at = world.now;
        for _ in 0..=offerings {
            let actions = decide(&self.config, &self.snapshot(world, launched));
            if !self.apply(world, actions, &mut launched, &mut call_at) {
                break;
            }
        }
        world.now + self.tick_s
    }
}
