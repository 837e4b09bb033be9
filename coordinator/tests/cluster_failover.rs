//! Failover of a three-replica cluster: leaders killed in the middle of a launch burst, one of them between
//! storing a launch intent and calling the cloud.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_coordinator::failpoint::AFTER_INTENT;
use fleet_proto::v1::ListInstancesRequest;
use fleet_tests::cluster::{ClusterOptions, CoordinatorCluster, VIEWER_TOKEN};

const BINARY: &str = env!("CARGO_BIN_EXE_fleet-coordinator");
/// A new leader must decide within TTL + 2 s of the old one's death.
const FAILOVER_LIMIT: Duration = Duration::from_secs(7);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits for a leader other than `old` and returns it with the time it took from `since_ms` to its first
/// decision.
async fn next_leader(
    cluster: &mut CoordinatorCluster,
    old: usize,
    since_ms: u64,
) -> (usize, Duration) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(index) = cluster.leader().await
            && index != old
            && let Some(status) = cluster.status(index).await
            && status.first_decision_ms > 0
        {
            let took = Duration::from_millis(status.first_decision_ms.saturating_sub(since_ms));
            return (index, took);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new leader decided within 30 s\n{}",
            cluster.logs(40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Returns the instance ids the leader's registry has in a state other than terminated.
async fn registry_instances(cluster: &CoordinatorCluster, index: usize) -> BTreeSet<String> {
    let mut client = cluster.fleet_client(index).await.unwrap();
    let mut request = tonic::Request::new(ListInstancesRequest::default());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {VIEWER_TOKEN}").parse().unwrap(),
    );
    client
        .list_instances(request)
        .await
        .unwrap()
        .into_inner()
        .instances
        .into_iter()
        .map(|instance| instance.instance_id)
        .filter(|id| !id.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leaders_launch_exact_demand() {
    let options = ClusterOptions {
        max_launches_per_tick: 2,
        orphan_grace_seconds: 5,
        ..ClusterOptions::default()
    };
    let mut cluster = CoordinatorCluster::start("failover-burst", BINARY, options)
        .await
        .unwrap();
    let first = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .unwrap();

    // The first leader dies between storing its first launch intent and the RunInstances call.
    cluster.arm_failpoint(AFTER_INTENT).unwrap();
    cluster.enqueue_tasks(10).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while cluster.is_running(first) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never reached the failpoint\n{}",
            cluster.logs(40)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let crashed_ms = now_ms();
    assert!(
        !cluster.failpoint_armed(AFTER_INTENT),
        "the failpoint fired"
    );
    assert_eq!(
        cluster.ec2.proxy.calls("RunInstances"),
        0,
        "the first leader died before its cloud call"
    );

    let (second, took) = next_leader(&mut cluster, first, crashed_ms).await;
    println!("crash at the failpoint -> new leader's first decision: {took:?}");
    assert!(
        took <= FAILOVER_LIMIT,
        "failover after a crash took {took:?}, limit {FAILOVER_LIMIT:?}\n{}",
        cluster.logs(30)
    );

    // SIGKILL the second leader while the burst is still launching.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let live = cluster.live_instances().await.unwrap().len();
        if (2..10).contains(&live) {
            break;
        }
        assert!(
            live < 10 && tokio::time::Instant::now() < deadline,
            "the burst finished ({live} instances) before the second leader could be killed\n{}",
            cluster.logs(40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill(second);
    let killed_ms = now_ms();
    let (third, took) = next_leader(&mut cluster, second, killed_ms).await;
    println!("SIGKILL during the burst -> new leader's first decision: {took:?}");
    assert!(
        took <= FAILOVER_LIMIT,
        "failover after SIGKILL took {took:?}, limit {FAILOVER_LIMIT:?}\n{}",
        cluster.logs(30)
    );

    cluster
        .wait_for_instances(10, Duration::from_secs(60))
        .await
        .unwrap();
    // Over two reconcile periods past the orphan grace, the count stays at the demand and every instance in
    // the cloud has a record: no duplicate, no orphan.
    let window = tokio::time::Instant::now() + Duration::from_secs(9);
    while tokio::time::Instant::now() < window {
        let live = cluster.live_instances().await.unwrap();
        assert_eq!(
            live.len(),
            10,
            "instances beyond demand\n{}",
            cluster.logs(60)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let live: BTreeSet<String> = cluster
        .live_instances()
        .await
        .unwrap()
        .into_keys()
        .collect();
    let recorded = registry_instances(&cluster, third).await;
    assert_eq!(
        live,
        recorded,
        "cloud and registry disagree\n{}",
        cluster.logs(60)
    );
}
