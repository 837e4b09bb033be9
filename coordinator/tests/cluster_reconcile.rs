//! The reconciler in both directions. An instance with the cluster's tags and no record is terminated after
//! the grace period, unless its agent registers first. A recorded instance that vanished from the cloud is
//! closed and replaced. A ClearML worker that claims a fleet instance with no record is reported.

use std::time::Duration;

use aws_sdk_ec2::types::{InstanceType, ResourceType, Tag, TagSpecification};
use clearml_api::Secret;
use clearml_api::workers::RegisterWorker;
use fleet_coordinator::keys::AgentKeys;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use fleet_proto::v1::{ListInstancesRequest, RegisterRequest};
use fleet_tests::cluster::{
    BOOTSTRAP_KEY, ClusterOptions, CoordinatorCluster, QUEUE, RESOURCE, VIEWER_TOKEN,
};
use fleet_tests::ec2::{CLUSTER, IMAGE_ID};
use fleet_tests::harness::wait_until_async;
use tonic::Request;
use tonic::transport::Channel;

const BINARY: &str = env!("CARGO_BIN_EXE_fleet-coordinator");

fn viewer<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {VIEWER_TOKEN}").parse().unwrap(),
    );
    request
}

/// Launches an instance directly in moto with the cluster's tags, as a launch whose record was lost.
async fn launch_untracked(cluster: &CoordinatorCluster, intent: &str) -> String {
    let tag = |key: &str, value: &str| Tag::builder().key(key).value(value).build();
    let response = cluster
        .ec2
        .direct
        .run_instances()
        .image_id(IMAGE_ID)
        .instance_type(InstanceType::M5Large)
        .subnet_id(&cluster.ec2.subnets[0].id)
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(tag("fleet:cluster", CLUSTER))
                .tags(tag("fleet:queue", QUEUE))
                .tags(tag("fleet:resource", RESOURCE))
                .tags(tag("fleet:intent-id", intent))
                .build(),
        )
        .send()
        .await
        .unwrap();
    response.instances()[0].instance_id().unwrap().to_owned()
}

async fn recorded(cluster: &CoordinatorCluster, leader: usize) -> Vec<String> {
    let mut client = cluster.fleet_client(leader).await.unwrap();
    client
        .list_instances(viewer(ListInstancesRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .instances
        .into_iter()
        .map(|instance| instance.instance_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciler_handles_orphans_and_gone_instances() {
    let options = ClusterOptions {
        orphan_grace_seconds: 5,
        reconcile_interval_seconds: 1,
        ..ClusterOptions::default()
    };
    let mut cluster = CoordinatorCluster::start("reconcile", BINARY, options)
        .await
        .unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .unwrap();

    // Two instances the registry does not know: the agent of one registers within the grace period.
    let orphan = launch_untracked(&cluster, "lost-intent-1").await;
    let adopted = launch_untracked(&cluster, "lost-intent-2").await;
    let channel = Channel::from_shared(format!(
        "http://127.0.0.1:{}",
        cluster.replicas[leader].grpc
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut agents = AgentServiceClient::new(channel);
    let token = AgentKeys::new(Secret::new(BOOTSTRAP_KEY)).bootstrap_token("lost-intent-2");
    let registration = wait_until_async(
        Duration::from_secs(10),
        "the adopted agent registers",
        || {
            let mut agents = agents.clone();
            let request = RegisterRequest {
                instance_id: adopted.clone(),
                bootstrap_token: token.expose().to_owned(),
                agent_version: "test".to_owned(),
                hostname: "test".to_owned(),
            };
            // The leader lists the instance after its first reconcile pass, and until then it returns UNAVAILABLE.
            async move { agents.register(request).await.is_ok() }
        },
    )
    .await;
    assert!(registration.is_ok(), "{}", cluster.logs(30));
    // A second registration of the same instance is rejected, like any reused bootstrap token.
    let reused = agents
        .register(RegisterRequest {
            instance_id: adopted.clone(),
            bootstrap_token: token.expose().to_owned(),
            agent_version: "test".to_owned(),
            hostname: "test".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), tonic::Code::PermissionDenied);

    let orphan_gone = wait_until_async(
        Duration::from_secs(20),
        "the orphan is terminated",
        || async {
            !cluster
                .live_instances()
                .await
                .unwrap()
                .contains_key(&orphan)
        },
    )
    .await;
    assert!(orphan_gone.is_ok(), "{}", cluster.logs(30));
    assert!(
        cluster
            .live_instances()
            .await
            .unwrap()
            .contains_key(&adopted)
    );
    assert!(recorded(&cluster, leader).await.contains(&adopted));
    let events = cluster.events(leader).await.unwrap();
    assert!(
        events
            .iter()
            .any(|(kind, message)| kind == "instance.orphan_terminated"
                && message.contains("lost-intent-1")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|(kind, _)| kind == "instance.adopted"),
        "{events:?}"
    );

    // A recorded instance that the cloud loses is closed, and the waiting task gets a new one. The adopted
    // instance counts as supply of the queue, so two waiting tasks need one launch.
    cluster.enqueue_tasks(2).await.unwrap();
    cluster
        .wait_for_instances(2, Duration::from_secs(20))
        .await
        .unwrap();
    let launched = cluster
        .live_instances()
        .await
        .unwrap()
        .into_keys()
        .find(|id| *id != adopted)
        .unwrap();
    cluster
        .ec2
        .direct
        .terminate_instances()
        .instance_ids(&launched)
        .send()
        .await
        .unwrap();
    let replaced = wait_until_async(
        Duration::from_secs(20),
        "a replacement is launched",
        || async {
            let live = cluster.live_instances().await.unwrap();
            live.len() == 2 && !live.contains_key(&launched)
        },
    )
    .await;
    assert!(replaced.is_ok(), "{}", cluster.logs(30));
    assert!(!recorded(&cluster, leader).await.contains(&launched));

    // A ClearML worker that claims a fleet instance with no record is reported.
    cluster
        .clearml
        .workers()
        .register(&RegisterWorker {
            worker: "fleet:cpu:i-0000000000notreal".to_owned(),
            timeout: Some(600),
            queues: Vec::new(),
            tags: Vec::new(),
        })
        .await
        .unwrap();
    let reported = wait_until_async(
        Duration::from_secs(15),
        "the unknown worker is reported",
        || async {
            cluster
                .events(leader)
                .await
                .unwrap()
                .iter()
                .any(|(kind, message)| {
                    kind == "worker.unknown" && message.contains("i-0000000000notreal")
                })
        },
    )
    .await;
    assert!(reported.is_ok(), "{}", cluster.logs(30));
}
