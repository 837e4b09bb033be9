//! The clearml-fleet coordinator: decides how many instances each ClearML queue needs.

pub mod election;
pub mod config;
pub mod etcd;
pub mod policy;
pub mod providers;
pub mod store;
