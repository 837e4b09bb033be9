//! The ClearML poller of the leader: one `queues.get_all` and one `workers.get_all` per interval for all
//! queues, each fresh observation handed to every queue actor.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, ActorFutureExt, Addr, AsyncContext, Context, SpawnHandle, WrapFuture};

use super::core::{FleetCore, now_ms};
use super::queue::{Observed, QueueActor};
use super::supervisor::stops_on_shutdown;
use crate::poller::ClearmlPoller;

/// Workers silent for longer than this are left out of observations.
const WORKER_LAST_SEEN: Duration = Duration::from_secs(600);

pub struct PollerActor {
    core: Arc<FleetCore>,
    queues: Vec<Addr<QueueActor>>,
    poller: Arc<ClearmlPoller>,
    in_flight: Option<SpawnHandle>,
    /// Consecutive failed polls, to log the first failure and the recovery once each.
    failures: u32,
}

impl PollerActor {
    pub fn new(core: Arc<FleetCore>, queues: Vec<Addr<QueueActor>>) -> Self {
        let names = core
            .config
            .policy
            .queues
            .iter()
            .map(|queue| queue.name.clone())
            .collect();
        let poller = Arc::new(ClearmlPoller::new(
            core.clearml.clone(),
            names,
            WORKER_LAST_SEEN,
        ));
        Self {
            core,
            queues,
            poller,
            in_flight: None,
            failures: 0,
        }
    }

    fn poll(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight.is_some() {
            return;
        }
        let poller = self.poller.clone();
        let started = Duration::from_millis(now_ms());
        let handle = ctx.spawn(
            async move { poller.poll(started).await }
                .into_actor(self)
                .map(|result, actor, _ctx| {
                    actor.in_flight = None;
                    actor.finish(result);
                }),
        );
        self.in_flight = Some(handle);
    }

    fn finish(&mut self, result: Result<crate::poller::Observation, crate::poller::PollError>) {
        let metrics = &self.core.metrics;
        match result {
            Ok(observation) => {
                metrics.inc("fleet_clearml_polls_total", &[("outcome", "ok")]);
                if self.failures > 0 {
                    tracing::info!(
                        failed_polls = self.failures,
                        "ClearML answers again; decisions resume"
                    );
                }
                self.failures = 0;
                for missing in &observation.missing_queues {
                    tracing::warn!(queue = %missing, "the ClearML server has no queue of this name; create it or fix the config");
                }
                for (queue, waiting) in &observation.waiting {
                    metrics.set(
                        "fleet_queue_tasks_waiting",
                        &[("queue", queue)],
                        f64::from(*waiting),
                    );
                }
                self.core.publish_observation(observation);
                for queue in &self.queues {
                    queue.do_send(Observed);
                }
            }
            Err(err) => {
                metrics.inc("fleet_clearml_polls_total", &[("outcome", "error")]);
                self.failures += 1;
                if self.failures == 1 {
                    tracing::warn!(error = %err, "ClearML poll failed; no launch or termination is decided until a poll succeeds");
                } else {
                    tracing::debug!(error = %err, failures = self.failures, "ClearML poll failed again");
                }
            }
        }
    }
}

impl Actor for PollerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.poll(ctx);
        ctx.run_interval(self.core.config.clearml.poll_interval, |actor, ctx| {
            actor.poll(ctx)
        });
    }
}

stops_on_shutdown!(PollerActor);
