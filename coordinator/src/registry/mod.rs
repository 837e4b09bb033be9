//! The instance registry: the leader's records of every instance, moved through the lifecycle
//! requested -> launching -> booting -> idle/busy -> draining -> terminating -> terminated.
//!
//! Every transition is stored, with an event that gives the reason, before the registry's memory changes, so what the
//! leader acts on is always what a successor would load. Instances are keyed `<intent id>/<index>` from the
//! moment the launch is decided, before the cloud has given them an id.

mod agents;
mod upkeep;

use std::sync::Arc;
use std::time::Duration;

pub use agents::{Adoption, Registration};

use crate::auth::{BootstrapError, BootstrapRecord};
use crate::policy::{self, InstanceView, QueueView, Snapshot};
use crate::store::{
    Change, Event, InstanceRecord, InstanceState, LaunchIntent, State, StateError, StateStore,
    TerminationGrant,
};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no instance record {key}; it may have been terminated and removed")]
    UnknownInstance { key: String },
    #[error("no open launch intent {intent_id}")]
    UnknownIntent { intent_id: String },
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("instance {key} is {state:?}; {action} needs it in {expected}")]
    InvalidTransition {
        key: String,
        state: InstanceState,
        action: &'static str,
        expected: &'static str,
    },
}

/// A launch the policy decided, to be stored as an intent before the cloud call.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchDecision {
    /// Random id, also the cloud client token.
    pub intent_id: String,
    pub queue: String,
    pub resource: String,
    pub offering: String,
    pub hourly_price_usd: f64,
    pub count: u32,
    /// Digest of the launch's bootstrap token, stored with the intent.
    pub bootstrap: Option<BootstrapRecord>,
}

/// An instance the cloud reported for a launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Launched {
    pub instance_id: String,
    pub offering: String,
    pub hourly_price_usd: f64,
}

pub struct Registry {
    store: Arc<dyn StateStore>,
    state: State,
    /// Term under which this registry writes, recorded in intents and grants.
    term: i64,
}

impl Registry {
    /// Loads every record, as a new leader does before it acts.
    pub async fn load(store: Arc<dyn StateStore>, term: i64) -> Result<Self, RegistryError> {
        let state = store.load().await?;
        Ok(Self { store, state, term })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Finds an instance record by its key or its cloud instance id.
    pub fn find(&self, key_or_instance_id: &str) -> Option<&InstanceRecord> {
        self.state.instances.get(key_or_instance_id).or_else(|| {
            self.state
                .instances
                .values()
                .find(|record| record.instance_id.as_deref() == Some(key_or_instance_id))
        })
    }

    /// Builds the policy's view of the fleet at `now_ms`: every instance that is not terminated, keyed by its
    /// record key.
    pub fn snapshot<'a>(
        &'a self,
        now_ms: u64,
        queues: Vec<QueueView<'a>>,
        termination_requests: Vec<&'a str>,
    ) -> Snapshot<'a> {
        let instances = self
            .state
            .instances
            .values()
            .filter_map(|record| {
                Some(InstanceView {
                    id: &record.key,
                    queue: &record.queue,
                    resource: &record.resource,
                    offering: record.offering.as_deref().unwrap_or_default(),
                    state: policy_state(record.state)?,
                    state_since: Duration::from_millis(record.state_since_ms),
                    last_heartbeat: record.last_heartbeat_ms.map(Duration::from_millis),
                    hourly_price_usd: record.hourly_price_usd,
                })
            })
            .collect();
        let backoffs = self
            .state
            .backoffs
            .values()
            .map(|backoff| policy::OfferingBackoff {
                offering: backoff.offering.clone(),
                failures: backoff.failures,
                until: Duration::from_millis(backoff.until_ms),
            })
            .collect();
        Snapshot {
            now: Duration::from_millis(now_ms),
            queues,
            instances,
            backoffs,
            termination_requests,
            launches_this_tick: 0,
        }
    }

    /// Stores a launch decision before any cloud call: the intent and one `requested` record per instance.
    pub async fn record_intent(
        &mut self,
        decision: &LaunchDecision,
        now_ms: u64,
    ) -> Result<LaunchIntent, RegistryError> {
        let intent = LaunchIntent {
            id: decision.intent_id.clone(),
            queue: decision.queue.clone(),
            resource: decision.resource.clone(),
            count: decision.count,
            created_ms: now_ms,
            term: self.term,
        };
        let mut changes = vec![Change::PutIntent(intent.clone())];
        if let Some(bootstrap) = &decision.bootstrap {
            changes.push(Change::PutBootstrap(bootstrap.clone()));
        }
        for index in 0..decision.count {
            let mut record = InstanceRecord::new(
                &decision.intent_id,
                index,
                &decision.queue,
                &decision.resource,
                now_ms,
            );
            record.offering = Some(decision.offering.clone());
            record.hourly_price_usd = decision.hourly_price_usd;
            changes.push(Change::PutInstance(record));
        }
        let message = format!(
            "launch of {} x {} decided",
            decision.count, decision.offering
        );
        changes.push(self.event(
            "instance.requested",
            now_ms,
            Some(&decision.queue),
            Some(&decision.resource),
            None,
            message,
        ));
        self.commit(changes).await?;
        Ok(intent)
    }

    /// Marks the intent's records `launching`, just before the cloud call with the intent id as client token.
    pub async fn mark_launching(
        &mut self,
        intent_id: &str,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let records = self.intent_records(intent_id)?;
        let mut changes = Vec::new();
        for mut record in records {
            if record.state == InstanceState::Requested {
                record.transition(InstanceState::Launching, now_ms, "cloud launch call sent");
                changes.push(Change::PutInstance(record));
            }
        }
        self.commit(changes).await
    }

    /// Records what the cloud launched for an intent and closes the intent. Records the cloud did not fill
    /// (it launched fewer than asked) end as terminated with the reason.
    pub async fn record_launched(
        &mut self,
        intent_id: &str,
        launched: &[Launched],
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let intent = self.state.intents.get(intent_id).cloned().ok_or_else(|| {
            RegistryError::UnknownIntent {
                intent_id: intent_id.to_owned(),
            }
        })?;
        let records = self.intent_records(intent_id)?;

        let mut changes = vec![Change::DeleteIntent(intent_id.to_owned())];
        for (index, mut record) in records.into_iter().enumerate() {
            match launched.get(index) {
                Some(instance) => {
                    record.instance_id = Some(instance.instance_id.clone());
                    record.offering = Some(instance.offering.clone());
                    record.hourly_price_usd = instance.hourly_price_usd;
                    record.transition(
                        InstanceState::Booting,
                        now_ms,
                        "cloud returned the instance id",
                    );
                    changes.push(self.event(
                        "instance.launched",
                        now_ms,
                        Some(&intent.queue),
                        Some(&intent.resource),
                        Some(&instance.instance_id),
                        format!("launched on {}", instance.offering),
                    ));
                }
                None => {
                    record.transition(
                        InstanceState::Terminated,
                        now_ms,
                        "the cloud launched fewer instances than requested",
                    );
                    record.hourly_price_usd = 0.0;
                }
            }
            changes.push(Change::PutInstance(record));
        }
        self.commit_with_sequences(changes).await
    }

    /// Applies an agent heartbeat: `busy` with the task it runs, or idle.
    pub async fn heartbeat(
        &mut self,
        key_or_instance_id: &str,
        task_id: Option<&str>,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let mut record = self.record(key_or_instance_id)?;
        record.last_heartbeat_ms = Some(now_ms);
        record.task_id = task_id.map(str::to_owned);
        let to = if task_id.is_some() {
            InstanceState::Busy
        } else {
            InstanceState::Idle
        };
        match record.state {
            InstanceState::Booting | InstanceState::Idle | InstanceState::Busy => {
                let reason = match to {
                    InstanceState::Busy => "agent reports a running task",
                    _ => "agent reports idle",
                };
                record.transition(to, now_ms, reason);
            }
            // A draining or terminating instance keeps its state; the heartbeat only proves it is alive.
            InstanceState::Draining | InstanceState::Terminating => {}
            state => {
                return Err(RegistryError::InvalidTransition {
                    key: record.key,
                    state,
                    action: "a heartbeat",
                    expected: "booting, idle, busy, draining or terminating",
                });
            }
        }
        self.commit(vec![Change::PutInstance(record)]).await
    }

    /// Stores a termination grant and moves the instance to `draining`, before the agent is notified.
    pub async fn grant_termination(
        &mut self,
        key_or_instance_id: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<TerminationGrant, RegistryError> {
        let mut record = self.record(key_or_instance_id)?;
        if record.state != InstanceState::Idle {
            return Err(RegistryError::InvalidTransition {
                key: record.key,
                state: record.state,
                action: "a termination grant",
                expected: "idle",
            });
        }
        let instance_id = record
            .instance_id
            .clone()
            .unwrap_or_else(|| record.key.clone());
        let grant = TerminationGrant {
            instance_id: instance_id.clone(),
            granted_ms: now_ms,
            term: self.term,
            reason: reason.to_owned(),
        };
        record.transition(
            InstanceState::Draining,
            now_ms,
            format!("termination granted: {reason}"),
        );
        let event = self.event(
            "instance.grant",
            now_ms,
            Some(&record.queue),
            Some(&record.resource),
            Some(&instance_id),
            format!("termination granted: {reason}"),
        );
        self.commit(vec![
            Change::PutGrant(grant.clone()),
            Change::PutInstance(record),
            event,
        ])
        .await?;
        Ok(grant)
    }

    /// Moves an instance to `terminating` when the terminate call is about to be sent.
    pub async fn mark_terminating(
        &mut self,
        key_or_instance_id: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let mut record = self.record(key_or_instance_id)?;
        if record.state == InstanceState::Terminated {
            return Err(RegistryError::InvalidTransition {
                key: record.key,
                state: record.state,
                action: "termination",
                expected: "any state but terminated",
            });
        }
        record.transition(InstanceState::Terminating, now_ms, reason);
        let event = self.event(
            "instance.terminating",
            now_ms,
            Some(&record.queue),
            Some(&record.resource),
            record.instance_id.as_deref(),
            reason.to_owned(),
        );
        self.commit(vec![Change::PutInstance(record), event]).await
    }

    /// Closes an instance's record: the cloud reports it gone, or the agent shut it down.
    pub async fn mark_terminated(
        &mut self,
        key_or_instance_id: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let mut record = self.record(key_or_instance_id)?;
        if record.state == InstanceState::Terminated {
            return Ok(());
        }
        record.transition(InstanceState::Terminated, now_ms, reason);
        record.hourly_price_usd = 0.0;
        let mut changes = Vec::new();
        if let Some(instance_id) = &record.instance_id {
            changes.push(Change::DeleteGrant(instance_id.clone()));
        }
        let others_live = self.state.instances.values().any(|other| {
            other.intent_id == record.intent_id
                && other.key != record.key
                && other.state != InstanceState::Terminated
        });
        if !others_live && self.state.bootstraps.contains_key(&record.intent_id) {
            changes.push(Change::DeleteBootstrap(record.intent_id.clone()));
        }
        changes.push(self.event(
            "instance.terminated",
            now_ms,
            Some(&record.queue),
            Some(&record.resource),
            record.instance_id.as_deref(),
            reason.to_owned(),
        ));
        changes.push(Change::PutInstance(record));
        self.commit(changes).await
    }

    fn record(&self, key_or_instance_id: &str) -> Result<InstanceRecord, RegistryError> {
        self.find(key_or_instance_id)
            .cloned()
            .ok_or_else(|| RegistryError::UnknownInstance {
                key: key_or_instance_id.to_owned(),
            })
    }

    fn intent_records(&self, intent_id: &str) -> Result<Vec<InstanceRecord>, RegistryError> {
        let mut records: Vec<InstanceRecord> = self
            .state
            .instances
            .values()
            .filter(|record| record.intent_id == intent_id)
            .cloned()
            .collect();
        if records.is_empty() {
            return Err(RegistryError::UnknownIntent {
                intent_id: intent_id.to_owned(),
            });
        }
        records.sort_by_key(|record| index_of(&record.key));
        Ok(records)
    }

    /// Builds an event with the next sequence number. Several events in one commit get consecutive
    /// numbers through [`Registry::commit_with_sequences`].
    fn event(
        &self,
        kind: &str,
        now_ms: u64,
        queue: Option<&str>,
        resource: Option<&str>,
        instance_id: Option<&str>,
        message: String,
    ) -> Change {
        Change::AppendEvent(Event {
            sequence: self.state.next_event_sequence(),
            at_ms: now_ms,
            kind: kind.to_owned(),
            queue: queue.map(str::to_owned),
            resource: resource.map(str::to_owned),
            instance_id: instance_id.map(str::to_owned),
            message,
        })
    }

    async fn commit(&mut self, changes: Vec<Change>) -> Result<(), RegistryError> {
        self.commit_with_sequences(changes).await
    }

    /// Renumbers the events in `changes` consecutively, stores the changes, and only then applies them in
    /// memory.
    async fn commit_with_sequences(
        &mut self,
        mut changes: Vec<Change>,
    ) -> Result<(), RegistryError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut sequence = self.state.next_event_sequence();
        for change in &mut changes {
            if let Change::AppendEvent(event) = change {
                event.sequence = sequence;
                sequence += 1;
            }
        }
        self.store.apply(&changes).await?;
        self.state.apply(&changes, crate::store::MAX_EVENTS);
        Ok(())
    }
}

/// Returns the policy's state for a record, or `None` for a terminated one, which the policy must not see.
fn policy_state(state: InstanceState) -> Option<policy::InstanceState> {
    Some(match state {
        InstanceState::Requested => policy::InstanceState::Requested,
        InstanceState::Launching => policy::InstanceState::Launching,
        InstanceState::Booting => policy::InstanceState::Booting,
        InstanceState::Idle => policy::InstanceState::Idle,
        InstanceState::Busy => policy::InstanceState::Busy,
        InstanceState::Draining => policy::InstanceState::Draining,
        InstanceState::Terminating => policy::InstanceState::Terminating,
        InstanceState::Terminated => return None,
    })
}

fn index_of(key: &str) -> u32 {
    key.rsplit_once('/')
        .and_then(|(_, index)| index.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStateStore;

    async fn registry(dir: &tempfile::TempDir) -> Registry {
        let store: Arc<dyn StateStore> =
            Arc::new(FileStateStore::new(dir.path().join("state.json")));
        Registry::load(store, 7).await.unwrap()
    }

    fn decision(count: u32) -> LaunchDecision {
        LaunchDecision {
            intent_id: "intent-1".to_owned(),
            queue: "gpu".to_owned(),
            resource: "gpu-spot".to_owned(),
            offering: "g5.xlarge/us-east-1a/spot".to_owned(),
            hourly_price_usd: 0.45,
            count,
            bootstrap: None,
        }
    }

    fn launched(id: &str) -> Launched {
        Launched {
            instance_id: id.to_owned(),
            offering: "g5.xlarge/us-east-1a/spot".to_owned(),
            hourly_price_usd: 0.45,
        }
    }

    #[tokio::test]
    async fn lifecycle_records_every_transition() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = registry(&dir).await;

        registry.record_intent(&decision(1), 1_000).await.unwrap();
        registry.mark_launching("intent-1", 1_100).await.unwrap();
        registry
            .record_launched("intent-1", &[launched("i-a")], 2_000)
            .await
            .unwrap();
        registry.heartbeat("i-a", None, 3_000).await.unwrap();
        registry
            .heartbeat("i-a", Some("task-1"), 4_000)
            .await
            .unwrap();
        registry.heartbeat("i-a", None, 5_000).await.unwrap();
        let grant = registry
            .grant_termination("i-a", "idle for 300 s", 6_000)
            .await
            .unwrap();
        registry
            .mark_terminated("i-a", "agent shut the machine down", 7_000)
            .await
            .unwrap();

        assert_eq!(grant.instance_id, "i-a");
        assert_eq!(grant.term, 7);
        let record = registry.find("i-a").unwrap();
        let states: Vec<InstanceState> = record.history.iter().map(|step| step.to).collect();
        assert_eq!(
            states,
            vec![
                InstanceState::Launching,
                InstanceState::Booting,
                InstanceState::Idle,
                InstanceState::Busy,
                InstanceState::Idle,
                InstanceState::Draining,
                InstanceState::Terminated,
            ]
        );
        assert!(
            registry.state().intents.is_empty(),
            "the intent closed with the launch"
        );
        assert!(
            registry.state().grants.is_empty(),
            "the grant closed with the termination"
        );
        let kinds: Vec<&str> = registry
            .state()
            .events
            .iter()
            .map(|event| event.kind.as_str())
            .collect();
        assert_eq!(
            kinds,
            vec![
                "instance.requested",
                "instance.launched",
                "instance.grant",
                "instance.terminated"
            ]
        );
        let sequences: Vec<u64> = registry
            .state()
            .events
            .iter()
            .map(|event| event.sequence)
            .collect();
        assert_eq!(sequences, vec![1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn successor_loads_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = registry(&dir).await;
        registry.record_intent(&decision(2), 1_000).await.unwrap();
        registry.mark_launching("intent-1", 1_100).await.unwrap();

        let successor = self::registry(&dir).await;

        assert_eq!(successor.state(), registry.state());
        assert_eq!(
            successor.state().intents["intent-1"].count,
            2,
            "the open intent is there to replay"
        );
    }

    #[tokio::test]
    async fn short_launch_closes_unfilled_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = registry(&dir).await;
        registry.record_intent(&decision(3), 1_000).await.unwrap();

        registry
            .record_launched("intent-1", &[launched("i-a")], 2_000)
            .await
            .unwrap();

        let states: Vec<InstanceState> = registry
            .state()
            .instances
            .values()
            .map(|record| record.state)
            .collect();
        assert_eq!(
            states,
            vec![
                InstanceState::Booting,
                InstanceState::Terminated,
                InstanceState::Terminated
            ]
        );
        let snapshot = registry.snapshot(2_000, Vec::new(), Vec::new());
        assert_eq!(
            snapshot.instances.len(),
            1,
            "the policy never sees terminated records"
        );
        assert_eq!(snapshot.hourly_spend_usd(), 0.45);
    }

    #[tokio::test]
    async fn grant_refused_while_busy() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = registry(&dir).await;
        registry.record_intent(&decision(1), 1_000).await.unwrap();
        registry
            .record_launched("intent-1", &[launched("i-a")], 2_000)
            .await
            .unwrap();
        registry
            .heartbeat("i-a", Some("task-1"), 3_000)
            .await
            .unwrap();

        let err = registry
            .grant_termination("i-a", "idle", 4_000)
            .await
            .unwrap_err();

        assert!(
            matches!(
                err,
                RegistryError::InvalidTransition {
                    state: InstanceState::Busy,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("needs it in idle"), "{err}");
        assert!(registry.state().grants.is_empty());
    }

    #[tokio::test]
    async fn snapshot_feeds_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = registry(&dir).await;
        registry.record_intent(&decision(2), 1_000).await.unwrap();

        let snapshot = registry.snapshot(
            1_500,
            vec![QueueView {
                name: "gpu",
                waiting: 2,
            }],
            Vec::new(),
        );

        assert_eq!(snapshot.instances.len(), 2);
        assert!(
            snapshot
                .instances
                .iter()
                .all(|view| view.state == policy::InstanceState::Requested)
        );
        assert_eq!(snapshot.instances[0].offering, "g5.xlarge/us-east-1a/spot");
        assert_eq!(snapshot.now, Duration::from_millis(1_500));
        assert_eq!(snapshot.waiting("gpu"), 2);
    }

    #[tokio::test]
    async fn unknown_instance_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = registry(&dir).await;

        let err = registry
            .heartbeat("i-ghost", None, 1_000)
            .await
            .unwrap_err();

        assert_eq!(
            err.to_string(),
            "no instance record i-ghost; it may have been terminated and removed"
        );
    }
}
