//! The node agent's termination protocol with the real clearml-agent, the ClearML API emulator, a fake IMDS and
//! a test coordinator: grant, refusal, and a coordinator that goes away.

use std::time::Duration;

use fleet_node_agent::controller::Exit;
use fleet_tests::harness::{wait_until, wait_until_async};
use fleet_tests::node::{AgentOptions, NodeTestBed, TaskOutcome, TerminationPolicy};

/// Writes a task script that prints a line and exits, or waits for `release` first when given.
fn task_script(
    bed: &NodeTestBed,
    name: &str,
    release: Option<&std::path::Path>,
) -> std::path::PathBuf {
    let path = bed.dir.join(format!("{name}.py"));
    let wait = match release {
        Some(file) => format!(
            "import os, time\nfor _ in range(1200):\n    if os.path.exists({file:?}):\n        break\n    time.sleep(0.1)\n",
            file = file.display().to_string()
        ),
        None => String::new(),
    };
    std::fs::write(&path, format!("{wait}print('node-agent-test-task-ran')\n")).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_grant_runs_shutdown_once() {
    let bed = NodeTestBed::start("idle_grant", AgentOptions::default()).await;
    let script = task_script(&bed, "quick", None);
    let task_id = bed.enqueue_script_task("quick-task", &script).await;

    let mut agent = bed.spawn_agent();
    let ready = agent.ready().await;
    let exit = agent.wait(Duration::from_secs(120)).await;

    assert_eq!(exit.expect("agent runs"), Exit::PoweredOff);
    assert_eq!(ready.worker_id, bed.worker_id);
    assert_eq!(
        bed.shutdown_count(),
        1,
        "the shutdown action runs exactly once"
    );
    assert_eq!(bed.task_outcome(&task_id), TaskOutcome::Completed);
    let terminations = bed.coordinator.terminations();
    assert_eq!(terminations.len(), 1, "{terminations:?}");
    assert!(terminations[0].granted);
    assert!(
        terminations[0].idle_seconds >= 2,
        "asked after max_idle: {terminations:?}"
    );
    assert!(
        bed.emulator.workers().iter().all(|w| w.id != bed.worker_id),
        "the worker is unregistered: {:?}",
        bed.emulator.workers()
    );
    let registrations = bed.coordinator.registrations();
    assert_eq!(registrations.len(), 1);
    assert_eq!(registrations[0].instance_id, bed.instance_id);
    assert_eq!(bed.imds.rejected_reads(), 0, "no IMDSv1 read was tried");
    assert_eq!(bed.coordinator.unauthenticated_calls(), 0);
    assert!(
        !bed.coordinator.heartbeats().is_empty(),
        "heartbeats were sent"
    );
    let conf = std::fs::read_to_string(bed.state_dir().join("clearml.conf")).unwrap();
    assert!(
        conf.contains(&format!("api_server: \"http://{}\"", ready.gate)),
        "clearml-agent's api_server is the gate: {conf}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_keeps_the_machine() {
    let bed = NodeTestBed::start("refusal", AgentOptions::default()).await;
    bed.coordinator.set_policy(TerminationPolicy::Refuse {
        reason: "queue node-test-queue needs a warm instance".to_owned(),
        retry_after_seconds: 1,
    });

    let mut agent = bed.spawn_agent();
    agent.ready().await;
    wait_until(
        Duration::from_secs(30),
        "three refused termination requests",
        || bed.coordinator.terminations().len() >= 3,
    )
    .await
    .unwrap();

    assert!(!agent.is_finished(), "a refused agent keeps running");
    assert_eq!(bed.shutdown_count(), 0);
    assert!(bed.coordinator.terminations().iter().all(|t| !t.granted));

    // The gate opened again after each refusal: a task enqueued now runs here.
    let script = task_script(&bed, "after-refusal", None);
    let task_id = bed.enqueue_script_task("after-refusal", &script).await;
    wait_until(
        Duration::from_secs(60),
        "the task to complete on the refused machine",
        || bed.task_outcome(&task_id) == TaskOutcome::Completed,
    )
    .await
    .unwrap();

    bed.coordinator.set_policy(TerminationPolicy::Grant);
    let exit = agent.wait(Duration::from_secs(60)).await;
    assert_eq!(exit.expect("agent runs"), Exit::PoweredOff);
    assert_eq!(bed.shutdown_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_idle_machine_terminates() {
    let options = AgentOptions {
        max_idle_seconds: 600,
        orphan_timeout_seconds: 3,
        ..AgentOptions::default()
    };
    let mut bed = NodeTestBed::start("orphan_idle", options).await;

    let mut agent = bed.spawn_agent();
    agent.ready().await;
    bed.coordinator.stop().await;
    let stopped_at = tokio::time::Instant::now();

    let exit = agent.wait(Duration::from_secs(60)).await;

    assert_eq!(exit.expect("agent runs"), Exit::PoweredOff);
    assert!(
        stopped_at.elapsed() >= Duration::from_secs(2),
        "terminated only after the orphan timeout"
    );
    assert_eq!(bed.shutdown_count(), 1);
    assert!(
        bed.coordinator.terminations().is_empty(),
        "no grant was asked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_busy_machine_waits_for_task() {
    let options = AgentOptions {
        max_idle_seconds: 600,
        orphan_timeout_seconds: 3,
        ..AgentOptions::default()
    };
    let mut bed = NodeTestBed::start("orphan_busy", options).await;
    let release = bed.dir.join("release-task");
    let script = task_script(&bed, "long", Some(&release));
    let task_id = bed.enqueue_script_task("long-task", &script).await;

    let mut agent = bed.spawn_agent();
    agent.ready().await;
    wait_until(
        Duration::from_secs(60),
        "clearml-agent to start the task",
        || {
            bed.emulator
                .task(&task_id)
                .is_some_and(|t| t.status == "in_progress")
        },
    )
    .await
    .unwrap();
    bed.coordinator.stop().await;

    // Well past the orphan timeout, the machine still runs its task.
    let second_task = bed.enqueue_script_task("not-taken", &script).await;
    wait_until_async(
        Duration::from_secs(30),
        "the gate to close after the orphan timeout",
        || async {
            let metrics = reqwest::get(format!("http://{}/metrics", agent.ready().await.metrics))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            metrics
                .lines()
                .any(|line| line == "fleet_node_agent_draining 1")
        },
    )
    .await
    .unwrap();
    assert!(!agent.is_finished(), "a busy orphan waits for its task");
    assert_eq!(bed.shutdown_count(), 0);

    std::fs::write(&release, "go").unwrap();
    let exit = agent.wait(Duration::from_secs(60)).await;

    assert_eq!(exit.expect("agent runs"), Exit::PoweredOff);
    assert_eq!(bed.task_outcome(&task_id), TaskOutcome::Completed);
    assert_eq!(
        bed.task_outcome(&second_task),
        TaskOutcome::Queued,
        "the draining orphan took no new task"
    );
    assert_eq!(bed.shutdown_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_drain_then_shutdown() {
    use fleet_proto::v1::node_agent_client::NodeAgentClient;
    use fleet_proto::v1::{AgentState, DrainRequest, NodeStatusRequest, ShutdownRequest};

    let options = AgentOptions {
        max_idle_seconds: 600,
        ..AgentOptions::default()
    };
    let bed = NodeTestBed::start("operator_drain", options).await;
    let release = bed.dir.join("release-task");
    let script = task_script(&bed, "long", Some(&release));
    let running = bed.enqueue_script_task("running", &script).await;

    let mut agent = bed.spawn_agent();
    let ready = agent.ready().await;
    wait_until(
        Duration::from_secs(60),
        "clearml-agent to start the task",
        || {
            bed.emulator
                .task(&running)
                .is_some_and(|t| t.status == "in_progress")
        },
    )
    .await
    .unwrap();
    let mut grpc = NodeAgentClient::connect(format!("http://{}", ready.grpc))
        .await
        .unwrap();

    let drained = grpc
        .drain(DrainRequest {
            reason: "operator test".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drained.running_task_id, running);
    let status = grpc
        .status(NodeStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, AgentState::Draining as i32);
    assert_eq!(status.task_id, running);

    let waiting = bed.enqueue_script_task("waiting", &script).await;
    grpc.shutdown(ShutdownRequest {
        reason: "operator test".to_owned(),
        requeue_running_task: true,
    })
    .await
    .unwrap();
    let exit = agent.wait(Duration::from_secs(60)).await;

    assert_eq!(exit.expect("agent runs"), Exit::PoweredOff);
    assert_eq!(bed.shutdown_count(), 1);
    assert_eq!(
        bed.emulator.queue_entries(fleet_tests::node::QUEUE),
        vec![running.clone(), waiting.clone()],
        "the requeued task is at the head, the waiting one was never taken"
    );
    assert_eq!(bed.task_outcome(&running), TaskOutcome::Queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_drain_stops_taking_tasks() {
    let options = AgentOptions {
        max_idle_seconds: 3,
        ..AgentOptions::default()
    };
    let bed = NodeTestBed::start("heartbeat_drain", options).await;
    bed.coordinator.request_drain();

    let mut agent = bed.spawn_agent();
    agent.ready().await;
    wait_until(
        Duration::from_secs(30),
        "a heartbeat that reports draining",
        || {
            bed.coordinator
                .heartbeats()
                .iter()
                .any(|h| h.state == fleet_proto::v1::AgentState::Draining as i32)
        },
    )
    .await
    .unwrap();
    let script = task_script(&bed, "quick", None);
    let task_id = bed.enqueue_script_task("not-taken", &script).await;
    let exit = agent.wait(Duration::from_secs(60)).await;

    assert_eq!(exit.expect("agent runs"), Exit::PoweredOff);
    assert_eq!(bed.task_outcome(&task_id), TaskOutcome::Queued);
    assert_eq!(bed.shutdown_count(), 1);
}
