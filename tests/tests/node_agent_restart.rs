//! A node agent restarted on the same machine resumes its saved registration: its one-time bootstrap token is
//! not presented again, and the coordinator keeps hearing from it.

use std::time::Duration;

use fleet_node_agent::controller::Exit;
use fleet_tests::harness::wait_until;
use fleet_tests::node::{AgentOptions, NodeTestBed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_resumes_its_registration() {
    let bed = NodeTestBed::start("agent-restart", AgentOptions::default()).await;
    let mut first = bed.spawn_agent();
    first.ready().await;
    assert_eq!(bed.coordinator.registrations().len(), 1);

    first.sigterm().await;
    let exit = first.wait(Duration::from_secs(30)).await.unwrap();
    assert_eq!(exit, Exit::Stopped);
    let saved = bed
        .state_dir()
        .join(format!("registration-{}.pb", bed.instance_id));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the saved registration holds secrets");
    std::fs::remove_file(bed.state_dir().join("ready.json")).unwrap();

    let heartbeats = bed.coordinator.heartbeats().len();
    let second = bed.spawn_agent();
    second.ready().await;
    wait_until(
        Duration::from_secs(10),
        "a heartbeat after the restart",
        || bed.coordinator.heartbeats().len() > heartbeats,
    )
    .await
    .unwrap();

    assert_eq!(
        bed.coordinator.registrations().len(),
        1,
        "the restarted agent registered again"
    );
    assert_eq!(bed.coordinator.unauthenticated_calls(), 0);
}
