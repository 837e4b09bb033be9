//! The state one leader term shares between its actors and the API: the registry, the providers, the newest
//! ClearML observation, and the term's validity.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clearml_api::Secret;
use tokio::sync::{Mutex, watch};

use crate::auth::BootstrapRecord;
use crate::config::Config;
use crate::election::Role;
use crate::keys::AgentKeys;
use crate::metrics::Metrics;
use crate::policy::{self, Action, PolicyConfig, QueueView};
use crate::poller::Observation;
use crate::providers::{CloudProvider, Instance, LaunchRequest};
use crate::registry::{LaunchDecision, Registry, RegistryError};
use crate::store::{InstanceState, LaunchIntent, RuntimeOverrides};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_millis() as u64)
        .unwrap_or(0)
}

/// This replica no longer leads the term it acted under.
#[derive(Debug, Clone, thiserror::Error)]
#[error("this replica no longer leads term {term}; the action was not taken")]
pub struct NotLeader {
    pub term: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(
        "the newest ClearML observation is {age_ms} ms old (limit {limit_ms} ms); no decision is made on stale data"
    )]
    Stale { age_ms: u64, limit_ms: u64 },
    #[error("no ClearML observation yet; the first poll has not succeeded")]
    NoObservation,
    #[error("queue {0:?} is not configured")]
    UnknownQueue(String),
}

/// A launch stored as an intent, ready for the cloud call.
#[derive(Debug, Clone)]
pub struct LaunchJob {
    pub intent: LaunchIntent,
    pub request: LaunchRequest,
    /// Price of the offering the policy planned, used when the provider has none for the one it launched.
    pub planned_price_usd: f64,
    /// True when a new leader or the reconciler replays an intent left open.
    pub replay: bool,
}

/// An instance to terminate, with the reason for its record and the event log.
#[derive(Debug, Clone)]
pub struct TerminateJob {
    pub key: String,
    pub instance_id: Option<String>,
    pub resource: String,
    pub reason: String,
}

/// Decisions of one policy run for a queue.
#[derive(Debug, Default)]
pub struct QueuePlan {
    pub launches: Vec<LaunchJob>,
    pub terminations: Vec<TerminateJob>,
    pub held: Vec<String>,
}

pub struct FleetCore {
    pub config: Arc<Config>,
    pub term: i64,
    pub registry: Mutex<Registry>,
    /// Provider of each resource.
    pub providers: BTreeMap<String, Arc<dyn CloudProvider>>,
    pub keys: AgentKeys,
    pub metrics: Arc<Metrics>,
    pub clearml: clearml_api::Client,
    observation: watch::Sender<Option<Arc<Observation>>>,
    role: watch::Receiver<Role>,
    /// Until when the term may act; see [`crate::election::Elector::deadline`].
    deadline: watch::Receiver<Option<tokio::time::Instant>>,
    stopped: AtomicBool,
    /// Intents whose cloud call runs now, so the reconciler does not replay them at the same time.
    in_flight: std::sync::Mutex<BTreeSet<String>>,
    /// Cloud instances with the cluster's tags and no record, by id, from the last reconcile.
    unknown: std::sync::Mutex<BTreeMap<String, Instance>>,
    pub leader_since_ms: u64,
    first_decision_ms: AtomicU64,
}

impl FleetCore {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        term: i64,
        registry: Registry,
        providers: BTreeMap<String, Arc<dyn CloudProvider>>,
        keys: AgentKeys,
        metrics: Arc<Metrics>,
        clearml: clearml_api::Client,
        role: watch::Receiver<Role>,
        deadline: watch::Receiver<Option<tokio::time::Instant>>,
    ) -> Self {
        let (observation, _) = watch::channel(None);
        Self {
            config,
            term,
            registry: Mutex::new(registry),
            providers,
            keys,
            metrics,
            clearml,
            observation,
            role,
            deadline,
            stopped: AtomicBool::new(false),
            in_flight: std::sync::Mutex::new(BTreeSet::new()),
            unknown: std::sync::Mutex::new(BTreeMap::new()),
            leader_since_ms: now_ms(),
            first_decision_ms: AtomicU64::new(0),
        }
    }

    /// Fails unless this replica still leads this core's term. Checked before every cloud call.
    pub fn may_act(&self) -> Result<(), NotLeader> {
        let leads = !self.stopped.load(Ordering::SeqCst)
            && matches!(&*self.role.borrow(), Role::Leader(term) if term.revision == self.term)
            && self
                .deadline
                .borrow()
                .is_some_and(|deadline| tokio::time::Instant::now() < deadline);
        if leads {
            Ok(())
        } else {
            Err(NotLeader { term: self.term })
        }
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub fn publish_observation(&self, observation: Observation) {
        self.observation.send_replace(Some(Arc::new(observation)));
    }

    /// Returns the newest observation if it is fresh enough to decide on, at most three poll intervals old.
    pub fn fresh_observation(&self) -> Result<Arc<Observation>, FleetError> {
        let observation = self
            .observation
            .borrow()
            .clone()
            .ok_or(FleetError::NoObservation)?;
        let now = Duration::from_millis(now_ms());
        let limit = self.max_observation_age();
        let age = now.saturating_sub(observation.taken_at);
        self.metrics.set(
            "fleet_clearml_observation_age_seconds",
            &[],
            age.as_secs_f64(),
        );
        if age > limit {
            return Err(FleetError::Stale {
                age_ms: age.as_millis() as u64,
                limit_ms: limit.as_millis() as u64,
            });
        }
        Ok(observation)
    }

    pub fn latest_observation(&self) -> Option<Arc<Observation>> {
        self.observation.borrow().clone()
    }

    fn max_observation_age(&self) -> Duration {
        self.config.clearml.poll_interval * 3
    }

    /// Time of the first decision this term made, in milliseconds since the epoch; 0 before it.
    pub fn first_decision_ms(&self) -> u64 {
        self.first_decision_ms.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> BTreeSet<String> {
        lock(&self.in_flight).clone()
    }

    /// Marks an intent's cloud call as running; false when it already runs.
    pub fn begin_launch(&self, intent_id: &str) -> bool {
        lock(&self.in_flight).insert(intent_id.to_owned())
    }

    pub fn end_launch(&self, intent_id: &str) {
        lock(&self.in_flight).remove(intent_id);
    }

    pub fn set_unknown(&self, instances: BTreeMap<String, Instance>) {
        *lock(&self.unknown) = instances;
    }

    pub fn unknown_instance(&self, instance_id: &str) -> Option<Instance> {
        lock(&self.unknown).get(instance_id).cloned()
    }

    pub fn provider_of(&self, resource: &str) -> Option<&Arc<dyn CloudProvider>> {
        self.providers.get(resource)
    }

    /// Values the instances of a launch need at boot: the bootstrap token and the coordinator endpoints.
    pub fn boot_values(&self, intent_id: &str) -> BTreeMap<String, Secret> {
        let mut values = BTreeMap::from([
            (
                "bootstrap_token".to_owned(),
                self.keys.bootstrap_token(intent_id),
            ),
            (
                "coordinator_endpoints".to_owned(),
                Secret::new(self.config.api.agent_endpoints.join(",")),
            ),
        ]);
        let endpoints_toml = self
            .config
            .api
            .agent_endpoints
            .iter()
            .map(|endpoint| format!("\"{endpoint}\""))
            .collect::<Vec<_>>()
            .join(", ");
        values.insert(
            "coordinator_endpoints_toml".to_owned(),
            Secret::new(format!("[{endpoints_toml}]")),
        );
        values.insert(
            "worker_prefix".to_owned(),
            Secret::new(self.config.worker_prefix.clone()),
        );
        values
    }

    /// Builds the launch request of a stored intent, for its first call or a replay.
    pub fn launch_request(&self, intent: &LaunchIntent) -> LaunchRequest {
        LaunchRequest {
            queue: intent.queue.clone(),
            resource: intent.resource.clone(),
            intent_id: intent.id.clone(),
            tags: BTreeMap::new(),
            boot_values: self.boot_values(&intent.id),
        }
    }

    /// Returns the policy settings with the runtime overrides applied.
    pub fn effective_policy(&self, overrides: &RuntimeOverrides) -> PolicyConfig {
        let mut policy = self.config.policy.clone();
        for queue in &mut policy.queues {
            if let Some(limits) = overrides.queue_limits.get(&queue.name) {
                if let Some(value) = limits.min_instances {
                    queue.min_instances = value;
                }
                if let Some(value) = limits.max_instances {
                    queue.max_instances = value;
                }
                if let Some(value) = limits.min_idle {
                    queue.min_idle = value;
                }
            }
        }
        policy
    }

    /// Runs the policy for `queue` on a fresh observation and stores an intent for every launch it decides,
    /// all under the registry's lock, so the next queue's run counts these launches against the shared
    /// limits.
    pub async fn plan_queue(&self, queue: &str) -> Result<QueuePlan, FleetError> {
        self.may_act()?;
        let observation = self.fresh_observation()?;
        if self.config.policy.queue(queue).is_none() {
            return Err(FleetError::UnknownQueue(queue.to_owned()));
        }
        let now = now_ms();
        let mut registry = self.registry.lock().await;
        let overrides = registry.state().overrides.clone();
        let policy = self.effective_policy(&overrides);
        let actions = decide_for(&registry, &policy, &observation, now, Vec::new());
        let paused = overrides.paused_queues.contains(queue);

        let mut plan = QueuePlan::default();
        let mut decisions = Vec::new();
        for action in actions {
            match action {
                Action::Launch {
                    queue: action_queue,
                    resource,
                    offering,
                    count,
                } if action_queue == queue => {
                    if paused {
                        plan.held
                            .push(format!("{count} launch(es) of {resource}: queue paused"));
                        continue;
                    }
                    let price = policy
                        .queue(queue)
                        .and_then(|config| config.resource(&resource))
                        .and_then(|config| {
                            config
                                .offerings
                                .iter()
                                .find(|candidate| candidate.id == offering)
                        })
                        .map_or(0.0, |candidate| candidate.hourly_price_usd);
                    decisions.push((resource, offering, count, price));
                }
                Action::Terminate { instance, reason } => {
                    if let Some(record) = registry.find(&instance)
                        && record.queue == queue
                    {
                        plan.terminations.push(TerminateJob {
                            key: record.key.clone(),
                            instance_id: record.instance_id.clone(),
                            resource: record.resource.clone(),
                            reason: reason.to_string(),
                        });
                    }
                }
                Action::Hold {
                    queue: action_queue,
                    missing,
                    reason,
                } if action_queue == queue => {
                    plan.held.push(format!("{missing} held: {reason}"));
                }
                _ => {}
            }
        }

        for (resource, offering, count, price) in decisions {
            self.may_act()?;
            let intent_id = uuid::Uuid::new_v4().to_string();
            let token = self.keys.bootstrap_token(&intent_id);
            let decision = LaunchDecision {
                intent_id: intent_id.clone(),
                queue: queue.to_owned(),
                resource: resource.clone(),
                offering,
                hourly_price_usd: price,
                count,
                bootstrap: Some(BootstrapRecord::for_token(&intent_id, &token, count, now)),
            };
            let intent = registry.record_intent(&decision, now).await?;
            let request = self.launch_request(&intent);
            plan.launches.push(LaunchJob {
                intent,
                request,
                planned_price_usd: price,
                replay: false,
            });
        }
        drop(registry);

        self.metrics
            .inc("fleet_policy_decisions_total", &[("queue", queue)]);
        let _ = self.first_decision_ms.compare_exchange(
            0,
            now_ms(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        Ok(plan)
    }

    /// Decides an agent's termination request with the policy: granted (and stored) or refused with the
    /// reason.
    pub async fn decide_termination(
        &self,
        instance_id: &str,
    ) -> Result<Result<(), String>, FleetError> {
        self.may_act()?;
        let mut registry = self.registry.lock().await;
        let Some(record) = registry.find(instance_id).cloned() else {
            return Ok(Err(format!(
                "instance {instance_id} has no record in this cluster"
            )));
        };
        if registry.is_granted(instance_id) {
            return Ok(Ok(()));
        }
        if record.state != InstanceState::Idle {
            return Ok(Err(format!(
                "instance {instance_id} is {:?}; only an idle instance may terminate",
                record.state
            )));
        }
        let observation = self.fresh_observation()?;
        let now = now_ms();
        let policy = self.effective_policy(&registry.state().overrides);
        let actions = decide_for(&registry, &policy, &observation, now, vec![&record.key]);
        let verdict = actions.into_iter().find_map(|action| match action {
            Action::Grant { instance } if instance == record.key => Some(Ok(())),
            Action::Refuse { instance, reason } if instance == record.key => {
                Some(Err(reason.to_string()))
            }
            _ => None,
        });
        match verdict {
            Some(Ok(())) => {
                registry
                    .grant_termination(&record.key, "idle, not needed by its queue", now)
                    .await?;
                Ok(Ok(()))
            }
            Some(Err(reason)) => Ok(Err(reason)),
            None => Ok(Err(
                "the policy made no decision for this instance; retry later".to_owned(),
            )),
        }
    }
}

impl FleetCore {
    /// Runs the policy for `queue` without storing or calling anything, and returns its actions.
    pub async fn dry_run(&self, queue: &str) -> Result<Vec<Action>, FleetError> {
        let observation = self.fresh_observation()?;
        if self.config.policy.queue(queue).is_none() {
            return Err(FleetError::UnknownQueue(queue.to_owned()));
        }
        let registry = self.registry.lock().await;
        let policy = self.effective_policy(&registry.state().overrides);
        let actions = decide_for(&registry, &policy, &observation, now_ms(), Vec::new());
        Ok(actions
            .into_iter()
            .filter(|action| match action {
                Action::Launch { queue: name, .. } | Action::Hold { queue: name, .. } => {
                    name == queue
                }
                Action::Terminate { instance, .. }
                | Action::Grant { instance }
                | Action::Refuse { instance, .. } => registry
                    .find(instance)
                    .is_some_and(|record| record.queue == queue),
            })
            .collect())
    }
}

/// Runs the policy over every configured queue with the observation's waiting counts.
fn decide_for(
    registry: &Registry,
    policy: &PolicyConfig,
    observation: &Observation,
    now_ms: u64,
    termination_requests: Vec<&str>,
) -> Vec<Action> {
    let queues: Vec<QueueView<'_>> = policy
        .queues
        .iter()
        .map(|queue| QueueView {
            name: &queue.name,
            waiting: observation.waiting(&queue.name),
        })
        .collect();
    let snapshot = registry.snapshot(now_ms, queues, termination_requests);
    policy::decide(policy, &snapshot)
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
