//! Measures the AWS provider's EC2 calls against moto: API calls per steady-state tick for a fleet, and launch and
//! terminate throughput.
//!
//! `cargo run --release -p fleet-tests --bin ec2-bench -- --instances 1000`
//!
//! A steady-state tick is one `describe` of the whole cluster by tag, which is what the coordinator's reconciler
//! issues each tick. The goal is one DescribeInstances page per 1,000 instances and no per-instance calls.
//! Throughput is moto's (a single Python process), not EC2's; EC2 also rate-limits RunInstances per account.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fleet_coordinator::providers::aws::AwsProvider;
use fleet_coordinator::providers::{CloudProvider, LaunchRequest, TagFilter};
use fleet_tests::ec2::{CLUSTER, Ec2TestBed};
use tokio::task::JoinSet;

#[derive(Debug, Parser)]
#[command(
    about = "EC2 API calls per tick and launch/terminate throughput of the AWS provider against moto"
)]
struct Args {
    /// Instances in the fleet.
    #[arg(long, default_value_t = 1000)]
    instances: u32,

    /// Instances per launch call; 1 gives one reservation per instance, the worst case for paging.
    #[arg(long, default_value_t = 1)]
    batch: u32,

    /// Launch calls in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,

    /// Steady-state ticks to measure.
    #[arg(long, default_value_t = 5)]
    ticks: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");

    let bed = Ec2TestBed::start("ec2-bench", 3)
        .await
        .context("failed to start moto and the fault proxy")?;
    let mut config = bed.config(BTreeMap::from([(
        "cpu".to_owned(),
        bed.resource(&["m5.large"]),
    )]));
    // The bench measures moto's throughput, so the provider's own rate limit must not be the bottleneck.
    config.bucket_capacity = 100_000;
    config.bucket_refill_per_second = 100_000.0;
    let provider = Arc::new(bed.provider(config).await?);

    let launched = launch_fleet(&provider, &args).await?;
    let launch_calls = bed.proxy.all_calls();
    println!(
        "launch:    {} instances in {:.1} s = {:.1} instances/s ({} calls of {} instances, concurrency {}; EC2 calls: {})",
        launched.ids.len(),
        launched.elapsed.as_secs_f64(),
        launched.ids.len() as f64 / launched.elapsed.as_secs_f64(),
        launched.calls,
        args.batch,
        args.concurrency,
        format_calls(&launch_calls)
    );

    bed.proxy.reset_calls();
    let mut tick_times = Vec::new();
    let mut seen = 0;
    for _ in 0..args.ticks {
        let started = Instant::now();
        seen = provider.describe(&TagFilter::cluster(CLUSTER)).await?.len();
        tick_times.push(started.elapsed());
    }
    let tick_calls = bed.proxy.all_calls();
    let total_calls: usize = tick_calls.values().sum();
    let pages = bed.proxy.calls("DescribeInstances");
    let mean_tick = tick_times.iter().sum::<Duration>() / args.ticks.max(1);
    println!(
        "steady:    {seen} instances, {:.2} EC2 calls per tick ({} DescribeInstances pages in {} ticks, {:.2} pages per \
         1,000 instances), mean tick {:.0} ms; EC2 calls: {}",
        total_calls as f64 / f64::from(args.ticks.max(1)),
        pages,
        args.ticks,
        pages as f64 / f64::from(args.ticks.max(1)) / (seen.max(1) as f64 / 1000.0),
        mean_tick.as_secs_f64() * 1000.0,
        format_calls(&tick_calls)
    );

    bed.proxy.reset_calls();
    let started = Instant::now();
    let outcome = provider.terminate(&launched.ids).await?;
    let elapsed = started.elapsed();
    println!(
        "terminate: {} instances in {:.1} s = {:.1} instances/s; EC2 calls: {}",
        outcome.terminating.len(),
        elapsed.as_secs_f64(),
        outcome.terminating.len() as f64 / elapsed.as_secs_f64(),
        format_calls(&bed.proxy.all_calls())
    );
    Ok(())
}

struct Launched {
    ids: Vec<String>,
    calls: u32,
    elapsed: Duration,
}

async fn launch_fleet(provider: &Arc<AwsProvider>, args: &Args) -> anyhow::Result<Launched> {
    let calls = args.instances.div_ceil(args.batch);
    let started = Instant::now();
    let mut ids = Vec::with_capacity(args.instances as usize);
    let mut tasks = JoinSet::new();

    for call in 0..calls {
        if tasks.len() >= args.concurrency {
            ids.extend(join_one(&mut tasks).await?);
        }
        let count = args.batch.min(args.instances - call * args.batch);
        let provider = provider.clone();
        tasks.spawn(async move {
            let intent_id = format!("bench-{call}");
            let request = LaunchRequest {
                queue: "bench".to_owned(),
                resource: "cpu".to_owned(),
                intent_id: intent_id.clone(),
                tags: BTreeMap::new(),
                boot_values: BTreeMap::new(),
            };
            provider.launch(&request, count, &intent_id).await
        });
    }
    while !tasks.is_empty() {
        ids.extend(join_one(&mut tasks).await?);
    }

    Ok(Launched {
        ids,
        calls,
        elapsed: started.elapsed(),
    })
}

type LaunchResult = Result<
    fleet_coordinator::providers::LaunchOutcome,
    fleet_coordinator::providers::ProviderError,
>;

async fn join_one(tasks: &mut JoinSet<LaunchResult>) -> anyhow::Result<Vec<String>> {
    let joined = tasks
        .join_next()
        .await
        .context("no launch task left to join")?;
    let outcome = joined.context("launch task panicked")??;
    Ok(outcome
        .instances
        .into_iter()
        .map(|instance| instance.id)
        .collect())
}

fn format_calls(calls: &BTreeMap<String, usize>) -> String {
    calls
        .iter()
        .map(|(action, count)| format!("{action}={count}"))
        .collect::<Vec<_>>()
        .join(" ")
}
