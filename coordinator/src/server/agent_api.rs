//! AgentService: the calls node agents make to the leader. Registration takes the launch's one-time
//! bootstrap token and returns the agent's config and a session token; every later call carries the session
//! token. A follower refuses every call with FAILED_PRECONDITION and the leader's address, and the agent tries
//! its next endpoint.

use std::sync::Arc;

use fleet_proto::v1::{self, agent_service_server::AgentService};
use tonic::{Request, Response, Status};

use super::Node;
use super::fleet_api::{fleet_status, registry_status};
use crate::auth::BootstrapRecord;
use crate::fleet::{FleetError, FleetHandle, Terminate, TerminateJob, now_ms};
use crate::providers::{TAG_INTENT, TAG_QUEUE, TAG_RESOURCE};
use crate::registry::{Adoption, RegistryError};
use crate::store::InstanceState;

/// Maximum time an agent waits before it requests termination again after a rejection.
const MAX_TERMINATION_RETRY_SECONDS: u32 = 30;

#[derive(Clone)]
pub struct AgentApi {
    node: Arc<Node>,
}

impl AgentApi {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Checks the session token of `instance_id` on a call after registration.
    fn check_session<T>(&self, request: &Request<T>, instance_id: &str) -> Result<(), Status> {
        require("instance_id", instance_id)?;
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing session token; send 'authorization: Bearer <session token>' from the registration",
                )
            })?;
        if !self.node.keys.verify_session(instance_id, presented.trim()) {
            return Err(Status::unauthenticated(format!(
                "invalid session token for instance {instance_id}; register again"
            )));
        }
        Ok(())
    }

    /// Builds the configuration an agent gets at registration. `max_idle_seconds` follows the queue's runtime
    /// override, if any, at the time of the registration.
    fn agent_config(
        &self,
        record: &crate::store::InstanceRecord,
        worker_id: String,
        max_idle_override: Option<u32>,
    ) -> v1::AgentConfig {
        let config = &self.node.config;
        let heartbeat_interval = heartbeat_interval_seconds(config);
        v1::AgentConfig {
            worker_id,
            resource: record.resource.clone(),
            queues: vec![record.queue.clone()],
            clearml: Some(v1::ClearmlAccess {
                api_server: config.clearml.api_server.clone(),
                web_server: config.clearml.web_server.clone(),
                files_server: config.clearml.files_server.clone(),
                access_key: config.clearml.access_key.clone(),
                secret_key: config.clearml.secret_key.expose().to_owned(),
            }),
            timeouts: Some(v1::AgentTimeouts {
                max_idle_seconds: max_idle_override
                    .unwrap_or(config.policy.max_idle.as_secs() as u32),
                heartbeat_interval_seconds: heartbeat_interval,
                orphan_timeout_seconds: config.orphan_timeout.as_secs() as u32,
                drain_grace_seconds: config.drain_grace.as_secs() as u32,
                termination_retry_seconds: termination_retry_seconds(config),
            }),
            docker_image: config.agent.docker_image_for(&record.resource).to_owned(),
            git: config.agent.git.as_ref().map(|git| v1::GitCredentials {
                user: git.user.clone(),
                password: git.password.expose().to_owned(),
            }),
            storage_env: config
                .agent
                .task_env
                .iter()
                .map(|(name, value)| (name.clone(), value.expose().to_owned()))
                .collect(),
            extra_clearml_conf: config
                .agent
                .extra_clearml_conf
                .as_ref()
                .map(|text| text.expose().to_owned())
                .unwrap_or_default(),
            init_script: config
                .agent
                .init_script
                .as_ref()
                .map(|text| text.expose().to_owned())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    /// Takes in an instance the reconciler found in the cloud without a record, if the presented token is its
    /// launch's token.
    async fn adopt(
        &self,
        fleet: &FleetHandle,
        instance_id: &str,
        token: &str,
    ) -> Result<(), Status> {
        let instance = fleet.core.unknown_instance(instance_id).ok_or_else(|| {
            Status::unavailable(format!(
                "instance {instance_id} is not known to the leader yet; retry in a few seconds"
            ))
        })?;
        let (Some(intent), Some(queue), Some(resource)) = (
            instance.tag(TAG_INTENT),
            instance.tag(TAG_QUEUE),
            instance.tag(TAG_RESOURCE),
        ) else {
            return Err(Status::permission_denied(format!(
                "instance {instance_id} lacks the fleet's launch tags; it cannot register"
            )));
        };
        let expected = fleet.core.keys.bootstrap_token(intent);
        let bootstrap = BootstrapRecord::for_token(intent, &expected, u32::MAX, now_ms());
        if crate::auth::TokenDigest::of(token) != bootstrap.digest {
            return Err(crate::auth::BootstrapError::Invalid {
                instance_id: instance_id.to_owned(),
            }
            .into());
        }
        let offering = format!(
            "{}/{}/{}",
            instance.instance_type.clone().unwrap_or_default(),
            instance.zone.clone().unwrap_or_default(),
            instance.market
        );
        let mut registry = fleet.core.registry.lock().await;
        registry
            .adopt(
                &Adoption {
                    instance_id: instance_id.to_owned(),
                    intent_id: intent.to_owned(),
                    queue: queue.to_owned(),
                    resource: resource.to_owned(),
                    offering,
                    hourly_price_usd: 0.0,
                },
                now_ms(),
            )
            .await
            .map_err(registry_status)?;
        registry
            .ensure_bootstrap(bootstrap)
            .await
            .map_err(registry_status)
    }
}

/// Heartbeats come four times per heartbeat timeout, at least every 30 s.
fn heartbeat_interval_seconds(config: &crate::config::Config) -> u32 {
    (config.policy.timeouts.heartbeat.as_secs() / 4).clamp(1, 30) as u32
}

/// Returns how long an agent waits after a rejected termination request: two heartbeat intervals, after which
/// the queue may have changed.
fn termination_retry_seconds(config: &crate::config::Config) -> u32 {
    (2 * heartbeat_interval_seconds(config)).min(MAX_TERMINATION_RETRY_SECONDS)
}

fn require(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let message = request.into_inner();
        require("instance_id", &message.instance_id)?;
        require("bootstrap_token", &message.bootstrap_token)?;
        let fleet = self.node.require_leader().await?;
        let known = fleet
            .core
            .registry
            .lock()
            .await
            .find(&message.instance_id)
            .is_some();
        if !known {
            self.adopt(&fleet, &message.instance_id, &message.bootstrap_token)
                .await?;
        }
        let mut registry = fleet.core.registry.lock().await;
        let registration = registry
            .register_agent(
                &message.instance_id,
                &message.bootstrap_token,
                &self.node.config.worker_prefix,
                now_ms(),
            )
            .await
            .map_err(|err| {
                tracing::warn!(instance = %message.instance_id, error = %err, "registration rejected");
                registry_status(err)
            })?;
        let record = registry
            .find(&message.instance_id)
            .cloned()
            .ok_or_else(|| Status::internal("registered instance has no record"))?;
        let max_idle_override = registry
            .state()
            .overrides
            .queue_limits
            .get(&record.queue)
            .and_then(|limits| limits.max_idle_seconds);
        drop(registry);
        tracing::info!(instance = %message.instance_id, worker = %registration.worker_id, version = %message.agent_version, "agent registered");
        Ok(Response::new(v1::RegisterResponse {
            session_token: self
                .node
                .keys
                .session_token(&message.instance_id)
                .expose()
                .to_owned(),
            config: Some(self.agent_config(&record, registration.worker_id, max_idle_override)),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let instance_id = request.get_ref().instance_id.clone();
        self.check_session(&request, &instance_id)?;
        let message = request.into_inner();
        let state = v1::AgentState::try_from(message.state).map_err(|_| {
            Status::invalid_argument(format!(
                "state = {} is not an agent state; use 1 (starting) to 5 (unhealthy)",
                message.state
            ))
        })?;
        let fleet = self.node.require_leader().await?;
        let task = (state == v1::AgentState::Busy && !message.task_id.is_empty())
            .then_some(message.task_id.as_str());
        let mut registry = fleet.core.registry.lock().await;
        if state != v1::AgentState::Starting {
            registry
                .heartbeat(&instance_id, task, now_ms())
                .await
                .map_err(registry_status)?;
        }
        let drain = registry
            .find(&instance_id)
            .is_some_and(|record| record.state == InstanceState::Draining);
        Ok(Response::new(v1::HeartbeatResponse { drain }))
    }

    async fn request_termination(
        &self,
        request: Request<v1::TerminationRequest>,
    ) -> Result<Response<v1::TerminationResponse>, Status> {
        let instance_id = request.get_ref().instance_id.clone();
        self.check_session(&request, &instance_id)?;
        let fleet = self.node.require_leader().await?;
        // An agent requests termination only when it is idle, which its last heartbeat may not have reported yet.
        {
            let mut registry = fleet.core.registry.lock().await;
            let reported_busy = registry.find(&instance_id).is_some_and(|record| {
                matches!(record.state, InstanceState::Booting | InstanceState::Busy)
            });
            if reported_busy {
                registry
                    .heartbeat(&instance_id, None, now_ms())
                    .await
                    .map_err(registry_status)?;
            }
        }
        let verdict = match fleet.core.decide_termination(&instance_id).await {
            Ok(verdict) => verdict,
            Err(err @ (FleetError::Stale { .. } | FleetError::NoObservation)) => Err(format!(
                "{err}; the coordinator does not let machines go without current queue data"
            )),
            Err(err) => return Err(fleet_status(err)),
        };
        let outcome = if verdict.is_ok() {
            "granted"
        } else {
            "refused"
        };
        fleet
            .core
            .metrics
            .inc("fleet_termination_requests_total", &[("outcome", outcome)]);
        let response = match verdict {
            Ok(()) => {
                tracing::info!(instance = %instance_id, "termination granted");
                v1::TerminationResponse {
                    granted: true,
                    reason: "idle and not needed".to_owned(),
                    retry_after_seconds: 0,
                }
            }
            Err(reason) => v1::TerminationResponse {
                granted: false,
                reason,
                retry_after_seconds: termination_retry_seconds(&self.node.config),
            },
        };
        Ok(Response::new(response))
    }

    async fn report_interruption(
        &self,
        request: Request<v1::InterruptionReport>,
    ) -> Result<Response<v1::InterruptionResponse>, Status> {
        let instance_id = request.get_ref().instance_id.clone();
        self.check_session(&request, &instance_id)?;
        let message = request.into_inner();
        let kind = v1::InterruptionKind::try_from(message.kind)
            .ok()
            .filter(|kind| *kind != v1::InterruptionKind::Unspecified)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "kind = {} is not an interruption kind; use 1 (spot termination) or 2 (rebalance)",
                    message.kind
                ))
            })?;
        let fleet = self.node.require_leader().await?;
        let mut registry = fleet.core.registry.lock().await;
        let requeued = if message.requeued_task_id.is_empty() {
            String::new()
        } else {
            format!(", task {} requeued", message.requeued_task_id)
        };
        match kind {
            v1::InterruptionKind::SpotTermination => {
                let reason = format!("spot interruption notice{requeued}");
                match registry
                    .mark_terminating(&instance_id, &reason, now_ms())
                    .await
                {
                    Ok(()) | Err(RegistryError::InvalidTransition { .. }) => {}
                    Err(err) => return Err(registry_status(err)),
                }
            }
            _ => {
                registry
                    .record_event(
                        "instance.rebalance",
                        None,
                        Some(&instance_id),
                        format!("rebalance recommendation{requeued}"),
                        now_ms(),
                    )
                    .await
                    .map_err(registry_status)?;
            }
        }
        Ok(Response::new(v1::InterruptionResponse {}))
    }

    async fn report_health(
        &self,
        request: Request<v1::HealthReport>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        let instance_id = request.get_ref().instance_id.clone();
        self.check_session(&request, &instance_id)?;
        let message = request.into_inner();
        if message.healthy {
            return Ok(Response::new(v1::HealthResponse { replace: false }));
        }
        let fleet = self.node.require_leader().await?;
        let record = fleet
            .core
            .registry
            .lock()
            .await
            .find(&instance_id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("instance {instance_id} has no record")))?;
        let reason = if message.reason.is_empty() {
            "agent reports the instance unhealthy".to_owned()
        } else {
            format!("agent reports the instance unhealthy: {}", message.reason)
        };
        tracing::warn!(instance = %instance_id, reason = %reason, "replacing an unhealthy instance");
        fleet.cloud.do_send(Terminate(TerminateJob {
            key: record.key,
            instance_id: record.instance_id,
            resource: record.resource,
            reason,
        }));
        Ok(Response::new(v1::HealthResponse { replace: true }))
    }
}
