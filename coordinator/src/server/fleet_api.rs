//! FleetService: the API of operators and tools. Every call needs an API token (viewer for reads, operator
//! for writes). Any replica serves reads; writes go to the leader, and a follower refuses them with
//! FAILED_PRECONDITION and the leader's address.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::v1::{self, fleet_service_server::FleetService};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::Node;
use super::convert;
use crate::config::Role as TokenRole;
use crate::fleet::{FleetError, Terminate, TerminateJob, now_ms};
use crate::policy::Action;
use crate::registry::RegistryError;
use crate::store::{InstanceState, QueueLimits, State};

/// How often a followed event stream looks for new events.
const EVENT_POLL: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct FleetApi {
    node: Arc<Node>,
}

impl FleetApi {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    fn authorize<T>(&self, request: &Request<T>, role: TokenRole) -> Result<String, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|value| value.to_str().unwrap_or(""));
        let name = self.node.auth.authorize(header, role)?;
        Ok(name.to_owned())
    }

    fn check_queue(&self, field: &str, queue: &str) -> Result<(), Status> {
        if queue.is_empty() {
            return Err(Status::invalid_argument(format!(
                "{field} is required; name one of the configured queues: {}",
                self.queue_names()
            )));
        }
        if self.node.config.policy.queue(queue).is_none() {
            return Err(Status::invalid_argument(format!(
                "{field} {queue:?} is not a configured queue; configured: {}",
                self.queue_names()
            )));
        }
        Ok(())
    }

    fn queue_names(&self) -> String {
        self.node
            .config
            .policy
            .queues
            .iter()
            .map(|queue| queue.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn queue_status(&self, state: &State, queue: &str) -> v1::QueueStatus {
        let waiting = self.waiting(state, queue);
        let config = self.node.config.policy.queue(queue);
        let overrides = state.overrides.queue_limits.get(queue);
        let mut instances = BTreeMap::new();
        let mut busy = 0u32;
        for record in state.instances.values() {
            if record.queue != queue || record.state == InstanceState::Terminated {
                continue;
            }
            if record.state == InstanceState::Busy {
                busy += 1;
            }
            *instances
                .entry(crate::fleet::state_name(record.state).to_owned())
                .or_insert(0u32) += 1;
        }
        let min_instances = overrides
            .and_then(|limits| limits.min_instances)
            .or(config.map(|config| config.min_instances))
            .unwrap_or(0);
        let max_instances = overrides
            .and_then(|limits| limits.max_instances)
            .or(config.map(|config| config.max_instances))
            .unwrap_or(0);
        let min_idle = overrides
            .and_then(|limits| limits.min_idle)
            .or(config.map(|config| config.min_idle))
            .unwrap_or(0);
        let (waiting_now, observed_ms) = waiting.unwrap_or((0, 0));
        let desired = (busy + waiting_now + min_idle)
            .max(min_instances)
            .min(max_instances);
        v1::QueueStatus {
            name: queue.to_owned(),
            tasks_waiting: waiting_now,
            tasks_waiting_observed_ms: observed_ms,
            instances: instances.into_iter().collect(),
            desired,
            paused: state.overrides.paused_queues.contains(queue),
            limits: Some(v1::QueueLimits {
                min_instances: Some(min_instances),
                max_instances: Some(max_instances),
                min_idle: Some(min_idle),
                max_idle_seconds: overrides
                    .and_then(|limits| limits.max_idle_seconds)
                    .or(Some(self.node.config.policy.max_idle.as_secs() as u32)),
            }),
        }
    }

    /// Returns the queue's waiting tasks and when ClearML was polled for them: the leader's own latest poll, or
    /// on a follower the counts the leader stored. `None` before any poll.
    fn waiting(&self, state: &State, queue: &str) -> Option<(u32, u64)> {
        if let Some(fleet) = self.node.fleet()
            && let Some(observation) = fleet.core.latest_observation()
        {
            return Some((
                observation.waiting(queue),
                observation.taken_at.as_millis() as u64,
            ));
        }
        let depths = &state.queue_depths;
        (depths.observed_ms > 0).then(|| {
            (
                depths.waiting.get(queue).copied().unwrap_or(0),
                depths.observed_ms,
            )
        })
    }

    async fn change_overrides(
        &self,
        queue: &str,
        who: &str,
        change: impl FnOnce(&mut crate::store::RuntimeOverrides) -> String,
    ) -> Result<v1::QueueStatus, Status> {
        let fleet = self.node.require_leader().await?;
        let mut registry = fleet.core.registry.lock().await;
        let mut overrides = registry.state().overrides.clone();
        let message = change(&mut overrides);
        registry
            .set_overrides(overrides, queue, format!("{message} by {who}"), now_ms())
            .await
            .map_err(registry_status)?;
        let state = registry.state().clone();
        drop(registry);
        Ok(self.queue_status(&state, queue))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;

#[tonic::async_trait]
impl FleetService for FleetApi {
    async fn get_cluster_status(
        &self,
        request: Request<v1::GetClusterStatusRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        self.authorize(&request, TokenRole::Viewer)?;
        let leader = self.node.leader().await;
        let state = self.node.read_state().await?;
        let members = super::members::list(&self.node).await;
        let spend = state
            .instances
            .values()
            .filter(|record| record.state != InstanceState::Terminated)
            .map(|record| record.hourly_price_usd)
            .sum();
        let (leader_id, leader_address) = leader.unwrap_or_default();
        Ok(Response::new(v1::ClusterStatus {
            cluster: self.node.config.cluster.clone(),
            members: members
                .into_iter()
                .map(|(replica_id, address)| v1::Member {
                    leader: replica_id == leader_id,
                    replica_id,
                    address,
                })
                .collect(),
            leader_id,
            leader_address,
            term: self.node.term(),
            replica_id: self.node.replica_id.clone(),
            hourly_spend_usd: spend,
            hourly_budget_usd: self.node.config.policy.hourly_budget_usd.unwrap_or(0.0),
        }))
    }

    async fn list_queues(
        &self,
        request: Request<v1::ListQueuesRequest>,
    ) -> Result<Response<v1::ListQueuesResponse>, Status> {
        self.authorize(&request, TokenRole::Viewer)?;
        let state = self.node.read_state().await?;
        let queues = self
            .node
            .config
            .policy
            .queues
            .iter()
            .map(|queue| self.queue_status(&state, &queue.name))
            .collect();
        Ok(Response::new(v1::ListQueuesResponse { queues }))
    }

    async fn list_instances(
        &self,
        request: Request<v1::ListInstancesRequest>,
    ) -> Result<Response<v1::ListInstancesResponse>, Status> {
        self.authorize(&request, TokenRole::Viewer)?;
        let message = request.into_inner();
        if !message.queue.is_empty() {
            self.check_queue("queue", &message.queue)?;
        }
        let mut states = Vec::new();
        for (index, raw) in message.states.iter().enumerate() {
            let state = v1::InstanceState::try_from(*raw)
                .ok()
                .and_then(convert::state_from_proto)
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "states[{index}] = {raw} is not an instance state; use 1 (requested) to 8 (terminated)"
                    ))
                })?;
            states.push(state);
        }
        let state = self.node.read_state().await?;
        let instances = state
            .instances
            .values()
            .filter(|record| message.queue.is_empty() || record.queue == message.queue)
            .filter(|record| {
                if states.is_empty() {
                    record.state != InstanceState::Terminated
                } else {
                    states.contains(&record.state)
                }
            })
            .map(convert::instance)
            .collect();
        Ok(Response::new(v1::ListInstancesResponse { instances }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.authorize(&request, TokenRole::Viewer)?;
        let message = request.into_inner();
        let node = self.node.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let initial = node.read_state().await?;
        tokio::spawn(async move {
            let mut after = message.after_sequence;
            let mut state = initial;
            loop {
                let newer: Vec<_> = state
                    .events
                    .iter()
                    .filter(|event| event.sequence > after)
                    .collect();
                for event in newer {
                    after = event.sequence;
                    if sender.send(Ok(convert::event(event))).await.is_err() {
                        return;
                    }
                }
                if !message.follow {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(EVENT_POLL) => {}
                    _ = sender.closed() => return,
                }
                state = match node.read_state().await {
                    Ok(state) => state,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn drain_instance(
        &self,
        request: Request<v1::DrainInstanceRequest>,
    ) -> Result<Response<v1::InstanceActionResponse>, Status> {
        let who = self.authorize(&request, TokenRole::Operator)?;
        let message = request.into_inner();
        require_instance_id(&message.instance_id)?;
        let fleet = self.node.require_leader().await?;
        let mut registry = fleet.core.registry.lock().await;
        let record = registry
            .drain(
                &message.instance_id,
                &format!("drained by operator token {who}"),
                now_ms(),
            )
            .await
            .map_err(registry_status)?;
        Ok(Response::new(v1::InstanceActionResponse {
            instance: Some(convert::instance(&record)),
        }))
    }

    async fn terminate_instance(
        &self,
        request: Request<v1::TerminateInstanceRequest>,
    ) -> Result<Response<v1::InstanceActionResponse>, Status> {
        let who = self.authorize(&request, TokenRole::Operator)?;
        let message = request.into_inner();
        require_instance_id(&message.instance_id)?;
        let fleet = self.node.require_leader().await?;
        let mut registry = fleet.core.registry.lock().await;
        if !message.force {
            let record = registry
                .drain(
                    &message.instance_id,
                    &format!("termination requested by operator token {who}; draining first"),
                    now_ms(),
                )
                .await
                .map_err(registry_status)?;
            return Ok(Response::new(v1::InstanceActionResponse {
                instance: Some(convert::instance(&record)),
            }));
        }
        let record = registry
            .find(&message.instance_id)
            .cloned()
            .ok_or_else(|| {
                Status::not_found(format!(
                    "instance {} has no record in this cluster",
                    message.instance_id
                ))
            })?;
        if record.state == InstanceState::Terminated {
            return Err(Status::failed_precondition(format!(
                "instance {} is already terminated",
                message.instance_id
            )));
        }
        drop(registry);
        fleet.cloud.do_send(Terminate(TerminateJob {
            key: record.key.clone(),
            instance_id: record.instance_id.clone(),
            resource: record.resource.clone(),
            reason: format!("forced termination by operator token {who}"),
        }));
        // The cloud actor records the transition shortly, so the response shows the state the instance is entering.
        let mut instance = convert::instance(&record);
        instance.state = v1::InstanceState::Terminating as i32;
        Ok(Response::new(v1::InstanceActionResponse {
            instance: Some(instance),
        }))
    }

    async fn pause_queue(
        &self,
        request: Request<v1::PauseQueueRequest>,
    ) -> Result<Response<v1::QueueStatus>, Status> {
        let who = self.authorize(&request, TokenRole::Operator)?;
        let queue = request.into_inner().queue;
        self.check_queue("queue", &queue)?;
        let status = self
            .change_overrides(&queue, &who, |overrides| {
                overrides.paused_queues.insert(queue.clone());
                format!("queue {queue} paused: no launches until resumed")
            })
            .await?;
        Ok(Response::new(status))
    }

    async fn resume_queue(
        &self,
        request: Request<v1::ResumeQueueRequest>,
    ) -> Result<Response<v1::QueueStatus>, Status> {
        let who = self.authorize(&request, TokenRole::Operator)?;
        let queue = request.into_inner().queue;
        self.check_queue("queue", &queue)?;
        let status = self
            .change_overrides(&queue, &who, |overrides| {
                overrides.paused_queues.remove(&queue);
                format!("queue {queue} resumed")
            })
            .await?;
        Ok(Response::new(status))
    }

    async fn set_queue_limits(
        &self,
        request: Request<v1::SetQueueLimitsRequest>,
    ) -> Result<Response<v1::QueueStatus>, Status> {
        let who = self.authorize(&request, TokenRole::Operator)?;
        let message = request.into_inner();
        self.check_queue("queue", &message.queue)?;
        let limits = match (message.reset, message.limits) {
            (true, Some(_)) => {
                return Err(Status::invalid_argument(
                    "limits and reset are exclusive; send reset = true alone to return to the configured limits",
                ));
            }
            (true, None) => None,
            (false, None) => {
                return Err(Status::invalid_argument(
                    "limits is required; set at least one of limits.min_instances, max_instances, min_idle, \
                     max_idle_seconds, or send reset = true",
                ));
            }
            (false, Some(limits)) => {
                // The request changes the limits it names and keeps the queue's other overrides.
                let state = self.node.read_state().await?;
                let current = state.overrides.queue_limits.get(&message.queue);
                Some(self.check_limits(&message.queue, limits, current)?)
            }
        };
        let queue = message.queue.clone();
        let status = self
            .change_overrides(&queue, &who, |overrides| match limits {
                Some(requested) => {
                    let merged = merge_limits(overrides.queue_limits.get(&queue), &requested);
                    let text = format!(
                        "limits of queue {queue} changed: {}; its overrides are now {}",
                        describe_limits(&requested),
                        describe_limits(&merged)
                    );
                    overrides.queue_limits.insert(queue.clone(), merged);
                    text
                }
                None => {
                    overrides.queue_limits.remove(&queue);
                    format!("limits of queue {queue} reset to the configuration")
                }
            })
            .await?;
        Ok(Response::new(status))
    }

    async fn dry_run(
        &self,
        request: Request<v1::DryRunRequest>,
    ) -> Result<Response<v1::DryRunResponse>, Status> {
        self.authorize(&request, TokenRole::Viewer)?;
        let queue = request.into_inner().queue;
        self.check_queue("queue", &queue)?;
        let fleet = self.node.require_leader().await?;
        let actions = fleet.core.dry_run(&queue).await.map_err(fleet_status)?;
        Ok(Response::new(v1::DryRunResponse {
            actions: actions.into_iter().map(planned_action).collect(),
        }))
    }
}

impl FleetApi {
    /// Checks the limits a request names, together with the queue's current overrides, and returns the named
    /// ones.
    fn check_limits(
        &self,
        queue: &str,
        limits: v1::QueueLimits,
        current: Option<&QueueLimits>,
    ) -> Result<QueueLimits, Status> {
        if limits.min_instances.is_none()
            && limits.max_instances.is_none()
            && limits.min_idle.is_none()
            && limits.max_idle_seconds.is_none()
        {
            return Err(Status::invalid_argument(
                "limits is empty; set at least one of limits.min_instances, max_instances, min_idle, max_idle_seconds",
            ));
        }
        let cluster_max = self.node.config.policy.cluster_max_instances;
        let configured = self.node.config.policy.queue(queue);
        if let Some(max) = limits.max_instances
            && max > cluster_max
        {
            return Err(Status::invalid_argument(format!(
                "limits.max_instances = {max} is above the cluster's budget.max_instances ({cluster_max})"
            )));
        }
        let requested = QueueLimits {
            min_instances: limits.min_instances,
            max_instances: limits.max_instances,
            min_idle: limits.min_idle,
            max_idle_seconds: limits.max_idle_seconds,
        };
        let merged = merge_limits(current, &requested);
        let max = merged
            .max_instances
            .or(configured.map(|queue| queue.max_instances))
            .unwrap_or(cluster_max);
        for (field, value) in [
            ("limits.min_instances", merged.min_instances),
            ("limits.min_idle", merged.min_idle),
        ] {
            if let Some(value) = value
                && value > max
            {
                return Err(Status::invalid_argument(format!(
                    "{field} = {value} is above the queue's max_instances ({max}); lower it, or raise \
                     limits.max_instances in the same request"
                )));
            }
        }
        if let Some(seconds) = limits.max_idle_seconds
            && !(10..=86_400).contains(&seconds)
        {
            return Err(Status::invalid_argument(format!(
                "limits.max_idle_seconds = {seconds} is out of range; use 10 to 86400"
            )));
        }
        Ok(requested)
    }
}

/// Returns `current` with every limit that `requested` sets replaced.
fn merge_limits(current: Option<&QueueLimits>, requested: &QueueLimits) -> QueueLimits {
    let current = current.cloned().unwrap_or_default();
    QueueLimits {
        min_instances: requested.min_instances.or(current.min_instances),
        max_instances: requested.max_instances.or(current.max_instances),
        min_idle: requested.min_idle.or(current.min_idle),
        max_idle_seconds: requested.max_idle_seconds.or(current.max_idle_seconds),
    }
}

/// Lists the limits an override sets, for the event log: `max_instances=4, min_idle=2`.
fn describe_limits(limits: &QueueLimits) -> String {
    let parts: Vec<String> = [
        ("min_instances", limits.min_instances),
        ("max_instances", limits.max_instances),
        ("min_idle", limits.min_idle),
        ("max_idle_seconds", limits.max_idle_seconds),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.map(|value| format!("{name}={value}")))
    .collect();
    parts.join(", ")
}

fn require_instance_id(instance_id: &str) -> Result<(), Status> {
    if instance_id.trim().is_empty() {
        return Err(Status::invalid_argument(
            "instance_id is required; list instances with ListInstances",
        ));
    }
    Ok(())
}

pub(super) fn registry_status(err: RegistryError) -> Status {
    match err {
        RegistryError::UnknownInstance { .. } | RegistryError::UnknownIntent { .. } => {
            Status::not_found(err.to_string())
        }
        RegistryError::InvalidTransition { .. } => Status::failed_precondition(err.to_string()),
        RegistryError::Bootstrap(err) => err.into(),
        RegistryError::State(err) => {
            Status::unavailable(format!("the change was not stored: {err}; retry"))
        }
    }
}

pub(super) fn fleet_status(err: FleetError) -> Status {
    match err {
        FleetError::Registry(err) => registry_status(err),
        FleetError::UnknownQueue(_) => Status::invalid_argument(err.to_string()),
        FleetError::NotLeader(_) => Status::failed_precondition(err.to_string()),
        FleetError::Stale { .. } | FleetError::NoObservation => {
            Status::unavailable(err.to_string())
        }
    }
}

fn planned_action(action: Action) -> v1::PlannedAction {
    match action {
        Action::Launch {
            queue,
            resource,
            offering,
            count,
        } => v1::PlannedAction {
            kind: "launch".to_owned(),
            queue,
            resource,
            count,
            instance_id: String::new(),
            reason: format!("on {offering}"),
        },
        Action::Hold {
            queue,
            missing,
            reason,
        } => v1::PlannedAction {
            kind: "hold".to_owned(),
            queue,
            count: missing,
            reason: reason.to_string(),
            ..Default::default()
        },
        Action::Grant { instance } => v1::PlannedAction {
            kind: "grant".to_owned(),
            instance_id: instance,
            count: 1,
            ..Default::default()
        },
        Action::Refuse { instance, reason } => v1::PlannedAction {
            kind: "refuse".to_owned(),
            instance_id: instance,
            reason: reason.to_string(),
            ..Default::default()
        },
        Action::Terminate { instance, reason } => v1::PlannedAction {
            kind: "terminate".to_owned(),
            instance_id: instance,
            count: 1,
            reason: reason.to_string(),
            ..Default::default()
        },
    }
}
