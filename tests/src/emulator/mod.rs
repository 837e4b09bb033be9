//! An emulator of the ClearML server REST API, faithful enough for the real `clearml` SDK and `clearml-agent`.
//!
//! It follows clearml-server's envelope, error codes, authentication (Basic credentials for `auth.login`, an
//! HS256 JWT afterwards), queues, workers with registration expiry, tasks with the server's status machine,
//! projects and the event calls a task run makes. Unknown endpoints fail with the server's 404 and are recorded
//! for tests. State lives in memory and disappears with the emulator.

mod auth;
mod envelope;
mod misc;
mod projects;
mod queues;
mod server;
mod state;
mod tasks;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use server::Shared;

/// Settings of an emulator instance. Its `Debug` output redacts the secret key.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// The access key `auth.login` accepts.
    pub access_key: String,
    /// The secret key `auth.login` accepts. Never logged.
    pub secret_key: String,
    /// Registration timeout of a worker that registers without one (the server's default is 600 s).
    pub worker_timeout: Duration,
}

impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("worker_timeout", &self.worker_timeout)
            .finish()
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            access_key: "fleet-test-access".to_owned(),
            secret_key: "fleet-test-secret".to_owned(),
            worker_timeout: Duration::from_secs(600),
        }
    }
}

/// A failure injected into the next calls of one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// HTTP 500 with the server's envelope (`result_code` 500, subcode 0). The endpoint does not run.
    ServerError,
    /// The endpoint runs after this delay.
    Delay(Duration),
    /// The endpoint runs, but the response is HTTP 200 with a body that is not JSON.
    MalformedJson,
    /// The endpoint runs, and this key (a dotted path such as `entry.task`) is removed from `data`.
    DropField(String),
}

/// Errors of starting the emulator.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("failed to bind the ClearML API emulator to {addr}: {source}; choose a free port")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read the local address of the emulator's listener: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// A task as the test API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskView {
    pub id: String,
    pub name: String,
    pub status: String,
    pub status_message: String,
    pub status_reason: String,
    pub project: Option<String>,
    /// `execution.queue`: the queue the task was last enqueued to.
    pub execution_queue: Option<String>,
    /// The worker that last reported running the task.
    pub last_worker: Option<String>,
    /// The full task document, as `tasks.get_by_id` returns it.
    pub document: Value,
}

/// A registered, unexpired worker as the test API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    pub id: String,
    /// Ids of the queues the worker listens to.
    pub queues: Vec<String>,
    /// The task the worker last reported running, or `None` when it is idle.
    pub task: Option<String>,
    pub last_activity: DateTime<Utc>,
}

/// A running emulator. Dropping it without [`Emulator::shutdown`] aborts the server task.
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Binds `bind` (port 0 picks a free port) and serves the API until [`Emulator::shutdown`].
    pub async fn start(
        bind: SocketAddr,
        config: EmulatorConfig,
    ) -> Result<Emulator, EmulatorError> {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|source| EmulatorError::Bind { addr: bind, source })?;
        let addr = listener.local_addr().map_err(EmulatorError::LocalAddr)?;
        let worker_timeout_secs = config.worker_timeout.as_secs();
        let shared = Arc::new(Shared::new(config));

        let app = axum::Router::new()
            .fallback(server::handle_request)
            .with_state(shared.clone());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let service = app.into_make_service_with_connect_info::<SocketAddr>();
            let result = axum::serve(listener, service)
                .with_graceful_shutdown(async {
                    let _ = shutdown_rx.await;
                })
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "ClearML API emulator server failed");
            }
        });
        tracing::info!(%addr, worker_timeout_secs, "ClearML API emulator listening");

        Ok(Emulator {
            addr,
            shared,
            shutdown: Some(shutdown_tx),
            server: Some(server),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the base URL for the clients' `api_server`, for example `http://127.0.0.1:8008`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates a queue and returns its id.
    ///
    /// # Panics
    /// If the name is shorter than 3 characters or taken, which the server also rejects.
    pub fn create_queue(&self, name: &str) -> String {
        let mut state = self.shared.state();
        queues::create_queue(&mut state, name, Utc::now())
            .unwrap_or_else(|error| panic!("failed to create queue {name:?}: {}", error.msg))
    }

    /// Creates a task in status `created`, in `project` (a project name, created when missing), and returns its
    /// id.
    pub fn create_task(&self, name: &str, project: Option<&str>) -> String {
        let now = Utc::now();
        let mut state = self.shared.state();
        let project_id = project.map(|name| projects::ensure_project(&mut state, name, now));
        let task = tasks::new_task(&state, name, project_id.as_deref(), now);
        let id = task
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        state.tasks.push(task);
        id
    }

    /// Creates `count` tasks named `task-0`, `task-1`, ... and enqueues them in queue `queue_id` with `client`'s
    /// `tasks.enqueue`, as a user's SDK would; returns their ids.
    pub async fn enqueue_new_tasks(
        &self,
        client: &clearml_api::Client,
        queue_id: &str,
        count: usize,
    ) -> Result<Vec<String>, clearml_api::Error> {
        let mut ids = Vec::with_capacity(count);
        for index in 0..count {
            let id = self.create_task(&format!("task-{index}"), None);
            client
                .tasks()
                .enqueue(&clearml_api::tasks::EnqueueTask {
                    task: id.clone(),
                    queue: Some(queue_id.to_owned()),
                    ..Default::default()
                })
                .await?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// Returns a client of this emulator with its own credentials.
    pub fn client(&self) -> Result<clearml_api::Client, clearml_api::Error> {
        let config = &self.shared.config;
        clearml_api::Client::new(clearml_api::ClientConfig::new(
            &self.url(),
            config.access_key.clone(),
            config.secret_key.clone(),
        )?)
    }

    /// Returns the ids of the tasks waiting in a queue (given by id or name), front first; empty for an
    /// unknown queue.
    pub fn queue_entries(&self, queue: &str) -> Vec<String> {
        let state = self.shared.state();
        state
            .queue_by_id_or_name(queue)
            .map(|q| q.entries.iter().map(|(task, _)| task.clone()).collect())
            .unwrap_or_default()
    }

    pub fn task(&self, id: &str) -> Option<TaskView> {
        let state = self.shared.state();
        let task = state.task(id).ok()?;
        let text = |key: &str| task.get(key).and_then(Value::as_str).map(str::to_owned);
        Some(TaskView {
            id: id.to_owned(),
            name: text("name").unwrap_or_default(),
            status: text("status").unwrap_or_default(),
            status_message: text("status_message").unwrap_or_default(),
            status_reason: text("status_reason").unwrap_or_default(),
            project: text("project"),
            execution_queue: task
                .get("execution")
                .and_then(|e| e.get("queue"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            last_worker: text("last_worker"),
            document: Value::Object(task.clone()),
        })
    }

    /// Returns the registered workers whose registration has not expired by tokio's clock.
    pub fn workers(&self) -> Vec<WorkerView> {
        let mut state = self.shared.state();
        state.expire_workers(tokio::time::Instant::now());
        state
            .workers
            .values()
            .map(|w| WorkerView {
                id: w.id.clone(),
                queues: w.queues.clone(),
                task: w.task.clone(),
                last_activity: w.last_activity_time,
            })
            .collect()
    }

    /// Returns the console output (`log` events) a task reported through `events.add_batch`, in order.
    pub fn task_log(&self, id: &str) -> Vec<String> {
        let state = self.shared.state();
        state
            .task_events
            .get(id)
            .map(|events| {
                events
                    .iter()
                    .filter(|e| e.get("type").and_then(Value::as_str) == Some("log"))
                    .filter_map(|e| e.get("msg").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Returns the calls to endpoints the emulator does not implement, as `name (version X)`, in order.
    pub fn unknown_calls(&self) -> Vec<String> {
        self.shared
            .unknown_calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Makes the next `times` calls to `endpoint` (for example `queues.get_next_task`) fail with `fault`.
    ///
    /// # Panics
    /// If the emulator does not implement `endpoint`, because such a fault could never fire.
    pub fn inject_fault(&self, endpoint: &str, fault: Fault, times: usize) {
        assert!(
            server::is_known(endpoint),
            "cannot inject a fault into {endpoint:?}: the emulator does not implement it"
        );
        let mut faults = self
            .shared
            .faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let queue = faults.entry(endpoint.to_owned()).or_default();
        queue.extend(std::iter::repeat_n(fault, times));
    }

    /// Starts or ends an outage: while it lasts, every call fails with HTTP 503 and no envelope.
    pub fn set_outage(&self, down: bool) {
        self.shared
            .outage
            .store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops accepting connections and waits for open requests to finish, at most 5 s.
    pub async fn shutdown(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .is_err()
            {
                tracing::warn!(addr = %self.addr, "emulator connections still open after 5 s; aborting the server");
                abort.abort();
            }
        }
        tracing::info!(addr = %self.addr, "ClearML API emulator stopped");
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}
