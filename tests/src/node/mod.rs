//! Test doubles around the node agent: a fake instance metadata service (IMDSv2), a test coordinator that
//! serves AgentService, and a test bed that runs the agent against them and the ClearML API emulator.

mod coordinator;
mod imds;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clearml_api::{Client, ClientConfig, Retry};
use fleet_node_agent::config::Config;
use fleet_node_agent::controller::Exit;
use fleet_node_agent::run::{ReadyInfo, StartError};
use fleet_proto::v1::{AgentConfig, AgentTimeouts, ClearmlAccess};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use coordinator::{
    SESSION_TOKEN, TerminationHook, TerminationPolicy, TerminationRecord, TestCoordinator,
};
pub use imds::FakeImds;

use crate::emulator::{Emulator, EmulatorConfig};
use crate::harness::{TestDir, venv_bin, wait_until};

/// The bootstrap token the test coordinator accepts.
pub const BOOTSTRAP_TOKEN: &str = "test-bootstrap-token";
pub const ACCESS_KEY: &str = "node-test-access";
pub const SECRET_KEY: &str = "node-test-secret-key";
pub const QUEUE: &str = "node-test-queue";

/// The program the supervisor runs as clearml-agent.
#[derive(Debug, Clone)]
pub enum WorkerProgram {
    /// The real clearml-agent from the test venv, set up to run a task in the venv's Python without installing
    /// anything.
    ClearmlAgent,
    /// `fake-clearml-worker` behind a shell wrapper that accepts clearml-agent's `daemon` arguments and reads
    /// the gate address and credentials from the generated clearml.conf.
    FakeWorker {
        binary: PathBuf,
        run_seconds: f64,
        poll_interval_ms: u64,
    },
    /// Any program, for example one that exits at once to make a crash loop.
    Custom(PathBuf),
}

/// Timeouts and settings of one test agent. Whole seconds, as the registration response carries them.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub max_idle_seconds: u32,
    pub heartbeat_interval_seconds: u32,
    pub orphan_timeout_seconds: u32,
    pub drain_grace_seconds: u32,
    pub termination_retry_seconds: u32,
    pub check_interval_ms: u64,
    pub notice_poll_interval_ms: u64,
    pub crash_loop_restarts: u32,
    pub restart_backoff_initial_ms: u64,
    pub worker: WorkerProgram,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            max_idle_seconds: 2,
            heartbeat_interval_seconds: 1,
            orphan_timeout_seconds: 600,
            drain_grace_seconds: 30,
            termination_retry_seconds: 1,
            check_interval_ms: 100,
            notice_poll_interval_ms: 200,
            crash_loop_restarts: 5,
            restart_backoff_initial_ms: 200,
            worker: WorkerProgram::ClearmlAgent,
        }
    }
}

/// The ClearML emulator, the fake IMDS and the test coordinator for one agent.
pub struct NodeTestBed {
    pub dir: TestDir,
    pub emulator: Emulator,
    pub imds: FakeImds,
    pub coordinator: TestCoordinator,
    pub queue_id: String,
    pub instance_id: String,
    pub worker_id: String,
    pub options: AgentOptions,
}

impl NodeTestBed {
    /// Starts the emulator with one queue, the fake IMDS and a coordinator that hands out `options`.
    pub async fn start(test: &str, options: AgentOptions) -> NodeTestBed {
        init_test_logging();
        let dir = TestDir::new(test).expect("test directory");
        let emulator = Emulator::start(
            "127.0.0.1:0".parse().expect("valid address"),
            EmulatorConfig {
                access_key: ACCESS_KEY.to_owned(),
                secret_key: SECRET_KEY.to_owned(),
                ..EmulatorConfig::default()
            },
        )
        .await
        .expect("emulator starts");
        let queue_id = emulator.create_queue(QUEUE);

        let instance_id = format!("i-{:017x}", rand::random::<u64>() >> 4);
        let worker_id = format!("fleet:cpu-spot:{instance_id}");
        let imds = FakeImds::start(&instance_id).await;
        let agent_config = AgentConfig {
            worker_id: worker_id.clone(),
            resource: "cpu-spot".to_owned(),
            queues: vec![QUEUE.to_owned()],
            clearml: Some(ClearmlAccess {
                api_server: emulator.url(),
                web_server: emulator.url(),
                files_server: emulator.url(),
                access_key: ACCESS_KEY.to_owned(),
                secret_key: SECRET_KEY.to_owned(),
            }),
            clearml_agent_version: "3.0.3".to_owned(),
            timeouts: Some(AgentTimeouts {
                max_idle_seconds: options.max_idle_seconds,
                heartbeat_interval_seconds: options.heartbeat_interval_seconds,
                orphan_timeout_seconds: options.orphan_timeout_seconds,
                drain_grace_seconds: options.drain_grace_seconds,
                termination_retry_seconds: options.termination_retry_seconds,
            }),
            ..AgentConfig::default()
        };
        let coordinator = TestCoordinator::start(BOOTSTRAP_TOKEN, agent_config).await;

        NodeTestBed {
            dir,
            emulator,
            imds,
            coordinator,
            queue_id,
            instance_id,
            worker_id,
            options,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("agent")
    }

    /// Returns the file the test shutdown action appends a line to; the action never powers anything off.
    pub fn shutdown_marker(&self) -> PathBuf {
        self.dir.join("shutdown-marker")
    }

    /// Returns how many times the shutdown action ran.
    pub fn shutdown_count(&self) -> usize {
        std::fs::read_to_string(self.shutdown_marker())
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }

    /// Renders the agent's bootstrap config with `token` as its bootstrap token.
    pub fn config_text(&self, token: &str) -> String {
        let (program, env) = self.program_and_env();
        let mut env_lines = String::new();
        for (key, value) in env {
            env_lines.push_str(&format!("{key} = {}\n", json!(value)));
        }
        format!(
            r#"[coordinator]
endpoints = ["{coordinator}"]
bootstrap_token = "{token}"
allow_plaintext_loopback = true
registration_timeout_seconds = 5
request_timeout_seconds = 2

[imds]
endpoint = "{imds}"
notice_poll_interval_ms = {notice_ms}

[agent]
state_dir = {state_dir}
gate_listen = "127.0.0.1:0"
grpc_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
shutdown_command = ["sh", "-c", {marker_command}]
check_interval_ms = {check_ms}

[clearml_agent]
program = {program}
restart_backoff_initial_ms = {backoff_ms}
restart_backoff_max_ms = 1000
crash_loop_restarts = {crash_loop}
crash_loop_window_seconds = 60
stop_timeout_seconds = 5

[clearml_agent.env]
{env_lines}"#,
            coordinator = self.coordinator.url(),
            imds = self.imds.url(),
            notice_ms = self.options.notice_poll_interval_ms,
            state_dir = json!(self.state_dir().display().to_string()),
            marker_command = json!(format!(
                "echo shutdown >> '{}'",
                self.shutdown_marker().display()
            )),
            check_ms = self.options.check_interval_ms,
            program = json!(program.display().to_string()),
            backoff_ms = self.options.restart_backoff_initial_ms,
            crash_loop = self.options.crash_loop_restarts,
        )
    }

    /// Writes the config file and returns its path.
    pub fn write_config(&self, token: &str) -> PathBuf {
        let path = self.dir.join("agent.toml");
        std::fs::write(&path, self.config_text(token)).expect("write agent.toml");
        path
    }

    /// Starts the agent in this process with the valid bootstrap token.
    pub fn spawn_agent(&self) -> RunningAgent {
        let text = self.config_text(BOOTSTRAP_TOKEN);
        let config = Config::parse(&text, Path::new("agent.toml")).expect("test config is valid");
        let (sigterm, sigterm_receiver) = mpsc::channel(1);
        let task = tokio::spawn(fleet_node_agent::run::run(config, sigterm_receiver));
        RunningAgent {
            task: Some(task),
            sigterm,
            state_dir: self.state_dir(),
        }
    }

    /// Returns a client of the emulator itself, not the gate.
    pub fn clearml(&self) -> Client {
        Client::new(
            ClientConfig::new(&self.emulator.url(), ACCESS_KEY, SECRET_KEY).expect("valid config"),
        )
        .expect("client builds")
    }

    /// Creates a task that runs `script` (a Python file) and enqueues it; returns its id.
    pub async fn enqueue_script_task(&self, name: &str, script: &Path) -> String {
        let client = self.clearml();
        #[derive(serde::Deserialize)]
        struct Created {
            id: String,
        }
        let created: Created = client
            .call(
                "tasks.create",
                &json!({
                    "name": name,
                    "type": "training",
                    "project": null,
                    "script": {
                        "entry_point": script.display().to_string(),
                        "working_dir": ".",
                        "repository": "",
                    },
                }),
                Retry::Never,
            )
            .await
            .expect("tasks.create succeeds");
        self.enqueue(&created.id).await;
        created.id
    }

    /// Enqueues an existing task to the test queue.
    pub async fn enqueue(&self, task_id: &str) {
        self.clearml()
            .tasks()
            .enqueue(&clearml_api::tasks::EnqueueTask {
                task: task_id.to_owned(),
                queue: Some(self.queue_id.clone()),
                ..Default::default()
            })
            .await
            .expect("tasks.enqueue succeeds");
    }

    /// Returns where a task ended up: it must have completed here or be waiting in the queue.
    pub fn task_outcome(&self, task_id: &str) -> TaskOutcome {
        let task = self.emulator.task(task_id).expect("task exists");
        let in_queue = self
            .emulator
            .queue_entries(QUEUE)
            .contains(&task_id.to_owned());
        match (task.status.as_str(), in_queue) {
            ("completed", false) => TaskOutcome::Completed,
            ("queued", true) => TaskOutcome::Queued,
            (status, in_queue) => TaskOutcome::Lost {
                status: status.to_owned(),
                in_queue,
            },
        }
    }

    fn program_and_env(&self) -> (PathBuf, Vec<(String, String)>) {
        match &self.options.worker {
            WorkerProgram::ClearmlAgent => (
                venv_bin("clearml-agent"),
                vec![
                    (
                        "CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL".to_owned(),
                        "1".to_owned(),
                    ),
                    (
                        "CLEARML_AGENT_SKIP_PIP_VENV_INSTALL".to_owned(),
                        venv_bin("python").display().to_string(),
                    ),
                    (
                        "CLEARML_AGENT_QUEUE_POLL_FREQ_SEC".to_owned(),
                        "0.5".to_owned(),
                    ),
                ],
            ),
            WorkerProgram::FakeWorker {
                binary,
                run_seconds,
                poll_interval_ms,
            } => {
                let wrapper = self.dir.join("fake-clearml-agent.sh");
                std::fs::write(&wrapper, FAKE_WORKER_WRAPPER).expect("write the wrapper");
                make_executable(&wrapper);
                (
                    wrapper,
                    vec![
                        ("FAKE_WORKER_BIN".to_owned(), binary.display().to_string()),
                        ("FAKE_RUN_SECONDS".to_owned(), run_seconds.to_string()),
                        ("FAKE_POLL_MS".to_owned(), poll_interval_ms.to_string()),
                    ],
                )
            }
            WorkerProgram::Custom(program) => (program.clone(), Vec::new()),
        }
    }
}

/// Sends tracing output to the test's captured output; `RUST_LOG` filters it (default `info`).
pub fn init_test_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// Where a task ended up after the agent finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome {
    Completed,
    /// `queued` and waiting in its queue.
    Queued,
    /// Anything else: the task is lost or stuck.
    Lost {
        status: String,
        in_queue: bool,
    },
}

/// Accepts clearml-agent's `daemon --queue Q... [--docker IMAGE] --foreground` and runs fake-clearml-worker
/// with the gate address and credentials read from `$CLEARML_CONFIG_FILE`.
const FAKE_WORKER_WRAPPER: &str = r#"#!/bin/sh
set -eu
conf="$CLEARML_CONFIG_FILE"
api=$(sed -n 's/^  api_server: "\(.*\)"$/\1/p' "$conf")
access=$(sed -n 's/^    access_key: "\(.*\)"$/\1/p' "$conf")
CLEARML_API_SECRET_KEY=$(sed -n 's/^    secret_key: "\(.*\)"$/\1/p' "$conf")
export CLEARML_API_SECRET_KEY
shift 2
queues=""
while [ $# -gt 0 ]; do
  case "$1" in
    --foreground) shift ;;
    --docker) shift 2 ;;
    *) queues="$queues --queue $1"; shift ;;
  esac
done
exec "$FAKE_WORKER_BIN" --api-server "$api" --access-key "$access" --worker-id "$CLEARML_WORKER_ID" \
  $queues --poll-interval-ms "$FAKE_POLL_MS" --default-run-seconds "$FAKE_RUN_SECONDS" --report-interval-secs 1
"#;

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut permissions = std::fs::metadata(path).expect("file exists").permissions();
    permissions.set_mode(0o755);
    std::fs::set_permissions(path, permissions).expect("chmod");
}

/// An agent running in this process.
pub struct RunningAgent {
    task: Option<JoinHandle<Result<Exit, StartError>>>,
    sigterm: mpsc::Sender<()>,
    state_dir: PathBuf,
}

impl RunningAgent {
    /// Waits for `<state_dir>/ready.json` and returns the addresses in it.
    pub async fn ready(&self) -> ReadyInfo {
        let path = self.state_dir.join("ready.json");
        wait_until(
            Duration::from_secs(20),
            "the node agent to write ready.json",
            || path.exists(),
        )
        .await
        .expect("agent becomes ready");
        let text = std::fs::read_to_string(&path).expect("read ready.json");
        serde_json::from_str(&text).expect("ready.json parses")
    }

    /// Delivers SIGTERM to the agent's main loop.
    pub async fn sigterm(&self) {
        self.sigterm.send(()).await.expect("agent main loop runs");
    }

    /// Returns true once the agent finished.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the agent to finish, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Result<Exit, StartError> {
        let task = self.task.take().expect("wait is called once");
        tokio::time::timeout(timeout, task)
            .await
            .unwrap_or_else(|_| panic!("node agent still running after {timeout:?}"))
            .expect("agent task does not panic")
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
