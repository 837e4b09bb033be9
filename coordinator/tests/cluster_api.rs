//! The gRPC API of a running cluster: bad requests get the right status with a message that names the field,
//! tokens and roles are enforced, followers refuse writes with the leader's address, and bootstrap tokens
//! register each instance once.

use std::time::Duration;

use clearml_api::Secret;
use fleet_coordinator::keys::AgentKeys;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use fleet_proto::v1::{
    AgentState, DrainInstanceRequest, HeartbeatRequest, InstanceState, ListInstancesRequest,
    ListQueuesRequest, PauseQueueRequest, QueueLimits, RegisterRequest, ResumeQueueRequest,
    SetQueueLimitsRequest, TerminationRequest,
};
use fleet_tests::cluster::{
    BOOTSTRAP_KEY, ClusterOptions, CoordinatorCluster, OPERATOR_TOKEN, QUEUE, VIEWER_TOKEN,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const BINARY: &str = env!("CARGO_BIN_EXE_fleet-coordinator");

/// Git token handed to agents; it must never appear in a replica's log.
const GIT_TOKEN: &str = "git-token-5b7e0c2a";

const AGENT_TOML: &str = r#"[agent]
docker_image = "nvidia/cuda:12.4.1-runtime-ubuntu22.04"
init_script = """
echo prepared > /tmp/prepared
"""
extra_clearml_conf = """
sdk.development.default_output_uri: "s3://models/out"
"""
git_user = "ci-bot"
git_password_env = "FLEET_TEST_GIT_TOKEN"
task_env = { AWS_DEFAULT_REGION = "FLEET_TEST_TASK_REGION" }
"#;

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, needle: &str) -> Status {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} lacks {needle:?}",
        status.message()
    );
    status
}

async fn agent_client(cluster: &CoordinatorCluster, index: usize) -> AgentServiceClient<Channel> {
    let channel =
        Channel::from_shared(format!("http://127.0.0.1:{}", cluster.replicas[index].grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
    AgentServiceClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_rejects_bad_requests() {
    let options = ClusterOptions {
        extra_toml: AGENT_TOML.to_owned(),
        env: [
            ("FLEET_TEST_GIT_TOKEN", GIT_TOKEN),
            ("FLEET_TEST_TASK_REGION", "eu-west-1"),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect(),
        ..ClusterOptions::default()
    };
    let mut cluster = CoordinatorCluster::start("api-errors", BINARY, options)
        .await
        .unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .unwrap();
    let follower = (0..3).find(|index| *index != leader).unwrap();
    let mut client = cluster.fleet_client(leader).await.unwrap();

    // Invalid arguments name the field.
    let bad_state = ListInstancesRequest {
        queue: String::new(),
        states: vec![InstanceState::Idle as i32, 0],
    };
    assert_status(
        client
            .list_instances(with_token(bad_state, VIEWER_TOKEN))
            .await,
        Code::InvalidArgument,
        "states[1]",
    );
    assert_status(
        client
            .pause_queue(with_token(
                PauseQueueRequest {
                    queue: String::new(),
                },
                OPERATOR_TOKEN,
            ))
            .await,
        Code::InvalidArgument,
        "queue is required",
    );
    assert_status(
        client
            .pause_queue(with_token(
                PauseQueueRequest {
                    queue: "no-such-queue".to_owned(),
                },
                OPERATOR_TOKEN,
            ))
            .await,
        Code::InvalidArgument,
        "\"no-such-queue\" is not a configured queue",
    );
    let limits = SetQueueLimitsRequest {
        queue: QUEUE.to_owned(),
        limits: Some(QueueLimits {
            max_instances: Some(3),
            min_idle: Some(5),
            ..QueueLimits::default()
        }),
        reset: false,
    };
    assert_status(
        client
            .set_queue_limits(with_token(limits, OPERATOR_TOKEN))
            .await,
        Code::InvalidArgument,
        "limits.min_idle = 5",
    );
    assert_status(
        client
            .drain_instance(with_token(
                DrainInstanceRequest {
                    instance_id: " ".to_owned(),
                },
                OPERATOR_TOKEN,
            ))
            .await,
        Code::InvalidArgument,
        "instance_id is required",
    );
    assert_status(
        client
            .drain_instance(with_token(
                DrainInstanceRequest {
                    instance_id: "i-0000000000".to_owned(),
                },
                OPERATOR_TOKEN,
            ))
            .await,
        Code::NotFound,
        "i-0000000000",
    );

    // Tokens and roles.
    assert_status(
        client.list_queues(Request::new(ListQueuesRequest {})).await,
        Code::Unauthenticated,
        "missing bearer token",
    );
    assert_status(
        client
            .list_queues(with_token(ListQueuesRequest {}, "not-a-token"))
            .await,
        Code::Unauthenticated,
        "invalid token",
    );
    assert_status(
        client
            .pause_queue(with_token(
                PauseQueueRequest {
                    queue: QUEUE.to_owned(),
                },
                VIEWER_TOKEN,
            ))
            .await,
        Code::PermissionDenied,
        "needs an operator token",
    );

    // A follower serves reads and refuses writes with the leader's address.
    let mut follower_client = cluster.fleet_client(follower).await.unwrap();
    let queues = follower_client
        .list_queues(with_token(ListQueuesRequest {}, VIEWER_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(queues.queues.len(), 1);
    let refused = assert_status(
        follower_client
            .pause_queue(with_token(
                PauseQueueRequest {
                    queue: QUEUE.to_owned(),
                },
                OPERATOR_TOKEN,
            ))
            .await,
        Code::FailedPrecondition,
        "is not the leader",
    );
    let leader_address = format!("127.0.0.1:{}", cluster.replicas[leader].grpc);
    assert_eq!(
        refused
            .metadata()
            .get("fleet-leader")
            .and_then(|value| value.to_str().ok()),
        Some(leader_address.as_str())
    );

    // The leader applies a pause and a resume.
    let paused = client
        .pause_queue(with_token(
            PauseQueueRequest {
                queue: QUEUE.to_owned(),
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(paused.paused);
    let resumed = client
        .resume_queue(with_token(
            ResumeQueueRequest {
                queue: QUEUE.to_owned(),
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!resumed.paused);

    // Bootstrap tokens: an instance registers once, with its launch's token only.
    cluster.enqueue_tasks(1).await.unwrap();
    cluster
        .wait_for_instances(1, Duration::from_secs(30))
        .await
        .unwrap();
    let (instance_id, tags) = cluster
        .live_instances()
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    let intent = tags.get("fleet:intent-id").unwrap();
    let token = AgentKeys::new(Secret::new(BOOTSTRAP_KEY)).bootstrap_token(intent);

    // The follower reports the waiting task too, from the counts the leader stores.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let queue = follower_client
            .list_queues(with_token(ListQueuesRequest {}, VIEWER_TOKEN))
            .await
            .unwrap()
            .into_inner()
            .queues
            .remove(0);
        if queue.tasks_waiting == 1 && queue.tasks_waiting_observed_ms > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the follower reports {} waiting task(s), observed at {} ms\n{}",
            queue.tasks_waiting,
            queue.tasks_waiting_observed_ms,
            cluster.logs(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut agents = agent_client(&cluster, leader).await;
    let register = |bootstrap_token: &str| RegisterRequest {
        instance_id: instance_id.clone(),
        bootstrap_token: bootstrap_token.to_owned(),
        agent_version: "test".to_owned(),
        hostname: "test-host".to_owned(),
    };
    assert_status(
        agents.register(register("guessed-token")).await,
        Code::PermissionDenied,
        "does not match",
    );
    assert_status(
        agents
            .register(RegisterRequest {
                instance_id: String::new(),
                ..register(token.expose())
            })
            .await,
        Code::InvalidArgument,
        "instance_id is required",
    );
    let registered = agents
        .register(register(token.expose()))
        .await
        .unwrap()
        .into_inner();
    let config = registered.config.unwrap();
    assert_eq!(config.queues, vec![QUEUE.to_owned()]);
    assert_eq!(config.worker_id, format!("fleet:cpu:{instance_id}"));
    // The [agent] table reaches the agent.
    assert_eq!(
        config.docker_image,
        "nvidia/cuda:12.4.1-runtime-ubuntu22.04"
    );
    assert_eq!(config.init_script, "echo prepared > /tmp/prepared\n");
    assert_eq!(
        config.extra_clearml_conf,
        "sdk.development.default_output_uri: \"s3://models/out\"\n"
    );
    let git = config.git.unwrap();
    assert_eq!(git.user, "ci-bot");
    assert_eq!(git.password, GIT_TOKEN);
    assert_eq!(
        config
            .storage_env
            .get("AWS_DEFAULT_REGION")
            .map(String::as_str),
        Some("eu-west-1")
    );
    assert_status(
        agents.register(register(token.expose())).await,
        Code::PermissionDenied,
        "already registered",
    );

    // Session tokens guard the later calls.
    let heartbeat = HeartbeatRequest {
        instance_id: instance_id.clone(),
        state: AgentState::Idle as i32,
        ..HeartbeatRequest::default()
    };
    assert_status(
        agents.heartbeat(heartbeat.clone()).await,
        Code::Unauthenticated,
        "missing session token",
    );
    assert_status(
        agents
            .heartbeat(with_token(heartbeat.clone(), token.expose()))
            .await,
        Code::Unauthenticated,
        "invalid session token",
    );
    agents
        .heartbeat(with_token(heartbeat, &registered.session_token))
        .await
        .unwrap();
    // The task the instance was launched for still waits, so the instance must stay.
    let verdict = agents
        .request_termination(with_token(
            TerminationRequest {
                instance_id: instance_id.clone(),
                idle_seconds: 600,
            },
            &registered.session_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!verdict.granted);
    assert!(
        verdict.reason.contains("wait in the instance's queue"),
        "{}",
        verdict.reason
    );

    // The Git token goes to registered agents only: neither the user data nor a log line contains it.
    let user_data = cluster.user_data(&instance_id).await.unwrap();
    assert!(!user_data.contains(GIT_TOKEN));
    assert!(!cluster.logs(usize::MAX).contains(GIT_TOKEN));
}
