//! Replays job traces through the fleet scaling policy and a model of the ClearML autoscaler and prints their
//! cost and task wait side by side.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use fleet_tests::sim::{
    ClearmlSettings, CloudConfig, Comparison, FleetSettings, PolicyChoice, Scenario, TraceOptions,
    TraceSource, report, trace,
};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PolicyArg {
    Fleet,
    Clearml,
    Both,
}

/// Durations accept a unit suffix: `90s`, `5m`, `1h`; a bare number is seconds.
#[derive(Debug, Parser)]
#[command(
    name = "fleet-sim",
    version,
    about = "Replays job traces through the fleet scaling policy and a model of the ClearML autoscaler, and compares task wait and cost"
)]
struct Args {
    /// Traces to replay: pollux-1 to pollux-8, sweep, poisson, diurnal or the path of a CSV file with the columns
    /// arrival_s,runtime_s. Comma-separated or repeated.
    #[arg(long, required = true, value_delimiter = ',')]
    trace: Vec<String>,
    /// Autoscalers to run.
    #[arg(long, value_enum, default_value = "both")]
    policy: PolicyArg,
    /// Print one JSON object per (trace, policy) instead of a table.
    #[arg(long)]
    json: bool,
    /// Seed of run-time draws, generated arrivals and the simulated cloud.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tasks of the sweep, poisson and diurnal traces [default: 200 for sweep, 1000 otherwise].
    #[arg(long)]
    tasks: Option<usize>,
    /// Mean arrival rate of the poisson and diurnal traces, in tasks per hour.
    #[arg(long, default_value_t = 6.0)]
    rate_per_hour: f64,
    /// Enqueue one task per pollux job instead of one per replica (num_replicas).
    #[arg(long)]
    one_task_per_job: bool,
    /// Folder with the trace CSV files.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/traces"))]
    traces_dir: PathBuf,

    /// Maximum spot instances (the first resource).
    #[arg(long, default_value_t = 100)]
    max_spot: u32,
    /// Maximum on-demand instances (the second resource).
    #[arg(long, default_value_t = 100)]
    max_on_demand: u32,
    /// Idle time after which an instance is let go, for both autoscalers.
    #[arg(long, default_value = "15m", value_parser = parse_seconds)]
    max_idle: f64,

    /// Time between fleet policy ticks.
    #[arg(long, default_value = "10s", value_parser = parse_seconds)]
    fleet_tick: f64,
    /// Maximum instances the fleet policy launches per tick.
    #[arg(long, default_value_t = 100)]
    fleet_launches_per_tick: u32,
    /// Idle instances the fleet keeps ready (warm pool).
    #[arg(long, default_value_t = 0)]
    fleet_min_idle: u32,

    /// Sleep of the ClearML autoscaler between polls (polling_interval_time_min).
    #[arg(long, default_value = "5m", value_parser = parse_seconds)]
    clearml_poll: f64,
    /// Time after which the ClearML autoscaler spins down an instance whose worker never registered
    /// (max_spin_up_time_min).
    #[arg(long, default_value = "30m", value_parser = parse_seconds)]
    clearml_max_spin_up: f64,
    /// Delay of boto3's instance_running waiter, which each ClearML launch waits on.
    #[arg(long, default_value = "15s", value_parser = parse_seconds)]
    clearml_waiter_delay: f64,

    /// Time of the ClearML API calls of one poll of the ClearML autoscaler.
    #[arg(long, default_value = "1s", value_parser = parse_seconds)]
    clearml_api_calls: f64,

    /// Median time from launch call to the running state.
    #[arg(long, default_value = "20s", value_parser = parse_seconds)]
    pending_median: f64,
    /// Median time from the running state to the agent's registration.
    #[arg(long, default_value = "100s", value_parser = parse_seconds)]
    agent_start_median: f64,
    /// Log-normal sigma of both boot phases.
    #[arg(long, default_value_t = 0.35)]
    boot_sigma: f64,
    /// Share of instances whose agent never registers (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    boot_failure_rate: f64,
    /// Spot interruptions per spot instance-hour.
    #[arg(long, default_value_t = 0.0)]
    spot_interruptions_per_hour: f64,
    /// Probability that a spot launch call fails with a capacity error (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    capacity_error_rate: f64,
    /// Duration of one launch call.
    #[arg(long, default_value = "1s", value_parser = parse_seconds)]
    launch_call: f64,
    /// Time from a terminate call until billing stops.
    #[arg(long, default_value = "30s", value_parser = parse_seconds)]
    shutdown: f64,
}

/// Parses a duration such as `90`, `90s`, `5m` or `1.5h` into seconds.
fn parse_seconds(text: &str) -> Result<f64, String> {
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(position) => text.split_at(position),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("invalid unit {unit:?} in {text:?}: use s, m or h")),
    };
    let value: f64 = number.trim().parse().map_err(|_| {
        format!("invalid duration {text:?}: expected a number with s, m or h, such as 5m")
    })?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!(
            "invalid duration {text:?}: must be a non-negative number"
        ));
    }
    Ok(value * scale)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let comparison = Comparison {
        scenario: Scenario::gpu_queue(args.max_spot, args.max_on_demand, args.max_idle),
        cloud: CloudConfig {
            pending_median_s: args.pending_median,
            agent_start_median_s: args.agent_start_median,
            boot_sigma: args.boot_sigma,
            boot_failure_rate: args.boot_failure_rate,
            spot_interruptions_per_hour: args.spot_interruptions_per_hour,
            capacity_error_rate: args.capacity_error_rate,
            launch_call_s: args.launch_call,
            shutdown_s: args.shutdown,
            seed: args.seed,
            ..CloudConfig::default()
        },
        fleet: FleetSettings {
            tick_s: args.fleet_tick.max(0.001),
            max_launches_per_tick: args.fleet_launches_per_tick,
            min_idle: args.fleet_min_idle,
            min_instances: 0,
        },
        clearml: ClearmlSettings {
            poll_s: args.clearml_poll.max(0.001),
            max_spin_up_s: args.clearml_max_spin_up,
            waiter_delay_s: args.clearml_waiter_delay.max(0.001),
            api_calls_s: args.clearml_api_calls,
        },
    };
    let options = TraceOptions {
        traces_dir: args.traces_dir.clone(),
        seed: args.seed,
        tasks: args.tasks,
        rate_per_hour: args.rate_per_hour,
        replicas_as_tasks: !args.one_task_per_job,
    };
    let choice = match args.policy {
        PolicyArg::Fleet => PolicyChoice::Fleet,
        PolicyArg::Clearml => PolicyChoice::Clearml,
        PolicyArg::Both => PolicyChoice::Both,
    };

    let mut reports = Vec::new();
    for name in &args.trace {
        let source: TraceSource = name.parse()?;
        let trace = trace::load(&source, &options)
            .with_context(|| format!("failed to load trace {name}"))?;

        let started = Instant::now();
        let trace_reports = comparison.run(&trace, choice);
        eprintln!(
            "fleet-sim: simulated trace {} ({} tasks, {} policies) in {:.2} s",
            trace.name,
            trace.tasks.len(),
            trace_reports.len(),
            started.elapsed().as_secs_f64()
        );

        if args.json {
            for report in &trace_reports {
                println!(
                    "{}",
                    serde_json::to_string(report).context("failed to encode the report as JSON")?
                );
            }
        }
        reports.extend(trace_reports);
    }

    if !args.json {
        print!("{}", report::table(&reports));
    }
    Ok(())
}
