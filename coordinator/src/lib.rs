//! The clearml-fleet coordinator: decides how many instances each ClearML queue needs.

pub mod policy;
pub mod providers;
