//! A three-replica coordinator cluster on a three-member etcd launches exactly what the queue needs in moto,
//! with the tags and user-data a node agent needs.

use std::time::Duration;

use clearml_api::Secret;
use fleet_coordinator::keys::AgentKeys;
use fleet_tests::cluster::{BOOTSTRAP_KEY, ClusterOptions, CoordinatorCluster, QUEUE, RESOURCE};
use fleet_tests::ec2::CLUSTER;

const BINARY: &str = env!("CARGO_BIN_EXE_fleet-coordinator");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_tasks_launch_five_instances() {
    let mut cluster = CoordinatorCluster::start("five-tasks", BINARY, ClusterOptions::default())
        .await
        .unwrap();
    cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .unwrap();

    cluster.enqueue_tasks(5).await.unwrap();
    cluster
        .wait_for_instances(5, Duration::from_secs(30))
        .await
        .unwrap();

    // The queue stays at five waiting tasks: over several poll intervals no further launch may happen.
    let window = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < window {
        let live = cluster.live_instances().await.unwrap();
        assert_eq!(
            live.len(),
            5,
            "instances beyond demand\n{}",
            cluster.logs(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let keys = AgentKeys::new(Secret::new(BOOTSTRAP_KEY));
    let live = cluster.live_instances().await.unwrap();
    for (id, tags) in &live {
        assert_eq!(tags.get("fleet:cluster").map(String::as_str), Some(CLUSTER));
        assert_eq!(tags.get("fleet:queue").map(String::as_str), Some(QUEUE));
        assert_eq!(
            tags.get("fleet:resource").map(String::as_str),
            Some(RESOURCE)
        );
        let intent = tags.get("fleet:intent-id").expect("intent tag");

        let user_data = cluster.user_data(id).await.unwrap();
        let token = keys.bootstrap_token(intent);
        assert!(
            user_data.contains(token.expose()),
            "user data of {id} lacks the launch's bootstrap token"
        );
        let endpoint = format!("\"http://127.0.0.1:{}\"", cluster.replicas[0].grpc);
        assert!(user_data.contains(&endpoint), "{user_data}");
        assert!(
            user_data.contains(&format!("intent={intent}")),
            "{user_data}"
        );
        assert!(
            !user_data.contains("fleet-test-secret"),
            "the ClearML secret must never be in user data"
        );
    }
}
