//! The clearml-fleet coordinator: decides how many instances each ClearML queue needs.

pub mod auth;
pub mod config;
pub mod election;
pub mod etcd;
pub mod failpoint;
pub mod fleet;
pub mod import;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod poller;
pub mod providers;
pub mod registry;
pub mod server;
pub mod store;
