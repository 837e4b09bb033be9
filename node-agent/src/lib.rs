//! The clearml-fleet node agent, which runs on every instance beside `clearml-agent`.
//!
//! It registers with the coordinator, runs clearml-agent behind a local API gate that observes which task the
//! worker holds, requests permission to terminate from the coordinator when the machine idles, and puts a running
//! task back at the head of its queue when the cloud reclaims the machine.

pub mod clearml_conf;
pub mod config;
pub mod controller;
pub mod coordinator;
pub mod gate;
pub mod grpc;
pub mod imds;
pub mod logs;
pub mod metrics;
pub mod policy;
pub mod requeue;
pub mod run;
pub mod shutdown;
pub mod supervisor;

/// Returns the wall-clock time in milliseconds since the UNIX epoch, for the timestamps in gRPC messages.
pub fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
