//! etcd failures under a running cluster. Losing one member changes nothing. Losing the quorum makes the
//! leader step down, and no cloud call is made until the quorum returns.

use std::time::Duration;

use fleet_tests::cluster::{ClusterOptions, CoordinatorCluster};

const BINARY: &str = env!("CARGO_BIN_EXE_fleet-coordinator");
const TTL: Duration = Duration::from_secs(5);

/// Cloud calls that change the fleet.
fn mutating_calls(cluster: &CoordinatorCluster) -> usize {
    cluster.ec2.proxy.calls("RunInstances") + cluster.ec2.proxy.calls("TerminateInstances")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_and_quorum_loss() {
    let mut cluster = CoordinatorCluster::start("etcd-loss", BINARY, ClusterOptions::default())
        .await
        .unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .unwrap();
    let term = cluster.status(leader).await.unwrap().term;
    cluster.enqueue_tasks(2).await.unwrap();
    cluster
        .wait_for_instances(2, Duration::from_secs(30))
        .await
        .unwrap();

    // One member down: the same leader, in the same term, keeps launching.
    cluster.etcd.kill(2);
    cluster.enqueue_tasks(2).await.unwrap();
    cluster
        .wait_for_instances(4, Duration::from_secs(30))
        .await
        .unwrap();
    let status = cluster.status(leader).await.unwrap();
    assert_eq!(status.role, "leader", "{}", cluster.logs(30));
    assert_eq!(
        status.term, term,
        "the leader changed after one member's loss"
    );

    // Quorum lost: the leader steps down within the lease TTL.
    cluster.etcd.kill(1);
    let lost_at = tokio::time::Instant::now();
    loop {
        if cluster.leader().await.is_none() {
            break;
        }
        assert!(
            lost_at.elapsed() < TTL + Duration::from_secs(2),
            "a replica still leads without an etcd quorum\n{}",
            cluster.logs(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "quorum lost -> leader stepped down after {:?}",
        lost_at.elapsed()
    );

    // Demand grows, but without a quorum no replica may call the cloud.
    let calls = mutating_calls(&cluster);
    cluster.enqueue_tasks(2).await.unwrap();
    let window = tokio::time::Instant::now() + TTL * 2;
    while tokio::time::Instant::now() < window {
        assert_eq!(
            mutating_calls(&cluster),
            calls,
            "a cloud call was made without an etcd quorum\n{}",
            cluster.logs(30)
        );
        assert!(cluster.leader().await.is_none(), "a leader without quorum");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Quorum back: a leader is elected and serves the waiting tasks.
    cluster.etcd.restart(1).await.unwrap();
    cluster.etcd.restart(2).await.unwrap();
    cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    cluster
        .wait_for_instances(6, Duration::from_secs(30))
        .await
        .unwrap();
}
