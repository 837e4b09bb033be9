//! `fleet-coordinator`: the clearml-fleet coordinator.
//!
//! NOTE: only `check-config` exists so far; the command that runs a replica (election, actors, gRPC API) is
//! not built yet.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_coordinator::config::{self, ConfigError, ProcessEnvironment};

/// Exit code of `check-config` for a file that is missing, unreadable or invalid.
const EXIT_INVALID: u8 = 1;

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::CheckConfig { file } => check_config(&file),
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
