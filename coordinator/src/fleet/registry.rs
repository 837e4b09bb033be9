//! The registry actor: the upkeep of the leader's records. It stores the offering backoffs the providers
//! report, so a new leader skips the same offerings, refreshes the instance metrics, and prunes old records.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, WrapFuture};
use tokio::sync::broadcast;

use super::core::{FleetCore, now_ms};
use super::supervisor::stops_on_shutdown;
use crate::providers::ProviderEvent;
use crate::store::{BackoffRecord, InstanceState, QueueDepths};

/// How often metrics are refreshed and records pruned.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How long terminated records stay, for `fleetctl` and the reconciler.
const TERMINATED_RETENTION: Duration = Duration::from_secs(3600);
/// Age after which unchanged waiting-task counts are stored again, so followers can tell they are current.
const QUEUE_DEPTHS_REFRESH: Duration = Duration::from_secs(30);

pub struct RegistryActor {
    core: Arc<FleetCore>,
}

impl RegistryActor {
    pub fn new(core: Arc<FleetCore>) -> Self {
        Self { core }
    }
}

impl Actor for RegistryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let mut seen = std::collections::BTreeSet::new();
        for provider in self.core.providers.values() {
            // Several resources share a provider; subscribe once per provider.
            if !seen.insert(Arc::as_ptr(provider) as *const () as usize) {
                continue;
            }
            let events = provider.subscribe();
            let core = self.core.clone();
            ctx.spawn(persist_events(core, events).into_actor(self));
        }
        refresh_metrics(&self.core);
        ctx.run_interval(UPKEEP_INTERVAL, |actor, ctx| {
            let core = actor.core.clone();
            ctx.spawn(
                async move {
                    refresh_metrics_async(&core).await;
                    if core.may_act().is_ok() {
                        let mut registry = core.registry.lock().await;
                        if let Err(err) = registry
                            .prune(TERMINATED_RETENTION.as_millis() as u64, now_ms())
                            .await
                        {
                            tracing::debug!(error = %err, "pruning records failed");
                        }
                        if let Some(observation) = core.latest_observation() {
                            let depths = QueueDepths {
                                observed_ms: observation.taken_at.as_millis() as u64,
                                waiting: observation.waiting.clone(),
                            };
                            if let Err(err) = registry
                                .put_queue_depths(depths, QUEUE_DEPTHS_REFRESH.as_millis() as u64)
                                .await
                            {
                                tracing::debug!(error = %err, "storing the waiting-task counts failed");
                            }
                        }
                    }
                }
                .into_actor(actor),
            );
        });
    }
}

stops_on_shutdown!(RegistryActor);

async fn persist_events(core: Arc<FleetCore>, mut events: broadcast::Receiver<ProviderEvent>) {
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "provider events dropped");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if core.may_act().is_err() {
            return;
        }
        let mut registry = core.registry.lock().await;
        let result = match event {
            ProviderEvent::OfferingBackedOff {
                offering,
                code,
                message,
                failures,
                until,
            } => {
                let text = format!(
                    "offering {offering} backed off for {} s after {code}: {message}",
                    until
                        .saturating_sub(Duration::from_millis(now_ms()))
                        .as_secs()
                );
                registry
                    .put_backoff(
                        BackoffRecord {
                            offering: offering.key(),
                            failures,
                            until_ms: until.as_millis() as u64,
                        },
                        text,
                        now_ms(),
                    )
                    .await
            }
            ProviderEvent::ResourceDisabled(detail) => {
                registry
                    .record_event(
                        "resource.disabled",
                        None,
                        None,
                        format!("resource {} disabled: {detail}", detail.resource),
                        now_ms(),
                    )
                    .await
            }
            ProviderEvent::ResourceEnabled { resource } => {
                registry
                    .record_event(
                        "resource.enabled",
                        None,
                        None,
                        format!("resource {resource} enabled again"),
                        now_ms(),
                    )
                    .await
            }
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, "provider event not stored");
        }
    }
}

fn refresh_metrics(core: &FleetCore) {
    if let Ok(registry) = core.registry.try_lock() {
        publish(core, registry.state());
    }
}

async fn refresh_metrics_async(core: &FleetCore) {
    let registry = core.registry.lock().await;
    publish(core, registry.state());
}

fn publish(core: &FleetCore, state: &crate::store::State) {
    let mut counts: std::collections::BTreeMap<(String, String), f64> = Default::default();
    let mut spend = 0.0;
    for record in state.instances.values() {
        if record.state == InstanceState::Terminated {
            continue;
        }
        spend += record.hourly_price_usd;
        *counts
            .entry((record.queue.clone(), state_name(record.state).to_owned()))
            .or_default() += 1.0;
    }
    core.metrics.replace(
        "fleet_instances",
        counts
            .into_iter()
            .map(|((queue, state), count)| (vec![("queue", queue), ("state", state)], count))
            .collect(),
    );
    core.metrics.set("fleet_hourly_spend_usd", &[], spend);
}

/// Returns the lower-case name of a state, as the API and metrics show it.
pub fn state_name(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Requested => "requested",
        InstanceState::Launching => "launching",
        InstanceState::Booting => "booting",
        InstanceState::Idle => "idle",
        InstanceState::Busy => "busy",
        InstanceState::Draining => "draining",
        InstanceState::Terminating => "terminating",
        InstanceState::Terminated => "terminated",
    }
}
