//! The agent's side of AgentService: registration and the calls it makes to the coordinator leader.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clearml_api::Secret;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use fleet_proto::v1::{
    AgentConfig, HealthReport, HealthResponse, HeartbeatRequest, HeartbeatResponse,
    InterruptionReport, RegisterRequest, TerminationRequest, TerminationResponse,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use url::Url;

use crate::config::CoordinatorConfig;

/// First delay between two registration attempts; it doubles up to [`REGISTER_BACKOFF_MAX`].
const REGISTER_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const REGISTER_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Errors of talking to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(
        "the coordinator rejected the bootstrap token for instance {instance_id}: {message}; the token is valid once, so relaunch the instance or issue a new token"
    )]
    TokenRejected {
        instance_id: String,
        message: String,
    },
    #[error(
        "registration of instance {instance_id} did not succeed within {waited:?}: no coordinator accepted it (tried {endpoints}); last error: {last_error}; check coordinator.endpoints, the network and the coordinators' logs"
    )]
    RegistrationTimedOut {
        instance_id: String,
        endpoints: String,
        waited: Duration,
        last_error: String,
    },
    #[error("the registration response for instance {instance_id} is invalid: {reason}")]
    InvalidRegistration { instance_id: String, reason: String },
    #[error("invalid coordinator endpoint {endpoint}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    #[error("coordinator call {call} failed on {endpoint}: {status}")]
    Call {
        call: &'static str,
        endpoint: String,
        status: tonic::Status,
    },
}

impl CoordinatorError {
    /// Returns true when no coordinator leader could be reached, as opposed to a leader returning an error.
    /// A replica that responds that it is not the leader counts as unreachable, because it cannot serve the call.
    pub fn is_unreachable(&self) -> bool {
        match self {
            CoordinatorError::Call { status, .. } => {
                matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
                ) || is_not_leader(status)
            }
            CoordinatorError::RegistrationTimedOut { .. } => true,
            _ => false,
        }
    }
}

/// Metadata key in which a follower names the leader's address when it refuses a call.
const LEADER_METADATA: &str = "fleet-leader";

/// Tells whether a coordinator replica refused the call because it is not the leader.
fn is_not_leader(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && (status.metadata().contains_key(LEADER_METADATA)
            || status.message().contains("is not the leader"))
}

/// The agent's configuration from a successful registration. Contains secrets: never log it.
pub struct Registration {
    pub session_token: Secret,
    pub config: AgentConfig,
}

/// A client for the coordinators' AgentService that fails over between endpoints.
pub struct CoordinatorClient {
    channels: Vec<(String, Channel)>,
    /// Index of the endpoint that responded last, where calls start.
    current: AtomicUsize,
    session_token: Mutex<Option<Secret>>,
}

impl CoordinatorClient {
    /// Prepares lazy channels to every endpoint; nothing connects until the first call.
    pub fn new(config: &CoordinatorConfig) -> Result<CoordinatorClient, CoordinatorError> {
        let mut channels = Vec::with_capacity(config.endpoints.len());
        for url in &config.endpoints {
            channels.push((url.to_string(), channel(url, config)?));
        }
        Ok(CoordinatorClient {
            channels,
            current: AtomicUsize::new(0),
            session_token: Mutex::new(None),
        })
    }

    /// Registers the instance, retrying unreachable coordinators with backoff until `timeout`.
    ///
    /// A rejected bootstrap token is returned at once: the token is valid once, so retrying cannot help.
    pub async fn register(
        &self,
        request: RegisterRequest,
        timeout: Duration,
    ) -> Result<Registration, CoordinatorError> {
        let instance_id = request.instance_id.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delay = REGISTER_BACKOFF_INITIAL;
        let mut attempt = 1u32;

        loop {
            let result = self
                .call("Register", |mut client| {
                    let request = request.clone();
                    async move { client.register(request).await }
                })
                .await;
            let error = match result {
                Ok(response) => return self.accept_registration(&instance_id, response),
                Err(CoordinatorError::Call { status, .. })
                    if matches!(
                        status.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    ) =>
                {
                    return Err(CoordinatorError::TokenRejected {
                        instance_id,
                        message: status.message().to_owned(),
                    });
                }
                Err(error) => error,
            };

            let now = tokio::time::Instant::now();
            if now + delay > deadline {
                return Err(CoordinatorError::RegistrationTimedOut {
                    instance_id,
                    endpoints: self.endpoint_list(),
                    waited: timeout,
                    last_error: error.to_string(),
                });
            }
            tracing::warn!(%instance_id, attempt, delay_ms = delay.as_millis() as u64, error = %error, "registration failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(REGISTER_BACKOFF_MAX);
            attempt += 1;
        }
    }

    pub async fn heartbeat(
        &self,
        request: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, CoordinatorError> {
        let request = self.authorized(request);
        self.call("Heartbeat", |mut client| {
            let request = clone_request(&request);
            async move { client.heartbeat(request).await }
        })
        .await
    }

    pub async fn request_termination(
        &self,
        request: TerminationRequest,
    ) -> Result<TerminationResponse, CoordinatorError> {
        let request = self.authorized(request);
        self.call("RequestTermination", |mut client| {
            let request = clone_request(&request);
            async move { client.request_termination(request).await }
        })
        .await
    }

    pub async fn report_interruption(
        &self,
        report: InterruptionReport,
    ) -> Result<(), CoordinatorError> {
        let request = self.authorized(report);
        self.call("ReportInterruption", |mut client| {
            let request = clone_request(&request);
            async move { client.report_interruption(request).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn report_health(
        &self,
        report: HealthReport,
    ) -> Result<HealthResponse, CoordinatorError> {
        let request = self.authorized(report);
        self.call("ReportHealth", |mut client| {
            let request = clone_request(&request);
            async move { client.report_health(request).await }
        })
        .await
    }

    /// Takes up a registration saved before a restart of this agent: the coordinator's session token stays
    /// valid for the instance, and its one-time bootstrap token could not be used again.
    pub fn resume(
        &self,
        instance_id: &str,
        response: fleet_proto::v1::RegisterResponse,
    ) -> Result<Registration, CoordinatorError> {
        self.accept_registration(instance_id, response)
    }

    fn accept_registration(
        &self,
        instance_id: &str,
        response: fleet_proto::v1::RegisterResponse,
    ) -> Result<Registration, CoordinatorError> {
        let invalid = |reason: &str| CoordinatorError::InvalidRegistration {
            instance_id: instance_id.to_owned(),
            reason: reason.to_owned(),
        };
        let config = response
            .config
            .ok_or_else(|| invalid("it has no agent config"))?;
        if config.worker_id.is_empty() {
            return Err(invalid("worker_id is empty"));
        }
        if config.queues.is_empty() {
            return Err(invalid("it lists no queues"));
        }
        let clearml = config
            .clearml
            .as_ref()
            .ok_or_else(|| invalid("it has no ClearML access settings"))?;
        Url::parse(&clearml.api_server)
            .map_err(|error| invalid(&format!("clearml.api_server is not a URL: {error}")))?;

        let session_token = Secret::new(response.session_token);
        *self
            .session_token
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(session_token.clone());
        tracing::info!(%instance_id, worker_id = %config.worker_id, queues = ?config.queues, "registered with the coordinator");
        Ok(Registration {
            session_token,
            config,
        })
    }

    fn authorized<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let token = self
            .session_token
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if let Some(token) = token
            && let Ok(value) = format!("Bearer {}", token.expose()).parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// Calls `send` on the endpoint that responded last, then on the others while they are unreachable.
    async fn call<T, F, Fut>(&self, call: &'static str, send: F) -> Result<T, CoordinatorError>
    where
        F: Fn(AgentServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let start = self.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for offset in 0..self.channels.len() {
            let index = (start + offset) % self.channels.len();
            let (endpoint, channel) = &self.channels[index];
            match send(AgentServiceClient::new(channel.clone())).await {
                Ok(response) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(response.into_inner());
                }
                Err(status) => {
                    let error = CoordinatorError::Call {
                        call,
                        endpoint: endpoint.clone(),
                        status,
                    };
                    if !error.is_unreachable() {
                        return Err(error);
                    }
                    tracing::debug!(call, endpoint = %endpoint, error = %error, "coordinator unreachable; trying the next endpoint");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("config validation guarantees at least one endpoint"))
    }

    fn endpoint_list(&self) -> String {
        self.channels
            .iter()
            .map(|(endpoint, _)| endpoint.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn clone_request<T: Clone>(request: &tonic::Request<T>) -> tonic::Request<T> {
    let mut copy = tonic::Request::new(request.get_ref().clone());
    *copy.metadata_mut() = request.metadata().clone();
    copy
}

fn channel(url: &Url, config: &CoordinatorConfig) -> Result<Channel, CoordinatorError> {
    let invalid = |reason: String| CoordinatorError::InvalidEndpoint {
        endpoint: url.to_string(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|error| invalid(error.to_string()))?
        .connect_timeout(config.request_timeout)
        .timeout(config.request_timeout);
    if url.scheme() == "https" {
        let mut tls = ClientTlsConfig::new();
        if let Some(pem) = &config.ca_certificate_pem {
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some(host) = url.host_str() {
            tls = tls.domain_name(host);
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|error| invalid(format!("TLS setup failed: {error}")))?;
    }
    Ok(endpoint.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_error(status: tonic::Status) -> CoordinatorError {
        CoordinatorError::Call {
            call: "heartbeat",
            endpoint: "http://127.0.0.1:1".to_owned(),
            status,
        }
    }

    #[test]
    fn follower_rejection_tries_next_endpoint() {
        let mut status = tonic::Status::failed_precondition(
            "replica coordinator-1 is not the leader; send writes to the leader coordinator-0 at 10.0.0.5:7443",
        );
        status
            .metadata_mut()
            .insert(LEADER_METADATA, "10.0.0.5:7443".parse().unwrap());
        assert!(call_error(status).is_unreachable());
    }

    #[test]
    fn leader_rejection_is_final() {
        let status = tonic::Status::failed_precondition(
            "instance i-1 is Terminated; a heartbeat needs it in booting, idle, busy, draining or terminating",
        );
        assert!(!call_error(status).is_unreachable());
        assert!(!call_error(tonic::Status::permission_denied("token reused")).is_unreachable());
        assert!(call_error(tonic::Status::unavailable("connection refused")).is_unreachable());
    }
}
