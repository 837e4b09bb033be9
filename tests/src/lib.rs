//! Test support for clearml-fleet: the ClearML API emulator, the EC2 test server, the process harness, the
//! fake worker and the fleet simulator.

pub mod cluster;
pub mod demo;
pub mod ec2;
pub mod emulator;
pub mod etcd;
pub mod fake_worker;
pub mod harness;
pub mod node;
pub mod sim;
