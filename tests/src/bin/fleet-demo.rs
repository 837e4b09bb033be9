//! `fleet-demo`: a burst of ClearML tasks scales a local fleet up and back to zero, with no cloud account and
//! no ClearML server. See the README's quick start.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fleet_tests::demo::{self, DemoOptions, roles};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Runs a local clearml-fleet: the ClearML API emulator, a standalone coordinator and one node agent \
             per local instance, then enqueues a burst of tasks and watches the fleet scale up and back to zero"
)]
struct Args {
    /// Tasks in the burst.
    #[arg(long, default_value_t = 12)]
    tasks: usize,
    /// Run time of each task in seconds, drawn uniformly from MIN..MAX (or one number).
    #[arg(long, default_value = "5..15", value_parser = parse_range)]
    task_seconds: (f64, f64),
    /// Maximum of instances the fleet may run at once.
    #[arg(long, default_value_t = 6)]
    max_instances: u32,
    /// Exit once the fleet is back to zero; without it the demo keeps running for fleetctl until Ctrl-C.
    #[arg(long)]
    exit_when_idle: bool,
    /// Print the summary as JSON on stdout (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Use the clearml-agent stand-in even when clearml-agent is installed.
    #[arg(long)]
    fake_worker: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
    /// Port of the coordinator's gRPC API on 127.0.0.1 (fleetctl's endpoint); 0 picks a free port.
    #[arg(long, default_value_t = 7443)]
    grpc_port: u16,
    /// Port of the coordinator's /metrics, /status, /healthz and /readyz on 127.0.0.1; 0 picks a free port.
    #[arg(long, default_value_t = 9090)]
    http_port: u16,
    #[command(subcommand)]
    internal: Option<Internal>,
}

/// The processes the demo starts from its own executable.
#[derive(Debug, Subcommand)]
enum Internal {
    #[command(hide = true, subcommand)]
    Internal(Role),
}

#[derive(Debug, Subcommand)]
enum Role {
    /// The standalone coordinator.
    Coordinator {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        state_file: PathBuf,
    },
    /// The node agent of one local instance.
    NodeAgent {
        #[arg(long)]
        config: PathBuf,
    },
    /// A stand-in for `clearml-agent daemon --queue Q... --foreground`.
    FakeClearmlAgent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn parse_range(text: &str) -> Result<(f64, f64), String> {
    let (low, high) = match text.split_once("..") {
        Some((low, high)) => (low, high),
        None => (text, text),
    };
    let parse = |value: &str| {
        value
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
            .ok_or_else(|| {
                format!("{value:?} is not a number of seconds; use for example 5..15 or 10")
            })
    };
    let (low, high) = (parse(low)?, parse(high)?);
    if low > high {
        return Err(format!(
            "{text}: the minimum is above the maximum; use MIN..MAX"
        ));
    }
    Ok((low, high))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let logging = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if let Some(Internal::Internal(role)) = args.internal {
        logging.init();
        return match role {
            Role::Coordinator { config, state_file } => roles::coordinator(&config, state_file),
            Role::NodeAgent { config } => roles::node_agent(&config),
            Role::FakeClearmlAgent { args } => roles::fake_clearml_agent(&args),
        };
    }
    // The demo's own output is the progress view; its log is for failures only. The emulator logs the endpoints
    // it does not implement, which clearml-agent probes and handles (see docs/emulator.md), so it stays quiet.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,fleet_tests::emulator=off".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    if args.tasks == 0 {
        eprintln!("error: --tasks 0: the burst needs at least one task");
        return ExitCode::from(2);
    }
    if args.max_instances == 0 {
        eprintln!("error: --max-instances 0: the fleet needs at least one instance");
        return ExitCode::from(2);
    }
    let options = DemoOptions {
        tasks: args.tasks,
        task_seconds: args.task_seconds,
        max_instances: args.max_instances,
        exit_when_idle: args.exit_when_idle,
        fake_worker: args.fake_worker,
        json: args.json,
        timeout: Duration::from_secs(args.timeout_seconds),
        grpc_port: args.grpc_port,
        http_port: args.http_port,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(demo::run(options)) {
        // The demo printed the summary when the fleet was back to zero.
        Ok(summary) => {
            if summary.tasks_lost == 0 && summary.instances_running_at_end == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
