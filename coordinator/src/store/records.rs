//! The records the coordinator keeps besides what the cloud and ClearML report. Times are milliseconds since
//! the UNIX epoch.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::auth::BootstrapRecord;

/// Transitions kept per instance; older ones are dropped first.
pub const MAX_HISTORY: usize = 32;

/// Lifecycle state of an instance record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// The launch intent is stored, the cloud call not made yet.
    Requested,
    /// The cloud call was made with the intent id as client token.
    Launching,
    /// The cloud returned the instance id; the agent has not registered yet.
    Booting,
    Idle,
    Busy,
    /// Termination granted; the agent is closing its gate.
    Draining,
    Terminating,
    Terminated,
}

/// One state change, with the reason that caused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub from: InstanceState,
    pub to: InstanceState,
    pub at_ms: u64,
    pub reason: String,
}

/// One instance, from its launch intent to its termination. Keyed by the intent id plus an index, because
/// one intent may launch several instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// `<intent id>/<index>`.
    pub key: String,
    pub intent_id: String,
    /// Cloud instance id; `None` until the cloud returned it.
    pub instance_id: Option<String>,
    pub queue: String,
    pub resource: String,
    /// Offering key such as `g5.xlarge/us-east-1a/spot`; `None` until the cloud chose one.
    pub offering: Option<String>,
    pub hourly_price_usd: f64,
    pub state: InstanceState,
    pub state_since_ms: u64,
    pub last_heartbeat_ms: Option<u64>,
    pub worker_id: Option<String>,
    pub task_id: Option<String>,
    pub history: Vec<Transition>,
}

impl InstanceRecord {
    pub fn new(intent_id: &str, index: u32, queue: &str, resource: &str, now_ms: u64) -> Self {
        Self {
            key: format!("{intent_id}/{index}"),
            intent_id: intent_id.to_owned(),
            instance_id: None,
            queue: queue.to_owned(),
            resource: resource.to_owned(),
            offering: None,
            hourly_price_usd: 0.0,
            state: InstanceState::Requested,
            state_since_ms: now_ms,
            last_heartbeat_ms: None,
            worker_id: None,
            task_id: None,
            history: Vec::new(),
        }
    }

    /// Moves the record to `to`, recording the transition and dropping the oldest beyond [`MAX_HISTORY`]. A
    /// transition to the current state records nothing.
    pub fn transition(&mut self, to: InstanceState, now_ms: u64, reason: impl Into<String>) {
        if self.state == to {
            return;
        }
        self.history.push(Transition {
            from: self.state,
            to,
            at_ms: now_ms,
            reason: reason.into(),
        });
        if self.history.len() > MAX_HISTORY {
            let excess = self.history.len() - MAX_HISTORY;
            self.history.drain(..excess);
        }
        self.state = to;
        self.state_since_ms = now_ms;
    }
}

/// A launch decided by the leader and stored before the cloud call, so a new leader can replay it with the
/// same client token instead of launching again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchIntent {
    /// Random id, also the cloud client token and the `fleet:intent-id` tag.
    pub id: String,
    pub queue: String,
    pub resource: String,
    pub count: u32,
    pub created_ms: u64,
    /// Term of the leader that decided it.
    pub term: i64,
}

/// Permission for an idle instance to terminate, stored before the agent is notified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminationGrant {
    pub instance_id: String,
    pub granted_ms: u64,
    pub term: i64,
    pub reason: String,
}

/// Changes operators made at runtime; they outlive leader changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeOverrides {
    pub paused_queues: BTreeSet<String>,
    pub queue_limits: BTreeMap<String, QueueLimits>,
}

/// The leader's latest count of waiting tasks per queue, stored so followers can report it as well.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueDepths {
    /// When the leader polled ClearML for these counts, in ms since the epoch; 0 before the first poll.
    pub observed_ms: u64,
    pub waiting: BTreeMap<String, u32>,
}

/// Limits that replace the configured ones of a queue; `None` keeps the configured value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueLimits {
    pub min_instances: Option<u32>,
    pub max_instances: Option<u32>,
    pub min_idle: Option<u32>,
    pub max_idle_seconds: Option<u32>,
}

/// An offering in backoff after capacity errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackoffRecord {
    pub offering: String,
    pub failures: u32,
    pub until_ms: u64,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event, across leaders.
    pub sequence: u64,
    pub at_ms: u64,
    /// For example `instance.launched`, `offering.backoff`, `resource.disabled`.
    pub kind: String,
    pub queue: Option<String>,
    pub resource: Option<String>,
    pub instance_id: Option<String>,
    pub message: String,
}

/// Everything a store holds, as a new leader loads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub instances: BTreeMap<String, InstanceRecord>,
    pub intents: BTreeMap<String, LaunchIntent>,
    pub grants: BTreeMap<String, TerminationGrant>,
    pub overrides: RuntimeOverrides,
    pub backoffs: BTreeMap<String, BackoffRecord>,
    /// Bootstrap token digests of launches whose instances may still register, keyed by intent id.
    #[serde(default)]
    pub bootstraps: BTreeMap<String, BootstrapRecord>,
    #[serde(default)]
    pub queue_depths: QueueDepths,
    /// The newest events, oldest first.
    pub events: Vec<Event>,
}

impl State {
    /// Returns the sequence number the next event gets.
    pub fn next_event_sequence(&self) -> u64 {
        self.events.last().map_or(1, |event| event.sequence + 1)
    }
}

/// One change to the state. A list of them is applied all or nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    PutInstance(InstanceRecord),
    DeleteInstance(String),
    PutIntent(LaunchIntent),
    DeleteIntent(String),
    PutGrant(TerminationGrant),
    DeleteGrant(String),
    PutOverrides(RuntimeOverrides),
    PutBackoff(BackoffRecord),
    DeleteBackoff(String),
    PutBootstrap(BootstrapRecord),
    /// Removes a launch's bootstrap record by intent id.
    DeleteBootstrap(String),
    /// Appends an event; the store drops the oldest beyond its event limit.
    AppendEvent(Event),
    PutQueueDepths(QueueDepths),
}

impl State {
    /// Applies `changes` in memory, in order; `max_events` bounds the event log.
    pub fn apply(&mut self, changes: &[Change], max_events: usize) {
        for change in changes {
            match change {
                Change::PutInstance(record) => {
                    self.instances.insert(record.key.clone(), record.clone());
                }
                Change::DeleteInstance(key) => {
                    self.instances.remove(key);
                }
                Change::PutIntent(intent) => {
                    self.intents.insert(intent.id.clone(), intent.clone());
                }
                Change::DeleteIntent(id) => {
                    self.intents.remove(id);
                }
                Change::PutGrant(grant) => {
                    self.grants.insert(grant.instance_id.clone(), grant.clone());
                }
                Change::DeleteGrant(id) => {
                    self.grants.remove(id);
                }
                Change::PutOverrides(overrides) => self.overrides = overrides.clone(),
                Change::PutBackoff(backoff) => {
                    self.backoffs
                        .insert(backoff.offering.clone(), backoff.clone());
                }
                Change::DeleteBackoff(offering) => {
                    self.backoffs.remove(offering);
                }
                Change::PutBootstrap(record) => {
                    self.bootstraps
                        .insert(record.intent_id.clone(), record.clone());
                }
                Change::DeleteBootstrap(intent_id) => {
                    self.bootstraps.remove(intent_id);
                }
                Change::PutQueueDepths(depths) => self.queue_depths = depths.clone(),
                Change::AppendEvent(event) => {
                    self.events.push(event.clone());
                    if self.events.len() > max_events {
                        let excess = self.events.len() - max_events;
                        self.events.drain(..excess);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_records_reason_and_time() {
        let mut record = InstanceRecord::new("intent-1", 0, "gpu", "gpu-spot", 1_000);

        record.transition(InstanceState::Launching, 2_000, "RunInstances sent");
        record.transition(InstanceState::Launching, 2_500, "repeated");

        assert_eq!(record.state, InstanceState::Launching);
        assert_eq!(record.state_since_ms, 2_000);
        assert_eq!(
            record.history.len(),
            1,
            "a transition to the same state records nothing"
        );
        assert_eq!(record.history[0].reason, "RunInstances sent");
        assert_eq!(record.history[0].from, InstanceState::Requested);
    }

    #[test]
    fn history_keeps_newest_transitions() {
        let mut record = InstanceRecord::new("intent-1", 0, "gpu", "gpu-spot", 0);
        for step in 0..(MAX_HISTORY as u64 + 10) {
            let to = if step % 2 == 0 {
                InstanceState::Busy
            } else {
                InstanceState::Idle
            };
            record.transition(to, step, format!("step {step}"));
        }

        assert_eq!(record.history.len(), MAX_HISTORY);
        assert_eq!(
            record.history.last().unwrap().reason,
            format!("step {}", MAX_HISTORY + 9)
        );
    }

    #[test]
    fn event_log_is_bounded() {
        let mut state = State::default();
        let changes: Vec<Change> = (1..=5)
            .map(|sequence| {
                Change::AppendEvent(Event {
                    sequence,
                    at_ms: sequence,
                    kind: "test".to_owned(),
                    queue: None,
                    resource: None,
                    instance_id: None,
                    message: String::new(),
                })
            })
            .collect();

        state.apply(&changes, 3);

        let sequences: Vec<u64> = state.events.iter().map(|event| event.sequence).collect();
        assert_eq!(sequences, vec![3, 4, 5]);
        assert_eq!(state.next_event_sequence(), 6);
    }
}
