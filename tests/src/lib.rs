//! Test support for clearml-fleet: the ClearML API emulator, the process harness and the fleet simulator.

pub mod emulator;
pub mod fake_worker;
pub mod harness;
pub mod sim;
