//! A launch that fails with an error another try would repeat backs off the resource. The error here is EC2's
//! PendingVerification (an account still under review). The leader does not send the same failing
//! RunInstances every poll, and the event log records the reason.

use std::time::Duration;

use fleet_tests::cluster::{ClusterOptions, CoordinatorCluster};
use fleet_tests::ec2::FaultRule;
use fleet_tests::harness::wait_until_async;

const BINARY: &str = env!("CARGO_BIN_EXE_fleet-coordinator");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_resource_is_backed_off() {
    let mut cluster = CoordinatorCluster::start("backoff", BINARY, ClusterOptions::default())
        .await
        .unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .unwrap();
    cluster
        .ec2
        .proxy
        .inject(FaultRule::error("RunInstances", "PendingVerification"));

    cluster.enqueue_tasks(1).await.unwrap();
    wait_until_async(Duration::from_secs(30), "a failed RunInstances", || async {
        cluster.ec2.proxy.calls("RunInstances") > 0
    })
    .await
    .unwrap();
    let backed_off = wait_until_async(
        Duration::from_secs(20),
        "a resource.backoff event",
        || async {
            cluster
                .events(leader)
                .await
                .unwrap()
                .iter()
                .any(|(kind, _)| kind == "resource.backoff")
        },
    )
    .await;
    if let Err(err) = backed_off {
        let seen = cluster.events(leader).await.unwrap();
        panic!("{err}\n{seen:?}\n{}", cluster.logs(30));
    }
    let after_backoff = cluster.ec2.proxy.calls("RunInstances");

    // The task still waits and the poll interval is 1 s: without the backoff, every poll would send the
    // same failing call. An absence needs a window; 6 s is six polls.
    tokio::time::sleep(Duration::from_secs(6)).await;

    assert_eq!(
        cluster.ec2.proxy.calls("RunInstances"),
        after_backoff,
        "RunInstances repeated during the backoff\n{}",
        cluster.logs(30)
    );
    let all = cluster.events(leader).await.unwrap();
    let (_, message) = all
        .iter()
        .find(|(kind, _)| kind == "resource.backoff")
        .unwrap();
    assert!(message.contains("PendingVerification"), "{message}");
    assert!(message.contains("backed off for 180 s"), "{message}");
}
