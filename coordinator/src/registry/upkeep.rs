//! Records besides the instance lifecycle: failed launches, offering backoffs, runtime overrides, the event
//! log, and the pruning of old terminated records.

use super::{Registry, RegistryError};
use crate::store::{BackoffRecord, Change, InstanceState, QueueDepths, RuntimeOverrides};

/// Maximum of records one prune removes, below the store's limit of changes per transaction.
const MAX_PRUNED_PER_CALL: usize = 50;

impl Registry {
    /// Closes a launch intent whose cloud call failed: its records end as terminated with `reason`, which the
    /// event log shows operators.
    pub async fn record_launch_failed(
        &mut self,
        intent_id: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let intent = self.state.intents.get(intent_id).cloned().ok_or_else(|| {
            RegistryError::UnknownIntent {
                intent_id: intent_id.to_owned(),
            }
        })?;
        let records = self.intent_records(intent_id)?;
        let mut changes = vec![
            Change::DeleteIntent(intent_id.to_owned()),
            Change::DeleteBootstrap(intent_id.to_owned()),
        ];
        for mut record in records {
            if record.state != InstanceState::Terminated {
                record.transition(
                    InstanceState::Terminated,
                    now_ms,
                    format!("launch failed: {reason}"),
                );
                record.hourly_price_usd = 0.0;
                changes.push(Change::PutInstance(record));
            }
        }
        changes.push(self.event(
            "launch.failed",
            now_ms,
            Some(&intent.queue),
            Some(&intent.resource),
            None,
            format!("launch of {} instance(s) failed: {reason}", intent.count),
        ));
        self.commit(changes).await
    }

    /// Stores an offering's backoff so a new leader skips the offering too.
    pub async fn put_backoff(
        &mut self,
        backoff: BackoffRecord,
        message: String,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let event = self.event("offering.backoff", now_ms, None, None, None, message);
        self.commit(vec![Change::PutBackoff(backoff), event]).await
    }

    /// Backs off every offering of a resource whose launch failed for a reason other than capacity, so the
    /// policy moves to the queue's next resource instead of repeating the failing call every tick.
    pub async fn back_off_resource(
        &mut self,
        queue: &str,
        resource: &str,
        backoffs: Vec<BackoffRecord>,
        message: String,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let event = self.event(
            "resource.backoff",
            now_ms,
            Some(queue),
            Some(resource),
            None,
            message,
        );
        let mut changes: Vec<Change> = backoffs.into_iter().map(Change::PutBackoff).collect();
        changes.push(event);
        self.commit(changes).await
    }

    /// Replaces the runtime overrides (paused queues, changed limits) with an event that describes the change.
    pub async fn set_overrides(
        &mut self,
        overrides: RuntimeOverrides,
        queue: &str,
        message: String,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let event = self.event("queue.override", now_ms, Some(queue), None, None, message);
        self.commit(vec![Change::PutOverrides(overrides), event])
            .await
    }

    /// Stores the leader's latest waiting-task counts, for followers to report, when they changed or the stored
    /// ones are older than `refresh_ms`. Returns whether it wrote.
    pub async fn put_queue_depths(
        &mut self,
        depths: QueueDepths,
        refresh_ms: u64,
    ) -> Result<bool, RegistryError> {
        let stored = &self.state().queue_depths;
        if stored.waiting == depths.waiting
            && depths.observed_ms.saturating_sub(stored.observed_ms) < refresh_ms
        {
            return Ok(false);
        }
        self.commit(vec![Change::PutQueueDepths(depths)]).await?;
        Ok(true)
    }

    /// Appends an event that records no state change, such as a decision held by a limit.
    pub async fn record_event(
        &mut self,
        kind: &str,
        queue: Option<&str>,
        instance_id: Option<&str>,
        message: String,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let event = self.event(kind, now_ms, queue, None, instance_id, message);
        self.commit(vec![event]).await
    }

    /// Removes terminated records older than `retention_ms` and expired backoffs. Returns how many records
    /// were removed.
    pub async fn prune(&mut self, retention_ms: u64, now_ms: u64) -> Result<usize, RegistryError> {
        let cutoff = now_ms.saturating_sub(retention_ms);
        let mut changes: Vec<Change> = self
            .state
            .instances
            .values()
            .filter(|record| {
                record.state == InstanceState::Terminated && record.state_since_ms < cutoff
            })
            .take(MAX_PRUNED_PER_CALL)
            .map(|record| Change::DeleteInstance(record.key.clone()))
            .collect();
        let room = MAX_PRUNED_PER_CALL.saturating_sub(changes.len());
        changes.extend(
            self.state
                .backoffs
                .values()
                .filter(|backoff| backoff.until_ms < now_ms)
                .take(room)
                .map(|backoff| Change::DeleteBackoff(backoff.offering.clone())),
        );
        let count = changes.len();
        self.commit(changes).await?;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::registry::LaunchDecision;
    use crate::store::{FileStateStore, StateStore};

    async fn registry(dir: &tempfile::TempDir) -> Registry {
        let store: Arc<dyn StateStore> =
            Arc::new(FileStateStore::new(dir.path().join("state.json")));
        Registry::load(store, 1).await.unwrap()
    }

    fn decision() -> LaunchDecision {
        LaunchDecision {
            intent_id: "intent-1".to_owned(),
            queue: "gpu".to_owned(),
            resource: "gpu-spot".to_owned(),
            offering: "g5.xlarge/us-east-1a/spot".to_owned(),
            hourly_price_usd: 0.45,
            count: 2,
            bootstrap: None,
        }
    }

    #[tokio::test]
    async fn failed_launch_closes_intent_with_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = registry(&dir).await;
        registry.record_intent(&decision(), 1).await.unwrap();

        registry
            .record_launch_failed("intent-1", "InvalidAMIID.NotFound: ami-1", 2)
            .await
            .unwrap();

        assert!(registry.state().intents.is_empty());
        let record = registry.find("intent-1/1").unwrap();
        assert_eq!(record.state, InstanceState::Terminated);
        assert!(
            record.history.last().unwrap().reason.contains("ami-1"),
            "{:?}",
            record.history
        );
        let event = registry.state().events.last().unwrap();
        assert_eq!(event.kind, "launch.failed");
        assert!(event.message.contains("InvalidAMIID"), "{}", event.message);
    }

    #[tokio::test]
    async fn prune_removes_old_terminated_records_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = registry(&dir).await;
        registry.record_intent(&decision(), 1).await.unwrap();
        registry
            .record_launch_failed("intent-1", "test", 10)
            .await
            .unwrap();
        let mut second = decision();
        second.intent_id = "intent-2".to_owned();
        registry.record_intent(&second, 20).await.unwrap();

        assert_eq!(registry.prune(100, 50).await.unwrap(), 0);
        assert_eq!(registry.prune(100, 200).await.unwrap(), 2);

        assert!(registry.find("intent-1/0").is_none());
        assert!(registry.find("intent-2/0").is_some());
    }

    #[tokio::test]
    async fn queue_depths_written_on_change_or_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = registry(&dir).await;
        let depths = |observed_ms: u64, waiting: u32| QueueDepths {
            observed_ms,
            waiting: [("gpu".to_owned(), waiting)].into(),
        };

        assert!(
            registry
                .put_queue_depths(depths(1_000, 3), 30_000)
                .await
                .unwrap()
        );
        assert!(
            !registry
                .put_queue_depths(depths(5_000, 3), 30_000)
                .await
                .unwrap()
        );
        assert!(
            registry
                .put_queue_depths(depths(6_000, 4), 30_000)
                .await
                .unwrap()
        );
        assert!(
            registry
                .put_queue_depths(depths(36_000, 4), 30_000)
                .await
                .unwrap()
        );

        // A new registry over the same file, as a follower would load it, reads the last write.
        let reloaded = super::tests::registry(&dir).await;
        assert_eq!(reloaded.state().queue_depths, depths(36_000, 4));
    }
}
