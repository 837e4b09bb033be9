//! Starts and cleans up the external processes that tests need: Python clients, etcd, moto.
//!
//! The helpers: a free loopback port, a guard that kills a child's whole process group when dropped, the Python
//! venv with the real ClearML clients, a deadline-bound wait, and a per-test temporary directory. The guard means
//! no process outlives a failed test.

mod local_instances;
mod partition;
mod paths;
mod process;
mod wait;

pub use local_instances::LocalInstances;
pub use partition::PartitionProxy;
pub use paths::{TestDir, free_port, venv_bin, venv_dir};
pub use process::ChildProcess;
pub use wait::{wait_until, wait_until_async};

/// Errors of the test harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "failed to spawn {name} ({program}): {source}; check that the program exists and is executable"
    )]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to create log file {path}: {source}")]
    LogFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to create a temporary directory for test {test}: {source}")]
    TempDir {
        test: String,
        #[source]
        source: std::io::Error,
    },

    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        what: String,
        waited: std::time::Duration,
    },

    #[error("{name} exited ({status}) before it was ready; its last log lines:\n{log}")]
    Exited {
        name: String,
        status: String,
        log: String,
    },
}
