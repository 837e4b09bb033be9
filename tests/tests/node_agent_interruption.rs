//! Spot interruption and SIGTERM with the real clearml-agent: a running task goes back to the head of its queue
//! with a status message that gives the reason, and nothing is left in_progress.

use std::time::Duration;

use fleet_node_agent::controller::Exit;
use fleet_proto::v1::InterruptionKind;
use fleet_tests::harness::wait_until;
use fleet_tests::node::{AgentOptions, NodeTestBed, TaskOutcome};

/// Writes a task script that runs until `release` exists (at most two minutes).
fn waiting_script(bed: &NodeTestBed) -> std::path::PathBuf {
    let release = bed.dir.join("release-task");
    let path = bed.dir.join("waiting.py");
    std::fs::write(
        &path,
        format!(
            "import os, time\nfor _ in range(1200):\n    if os.path.exists({release:?}):\n        break\n    time.sleep(0.1)\nprint('waiting task done')\n",
            release = release.display().to_string()
        ),
    )
    .unwrap();
    path
}

async fn wait_for_in_progress(bed: &NodeTestBed, task_id: &str) {
    wait_until(
        Duration::from_secs(60),
        "clearml-agent to start the task",
        || {
            bed.emulator
                .task(task_id)
                .is_some_and(|task| task.status == "in_progress")
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_notice_requeues_running_task_at_head() {
    let options = AgentOptions {
        max_idle_seconds: 600,
        ..AgentOptions::default()
    };
    let bed = NodeTestBed::start("spot_notice", options).await;
    let script = waiting_script(&bed);
    let running = bed.enqueue_script_task("running", &script).await;

    let mut agent = bed.spawn_agent();
    agent.ready().await;
    wait_for_in_progress(&bed, &running).await;
    let waiting = bed.enqueue_script_task("waiting", &script).await;

    bed.imds
        .set_spot_action("terminate", "2026-12-04T21:00:05Z");
    let exit = agent.wait(Duration::from_secs(60)).await;

    assert_eq!(exit.expect("agent runs"), Exit::PoweredOff);
    assert_eq!(bed.shutdown_count(), 1);
    assert_eq!(bed.task_outcome(&running), TaskOutcome::Queued);
    assert_eq!(
        bed.emulator.queue_entries(fleet_tests::node::QUEUE),
        vec![running.clone(), waiting.clone()],
        "the interrupted task is at the head of its queue"
    );
    let task = bed.emulator.task(&running).unwrap();
    assert!(
        task.status_message
            .contains("interrupted by a spot reclaim"),
        "status message: {:?}",
        task.status_message
    );
    assert_eq!(task.status_reason, "spot interruption");

    let interruptions = bed.coordinator.interruptions();
    assert_eq!(interruptions.len(), 1, "{interruptions:?}");
    assert_eq!(interruptions[0].instance_id, bed.instance_id);
    assert_eq!(
        interruptions[0].kind,
        InterruptionKind::SpotTermination as i32
    );
    assert_eq!(interruptions[0].action_time_unix_ms, 1_796_418_005_000);
    assert_eq!(interruptions[0].requeued_task_id, running);
    assert!(
        bed.emulator.workers().iter().all(|w| w.id != bed.worker_id),
        "the worker is unregistered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_notice_while_idle_shuts_down() {
    let options = AgentOptions {
        max_idle_seconds: 600,
        ..AgentOptions::default()
    };
    let bed = NodeTestBed::start("rebalance_idle", options).await;

    let mut agent = bed.spawn_agent();
    agent.ready().await;
    bed.imds.set_rebalance("2026-12-04T21:00:00Z");
    let exit = agent.wait(Duration::from_secs(60)).await;

    assert_eq!(exit.expect("agent runs"), Exit::PoweredOff);
    assert_eq!(bed.shutdown_count(), 1);
    let interruptions = bed.coordinator.interruptions();
    assert_eq!(interruptions.len(), 1);
    assert_eq!(interruptions[0].kind, InterruptionKind::Rebalance as i32);
    assert_eq!(interruptions[0].requeued_task_id, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_requeues_task_after_grace() {
    let options = AgentOptions {
        max_idle_seconds: 600,
        drain_grace_seconds: 2,
        ..AgentOptions::default()
    };
    let bed = NodeTestBed::start("sigterm_grace", options).await;
    let script = waiting_script(&bed);
    let running = bed.enqueue_script_task("running", &script).await;

    let mut agent = bed.spawn_agent();
    agent.ready().await;
    wait_for_in_progress(&bed, &running).await;
    agent.sigterm().await;
    let exit = agent.wait(Duration::from_secs(60)).await;

    assert_eq!(exit.expect("agent runs"), Exit::Stopped);
    assert_eq!(
        bed.shutdown_count(),
        0,
        "SIGTERM does not power the machine off"
    );
    assert_eq!(bed.task_outcome(&running), TaskOutcome::Queued);
    let task = bed.emulator.task(&running).unwrap();
    assert!(
        task.status_message.contains("after the drain grace period"),
        "status message: {:?}",
        task.status_message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_short_task_finish() {
    let options = AgentOptions {
        max_idle_seconds: 600,
        drain_grace_seconds: 60,
        ..AgentOptions::default()
    };
    let bed = NodeTestBed::start("sigterm_finish", options).await;
    let script = waiting_script(&bed);
    let running = bed.enqueue_script_task("running", &script).await;

    let mut agent = bed.spawn_agent();
    agent.ready().await;
    wait_for_in_progress(&bed, &running).await;
    agent.sigterm().await;
    let not_taken = bed.enqueue_script_task("not-taken", &script).await;
    std::fs::write(bed.dir.join("release-task"), "go").unwrap();
    let exit = agent.wait(Duration::from_secs(60)).await;

    assert_eq!(exit.expect("agent runs"), Exit::Stopped);
    assert_eq!(bed.task_outcome(&running), TaskOutcome::Completed);
    assert_eq!(
        bed.task_outcome(&not_taken),
        TaskOutcome::Queued,
        "the draining agent took no new task"
    );
}
