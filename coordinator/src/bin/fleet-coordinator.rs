//! `fleet-coordinator`: the clearml-fleet coordinator.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_coordinator::config::{self, ConfigError, ProcessEnvironment};
use fleet_coordinator::import::{self, ImportOptions};
use fleet_coordinator::server::RunOptions;
use tracing_subscriber::EnvFilter;

/// Exit code for a configuration file that is missing, unreadable or invalid, and for an import that fails.
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
    /// Converts a ClearML AWS autoscaler configuration (the file of the clearml SDK's aws_autoscaler.py) to
    /// this coordinator's TOML. It reads that YAML file, or the same settings as JSON. Settings that cannot carry over, and secrets, which are never copied, are listed on stderr and as
    /// comments at the top of the output. Exit 0 on success (warnings allowed), 1 on invalid input.
    ImportClearmlConfig {
        /// Path of the ClearML autoscaler's configuration (aws_autoscaler.yaml), as YAML or JSON.
        file: PathBuf,
        /// Write the TOML to this file instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// cluster.name of the output: 1 to 63 lowercase letters, digits, '-' or '_'.
        #[arg(long, default_value = import::DEFAULT_CLUSTER)]
        cluster: String,
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
        Command::ImportClearmlConfig {
            file,
            output,
            cluster,
        } => import_clearml_config(&file, output.as_deref(), cluster),
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

fn import_clearml_config(file: &Path, output: Option<&Path>, cluster: String) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("error: cannot read {}: {err}", file.display());
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let options = ImportOptions {
        cluster,
        source_name: file
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let converted = match import::convert(&text, &file.display().to_string(), &options) {
        Ok(converted) => converted,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    for note in &converted.notes {
        eprintln!("{note}");
    }
    match output {
        Some(path) => {
            if let Err(err) = std::fs::write(path, &converted.toml) {
                eprintln!("error: cannot write {}: {err}", path.display());
                return ExitCode::from(EXIT_INVALID);
            }
            eprintln!(
                "wrote {}; set CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY, replace its TODO values and run \
                 `fleet-coordinator check-config {}`",
                path.display(),
                path.display()
            );
        }
        None => print!("{}", converted.toml),
    }
    ExitCode::SUCCESS
}
