//! `fake-clearml-worker`: registers like clearml-agent, pulls tasks and "runs" each for the time in its
//! `fleet/run_seconds` hyperparameter. Scale tests run hundreds of these where real agents would not fit.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use clearml_api::{Client, ClientConfig, Secret};
use fleet_tests::fake_worker::{self, FakeWorkerConfig, FakeWorkerError};
use tokio::sync::watch;

/// Exit code for a configuration the worker cannot start with (bad credentials, unknown queue).
const EXIT_CONFIG: u8 = 2;
/// Exit code for any other failure at start.
const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A fake clearml-agent for scale tests: pulls tasks and waits out their run time"
)]
struct Args {
    /// ClearML API server URL.
    #[arg(long, env = "CLEARML_API_HOST")]
    api_server: String,
    #[arg(long, env = "CLEARML_API_ACCESS_KEY", hide_env_values = true)]
    access_key: String,
    /// Read from the environment only, so it never shows in the process list.
    #[arg(long = "secret-key-env", default_value = "CLEARML_API_SECRET_KEY")]
    secret_key_env: String,
    /// Worker id, as clearml-agent's --worker-id.
    #[arg(long)]
    worker_id: String,
    /// Queue name to pull from; repeat for several, polled in the given order.
    #[arg(long = "queue", required = true)]
    queues: Vec<String>,
    /// Run time in seconds of a task without a fleet/run_seconds hyperparameter.
    #[arg(long, default_value_t = 1.0)]
    default_run_seconds: f64,
    /// Milliseconds between polls while every queue is empty.
    #[arg(long, default_value_t = 500)]
    poll_interval_ms: u64,
    /// Seconds between status reports.
    #[arg(long, default_value_t = 5)]
    report_interval_secs: u64,
    /// Seconds without a report after which the server drops the worker.
    #[arg(long, default_value_t = 600)]
    worker_timeout_secs: u64,
    /// Exit after this many tasks.
    #[arg(long)]
    max_tasks: Option<u64>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let config = match build_config(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let client = match std::env::var(&args.secret_key_env)
        .map_err(|_| {
            format!(
                "environment variable {} with the ClearML secret key is not set",
                args.secret_key_env
            )
        })
        .and_then(|secret| {
            ClientConfig::new(&args.api_server, &args.access_key, Secret::new(secret))
                .and_then(Client::new)
                .map_err(|err| err.to_string())
        }) {
        Ok(client) => client,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };

    let (stop_sender, stop_receiver) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; finishing the running task");
        let _ = stop_sender.send(true);
    });

    match fake_worker::run(client, config, stop_receiver).await {
        Ok(summary) => {
            println!(
                "tasks_completed={} tasks_failed={}",
                summary.tasks_completed, summary.tasks_failed
            );
            ExitCode::SUCCESS
        }
        Err(err @ (FakeWorkerError::QueueNotFound { .. } | FakeWorkerError::Unauthorized(_))) => {
            eprintln!("error: {err}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn build_config(args: &Args) -> Result<FakeWorkerConfig, String> {
    if !(args.default_run_seconds.is_finite() && args.default_run_seconds >= 0.0) {
        return Err(format!(
            "--default-run-seconds {} is invalid; expected a non-negative number of seconds",
            args.default_run_seconds
        ));
    }
    if args.report_interval_secs == 0 {
        return Err("--report-interval-secs 0 is invalid; expected at least 1".to_owned());
    }
    Ok(FakeWorkerConfig {
        worker_id: args.worker_id.clone(),
        queues: args.queues.clone(),
        default_run_time: Duration::from_secs_f64(args.default_run_seconds),
        poll_interval: Duration::from_millis(args.poll_interval_ms),
        report_interval: Duration::from_secs(args.report_interval_secs),
        worker_timeout: Duration::from_secs(args.worker_timeout_secs),
        max_tasks: args.max_tasks,
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install the signal handlers; stop the worker with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}
