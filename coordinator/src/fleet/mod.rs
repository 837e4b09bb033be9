//! The leader's fleet: the actors that run while this replica leads, and the state they share.
//!
//! [`start`] runs on election. It loads the registry under the new term and starts the actors:
//! - [`Supervisor`](supervisor::Supervisor) owns the others and stops them all at once;
//! - [`ClearmlPoller`](poller::PollerActor) polls ClearML once per interval for every queue;
//! - one [`QueueActor`](queue::QueueActor) per queue runs the policy on each fresh observation;
//! - [`CloudActor`](cloud::CloudActor) makes the launch and terminate calls;
//! - [`RegistryActor`](registry::RegistryActor) serializes every change of the registry;
//! - [`Reconciler`](reconciler::Reconciler) compares the cloud, the registry and ClearML's workers.
//!
//! [`FleetCore`] is the state of one term that they share. Every cloud call first checks that the term is
//! still current, and every state write is fenced by the term in etcd, so a deposed leader neither calls the
//! cloud nor changes the records.

mod cloud;
mod core;
mod poller;
mod queue;
mod reconciler;
mod registry;
mod supervisor;

use std::sync::Arc;

use actix::{Actor, Addr};

pub use self::core::{
    FleetCore, FleetError, LaunchJob, NotLeader, QueuePlan, TerminateJob, now_ms,
};
pub use cloud::{CloudActor, Launch, Terminate};
pub use registry::{RegistryActor, state_name};
pub use supervisor::{Shutdown, Supervisor};

/// Handles of a running fleet, which the API servers use while this replica leads.
#[derive(Clone)]
pub struct FleetHandle {
    pub core: Arc<FleetCore>,
    pub supervisor: Addr<Supervisor>,
    pub registry: Addr<RegistryActor>,
    pub cloud: Addr<CloudActor>,
}

impl FleetHandle {
    /// Stops every actor of the fleet. The term's core refuses further cloud calls at once, before the actors
    /// have stopped.
    pub fn stop(&self) {
        self.core.stop();
        self.supervisor.do_send(Shutdown);
    }
}

/// Starts the fleet's actors on the current actix arbiter, for `core`'s term.
pub fn start(core: Arc<FleetCore>) -> FleetHandle {
    let registry = RegistryActor::new(core.clone()).start();
    let cloud = CloudActor::new(core.clone()).start();
    let supervisor = Supervisor::new(core.clone(), registry.clone(), cloud.clone()).start();
    FleetHandle {
        core,
        supervisor,
        registry,
        cloud,
    }
}
