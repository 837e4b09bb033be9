//! The discrete-event simulation: a simulated clock, the queue, the instances and the autoscaler under test.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};

use crate::sim::cloud::{CapacityError, Cloud};
use crate::sim::scenario::Scenario;
use crate::sim::trace::Trace;

/// An autoscaler driven by the simulated clock.
pub trait Autoscaler {
    /// Name in reports ("fleet" or "clearml").
    fn name(&self) -> &'static str;

    /// Tells whether the agents re-enqueue their running task when a spot interruption notice arrives.
    fn requeues_interrupted_tasks(&self) -> bool;

    /// Runs one step at `world.now` and returns the time of the next step.
    fn wake(&mut self, world: &mut World) -> f64;
}

/// Where an instance is in its life, as the simulated cloud and agent see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SimState {
    /// Launched (from `launched_at` on) but its agent has not registered.
    Booting,
    Idle {
        since: f64,
    },
    Busy {
        task: usize,
    },
    /// A spot interruption notice arrived and the agent takes no more tasks.
    Draining,
    /// Terminate called; billing stops at `billing_end`.
    Terminating,
    Terminated,
}

/// One simulated instance.
#[derive(Debug, Clone)]
pub struct SimInstance {
    pub name: String,
    /// Index into the scenario's resources.
    pub resource: usize,
    /// When the launch call returned, which is when billing starts.
    pub launched_at: f64,
    pub state: SimState,
    pub state_since: f64,
    pub billing_end: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct TaskRecord {
    runtime_s: f64,
    /// When the task last entered the queue.
    queued_since: f64,
    /// Sum of the time spent waiting in the queue, over every enqueue.
    waited_s: f64,
    /// Counts starts, so a finish event of an interrupted run is recognised as stale.
    starts: u32,
    done: bool,
    lost: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    Arrival(usize),
    Registered(usize),
    Finished {
        instance: usize,
        task: usize,
        start: u32,
    },
    InterruptionNotice(usize),
    Reclaimed(usize),
    BillingEnded(usize),
    Wake,
}

#[derive(Debug, Clone, Copy)]
struct Scheduled {
    at: f64,
    sequence: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    /// Reversed, so the `BinaryHeap` pops the earliest event first, and among equal times the first scheduled.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .total_cmp(&self.at)
            .then_with(|| other.sequence.cmp(&self.sequence))
    }
}

/// Counters the report reads after a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub launches: u64,
    pub capacity_errors: u64,
    pub interruptions: u64,
    pub tasks_requeued: u64,
}

/// The simulated queue, instances and clock that an autoscaler acts on.
pub struct World {
    pub now: f64,
    pub scenario: Scenario,
    pub cloud: Cloud,
    pub counters: Counters,
    instances: Vec<SimInstance>,
    instance_by_name: HashMap<String, usize>,
    /// Instances whose billing has not ended.
    live: BTreeSet<usize>,
    /// Registered idle instances, which take the next task; the lowest index first.
    idle: BTreeSet<usize>,
    tasks: Vec<TaskRecord>,
    queue: VecDeque<usize>,
    events: BinaryHeap<Scheduled>,
    sequence: u64,
    requeue_on_interruption: bool,
    finished_or_lost: usize,
}

impl World {
    fn new(scenario: Scenario, cloud: Cloud, trace: &Trace, requeue_on_interruption: bool) -> Self {
        let tasks = trace
            .tasks
            .iter()
            .map(|spec| TaskRecord {
                runtime_s: spec.runtime_s,
                queued_since: spec.arrival_s,
                waited_s: 0.0,
                starts: 0,
                done: false,
                lost: false,
            })
            .collect();
        let mut world = Self {
            now: 0.0,
            scenario,
            cloud,
            counters: Counters::default(),
            instances: Vec::new(),
            instance_by_name: HashMap::new(),
            live: BTreeSet::new(),
            idle: BTreeSet::new(),
            tasks,
            queue: VecDeque::new(),
            events: BinaryHeap::new(),
            sequence: 0,
            requeue_on_interruption,
            finished_or_lost: 0,
        };
        for (index, spec) in trace.tasks.iter().enumerate() {
            world.schedule(spec.arrival_s, Event::Arrival(index));
        }
        world
    }

    fn schedule(&mut self, at: f64, event: Event) {
        self.sequence += 1;
        self.events.push(Scheduled {
            at,
            sequence: self.sequence,
            event,
        });
    }

    /// Returns the number of tasks waiting in the queue.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Returns the instance with index `index`.
    pub fn instance(&self, index: usize) -> &SimInstance {
        &self.instances[index]
    }

    /// Returns the index of the instance named `name`.
    pub fn instance_index(&self, name: &str) -> Option<usize> {
        self.instance_by_name.get(name).copied()
    }

    /// Iterates over the instances whose billing has not ended, with their indexes.
    pub fn live_instances(&self) -> impl Iterator<Item = (usize, &SimInstance)> {
        self.live
            .iter()
            .map(|&index| (index, &self.instances[index]))
    }

    /// Iterates over the registered idle instances.
    pub fn idle_instances(&self) -> impl Iterator<Item = (usize, &SimInstance)> {
        self.idle
            .iter()
            .map(|&index| (index, &self.instances[index]))
    }

    /// Launches `count` instances of resource `resource` with one launch call made at `call_at`.
    ///
    /// Returns the new instances' indexes with their boot draws, or the capacity error of the call.
    pub fn launch(
        &mut self,
        resource: usize,
        count: u32,
        call_at: f64,
    ) -> Result<Vec<(usize, crate::sim::cloud::Boot)>, CapacityError> {
        let market = self.scenario.resources[resource].market;
        if let Err(error) = self.cloud.launch_call(market) {
            self.counters.capacity_errors += 1;
            return Err(error);
        }

        let launched_at = call_at + self.cloud.config.launch_call_s;
        let mut launched = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let boot = self.cloud.boot(market);
            let index = self.instances.len();
            let name = format!("i-{index:08x}");
            self.instance_by_name.insert(name.clone(), index);
            self.instances.push(SimInstance {
                name,
                resource,
                launched_at,
                state: SimState::Booting,
                state_since: launched_at,
                billing_end: None,
            });
            self.live.insert(index);

            if let Some(after) = boot.registers_after_s {
                self.schedule(launched_at + after, Event::Registered(index));
            }
            if let Some(after) = boot.reclaimed_after_s {
                let reclaim_at = launched_at + after;
                let notice_at =
                    (reclaim_at - self.cloud.config.interruption_notice_s).max(launched_at);
                self.schedule(notice_at, Event::InterruptionNotice(index));
                self.schedule(reclaim_at, Event::Reclaimed(index));
            }
            launched.push((index, boot));
        }
        self.counters.launches += u64::from(count);
        Ok(launched)
    }

    /// Terminates an instance at `now`: it takes no more tasks and billing stops after the shutdown time.
    ///
    /// A running task is lost. Terminating an instance that is already terminating or gone does nothing, like
    /// EC2's TerminateInstances on a terminated instance.
    pub fn terminate(&mut self, index: usize) {
        let launched_at = self.instances[index].launched_at;
        match self.instances[index].state {
            SimState::Terminating | SimState::Terminated => return,
            SimState::Busy { task } => self.lose_task(task),
            _ => {}
        }
        self.idle.remove(&index);
        let billing_end = self.now.max(launched_at) + self.cloud.config.shutdown_s;
        self.set_state(index, SimState::Terminating);
        self.instances[index].billing_end = Some(billing_end);
        self.schedule(billing_end, Event::BillingEnded(index));
    }

    fn set_state(&mut self, index: usize, state: SimState) {
        let instance = &mut self.instances[index];
        instance.state = state;
        instance.state_since = self.now;
    }

    fn lose_task(&mut self, task: usize) {
        let record = &mut self.tasks[task];
        if !record.done && !record.lost {
            record.lost = true;
            self.finished_or_lost += 1;
        }
    }

    /// Gives the next waiting task to the instance, or marks it idle.
    fn offer_work(&mut self, index: usize) {
        match self.queue.pop_front() {
            Some(task) => self.start(task, index),
            None => {
                self.set_state(index, SimState::Idle { since: self.now });
                self.idle.insert(index);
            }
        }
    }

    fn start(&mut self, task: usize, index: usize) {
        self.idle.remove(&index);
        let record = &mut self.tasks[task];
        record.waited_s += self.now - record.queued_since;
        record.starts += 1;
        let start = record.starts;
        let finish_at = self.now + record.runtime_s;
        self.set_state(index, SimState::Busy { task });
        self.schedule(
            finish_at,
            Event::Finished {
                instance: index,
                task,
                start,
            },
        );
    }

    /// Puts a task in the queue and hands it to an idle instance if there is one, as an agent polling the queue
    /// would within seconds.
    fn enqueue(&mut self, task: usize, at_head: bool) {
        self.tasks[task].queued_since = self.now;
        if at_head {
            self.queue.push_front(task);
        } else {
            self.queue.push_back(task);
        }

        while let (Some(_), Some(&index)) = (self.queue.front(), self.idle.first()) {
            let next = self.queue.pop_front().expect("the queue is not empty");
            self.start(next, index);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Arrival(task) => self.enqueue(task, false),
            Event::Registered(index) => {
                if self.instances[index].state == SimState::Booting {
                    self.offer_work(index);
                }
            }
            Event::Finished {
                instance,
                task,
                start,
            } => {
                let current = self.instances[instance].state == SimState::Busy { task };
                if current && self.tasks[task].starts == start && !self.tasks[task].lost {
                    self.tasks[task].done = true;
                    self.finished_or_lost += 1;
                    self.offer_work(instance);
                }
            }
            Event::InterruptionNotice(index) => self.interruption_notice(index),
            Event::Reclaimed(index) => self.reclaim(index),
            Event::BillingEnded(index) => {
                self.set_state(index, SimState::Terminated);
                self.live.remove(&index);
            }
            Event::Wake => {}
        }
    }

    /// Applies a spot interruption notice. With re-enqueueing agents the running task goes back to the head of
    /// the queue and the instance takes no more tasks. Otherwise the instance runs on until it is reclaimed.
    fn interruption_notice(&mut self, index: usize) {
        let state = self.instances[index].state;
        if matches!(state, SimState::Terminating | SimState::Terminated)
            || !self.requeue_on_interruption
        {
            return;
        }
        if let SimState::Busy { task } = state {
            self.enqueue(task, true);
            self.counters.tasks_requeued += 1;
        }
        self.idle.remove(&index);
        self.set_state(index, SimState::Draining);
    }

    /// Reclaims a spot instance: billing stops at once and a task still running on it is lost.
    fn reclaim(&mut self, index: usize) {
        let state = self.instances[index].state;
        if matches!(state, SimState::Terminating | SimState::Terminated) {
            return;
        }
        self.counters.interruptions += 1;
        if let SimState::Busy { task } = state {
            self.lose_task(task);
        }
        self.idle.remove(&index);
        self.set_state(index, SimState::Terminated);
        self.instances[index].billing_end = Some(self.now);
        self.live.remove(&index);
    }

    fn finished(&self) -> bool {
        self.finished_or_lost == self.tasks.len() && self.live.is_empty()
    }
}

/// What one run leaves for the report.
pub struct Outcome {
    pub instances: Vec<SimInstance>,
    /// Wait of every task that started at least once, in seconds.
    pub waits_s: Vec<f64>,
    pub tasks: usize,
    pub tasks_lost: usize,
    pub runtime_s: f64,
    pub counters: Counters,
    pub min_billed_s: f64,
}

/// Time the run goes on after the last task ended, for instances that a warm pool keeps. Without a warm pool
/// both autoscalers release every instance well within it, after max idle plus at most one poll.
const TAIL_AFTER_LAST_TASK_S: f64 = 3600.0;

/// Runs `autoscaler` on `trace` until every task finished or was lost and every instance is terminated, or until
/// `TAIL_AFTER_LAST_TASK_S` after the last task ended, whichever comes first. Instances still up then are billed
/// until that moment.
///
/// Tasks still queued or running at a safety horizon (the last arrival plus the sum of all run times plus a week,
/// which any autoscaler with one instance would beat) count as lost.
pub fn run(
    trace: &Trace,
    scenario: Scenario,
    cloud: Cloud,
    autoscaler: &mut dyn Autoscaler,
) -> Outcome {
    let mut world = World::new(
        scenario,
        cloud,
        trace,
        autoscaler.requeues_interrupted_tasks(),
    );
    let last_arrival = trace
        .tasks
        .iter()
        .map(|task| task.arrival_s)
        .fold(0.0, f64::max);
    let horizon =
        last_arrival + trace.tasks.iter().map(|task| task.runtime_s).sum::<f64>() + 7.0 * 86_400.0;

    world.schedule(0.0, Event::Wake);
    let mut last_task_ended = None;
    while let Some(next) = world.events.pop() {
        if next.at > horizon {
            break;
        }
        if let Some(ended) = last_task_ended
            && next.at > ended + TAIL_AFTER_LAST_TASK_S
        {
            world.now = ended + TAIL_AFTER_LAST_TASK_S;
            break;
        }
        world.now = next.at;
        world.handle(next.event);
        if next.event == Event::Wake {
            let wake_at = autoscaler.wake(&mut world).max(world.now);
            world.schedule(wake_at, Event::Wake);
        }
        if world.finished() {
            break;
        }
        if last_task_ended.is_none() && world.finished_or_lost == world.tasks.len() {
            last_task_ended = Some(world.now);
        }
    }

    close(world)
}

fn close(mut world: World) -> Outcome {
    let unfinished: Vec<usize> = (0..world.tasks.len())
        .filter(|&task| !world.tasks[task].done && !world.tasks[task].lost)
        .collect();
    for task in unfinished {
        world.lose_task(task);
    }
    let end = world.now;
    for instance in &mut world.instances {
        if instance.billing_end.is_none() {
            instance.billing_end = Some(end.max(instance.launched_at));
        }
    }

    Outcome {
        waits_s: world
            .tasks
            .iter()
            .filter(|task| task.starts > 0)
            .map(|task| task.waited_s)
            .collect(),
        tasks: world.tasks.len(),
        tasks_lost: world.tasks.iter().filter(|task| task.lost).count(),
        runtime_s: world.tasks.iter().map(|task| task.runtime_s).sum(),
        counters: world.counters,
        min_billed_s: world.cloud.config.min_billed_s,
        instances: world.instances,
    }
}
