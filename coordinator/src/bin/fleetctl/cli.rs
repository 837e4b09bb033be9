//! Command line of `fleetctl`.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use fleet_proto::v1::InstanceState;

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7443";

const AFTER_HELP: &str = "\
Authentication:
  Every call sends the API token from --token-file PATH, or else from the environment variable FLEET_TOKEN.
  A viewer token may read; drain, terminate, pause, resume and limits need an operator token.

Exit codes:
  0  success
  1  the coordinator returned another error (for example INVALID_ARGUMENT or FAILED_PRECONDITION)
  2  invalid command line, or a token file, CA file or endpoint URL that cannot be used
  3  UNAUTHENTICATED or PERMISSION_DENIED: the token is missing, unknown, or lacks the operator role
  4  NOT_FOUND: no such instance
  5  no replica reachable, or no leader elected (UNAVAILABLE, DEADLINE_EXCEEDED, or FAILED_PRECONDITION
     without a leader address)";

/// Operators' client of the clearml-fleet coordinator's FleetService.
#[derive(Debug, Parser)]
#[command(name = "fleetctl", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Coordinator replica as http://HOST:PORT, or https://HOST:PORT with --ca-file. Repeat it to list
    /// several replicas, which are tried in order until one responds.
    #[arg(
        long = "endpoint",
        value_name = "URL",
        env = "FLEET_ENDPOINTS",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINT,
        global = true
    )]
    pub endpoints: Vec<String>,

    /// File that contains the API token. It overrides the environment variable FLEET_TOKEN.
    #[arg(long, value_name = "PATH", global = true)]
    pub token_file: Option<PathBuf>,

    /// PEM file with the CA certificate that signed the coordinator's certificate, needed for https://
    /// endpoints.
    #[arg(long, value_name = "PEM", global = true)]
    pub ca_file: Option<PathBuf>,

    /// Time limit in seconds for connecting to one replica and for each call.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600),
        global = true
    )]
    pub timeout: u64,

    /// Output format: aligned columns for people, or JSON for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Shows the cluster: leader, term, members, hourly spend and budget.
    Status,
    /// Lists the configured queues: tasks waiting, instances by state, desired instances, pause and limits.
    Queues,
    /// Lists instances, by default every instance that is not terminated.
    Instances {
        /// Only instances of this queue.
        #[arg(long, value_name = "QUEUE")]
        queue: Option<String>,
        /// Only instances in this state. Repeat it or separate states with commas.
        #[arg(
            long = "state",
            value_name = "STATE",
            value_enum,
            value_delimiter = ','
        )]
        states: Vec<StateName>,
    },
    /// Prints the event log after a sequence number, and with --follow new events as they come.
    Events {
        /// Print only events with a sequence number above N.
        #[arg(long, value_name = "N", default_value_t = 0)]
        after: u64,
        /// Keep the stream open and print new events until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Stops an instance from taking new tasks, so it terminates when its task ends.
    Drain {
        /// Instance id, or the record key (launch intent id) of an instance without one.
        id: String,
    },
    /// Terminates an instance: drains it first, or with --force terminates it at once.
    Terminate {
        /// Instance id, or the record key (launch intent id) of an instance without one.
        id: String,
        /// Terminate now, even while the instance runs a task.
        #[arg(long)]
        force: bool,
    },
    /// Stops launches for a queue until it is resumed. Terminations go on.
    Pause {
        /// Name of a configured queue.
        queue: String,
    },
    /// Resumes launches for a paused queue.
    Resume {
        /// Name of a configured queue.
        queue: String,
    },
    /// Overrides a queue's limits at runtime, or with --reset returns to the configured ones.
    Limits(LimitsArgs),
    /// Shows what the scaling policy would do for a queue now, without doing it.
    DryRun {
        /// Name of a configured queue.
        queue: String,
    },
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("change")
        .required(true)
        .multiple(true)
        .args(["min_instances", "max_instances", "min_idle", "max_idle_seconds", "reset"])
))]
pub struct LimitsArgs {
    /// Name of a configured queue.
    pub queue: String,
    /// Instances kept even when the queue is empty.
    #[arg(long, value_name = "N")]
    pub min_instances: Option<u32>,
    /// Maximum of non-terminated instances for the queue, at most the cluster's budget.max_instances.
    #[arg(long, value_name = "N")]
    pub max_instances: Option<u32>,
    /// Idle instances kept ready beyond the waiting tasks.
    #[arg(long, value_name = "N")]
    pub min_idle: Option<u32>,
    /// Seconds an instance may stay idle before it terminates, 10 to 86400. It applies to agents that
    /// register after the change.
    #[arg(long, value_name = "N")]
    pub max_idle_seconds: Option<u32>,
    /// Drop the runtime overrides and return to the configured limits.
    #[arg(
        long,
        conflicts_with_all = ["min_instances", "max_instances", "min_idle", "max_idle_seconds"]
    )]
    pub reset: bool,
}

/// Instance state as the API names it in `QueueStatus.instances`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateName {
    Requested,
    Launching,
    Booting,
    Idle,
    Busy,
    Draining,
    Terminating,
    Terminated,
}

impl StateName {
    pub fn to_proto(self) -> InstanceState {
        match self {
            StateName::Requested => InstanceState::Requested,
            StateName::Launching => InstanceState::Launching,
            StateName::Booting => InstanceState::Booting,
            StateName::Idle => InstanceState::Idle,
            StateName::Busy => InstanceState::Busy,
            StateName::Draining => InstanceState::Draining,
            StateName::Terminating => InstanceState::Terminating,
            StateName::Terminated => InstanceState::Terminated,
        }
    }
}

/// Returns the API's lower-case word for a state number of an `Instance` message.
pub fn state_word(state: i32) -> String {
    match InstanceState::try_from(state) {
        Ok(InstanceState::Unspecified) | Err(_) => format!("unknown({state})"),
        Ok(known) => known
            .as_str_name()
            .trim_start_matches("INSTANCE_STATE_")
            .to_ascii_lowercase(),
    }
}
