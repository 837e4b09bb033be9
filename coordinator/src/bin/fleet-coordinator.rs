//! `fleet-coordinator`: the clearml-fleet coordinator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_coordinator::config::{self, ConfigError, ProcessEnvironment};
use fleet_coordinator::server::RunOptions;
use tracing_subscriber::EnvFilter;

/// Exit code for a configuration file that is missing, unreadable or invalid.
const EXIT_INVALID: u8 = 1;
/// Exit code of `run` when the replica cannot start (a port in use, a TLS file missing, etcd unusable).
const EXIT_START: u8 = 2;

#[derive(Debug, Parser)]
#[command(version, about = "Autoscaler for ClearML queues: the coordinator")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks a configuration file without starting anything: exit 0 when valid, 1 with every problem listed
    /// otherwise. Secrets are read from their environment variables or files, so run it where the
    /// coordinator runs.
    CheckConfig {
        /// Path of the TOML configuration file.
        file: PathBuf,
    },
    /// Runs one coordinator replica until SIGTERM or SIGINT.
    Run {
        /// Path of the TOML configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Run as the only replica, keeping the records in a local file instead of etcd.
        #[arg(long)]
        standalone: bool,
        /// State file of a standalone replica; default `<cluster>.state.json` in the working directory.
        #[arg(long, requires = "standalone")]
        state_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Run {
            config,
            standalone,
            state_file,
        } => run(
            &config,
            RunOptions {
                standalone,
                state_file,
            },
        ),
    }
}

fn run(file: &std::path::Path, options: RunOptions) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match config::load(file, &ProcessEnvironment) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    match fleet_coordinator::server::run(config, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(EXIT_START)
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match config::load(file, &ProcessEnvironment) {
        Ok(config) => {
            let resources: usize = config
                .policy
                .queues
                .iter()
                .map(|queue| queue.resources.len())
                .sum();
            println!(
                "{}: valid (cluster {}, {} queue(s), {} queue resource(s), {})",
                file.display(),
                config.cluster,
                config.policy.queues.len(),
                resources,
                if config.etcd.is_some() {
                    "etcd election"
                } else {
                    "standalone only: no [etcd] table"
                }
            );
            ExitCode::SUCCESS
        }
        Err(
            err @ (ConfigError::Read { .. }
            | ConfigError::Syntax { .. }
            | ConfigError::Invalid { .. }),
        ) => {
            eprintln!("error: {err}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}
