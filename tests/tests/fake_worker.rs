//! `fake-clearml-worker` against the emulator: it pulls, runs and finishes tasks the way clearml-agent
//! does, and rejects a configuration it cannot start with.

use std::process::Command;
use std::time::Duration;

use clearml_api::tasks::EnqueueTask;
use clearml_api::{Client, ClientConfig, Retry};
use fleet_tests::emulator::{Emulator, EmulatorConfig};
use fleet_tests::harness::{ChildProcess, TestDir, wait_until};
use serde_json::json;

const ACCESS_KEY: &str = "fake-worker-access";
const SECRET_KEY: &str = "fake-worker-secret";
const DEADLINE: Duration = Duration::from_secs(30);

async fn start_emulator() -> Emulator {
    let config = EmulatorConfig {
        access_key: ACCESS_KEY.to_owned(),
        secret_key: SECRET_KEY.to_owned(),
        ..EmulatorConfig::default()
    };
    Emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

fn worker_command(emulator: &Emulator, secret: &str, queue: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fake-clearml-worker"));
    command
        .args(["--api-server", &emulator.url()])
        .args(["--access-key", ACCESS_KEY])
        .args(["--worker-id", "fake:test:1"])
        .args(["--queue", queue])
        .args(["--poll-interval-ms", "50", "--report-interval-secs", "1"])
        .env("CLEARML_API_SECRET_KEY", secret)
        .env("RUST_LOG", "info");
    command
}

async fn enqueue_task(
    client: &Client,
    queue_id: &str,
    name: &str,
    params: serde_json::Value,
) -> String {
    #[derive(serde::Deserialize)]
    struct Created {
        id: String,
    }
    let created: Created = client
        .call(
            "tasks.create",
            &json!({"name": name, "type": "training", "hyperparams": {"fleet": params}}),
            Retry::Never,
        )
        .await
        .unwrap();
    client
        .tasks()
        .enqueue(&EnqueueTask {
            task: created.id.clone(),
            queue: Some(queue_id.to_owned()),
            ..EnqueueTask::default()
        })
        .await
        .unwrap();
    created.id
}

/// Runs a command to its end without blocking the runtime that serves the in-process emulator.
async fn run_to_exit(command: Command) -> std::process::Output {
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("the fake worker exits within the deadline")
        .unwrap()
}

fn param(name: &str, value: &str) -> serde_json::Value {
    json!({"section": "fleet", "name": name, "value": value})
}

#[tokio::test]
async fn fake_worker_runs_tasks_to_the_end() {
    let emulator = start_emulator().await;
    let dir = TestDir::new("fake_worker_runs_tasks").unwrap();
    let queue_id = emulator.create_queue("cpu");
    let client =
        Client::new(ClientConfig::new(&emulator.url(), ACCESS_KEY, SECRET_KEY).unwrap()).unwrap();
    let quick = enqueue_task(
        &client,
        &queue_id,
        "quick",
        json!({"run_seconds": param("run_seconds", "0.2")}),
    )
    .await;
    let slower = enqueue_task(
        &client,
        &queue_id,
        "slower",
        json!({"run_seconds": param("run_seconds", "0.5")}),
    )
    .await;
    let failing = enqueue_task(
        &client,
        &queue_id,
        "failing",
        json!({"run_seconds": param("run_seconds", "0"), "exit_code": param("exit_code", "3")}),
    )
    .await;

    let mut command = worker_command(&emulator, SECRET_KEY, "cpu");
    command.args(["--max-tasks", "3"]);
    let mut worker = ChildProcess::spawn("fake-worker", command, dir.path()).unwrap();

    let status_of = |id: &str| {
        emulator
            .task(id)
            .map(|task| task.status)
            .unwrap_or_default()
    };
    wait_until(DEADLINE, "the fake worker exits after three tasks", || {
        worker.exit_status().is_some()
    })
    .await
    .unwrap_or_else(|err| panic!("{err}\n{}", worker.log_tail(40)));

    assert!(
        worker.exit_status().unwrap().success(),
        "{}",
        worker.log_tail(40)
    );
    assert_eq!(status_of(&quick), "completed");
    assert_eq!(status_of(&slower), "completed");
    assert_eq!(status_of(&failing), "failed");
    let failed = emulator.task(&failing).unwrap();
    assert!(
        failed.status_message.contains("exited with code 3"),
        "{}",
        failed.status_message
    );
    assert_eq!(
        emulator.task(&quick).unwrap().last_worker.as_deref(),
        Some("fake:test:1")
    );
    assert!(emulator.queue_entries(&queue_id).is_empty());
    assert!(
        emulator.workers().is_empty(),
        "the worker unregistered on exit"
    );
    let log = worker.log_tail(100);
    assert!(!log.contains(SECRET_KEY), "the secret leaked into the log");

    emulator.shutdown().await;
}

#[tokio::test]
async fn fake_worker_registers_while_idle() {
    let emulator = start_emulator().await;
    let dir = TestDir::new("fake_worker_registers").unwrap();
    emulator.create_queue("idle");

    let mut worker = ChildProcess::spawn(
        "fake-worker",
        worker_command(&emulator, SECRET_KEY, "idle"),
        dir.path(),
    )
    .unwrap();

    wait_until(DEADLINE, "the fake worker registers", || {
        emulator
            .workers()
            .iter()
            .any(|worker| worker.id == "fake:test:1")
    })
    .await
    .unwrap_or_else(|err| panic!("{err}\n{}", worker.log_tail(40)));
    let registered = emulator.workers();
    assert_eq!(registered[0].task, None, "an idle worker holds no task");
    assert_eq!(registered[0].queues.len(), 1);
    worker.kill();
    emulator.shutdown().await;
}

#[tokio::test]
async fn fake_worker_rejects_wrong_secret() {
    let emulator = start_emulator().await;
    emulator.create_queue("cpu");

    let output = run_to_exit(worker_command(&emulator, "wrong-secret", "cpu")).await;

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("rejected the credentials"), "{stderr}");
    assert!(stderr.contains("auth.login"), "{stderr}");
    assert!(
        !stderr.contains("wrong-secret"),
        "the secret leaked: {stderr}"
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn fake_worker_rejects_unknown_queue() {
    let emulator = start_emulator().await;

    let output = run_to_exit(worker_command(&emulator, SECRET_KEY, "no-such-queue")).await;

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("queue \"no-such-queue\" was not found"),
        "{stderr}"
    );
    emulator.shutdown().await;
}
