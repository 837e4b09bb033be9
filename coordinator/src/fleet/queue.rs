//! One actor per queue: on each fresh observation it runs the policy for its queue and hands the launches and
//! terminations it decided to the cloud actor.

use std::sync::Arc;

use actix::{Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, WrapFuture};

use super::cloud::{CloudActor, Launch, Terminate};
use super::core::{FleetCore, FleetError};
use super::supervisor::stops_on_shutdown;

/// A new observation is published in the core.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Observed;

pub struct QueueActor {
    core: Arc<FleetCore>,
    queue: String,
    cloud: Addr<CloudActor>,
    planning: bool,
    /// An observation arrived while a plan ran; plan again when it ends.
    pending: bool,
}

impl QueueActor {
    pub fn new(core: Arc<FleetCore>, queue: String, cloud: Addr<CloudActor>) -> Self {
        Self {
            core,
            queue,
            cloud,
            planning: false,
            pending: false,
        }
    }

    fn plan(&mut self, ctx: &mut Context<Self>) {
        if self.planning {
            self.pending = true;
            return;
        }
        self.planning = true;
        self.pending = false;
        let core = self.core.clone();
        let queue = self.queue.clone();
        ctx.spawn(
            async move { core.plan_queue(&queue).await }
                .into_actor(self)
                .map(|result, actor, ctx| {
                    actor.planning = false;
                    actor.apply(result);
                    if actor.pending {
                        actor.plan(ctx);
                    }
                }),
        );
    }

    fn apply(&mut self, result: Result<super::core::QueuePlan, FleetError>) {
        match result {
            Ok(plan) => {
                for held in &plan.held {
                    tracing::debug!(queue = %self.queue, held = %held, "shortfall held");
                }
                for job in plan.launches {
                    tracing::info!(
                        queue = %self.queue,
                        resource = %job.intent.resource,
                        count = job.intent.count,
                        intent = %job.intent.id,
                        "launch decided"
                    );
                    self.cloud.do_send(Launch(job));
                }
                for job in plan.terminations {
                    tracing::info!(queue = %self.queue, instance = %job.key, reason = %job.reason, "termination decided");
                    self.cloud.do_send(Terminate(job));
                }
            }
            Err(FleetError::NotLeader(_)) => {}
            Err(err @ (FleetError::Stale { .. } | FleetError::NoObservation)) => {
                tracing::debug!(queue = %self.queue, error = %err, "no decision");
            }
            Err(err) => {
                self.core.metrics.inc("fleet_state_write_errors_total", &[]);
                tracing::warn!(queue = %self.queue, error = %err, "policy run failed");
            }
        }
    }
}

impl Actor for QueueActor {
    type Context = Context<Self>;
}

impl Handler<Observed> for QueueActor {
    type Result = ();

    fn handle(&mut self, _: Observed, ctx: &mut Self::Context) {
        self.plan(ctx);
    }
}

stops_on_shutdown!(QueueActor);
