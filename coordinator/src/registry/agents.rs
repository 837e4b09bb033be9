//! Transitions that node agents and operators cause: registration with a bootstrap token, adoption of an
//! instance the registry lost, drains and interruptions.

use std::collections::BTreeSet;

use super::{Registry, RegistryError};
use crate::store::{Change, InstanceRecord, InstanceState, TerminationGrant};

/// An accepted registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub instance_id: String,
    pub worker_id: String,
}

/// An instance the cloud reports with the cluster's tags but the registry has no record of.
#[derive(Debug, Clone, PartialEq)]
pub struct Adoption {
    pub instance_id: String,
    pub intent_id: String,
    pub queue: String,
    pub resource: String,
    pub offering: String,
    pub hourly_price_usd: f64,
}

impl Registry {
    /// Accepts an agent's registration: the presented bootstrap token must be the launch's and unused by this
    /// instance. The redemption is stored before the caller responds to the agent, so a token works once even
    /// across a change of leader.
    pub async fn register_agent(
        &mut self,
        instance_id: &str,
        presented_token: &str,
        worker_prefix: &str,
        now_ms: u64,
    ) -> Result<Registration, RegistryError> {
        let mut record = self.record(instance_id)?;
        if !matches!(
            record.state,
            InstanceState::Booting | InstanceState::Idle | InstanceState::Busy
        ) {
            return Err(RegistryError::InvalidTransition {
                key: record.key,
                state: record.state,
                action: "a registration",
                expected: "booting, idle or busy",
            });
        }
        let mut bootstrap = self
            .state
            .bootstraps
            .get(&record.intent_id)
            .cloned()
            .ok_or_else(|| crate::auth::BootstrapError::Invalid {
                instance_id: instance_id.to_owned(),
            })?;
        let launched: BTreeSet<String> = self
            .state
            .instances
            .values()
            .filter(|other| other.intent_id == record.intent_id)
            .filter_map(|other| other.instance_id.clone())
            .collect();
        bootstrap.redeem(presented_token, instance_id, &launched)?;

        let worker_id = format!("{worker_prefix}:{}:{instance_id}", record.resource);
        record.worker_id = Some(worker_id.clone());
        record.last_heartbeat_ms = Some(now_ms);
        let event = self.event(
            "agent.registered",
            now_ms,
            Some(&record.queue),
            Some(&record.resource),
            Some(instance_id),
            format!("agent registered as worker {worker_id}"),
        );
        self.commit(vec![
            Change::PutBootstrap(bootstrap),
            Change::PutInstance(record),
            event,
        ])
        .await?;
        Ok(Registration {
            instance_id: instance_id.to_owned(),
            worker_id,
        })
    }

    /// Takes in an instance the cloud reports with this cluster's tags but no record: a launch whose record
    /// was lost, for example. The record starts in `booting`, so its agent may register or the boot timeout
    /// ends it.
    pub async fn adopt(&mut self, found: &Adoption, now_ms: u64) -> Result<(), RegistryError> {
        let Adoption {
            instance_id,
            intent_id,
            queue,
            resource,
            offering,
            hourly_price_usd,
        } = found;
        if self.find(instance_id).is_some() {
            return Ok(());
        }
        let mut record = InstanceRecord::new(intent_id, 0, queue, resource, now_ms);
        record.key = format!("{intent_id}/{instance_id}");
        record.instance_id = Some(instance_id.to_owned());
        record.offering = Some(offering.to_owned());
        record.hourly_price_usd = *hourly_price_usd;
        record.transition(
            InstanceState::Booting,
            now_ms,
            "adopted: the cloud reports the instance with this cluster's tags",
        );
        let event = self.event(
            "instance.adopted",
            now_ms,
            Some(queue.as_str()),
            Some(resource.as_str()),
            Some(instance_id.as_str()),
            format!("adopted instance of launch {intent_id} found in the cloud without a record"),
        );
        self.commit(vec![Change::PutInstance(record), event]).await
    }

    /// Drains an instance on an operator's request: it takes no new task, and terminates once its current
    /// task ends. The grant is stored, so the agent's termination request is granted.
    pub async fn drain(
        &mut self,
        key_or_instance_id: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<InstanceRecord, RegistryError> {
        let mut record = self.record(key_or_instance_id)?;
        match record.state {
            InstanceState::Draining => return Ok(record),
            InstanceState::Booting | InstanceState::Idle | InstanceState::Busy => {}
            state => {
                return Err(RegistryError::InvalidTransition {
                    key: record.instance_id.unwrap_or(record.key),
                    state,
                    action: "a drain",
                    expected: "booting, idle or busy",
                });
            }
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
        record.transition(InstanceState::Draining, now_ms, reason);
        let event = self.event(
            "instance.drain",
            now_ms,
            Some(&record.queue),
            Some(&record.resource),
            Some(&instance_id),
            reason.to_owned(),
        );
        self.commit(vec![
            Change::PutGrant(grant),
            Change::PutInstance(record.clone()),
            event,
        ])
        .await?;
        Ok(record)
    }

    /// Stores the bootstrap record of a launch unless one exists, for an adopted instance whose launch record
    /// was lost.
    pub async fn ensure_bootstrap(
        &mut self,
        record: crate::auth::BootstrapRecord,
    ) -> Result<(), RegistryError> {
        if self.state.bootstraps.contains_key(&record.intent_id) {
            return Ok(());
        }
        self.commit(vec![Change::PutBootstrap(record)]).await
    }

    /// Tells whether a termination of the instance is already granted.
    pub fn is_granted(&self, key_or_instance_id: &str) -> bool {
        self.find(key_or_instance_id).is_some_and(|record| {
            let id = record.instance_id.as_deref().unwrap_or(&record.key);
            self.state.grants.contains_key(id)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use clearml_api::Secret;

    use super::*;
    use crate::auth::BootstrapRecord;
    use crate::registry::{LaunchDecision, Launched};
    use crate::store::{FileStateStore, StateStore};

    async fn launched_registry(dir: &tempfile::TempDir, token: &Secret) -> Registry {
        let store: Arc<dyn StateStore> =
            Arc::new(FileStateStore::new(dir.path().join("state.json")));
        let mut registry = Registry::load(store, 3).await.unwrap();
        let decision = LaunchDecision {
            intent_id: "intent-1".to_owned(),
            queue: "gpu".to_owned(),
            resource: "gpu-spot".to_owned(),
            offering: "g5.xlarge/us-east-1a/spot".to_owned(),
            hourly_price_usd: 0.45,
            count: 2,
            bootstrap: Some(BootstrapRecord::for_token("intent-1", token, 2, 0)),
        };
        registry.record_intent(&decision, 1).await.unwrap();
        let launched: Vec<Launched> = ["i-a", "i-b"]
            .iter()
            .map(|id| Launched {
                instance_id: (*id).to_owned(),
                offering: decision.offering.clone(),
                hourly_price_usd: 0.45,
            })
            .collect();
        registry
            .record_launched("intent-1", &launched, 2)
            .await
            .unwrap();
        registry
    }

    #[tokio::test]
    async fn bootstrap_token_registers_each_instance_once() {
        let dir = tempfile::tempdir().unwrap();
        let token = Secret::new("bootstrap-token");
        let mut registry = launched_registry(&dir, &token).await;

        let registration = registry
            .register_agent("i-a", token.expose(), "fleet", 10)
            .await
            .unwrap();
        assert_eq!(registration.worker_id, "fleet:gpu-spot:i-a");
        registry
            .register_agent("i-b", token.expose(), "fleet", 11)
            .await
            .unwrap();

        let reused = registry
            .register_agent("i-a", token.expose(), "fleet", 12)
            .await
            .unwrap_err();
        assert!(
            reused.to_string().contains("already registered"),
            "{reused}"
        );
        let wrong = registry
            .register_agent("i-b", "guessed", "fleet", 13)
            .await
            .unwrap_err();
        assert!(wrong.to_string().contains("does not match"), "{wrong}");
    }

    #[tokio::test]
    async fn redemption_survives_a_new_leader() {
        let dir = tempfile::tempdir().unwrap();
        let token = Secret::new("bootstrap-token");
        let mut registry = launched_registry(&dir, &token).await;
        registry
            .register_agent("i-a", token.expose(), "fleet", 10)
            .await
            .unwrap();

        let store: Arc<dyn StateStore> =
            Arc::new(FileStateStore::new(dir.path().join("state.json")));
        let mut successor = Registry::load(store, 4).await.unwrap();
        let err = successor
            .register_agent("i-a", token.expose(), "fleet", 20)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("already registered"), "{err}");
    }

    #[tokio::test]
    async fn drain_grants_termination_of_a_busy_instance() {
        let dir = tempfile::tempdir().unwrap();
        let token = Secret::new("bootstrap-token");
        let mut registry = launched_registry(&dir, &token).await;
        registry.heartbeat("i-a", Some("task-1"), 10).await.unwrap();

        let record = registry
            .drain("i-a", "drained by operator ops", 11)
            .await
            .unwrap();

        assert_eq!(record.state, InstanceState::Draining);
        assert!(registry.is_granted("i-a"));
        assert!(!registry.is_granted("i-b"));
    }

    #[tokio::test]
    async fn adopted_instance_boots_under_its_intent() {
        let dir = tempfile::tempdir().unwrap();
        let token = Secret::new("bootstrap-token");
        let mut registry = launched_registry(&dir, &token).await;

        let found = Adoption {
            instance_id: "i-x".to_owned(),
            intent_id: "intent-9".to_owned(),
            queue: "gpu".to_owned(),
            resource: "gpu-spot".to_owned(),
            offering: "g5.xlarge/a/spot".to_owned(),
            hourly_price_usd: 0.45,
        };
        registry.adopt(&found, 30).await.unwrap();

        let record = registry.find("i-x").unwrap();
        assert_eq!(record.state, InstanceState::Booting);
        assert_eq!(record.intent_id, "intent-9");
        assert_eq!(
            registry.state().events.last().unwrap().kind,
            "instance.adopted"
        );
    }
}
