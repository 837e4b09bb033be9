//! Benchmarks of a three-replica coordinator cluster on loopback (three-member etcd, the ClearML API
//! emulator, moto behind the fault proxy):
//!
//! - failover: from SIGKILL of the leader to the new leader's first policy decision, over 10 kills;
//! - enqueue to launch: from `tasks.enqueue` in the emulator to the RunInstances call that launches the
//!   task's instance, as the fault proxy in front of moto receives it, over 100 tasks.
//!
//! Run with `cargo bench -p fleet-coordinator --bench cluster`; `-- --kills N --tasks N` change the counts.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_tests::cluster::{ClusterOptions, CoordinatorCluster};
use rand::Rng;

const BINARY: &str = env!("CARGO_BIN_EXE_fleet-coordinator");
const TTL_SECONDS: u64 = 5;
const POLL_SECONDS: u64 = 2;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn argument(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|arg| arg == name)
        .and_then(|index| args.get(index + 1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let kills = argument("--kills", 10);
    let tasks = argument("--tasks", 100);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench(kills, tasks))
}

async fn bench(kills: usize, tasks: usize) -> anyhow::Result<()> {
    let options = ClusterOptions {
        lease_ttl_seconds: TTL_SECONDS,
        poll_interval_seconds: POLL_SECONDS,
        max_instances: (tasks as u32 + 20).max(40),
        log_filter: "warn".to_owned(),
        ..ClusterOptions::default()
    };
    let mut cluster = CoordinatorCluster::start("bench-cluster", BINARY, options).await?;
    let log_filter = "warn".to_owned();

    println!(
        "cluster: 3 replicas, 3 etcd members, lease TTL {TTL_SECONDS} s, poll interval {POLL_SECONDS} s"
    );
    println!();
    println!("failover: SIGKILL of the leader -> the new leader's first decision");
    let mut failovers = Vec::with_capacity(kills);
    for round in 1..=kills {
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await?;
        wait_for_decision(&cluster, leader).await?;
        cluster.kill(leader);
        let killed_ms = now_ms();
        let deadline = Instant::now() + Duration::from_secs(60);
        let took = loop {
            if let Some(index) = cluster.leader().await
                && index != leader
                && let Some(status) = cluster.status(index).await
                && status.first_decision_ms > 0
            {
                break Duration::from_millis(status.first_decision_ms.saturating_sub(killed_ms));
            }
            anyhow::ensure!(Instant::now() < deadline, "no new leader within 60 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        println!("  round {round:>2}: {}", seconds(took));
        failovers.push(took);
        cluster.spawn(leader, &log_filter)?;
        // The restarted replica rejoins as a follower before the next round.
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.status(leader).await.is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "restarted replica never answered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    failovers.sort();
    let goal = Duration::from_secs(TTL_SECONDS + 2);
    println!(
        "  median {}  min {}  max {}  (goal: median <= {} with TTL {TTL_SECONDS} s)",
        seconds(percentile(&failovers, 0.5)),
        seconds(failovers[0]),
        seconds(*failovers.last().unwrap()),
        seconds(goal),
    );

    println!();
    println!("enqueue -> RunInstances: {tasks} tasks enqueued one at a time, 100 to 600 ms apart");
    let leader = cluster.wait_for_leader(Duration::from_secs(60)).await?;
    wait_for_decision(&cluster, leader).await?;
    let already = cluster.live_instances().await?.len();
    cluster.ec2.proxy.reset_calls();
    let mut enqueued = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let at = Instant::now();
        cluster.enqueue_tasks(1).await?;
        enqueued.push(at);
        let pause = rand::rng().random_range(100..=600);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    cluster
        .wait_for_instances(already + tasks, Duration::from_secs(120))
        .await?;

    // The k-th instance launched serves the k-th task enqueued.
    let mut launched_at = Vec::with_capacity(tasks);
    for (arrived, params) in cluster.ec2.proxy.timed_requests("RunInstances") {
        let count: usize = params
            .get("MaxCount")
            .and_then(|value| value.parse().ok())
            .unwrap_or(1);
        launched_at.extend(std::iter::repeat_n(arrived, count));
    }
    anyhow::ensure!(
        launched_at.len() >= tasks,
        "{} instances launched for {tasks} tasks",
        launched_at.len()
    );
    let mut latencies: Vec<Duration> = enqueued
        .iter()
        .zip(&launched_at)
        .map(|(enqueued, launched)| launched.saturating_duration_since(*enqueued))
        .collect();
    latencies.sort();
    println!(
        "  p50 {}  p95 {}  max {}  over {} tasks, {} RunInstances calls  (goal: p95 <= {} = poll interval + 0.5 s)",
        seconds(percentile(&latencies, 0.5)),
        seconds(percentile(&latencies, 0.95)),
        seconds(*latencies.last().unwrap()),
        latencies.len(),
        cluster.ec2.proxy.calls("RunInstances"),
        seconds(Duration::from_millis(POLL_SECONDS * 1000 + 500)),
    );
    Ok(())
}

async fn wait_for_decision(cluster: &CoordinatorCluster, index: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if cluster
            .status(index)
            .await
            .is_some_and(|status| status.first_decision_ms > 0)
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "leader made no decision in 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
