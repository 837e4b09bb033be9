//! A leader cut off from etcd stops acting before its lease ends, another replica takes over, and a write
//! under the old term is rejected by the fence.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_coordinator::election::Term;
use fleet_coordinator::etcd::{EtcdOptions, EtcdPool};
use fleet_coordinator::store::{Change, EtcdStateStore, Event, StateError, StateStore, StoreError};
use fleet_tests::cluster::{ClusterOptions, CoordinatorCluster};
use fleet_tests::ec2::CLUSTER;

const BINARY: &str = env!("CARGO_BIN_EXE_fleet-coordinator");
/// Lease TTL of the test clusters.
const TTL: Duration = Duration::from_secs(5);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_leader_steps_down_and_is_fenced() {
    let mut cluster = CoordinatorCluster::start("failover-cut", BINARY, ClusterOptions::default())
        .await
        .unwrap();
    let old = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .unwrap();
    let old_term = cluster.status(old).await.unwrap().term;
    cluster.enqueue_tasks(2).await.unwrap();
    cluster
        .wait_for_instances(2, Duration::from_secs(30))
        .await
        .unwrap();

    // The test's own view of etcd, to find the old leader's key for the fence check.
    let pool = EtcdPool::connect(&cluster.etcd.endpoints(), &EtcdOptions::default())
        .await
        .unwrap();
    let election_key = format!("/fleet-test/{CLUSTER}/leader");
    let leader_key = pool
        .run("find the leader key", |mut client| {
            let key = election_key.clone();
            async move {
                client
                    .get(key, Some(etcd_client::GetOptions::new().with_prefix()))
                    .await
            }
        })
        .await
        .unwrap()
        .kvs()
        .iter()
        .find(|kv| kv.create_revision() == old_term)
        .map(|kv| kv.key().to_vec())
        .expect("the old leader's key");

    cluster.cut_from_etcd(old, true);
    let cut_at = tokio::time::Instant::now();
    // The old leader steps down before any other replica can take over, which needs its lease to expire.
    let deadline = cut_at + TTL * 2;
    loop {
        let status = cluster
            .status(old)
            .await
            .expect("the cut-off replica still answers HTTP");
        if status.role != "leader" {
            break;
        }
        for other in (0..cluster.replicas.len()).filter(|index| *index != old) {
            let other_status = cluster.status(other).await.unwrap_or_else(|| {
                panic!(
                    "replica {other} does not answer /status\n{}",
                    cluster.logs(30)
                )
            });
            assert_ne!(
                other_status.role,
                "leader",
                "a new leader was elected while the old one still acted\n{}",
                cluster.logs(30)
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cut-off leader never stepped down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stepped_down = cut_at.elapsed();
    println!("the cut-off leader stepped down {stepped_down:?} after the cut (lease TTL {TTL:?})");
    assert!(
        stepped_down < TTL,
        "stepped down after {stepped_down:?}, TTL {TTL:?}"
    );
    let calls_before = cluster.ec2.proxy.calls("RunInstances");

    // Another replica takes over and acts.
    let new = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(index) = cluster.leader().await
                && index != old
            {
                break index;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no new leader\n{}",
                cluster.logs(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let new_term = cluster.status(new).await.unwrap().term;
    assert!(new_term > old_term);
    cluster.enqueue_tasks(2).await.unwrap();
    cluster
        .wait_for_instances(4, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(cluster.ec2.proxy.calls("RunInstances") > calls_before);

    // A write under the old term is rejected by the fence.
    let store = EtcdStateStore::new(
        std::sync::Arc::new(pool),
        Term {
            revision: old_term,
            leader_key,
            lease_id: 0,
        },
        &format!("/fleet-test/{CLUSTER}/"),
    );
    let event = Event {
        sequence: 999_999,
        at_ms: now_ms(),
        kind: "test.stale_write".to_owned(),
        queue: None,
        resource: None,
        instance_id: None,
        message: "a write of the deposed leader".to_owned(),
    };
    let err = store
        .apply(&[Change::AppendEvent(event)])
        .await
        .expect_err("the fence rejects a write of an ended term");
    assert!(
        matches!(err, StateError::Store(StoreError::Fenced { term, .. }) if term == old_term),
        "{err}"
    );

    // Reconnected, the old replica follows: nothing is launched twice.
    cluster.cut_from_etcd(old, false);
    let window = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < window {
        assert_eq!(cluster.live_instances().await.unwrap().len(), 4);
        assert_ne!(cluster.status(old).await.unwrap().role, "leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
