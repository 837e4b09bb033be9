//! `fleet-demo`: the whole fleet on one machine, with no cloud account and no ClearML server.
//!
//! It starts the ClearML API emulator, a standalone coordinator whose local provider starts one node agent
//! process per instance, and enqueues a burst of tasks. The node agents run the real clearml-agent when it is
//! installed, else a stand-in that pulls tasks the same way and waits out their run time. The demo shows the
//! queue and the instances while the fleet scales up, works off the burst and scales back to zero, then prints a
//! summary.

pub mod roles;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clearml_api::tasks::EnqueueTask;
use clearml_api::{Client, ClientConfig, Retry};
use fleet_proto::v1::fleet_service_client::FleetServiceClient;
use fleet_proto::v1::{InstanceState, ListInstancesRequest};
use serde::Serialize;
use serde_json::json;
use tonic::Request;
use tonic::transport::Channel;

use crate::emulator::{Emulator, EmulatorConfig};
use crate::harness::{ChildProcess, LocalInstances, TestDir, free_port, venv_bin};

/// Queue the demo serves.
pub const QUEUE: &str = "default";
/// The demo coordinator's viewer and operator token, for fleetctl against a running demo.
pub const DEMO_TOKEN: &str = "demo-operator-token";
/// Time a node agent gives its running task when the demo stops it, before it requeues the task.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub tasks: usize,
    pub task_seconds: (f64, f64),
    pub max_instances: u32,
    pub exit_when_idle: bool,
    /// Use the stand-in even when clearml-agent is installed.
    pub fake_worker: bool,
    pub json: bool,
    /// Give up after this long.
    pub timeout: Duration,
    /// Ports of the coordinator's gRPC and HTTP servers on 127.0.0.1; 0 picks a free one.
    pub grpc_port: u16,
    pub http_port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub tasks_completed: usize,
    pub tasks_lost: usize,
    pub instances_launched: usize,
    pub instances_running_at_end: usize,
    pub wall_s: f64,
    pub worker: String,
}

/// Which clearml-agent the node agents run.
enum Worker {
    Real { agent: PathBuf, python: PathBuf },
    StandIn,
}

impl Worker {
    fn detect(force_fake: bool) -> Worker {
        if force_fake {
            return Worker::StandIn;
        }
        let venv_agent = venv_bin("clearml-agent");
        if venv_agent.exists() {
            return Worker::Real {
                agent: venv_agent,
                python: venv_bin("python"),
            };
        }
        match (which("clearml-agent"), which("python3")) {
            (Some(agent), Some(python)) => Worker::Real { agent, python },
            _ => Worker::StandIn,
        }
    }

    fn describe(&self) -> String {
        match self {
            Worker::Real { agent, .. } => format!("the real clearml-agent ({})", agent.display()),
            Worker::StandIn => {
                "a stand-in for clearml-agent (clearml-agent is not installed; `pip install clearml-agent` \
                 to run the real one)"
                    .to_owned()
            }
        }
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// Runs the demo and returns its summary.
pub async fn run(options: DemoOptions) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let out = Output::new(options.json);
    let dir = TestDir::new("demo")?;
    let keys = EmulatorConfig::default();
    let emulator = Emulator::start("127.0.0.1:0".parse()?, keys.clone()).await?;
    let queue_id = emulator.create_queue(QUEUE);
    let worker = Worker::detect(options.fake_worker);
    out.line(&format!("ClearML API emulator at {}", emulator.url()));
    out.line(&format!("node agents run {}", worker.describe()));

    let exe = std::env::current_exe()?;
    let pick = |port: u16| if port == 0 { free_port() } else { port };
    let (grpc, http) = (pick(options.grpc_port), pick(options.http_port));
    write_agent_template(&dir, &exe, &worker)?;
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        coordinator_config(&dir, &exe, &emulator, grpc, http, &options),
    )?;

    let mut command = Command::new(&exe);
    command
        .args(["internal", "coordinator", "--config"])
        .arg(&config)
        .arg("--state-file")
        .arg(dir.join("state.json"))
        .env("CLEARML_API_ACCESS_KEY", &keys.access_key)
        .env("CLEARML_API_SECRET_KEY", &keys.secret_key)
        .env("FLEET_DEMO_TOKEN", DEMO_TOKEN)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
        );
    let mut coordinator = ChildProcess::spawn("coordinator", command, dir.path())?;
    let reaper = LocalInstances::new(dir.join("instances"));
    wait_ready(http, &mut coordinator).await?;
    out.line(&format!(
        "coordinator ready: gRPC 127.0.0.1:{grpc}, HTTP http://127.0.0.1:{http}/status, logs in {}",
        dir.path().display()
    ));

    let client = Client::new(ClientConfig::new(
        &emulator.url(),
        &keys.access_key,
        keys.secret_key.clone(),
    )?)?;
    let tasks = enqueue_burst(&client, &dir, &queue_id, &worker, &options).await?;
    out.line(&format!(
        "enqueued {} tasks of {:.0} to {:.0} s into queue {QUEUE:?}",
        tasks.len(),
        options.task_seconds.0,
        options.task_seconds.1
    ));

    let channel = Channel::from_shared(format!("http://127.0.0.1:{grpc}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut fleet = FleetServiceClient::new(channel);
    let mut launched = std::collections::BTreeSet::new();
    let deadline = Instant::now() + options.timeout;
    let mut last_line = String::new();
    let mut scaled_up = false;
    loop {
        if let Some(status) = coordinator.exit_status() {
            anyhow::bail!(
                "the coordinator exited with {status}\n{}",
                coordinator.log_tail(20)
            );
        }
        let counts = task_counts(&emulator, &tasks);
        let instances = list_instances(&mut fleet).await.unwrap_or_default();
        let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut spend = 0.0;
        for instance in &instances {
            if !instance.instance_id.is_empty() {
                launched.insert(instance.instance_id.clone());
            }
            if instance.state == InstanceState::Terminated as i32 {
                continue;
            }
            spend += instance.hourly_price_usd;
            *by_state.entry(state_name(instance.state)).or_default() += 1;
        }
        let live: usize = by_state.values().sum();
        scaled_up |= live > 0;
        let line = format!(
            "{:>4.0}s  tasks: {} waiting, {} running, {} done of {}  |  instances: {}  |  ${spend:.2}/h",
            started.elapsed().as_secs_f64(),
            counts.waiting,
            counts.running,
            counts.done,
            tasks.len(),
            if live == 0 {
                "none".to_owned()
            } else {
                by_state
                    .iter()
                    .map(|(state, count)| format!("{count} {state}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        );
        out.progress(&line, &mut last_line);
        if counts.done == tasks.len() && scaled_up && live == 0 {
            break;
        }
        if Instant::now() >= deadline {
            out.finish_progress();
            anyhow::bail!(
                "the demo did not finish within {} s; see the logs in {}",
                options.timeout.as_secs(),
                dir.path().display()
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = wait_for_interrupt() => {
                out.finish_progress();
                out.line("interrupted; stopping the fleet");
                stop(&mut coordinator, &reaper).await;
                anyhow::bail!("interrupted before the fleet was back to zero");
            }
        }
    }
    out.finish_progress();

    let counts = task_counts(&emulator, &tasks);
    let summary = Summary {
        tasks_completed: counts.completed,
        tasks_lost: tasks.len() - counts.completed,
        instances_launched: launched.len(),
        instances_running_at_end: reaper.running(),
        wall_s: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        worker: match worker {
            Worker::Real { .. } => "clearml-agent".to_owned(),
            Worker::StandIn => "stand-in".to_owned(),
        },
    };
    print_summary(&summary, options.json);
    if !options.exit_when_idle {
        out.line(&format!(
            "the fleet is back to zero. It keeps running for fleetctl: FLEET_ENDPOINTS=http://127.0.0.1:{grpc} \
             FLEET_TOKEN={DEMO_TOKEN} fleetctl status. Press Ctrl-C to stop."
        ));
        wait_for_interrupt().await;
    }
    stop(&mut coordinator, &reaper).await;
    Ok(summary)
}

/// Prints the summary: JSON on stdout with `--json`, else one line.
fn print_summary(summary: &Summary, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(summary).expect("the summary serializes")
        );
    } else {
        println!(
            "summary: {} tasks completed, {} lost, {} instances launched, {} running at the end, {:.1} s ({})",
            summary.tasks_completed,
            summary.tasks_lost,
            summary.instances_launched,
            summary.instances_running_at_end,
            summary.wall_s,
            summary.worker
        );
    }
    let _ = std::io::stdout().flush();
}

/// Stops the coordinator, then the instances: SIGTERM lets each node agent requeue its task and stop its
/// clearml-agent within the drain grace, and SIGKILL follows for any agent still running after that.
async fn stop(coordinator: &mut ChildProcess, reaper: &LocalInstances) {
    coordinator.terminate();
    let stopped =
        crate::harness::wait_until(Duration::from_secs(10), "the coordinator stops", || {
            coordinator.exit_status().is_some()
        })
        .await;
    if stopped.is_err() {
        coordinator.kill();
    }
    reaper.signal(libc::SIGTERM);
    let limit = DRAIN_GRACE + Duration::from_secs(10);
    let _ = crate::harness::wait_until(limit, "the instances stop", || reaper.running() == 0).await;
}

async fn wait_ready(http: u16, coordinator: &mut ChildProcess) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = coordinator.exit_status() {
            anyhow::bail!(
                "the coordinator exited with {status} before it was ready\n{}",
                coordinator.log_tail(20)
            );
        }
        let ready = client
            .get(format!("http://127.0.0.1:{http}/readyz"))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success());
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the coordinator was not ready within 30 s\n{}",
                coordinator.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn list_instances(
    fleet: &mut FleetServiceClient<Channel>,
) -> Result<Vec<fleet_proto::v1::Instance>, tonic::Status> {
    let mut request = Request::new(ListInstancesRequest {
        queue: String::new(),
        states: (1..=8).collect(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {DEMO_TOKEN}")
            .parse()
            .expect("the token is valid metadata"),
    );
    Ok(fleet.list_instances(request).await?.into_inner().instances)
}

fn state_name(state: i32) -> &'static str {
    match InstanceState::try_from(state).unwrap_or(InstanceState::Unspecified) {
        InstanceState::Requested => "requested",
        InstanceState::Launching => "launching",
        InstanceState::Booting => "booting",
        InstanceState::Idle => "idle",
        InstanceState::Busy => "busy",
        InstanceState::Draining => "draining",
        InstanceState::Terminating => "terminating",
        InstanceState::Terminated => "terminated",
        InstanceState::Unspecified => "unknown",
    }
}

#[derive(Default)]
struct TaskCounts {
    waiting: usize,
    running: usize,
    /// Completed or failed.
    done: usize,
    completed: usize,
}

fn task_counts(emulator: &Emulator, tasks: &[String]) -> TaskCounts {
    let mut counts = TaskCounts::default();
    for id in tasks {
        match emulator.task(id).map(|task| task.status).as_deref() {
            Some("queued") | Some("created") => counts.waiting += 1,
            Some("completed") => {
                counts.done += 1;
                counts.completed += 1;
            }
            Some("failed") | Some("stopped") => counts.done += 1,
            _ => counts.running += 1,
        }
    }
    counts
}

async fn enqueue_burst(
    client: &Client,
    dir: &TestDir,
    queue_id: &str,
    worker: &Worker,
    options: &DemoOptions,
) -> anyhow::Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Created {
        id: String,
    }
    let (low, high) = options.task_seconds;
    let mut ids = Vec::with_capacity(options.tasks);
    for index in 0..options.tasks {
        let seconds = if high > low {
            low + (high - low) * rand::random::<f64>()
        } else {
            low
        };
        let body = match worker {
            Worker::Real { .. } => {
                let script = dir.join(format!("task-{index}.py"));
                std::fs::write(
                    &script,
                    format!(
                        "import time\nprint('demo task {index} runs for {seconds:.1} s', flush=True)\ntime.sleep({seconds:.1})\nprint('demo task {index} done')\n"
                    ),
                )?;
                json!({
                    "name": format!("demo-task-{index}"),
                    "type": "training",
                    "script": {
                        "entry_point": script.display().to_string(),
                        "working_dir": dir.path().display().to_string(),
                        "repository": "",
                    },
                })
            }
            Worker::StandIn => json!({
                "name": format!("demo-task-{index}"),
                "type": "training",
                "hyperparams": {"fleet": {"run_seconds": {
                    "section": "fleet", "name": "run_seconds", "value": format!("{seconds:.1}")
                }}},
            }),
        };
        let created: Created = client.call("tasks.create", &body, Retry::Never).await?;
        client
            .tasks()
            .enqueue(&EnqueueTask {
                task: created.id.clone(),
                queue: Some(queue_id.to_owned()),
                ..EnqueueTask::default()
            })
            .await?;
        ids.push(created.id);
    }
    Ok(ids)
}

fn write_agent_template(dir: &TestDir, exe: &Path, worker: &Worker) -> anyhow::Result<()> {
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    let (program, env) = match worker {
        Worker::Real { agent, python } => (
            agent.display().to_string(),
            format!(
                "CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL = \"1\"\nCLEARML_AGENT_SKIP_PIP_VENV_INSTALL = {}\nCLEARML_AGENT_QUEUE_POLL_FREQ_SEC = \"0.5\"\n",
                quote(&python.display().to_string())
            ),
        ),
        Worker::StandIn => {
            let wrapper = dir.join("clearml-agent-stand-in.sh");
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\nexec {} internal fake-clearml-agent \"$@\"\n",
                    shell_quote(&exe.display().to_string())
                ),
            )?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
            (wrapper.display().to_string(), String::new())
        }
    };
    let template = format!(
        r#"# Rendered by the coordinator's local provider for each instance.
[coordinator]
endpoints = {{{{coordinator_endpoints_toml}}}}
bootstrap_token = "{{{{bootstrap_token}}}}"
allow_plaintext_loopback = true

[imds]
instance_id = "{{{{instance_id}}}}"

[agent]
state_dir = "{{{{dir}}}}/agent"
gate_listen = "127.0.0.1:0"
grpc_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
shutdown_command = ["true"]
check_interval_ms = 200

[clearml_agent]
program = {program}
restart_backoff_initial_ms = 500
stop_timeout_seconds = 5

[clearml_agent.env]
{env}"#,
        program = quote(&program),
    );
    std::fs::write(dir.join("agent.toml.tmpl"), template)?;
    Ok(())
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

fn coordinator_config(
    dir: &TestDir,
    exe: &Path,
    emulator: &Emulator,
    grpc: u16,
    http: u16,
    options: &DemoOptions,
) -> String {
    format!(
        r#"[cluster]
name = "demo"

[clearml]
api_server = "{clearml}"
poll_interval_seconds = 1

[defaults]
max_idle_seconds = 10
heartbeat_timeout_seconds = 10
reconcile_interval_seconds = 2
orphan_grace_seconds = 30
drain_grace_seconds = {drain_grace}

[budget]
max_instances = {max}

[api]
grpc_listen = "127.0.0.1:{grpc}"
http_listen = "127.0.0.1:{http}"
agent_endpoints = ["http://127.0.0.1:{grpc}"]

[[api.tokens]]
name = "demo"
role = "operator"
token_env = "FLEET_DEMO_TOKEN"

[local]
base_dir = {instances}
program = {exe}
args = ["internal", "node-agent", "--config", "{{dir}}/agent.toml"]
agent_config_template_file = {template}

[resources.local]
provider = "local"
max_instances = {max}
hourly_price_usd = {{ local = 0.10 }}

[[queues]]
name = "{QUEUE}"
resources = ["local"]
max_instances = {max}
"#,
        clearml = emulator.url(),
        drain_grace = DRAIN_GRACE.as_secs(),
        max = options.max_instances,
        instances = serde_json::Value::from(dir.join("instances").display().to_string()),
        exe = serde_json::Value::from(exe.display().to_string()),
        template = serde_json::Value::from(dir.join("agent.toml.tmpl").display().to_string()),
    )
}

async fn wait_for_interrupt() {
    use tokio::signal::unix::{SignalKind, signal};
    if let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    }
}

/// Progress output: one line rewritten in place on a terminal, one line per change otherwise. With `--json`
/// only stderr gets progress.
struct Output {
    terminal: bool,
    json: bool,
}

impl Output {
    fn new(json: bool) -> Output {
        let terminal = if json {
            std::io::stderr().is_terminal()
        } else {
            std::io::stdout().is_terminal()
        };
        Output { terminal, json }
    }

    fn write(&self, text: &str) {
        if self.json {
            let _ = write!(std::io::stderr(), "{text}");
        } else {
            let _ = write!(std::io::stdout(), "{text}");
            let _ = std::io::stdout().flush();
        }
    }

    fn line(&self, text: &str) {
        self.write(&format!("{text}\n"));
    }

    fn progress(&self, line: &str, last: &mut String) {
        if self.terminal {
            self.write(&format!("\r\x1b[2K{line}"));
        } else {
            // Without a terminal, print a line only when something besides the clock changed.
            let content = line.split_once("  tasks:").map_or(line, |(_, rest)| rest);
            if content != last {
                self.line(line);
            }
        }
        let content = line.split_once("  tasks:").map_or(line, |(_, rest)| rest);
        *last = content.to_owned();
    }

    fn finish_progress(&self) {
        if self.terminal {
            self.write("\n");
        }
    }
}
