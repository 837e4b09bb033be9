//! The supervisor: started on election, it starts the poller, one queue actor per configured queue and the
//! reconciler, and stops all of them, with the cloud and registry actors, when leadership ends.

use std::sync::Arc;

use actix::{Actor, ActorContext, Addr, Context, Handler, Message};

use super::cloud::CloudActor;
use super::core::FleetCore;
use super::poller::PollerActor;
use super::queue::QueueActor;
use super::reconciler::Reconciler;
use super::registry::RegistryActor;

/// Stops an actor of the fleet.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

pub struct Supervisor {
    core: Arc<FleetCore>,
    registry: Addr<RegistryActor>,
    cloud: Addr<CloudActor>,
    queues: Vec<Addr<QueueActor>>,
    poller: Option<Addr<PollerActor>>,
    reconciler: Option<Addr<Reconciler>>,
}

impl Supervisor {
    pub fn new(
        core: Arc<FleetCore>,
        registry: Addr<RegistryActor>,
        cloud: Addr<CloudActor>,
    ) -> Self {
        Self {
            core,
            registry,
            cloud,
            queues: Vec::new(),
            poller: None,
            reconciler: None,
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        self.queues = self
            .core
            .config
            .policy
            .queues
            .iter()
            .map(|queue| {
                QueueActor::new(self.core.clone(), queue.name.clone(), self.cloud.clone()).start()
            })
            .collect();
        self.poller = Some(PollerActor::new(self.core.clone(), self.queues.clone()).start());
        self.reconciler = Some(Reconciler::new(self.core.clone(), self.cloud.clone()).start());
        tracing::info!(
            term = self.core.term,
            queues = self.queues.len(),
            "fleet started"
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        tracing::info!(term = self.core.term, "fleet stopped");
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) {
        self.core.stop();
        for queue in &self.queues {
            queue.do_send(Shutdown);
        }
        if let Some(poller) = &self.poller {
            poller.do_send(Shutdown);
        }
        if let Some(reconciler) = &self.reconciler {
            reconciler.do_send(Shutdown);
        }
        self.cloud.do_send(Shutdown);
        self.registry.do_send(Shutdown);
        ctx.stop();
    }
}

/// Implements [`Shutdown`] for an actor by stopping its context, which drops its timers and the futures it
/// spawned (cloud calls in flight included).
macro_rules! stops_on_shutdown {
    ($actor:ty) => {
        impl actix::Handler<$crate::fleet::supervisor::Shutdown> for $actor {
            type Result = ();

            fn handle(&mut self, _: $crate::fleet::supervisor::Shutdown, ctx: &mut Self::Context) {
                actix::ActorContext::stop(ctx);
            }
        }
    };
}
pub(crate) use stops_on_shutdown;
