//! The supervisor with the real clearml-agent: a killed clearml-agent is restarted, a crash loop is reported as
//! unhealthy, and the NodeAgent gRPC service and `/metrics` show it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_proto::v1::node_agent_client::NodeAgentClient;
use fleet_proto::v1::{AgentState, NodeStatusRequest, TailLogsRequest};
use fleet_tests::harness::{venv_bin, wait_until, wait_until_async};
use fleet_tests::node::{AgentOptions, NodeTestBed, WorkerProgram};

/// Writes a wrapper that appends its pid to `pids` and then becomes clearml-agent.
fn pid_recording_wrapper(dir: &Path, pids: &Path) -> PathBuf {
    let path = dir.join("recording-clearml-agent.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho $$ >> '{pids}'\nexec '{agent}' \"$@\"\n",
            pids = pids.display(),
            agent = venv_bin("clearml-agent").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn recorded_pids(pids: &Path) -> Vec<i32> {
    std::fs::read_to_string(pids)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

fn kill(pid: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let result = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(result, 0, "kill -9 {pid}");
}

/// Environment the real clearml-agent needs here; the wrapper passes it on.
fn options_with(program: PathBuf, crash_loop_restarts: u32) -> AgentOptions {
    AgentOptions {
        max_idle_seconds: 600,
        crash_loop_restarts,
        worker: WorkerProgram::Custom(program),
        ..AgentOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_clearml_agent_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let wrapper = pid_recording_wrapper(dir.path(), &pids);
    let bed = NodeTestBed::start("killed_restarted", options_with(wrapper, 5)).await;

    let agent = bed.spawn_agent();
    let ready = agent.ready().await;
    let mut grpc = NodeAgentClient::connect(format!("http://{}", ready.grpc))
        .await
        .unwrap();
    wait_until_async(
        Duration::from_secs(60),
        "clearml-agent to poll through the gate",
        || {
            let mut grpc = grpc.clone();
            async move {
                let status = grpc
                    .status(NodeStatusRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                status.state == AgentState::Idle as i32
            }
        },
    )
    .await
    .unwrap();

    let first = recorded_pids(&pids)[0];
    kill(first);
    wait_until(
        Duration::from_secs(30),
        "clearml-agent to be started again",
        || recorded_pids(&pids).len() >= 2,
    )
    .await
    .unwrap();

    let status = grpc
        .status(NodeStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.clearml_agent_restarts, 1);
    assert_eq!(status.instance_id, bed.instance_id);
    assert_eq!(status.worker_id, bed.worker_id);
    assert!(
        bed.coordinator.health_reports().iter().all(|r| r.healthy),
        "one restart is no crash loop: {:?}",
        bed.coordinator.health_reports()
    );

    let mut lines = grpc
        .tail_logs(TailLogsRequest {
            lines: 500,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(line) = lines.message().await.unwrap() {
        text.push_str(&line.line);
        text.push('\n');
    }
    assert!(
        text.contains(&bed.worker_id),
        "TailLogs returns clearml-agent's output: {text}"
    );
    assert!(
        !text.contains(fleet_tests::node::SECRET_KEY),
        "the ClearML secret key never appears in the log"
    );

    let metrics = reqwest::get(format!("http://{}/metrics", ready.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|line| line == "fleet_node_agent_clearml_agent_restarts_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kills_report_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let wrapper = pid_recording_wrapper(dir.path(), &pids);
    let bed = NodeTestBed::start("crash_loop", options_with(wrapper, 3)).await;

    let agent = bed.spawn_agent();
    let ready = agent.ready().await;
    for round in 1..=3 {
        wait_until(
            Duration::from_secs(30),
            "clearml-agent to be started",
            || recorded_pids(&pids).len() >= round,
        )
        .await
        .unwrap();
        kill(recorded_pids(&pids)[round - 1]);
    }

    wait_until(Duration::from_secs(30), "an unhealthy report", || {
        bed.coordinator.health_reports().iter().any(|r| !r.healthy)
    })
    .await
    .unwrap();
    let report = bed
        .coordinator
        .health_reports()
        .into_iter()
        .find(|r| !r.healthy)
        .unwrap();
    assert_eq!(report.instance_id, bed.instance_id);
    assert!(report.reason.contains("crash loop"), "{}", report.reason);

    let mut grpc = NodeAgentClient::connect(format!("http://{}", ready.grpc))
        .await
        .unwrap();
    let status = grpc
        .status(NodeStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, AgentState::Unhealthy as i32);
    wait_until(
        Duration::from_secs(30),
        "a heartbeat that says unhealthy",
        || {
            bed.coordinator
                .heartbeats()
                .iter()
                .any(|h| h.state == AgentState::Unhealthy as i32)
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_unhealthy_instance_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let crashing = dir.path().join("crashing-clearml-agent.sh");
    std::fs::write(
        &crashing,
        "#!/bin/sh\necho 'clearml-agent failed to start' >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&crashing, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bed = NodeTestBed::start("replaced_unhealthy", options_with(crashing, 3)).await;
    bed.coordinator.replace_unhealthy();

    let mut agent = bed.spawn_agent();
    agent.ready().await;
    let exit = agent.wait(Duration::from_secs(60)).await;

    assert_eq!(
        exit.expect("agent runs"),
        fleet_node_agent::controller::Exit::PoweredOff
    );
    assert_eq!(bed.shutdown_count(), 1);
    assert!(
        bed.coordinator.health_reports().iter().any(|r| !r.healthy),
        "the crash loop was reported"
    );
}
