//! A test coordinator that serves AgentService on 127.0.0.1, records every call, and decides termination
//! requests by a settable policy. It can stop and start again on the same port, to play a lost control plane.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use fleet_proto::v1::{
    AgentConfig, HealthReport, HealthResponse, HeartbeatRequest, HeartbeatResponse,
    InterruptionReport, InterruptionResponse, RegisterRequest, RegisterResponse,
    TerminationRequest, TerminationResponse,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

/// Session token the coordinator hands out; later calls must carry it.
pub const SESSION_TOKEN: &str = "test-session-token";

/// The coordinator's decision on termination requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminationPolicy {
    Grant,
    Refuse {
        reason: String,
        retry_after_seconds: u32,
    },
}

/// Runs before each termination decision, for example to enqueue a task at that very moment.
pub type TerminationHook = Arc<dyn Fn(&TerminationRequest) + Send + Sync>;

/// One recorded termination request and the decision it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminationRecord {
    pub instance_id: String,
    pub idle_seconds: u32,
    pub granted: bool,
}

#[derive(Default)]
struct Recorded {
    registrations: Vec<RegisterRequest>,
    heartbeats: Vec<HeartbeatRequest>,
    terminations: Vec<TerminationRecord>,
    interruptions: Vec<InterruptionReport>,
    health: Vec<HealthReport>,
    unauthenticated_calls: u64,
}

struct Inner {
    bootstrap_token: String,
    agent_config: AgentConfig,
    policy: Mutex<TerminationPolicy>,
    hook: Mutex<Option<TerminationHook>>,
    /// Delay before the response to a termination request.
    grant_delay: Mutex<Duration>,
    drain: Mutex<bool>,
    /// Respond to unhealthy reports with `replace: true`.
    replace_unhealthy: Mutex<bool>,
    recorded: Mutex<Recorded>,
}

/// A running (or stopped) test coordinator.
pub struct TestCoordinator {
    addr: SocketAddr,
    inner: Arc<Inner>,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl TestCoordinator {
    /// Starts on a free port. `bootstrap_token` is the only token Register accepts; `agent_config` is what it
    /// returns.
    pub async fn start(bootstrap_token: &str, agent_config: AgentConfig) -> TestCoordinator {
        let inner = Arc::new(Inner {
            bootstrap_token: bootstrap_token.to_owned(),
            agent_config,
            policy: Mutex::new(TerminationPolicy::Grant),
            hook: Mutex::new(None),
            grant_delay: Mutex::new(Duration::ZERO),
            drain: Mutex::new(false),
            replace_unhealthy: Mutex::new(false),
            recorded: Mutex::new(Recorded::default()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0 must succeed");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let mut coordinator = TestCoordinator {
            addr,
            inner,
            server: None,
        };
        coordinator.serve(listener);
        coordinator
    }

    /// Returns the endpoint for `coordinator.endpoints`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_policy(&self, policy: TerminationPolicy) {
        *lock(&self.inner.policy) = policy;
    }

    pub fn set_hook(&self, hook: Option<TerminationHook>) {
        *lock(&self.inner.hook) = hook;
    }

    pub fn set_grant_delay(&self, delay: Duration) {
        *lock(&self.inner.grant_delay) = delay;
    }

    /// Makes every later heartbeat response carry `drain: true`.
    pub fn request_drain(&self) {
        *lock(&self.inner.drain) = true;
    }

    /// Makes the coordinator respond to unhealthy reports with `replace: true`.
    pub fn replace_unhealthy(&self) {
        *lock(&self.inner.replace_unhealthy) = true;
    }

    /// Stops serving; calls fail with connection refused until [`TestCoordinator::restart`].
    pub async fn stop(&mut self) {
        if let Some((shutdown, server)) = self.server.take() {
            let _ = shutdown.send(());
            let _ = server.await;
            tracing::info!(addr = %self.addr, "test coordinator stopped");
        }
    }

    /// Serves again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("the test coordinator's port is free again after stop");
        self.serve(listener);
        tracing::info!(addr = %self.addr, "test coordinator restarted");
    }

    pub fn registrations(&self) -> Vec<RegisterRequest> {
        lock(&self.inner.recorded).registrations.clone()
    }

    pub fn heartbeats(&self) -> Vec<HeartbeatRequest> {
        lock(&self.inner.recorded).heartbeats.clone()
    }

    pub fn terminations(&self) -> Vec<TerminationRecord> {
        lock(&self.inner.recorded).terminations.clone()
    }

    pub fn interruptions(&self) -> Vec<InterruptionReport> {
        lock(&self.inner.recorded).interruptions.clone()
    }

    pub fn health_reports(&self) -> Vec<HealthReport> {
        lock(&self.inner.recorded).health.clone()
    }

    /// Calls after registration that came without the session token.
    pub fn unauthenticated_calls(&self) -> u64 {
        lock(&self.inner.recorded).unauthenticated_calls
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (shutdown, shutdown_signal) = oneshot::channel::<()>();
        let service = AgentServiceServer::new(Service {
            inner: self.inner.clone(),
        });
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(error) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = shutdown_signal.await;
                })
                .await
            {
                tracing::error!(%error, "test coordinator failed");
            }
        });
        self.server = Some((shutdown, server));
    }
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        if let Some((shutdown, server)) = self.server.take() {
            let _ = shutdown.send(());
            server.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

struct Service {
    inner: Arc<Inner>,
}

impl Service {
    fn check_session<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let expected = format!("Bearer {SESSION_TOKEN}");
        let authorized = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(expected.as_str());
        if authorized {
            Ok(())
        } else {
            lock(&self.inner.recorded).unauthenticated_calls += 1;
            Err(Status::unauthenticated("missing or unknown session token"))
        }
    }
}

#[tonic::async_trait]
impl AgentService for Service {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let request = request.into_inner();
        if request.bootstrap_token != self.inner.bootstrap_token {
            return Err(Status::unauthenticated(format!(
                "bootstrap token for instance {} is unknown or already used",
                request.instance_id
            )));
        }
        lock(&self.inner.recorded).registrations.push(request);
        Ok(Response::new(RegisterResponse {
            session_token: SESSION_TOKEN.to_owned(),
            config: Some(self.inner.agent_config.clone()),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.check_session(&request)?;
        lock(&self.inner.recorded)
            .heartbeats
            .push(request.into_inner());
        Ok(Response::new(HeartbeatResponse {
            drain: *lock(&self.inner.drain),
        }))
    }

    async fn request_termination(
        &self,
        request: Request<TerminationRequest>,
    ) -> Result<Response<TerminationResponse>, Status> {
        self.check_session(&request)?;
        let request = request.into_inner();
        let hook = lock(&self.inner.hook).clone();
        if let Some(hook) = hook {
            hook(&request);
        }
        let delay = *lock(&self.inner.grant_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }

        let policy = lock(&self.inner.policy).clone();
        let response = match policy {
            TerminationPolicy::Grant => TerminationResponse {
                granted: true,
                ..TerminationResponse::default()
            },
            TerminationPolicy::Refuse {
                reason,
                retry_after_seconds,
            } => TerminationResponse {
                granted: false,
                reason,
                retry_after_seconds,
            },
        };
        lock(&self.inner.recorded)
            .terminations
            .push(TerminationRecord {
                instance_id: request.instance_id,
                idle_seconds: request.idle_seconds,
                granted: response.granted,
            });
        Ok(Response::new(response))
    }

    async fn report_interruption(
        &self,
        request: Request<InterruptionReport>,
    ) -> Result<Response<InterruptionResponse>, Status> {
        self.check_session(&request)?;
        lock(&self.inner.recorded)
            .interruptions
            .push(request.into_inner());
        Ok(Response::new(InterruptionResponse {}))
    }

    async fn report_health(
        &self,
        request: Request<HealthReport>,
    ) -> Result<Response<HealthResponse>, Status> {
        self.check_session(&request)?;
        let report = request.into_inner();
        let replace = !report.healthy && *lock(&self.inner.replace_unhealthy);
        lock(&self.inner.recorded).health.push(report);
        Ok(Response::new(HealthResponse { replace }))
    }
}
