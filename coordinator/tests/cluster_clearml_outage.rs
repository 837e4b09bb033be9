//! The ClearML API server is down for two minutes: no launch and no termination is decided on the stale
//! queue data, and decisions resume on the first successful poll.

use std::time::Duration;

use clearml_api::Secret;
use fleet_coordinator::keys::AgentKeys;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use fleet_proto::v1::{AgentState, HeartbeatRequest, RegisterRequest, TerminationRequest};
use fleet_tests::cluster::{BOOTSTRAP_KEY, ClusterOptions, CoordinatorCluster};
use tonic::Request;
use tonic::transport::Channel;

const BINARY: &str = env!("CARGO_BIN_EXE_fleet-coordinator");
const OUTAGE: Duration = Duration::from_secs(120);

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_blocks_stale_decisions() {
    let options = ClusterOptions {
        orphan_grace_seconds: 5,
        ..ClusterOptions::default()
    };
    let mut cluster = CoordinatorCluster::start("clearml-outage", BINARY, options)
        .await
        .unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .unwrap();
    cluster.enqueue_tasks(3).await.unwrap();
    cluster
        .wait_for_instances(3, Duration::from_secs(30))
        .await
        .unwrap();
    let live: Vec<(String, String)> = cluster
        .live_instances()
        .await
        .unwrap()
        .into_iter()
        .map(|(id, tags)| (id, tags["fleet:intent-id"].clone()))
        .collect();

    // One instance gets an agent, which reports idle like a real one.
    let (agent_instance, intent) = live[0].clone();
    let channel = Channel::from_shared(format!(
        "http://127.0.0.1:{}",
        cluster.replicas[leader].grpc
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut agents = AgentServiceClient::new(channel);
    let token = AgentKeys::new(Secret::new(BOOTSTRAP_KEY)).bootstrap_token(&intent);
    let session = agents
        .register(RegisterRequest {
            instance_id: agent_instance.clone(),
            bootstrap_token: token.expose().to_owned(),
            agent_version: "test".to_owned(),
            hostname: "test".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .session_token;
    let heartbeat = HeartbeatRequest {
        instance_id: agent_instance.clone(),
        state: AgentState::Idle as i32,
        ..HeartbeatRequest::default()
    };

    cluster.emulator.set_outage(true);
    let outage_start = tokio::time::Instant::now();
    let launches = cluster.ec2.proxy.calls("RunInstances");
    let terminations = cluster.ec2.proxy.calls("TerminateInstances");

    // The cloud loses another instance (a spot reclaim, for example). With the last queue data (3 waiting),
    // a coordinator that decided on stale data would launch a replacement now.
    let (lost, _) = live[1].clone();
    cluster
        .ec2
        .direct
        .terminate_instances()
        .instance_ids(&lost)
        .send()
        .await
        .unwrap();

    let mut refusals = 0;
    while outage_start.elapsed() < OUTAGE {
        assert_eq!(
            cluster.ec2.proxy.calls("RunInstances"),
            launches,
            "a launch was decided on stale data\n{}",
            cluster.logs(30)
        );
        assert_eq!(
            cluster.ec2.proxy.calls("TerminateInstances"),
            terminations,
            "a termination was decided on stale data\n{}",
            cluster.logs(30)
        );
        agents
            .heartbeat(with_token(heartbeat.clone(), &session))
            .await
            .unwrap();
        let verdict = agents
            .request_termination(with_token(
                TerminationRequest {
                    instance_id: agent_instance.clone(),
                    idle_seconds: 600,
                },
                &session,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(!verdict.granted, "termination granted during the outage");
        // The first request may still see the last fresh poll.
        if outage_start.elapsed() > Duration::from_secs(5) {
            assert!(
                verdict.reason.contains("stale data")
                    || verdict.reason.contains("current queue data"),
                "{}",
                verdict.reason
            );
            refusals += 1;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(refusals > 10);

    // ClearML is back: the replacement for the lost instance is launched on fresh data.
    cluster.emulator.set_outage(false);
    let back = tokio::time::Instant::now();
    cluster
        .wait_for_instances(3, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(cluster.ec2.proxy.calls("RunInstances") > launches);
    println!(
        "decisions resumed {:?} after the outage ended",
        back.elapsed()
    );
}
