//! The real ClearML clients from PyPI against the emulator: the `clearml` SDK creates and enqueues a task, and
//! `clearml-agent daemon` registers, pulls that task, runs it and reports it completed.
//!
//! The clients come from the venv of `FLEET_VENV` (default `$HOME/.cache/clearml-fleet/venv`). Every process
//! runs with `HOME` and `TMPDIR` in the test's directory and with HTTP(S) proxies pointing at a closed loopback
//! port, so any request that is not for the emulator on 127.0.0.1 fails instead of leaving the machine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleet_tests::emulator::{Emulator, EmulatorConfig};
use fleet_tests::harness::{ChildProcess, TestDir, venv_bin, venv_dir, wait_until};

/// The SDK needs a few seconds to import and make about ten calls.
const SDK_DEADLINE: Duration = Duration::from_secs(90);
/// The agent starts, registers, pulls, runs the task in a subprocess and reports back, about 10-20 s here.
const AGENT_DEADLINE: Duration = Duration::from_secs(180);
/// Endpoints the clients call that the open-source clearml-server does not implement either, so the 404 they
/// get is what the real server returns.
const ABSENT_FROM_OPEN_SOURCE_SERVER: &[&str] = &["workers.get_runtime_properties"];
/// The line `tests/python/hello_task.py` prints, with the parameter it read back through `Task.connect`.
const TASK_MARKER: &str = "fleet-conformance-task-ran steps=3";
/// A loopback port nothing listens on, used as the proxy for every non-local request.
const CLOSED_PROXY: &str = "http://127.0.0.1:9";

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("fleet_tests=info")),
        )
        .try_init();
}

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

fn require_venv() {
    for program in ["python", "clearml-agent"] {
        let path = venv_bin(program);
        assert!(
            path.exists(),
            "{} is missing: install clearml==2.1.12 and clearml-agent==3.0.3 into {} or set FLEET_VENV",
            path.display(),
            venv_dir().display()
        );
    }
}

/// Writes the clearml.conf both clients read: every server URL is the emulator.
fn write_clearml_conf(dir: &TestDir, emulator: &Emulator, config: &EmulatorConfig) -> PathBuf {
    let url = emulator.url();
    let text = format!(
        r#"api {{
    api_server: "{url}"
    web_server: "{url}"
    files_server: "{url}"
    credentials {{
        access_key: "{access_key}"
        secret_key: "{secret_key}"
    }}
}}
agent {{
    vcs_cache.enabled: false
    pip_download_cache.enabled: false
    reload_config: false
}}
"#,
        access_key = config.access_key,
        secret_key = config.secret_key,
    );
    let path = dir.join("clearml.conf");
    std::fs::write(&path, text)
        .unwrap_or_else(|e| panic!("failed to write {}: {e}", path.display()));
    path
}

/// Builds a command with a clean environment: only the venv, the test directory as home and the closed proxy.
fn client_command(program: &Path, dir: &TestDir, conf: &Path) -> Command {
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp)
        .unwrap_or_else(|e| panic!("failed to create {}: {e}", tmp.display()));
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", venv_bin("").display());

    let mut command = Command::new(program);
    command
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir.path())
        .env("TMPDIR", &tmp)
        .env("LANG", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1")
        .env("CLEARML_CONFIG_FILE", conf)
        .env("HTTP_PROXY", CLOSED_PROXY)
        .env("HTTPS_PROXY", CLOSED_PROXY)
        .env("http_proxy", CLOSED_PROXY)
        .env("https_proxy", CLOSED_PROXY)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .current_dir(dir.path());
    command
}

/// Runs `tests/python/enqueue_task.py` for `script` (a file in `tests/python/`) and returns the id of the task
/// it created.
async fn enqueue_with_sdk(
    dir: &TestDir,
    conf: &Path,
    task_name: &str,
    queue: &str,
    script: &str,
) -> String {
    let project = "fleet-conformance";
    let script = python_dir().join(script);
    let mut command = client_command(&venv_bin("python"), dir, conf);
    command
        .arg(python_dir().join("enqueue_task.py"))
        .args(["--project", project, "--name", task_name, "--queue", queue])
        .arg("--script")
        .arg(&script);
    let mut sdk =
        ChildProcess::spawn("enqueue-task", command, dir.path()).expect("the venv's python starts");

    let waited = wait_until(
        SDK_DEADLINE,
        "enqueue_task.py (clearml SDK) to exit",
        || sdk.exit_status().is_some(),
    )
    .await;
    if let Err(error) = waited {
        panic!("{error}\n{}", sdk.log_tail(40));
    }
    let status = sdk.exit_status().expect("the SDK process exited");
    assert!(
        status.success(),
        "enqueue_task.py failed with {status}\n{}",
        sdk.log_tail(40)
    );

    let stdout = std::fs::read_to_string(dir.join("enqueue-task.stdout.log")).unwrap_or_default();
    stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("enqueue_task.py printed no task id\n{}", sdk.log_tail(40)))
}

fn unexpected_unknown_calls(emulator: &Emulator) -> Vec<String> {
    emulator
        .unknown_calls()
        .into_iter()
        .filter(|call| {
            !ABSENT_FROM_OPEN_SOURCE_SERVER
                .iter()
                .any(|absent| call.starts_with(&format!("{absent} ")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_creates_and_enqueues_task() {
    init_tracing();
    require_venv();
    let dir = TestDir::new("sdk-enqueue").unwrap();
    let config = EmulatorConfig::default();
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), config.clone())
        .await
        .unwrap();
    let queue = emulator.create_queue("sdk-queue");
    let conf = write_clearml_conf(&dir, &emulator, &config);

    let started = Instant::now();
    let task_id = enqueue_with_sdk(&dir, &conf, "sdk-enqueued", "sdk-queue", "hello_task.py").await;
    eprintln!(
        "clearml SDK created and enqueued task {task_id} in {:?}",
        started.elapsed()
    );

    assert_eq!(emulator.queue_entries("sdk-queue"), vec![task_id.clone()]);
    let task = emulator
        .task(&task_id)
        .expect("the task the SDK created exists");
    assert_eq!(task.name, "sdk-enqueued");
    assert_eq!(task.status, "queued");
    assert_eq!(task.execution_queue.as_deref(), Some(queue.as_str()));
    assert!(
        task.project.is_some(),
        "the SDK created the project and set it on the task"
    );
    assert_eq!(
        task.document["script"]["entry_point"],
        python_dir().join("hello_task.py").display().to_string()
    );
    assert_eq!(unexpected_unknown_calls(&emulator), Vec::<String>::new());
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_tasks_and_unregisters() {
    init_tracing();
    require_venv();
    let dir = TestDir::new("agent-run").unwrap();
    let config = EmulatorConfig::default();
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), config.clone())
        .await
        .unwrap();
    let queue = emulator.create_queue("agent-queue");
    let conf = write_clearml_conf(&dir, &emulator, &config);
    let task_id = enqueue_with_sdk(&dir, &conf, "agent-run", "agent-queue", "hello_task.py").await;

    let worker_id = "fleet-conformance:local:agent-1";
    let python = venv_bin("python");
    let mut command = client_command(&venv_bin("clearml-agent"), &dir, &conf);
    command
        .env("CLEARML_WORKER_ID", worker_id)
        // Run the task with the venv's Python as it is, without building a virtualenv or installing packages.
        .env("CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL", "1")
        .env("CLEARML_AGENT_SKIP_PIP_VENV_INSTALL", &python)
        .arg("--config-file")
        .arg(&conf)
        .args(["daemon", "--queue", "agent-queue", "--foreground"]);
    let started = Instant::now();
    let mut agent =
        ChildProcess::spawn("clearml-agent", command, dir.path()).expect("clearml-agent starts");

    let registered = wait_until(
        AGENT_DEADLINE,
        "clearml-agent to register its worker",
        || emulator.workers().iter().any(|w| w.id == worker_id),
    )
    .await;
    if let Err(error) = registered {
        panic!("{error}\n{}", agent.log_tail(60));
    }
    let completed = wait_until(
        AGENT_DEADLINE,
        &format!("task {task_id} to complete and worker {worker_id} to idle"),
        || {
            let task_done = emulator
                .task(&task_id)
                .is_some_and(|t| t.status == "completed");
            let worker_idle = emulator
                .workers()
                .iter()
                .any(|w| w.id == worker_id && w.task.is_none());
            task_done && worker_idle || agent.exit_status().is_some()
        },
    )
    .await;
    if let Err(error) = completed {
        panic!(
            "{error}\n{:?}\n{}",
            emulator.task(&task_id),
            agent.log_tail(60)
        );
    }
    assert!(
        agent.exit_status().is_none(),
        "clearml-agent exited early\n{}",
        agent.log_tail(60)
    );
    eprintln!(
        "clearml-agent registered, ran and completed task {task_id} in {:?}",
        started.elapsed()
    );

    let task = emulator.task(&task_id).unwrap();
    assert_eq!(task.status, "completed");
    assert_eq!(task.last_worker.as_deref(), Some(worker_id));
    assert!(
        task.document["started"].is_string(),
        "tasks.started set the start time"
    );
    assert!(
        task.document["completed"].is_string(),
        "tasks.completed set the end time"
    );
    assert!(
        emulator.queue_entries("agent-queue").is_empty(),
        "the agent took the task off the queue"
    );

    let workers = emulator.workers();
    let worker = workers
        .iter()
        .find(|w| w.id == worker_id)
        .expect("the worker is still registered");
    assert_eq!(worker.queues, vec![queue.clone()]);
    assert_eq!(worker.task, None, "the worker reports idle after the task");

    let steps = &task.document["hyperparams"]["General"]["steps"];
    assert_eq!(
        steps["value"], "3",
        "Task.connect in the task stored its parameters: {steps}"
    );

    let log = emulator.task_log(&task_id).join("");
    assert!(
        log.contains(TASK_MARKER),
        "the task's console output reached the emulator:\n{log}"
    );

    // A task whose script exits non-zero ends as failed.
    let failing_id =
        enqueue_with_sdk(&dir, &conf, "agent-fail", "agent-queue", "failing_task.py").await;
    let failed = wait_until(
        AGENT_DEADLINE,
        &format!("task {failing_id} to fail and worker {worker_id} to idle"),
        || {
            let task_failed = emulator
                .task(&failing_id)
                .is_some_and(|t| t.status == "failed");
            let worker_idle = emulator
                .workers()
                .iter()
                .any(|w| w.id == worker_id && w.task.is_none());
            task_failed && worker_idle || agent.exit_status().is_some()
        },
    )
    .await;
    if let Err(error) = failed {
        panic!(
            "{error}\n{:?}\n{}",
            emulator.task(&failing_id),
            agent.log_tail(60)
        );
    }
    let failing = emulator.task(&failing_id).unwrap();
    assert_eq!(failing.status, "failed", "{}", agent.log_tail(60));
    assert_eq!(failing.last_worker.as_deref(), Some(worker_id));

    // On SIGTERM the agent unregisters its worker before it exits.
    agent.terminate();
    let stopped = wait_until(
        AGENT_DEADLINE,
        &format!("clearml-agent to exit and unregister worker {worker_id}"),
        || agent.exit_status().is_some() && emulator.workers().is_empty(),
    )
    .await;
    if let Err(error) = stopped {
        panic!("{error}\n{:?}\n{}", emulator.workers(), agent.log_tail(60));
    }
    assert_eq!(unexpected_unknown_calls(&emulator), Vec::<String>::new());
    emulator.shutdown().await;
}
