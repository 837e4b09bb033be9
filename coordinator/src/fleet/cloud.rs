//! The cloud actor: makes every launch and terminate call of the leader and records the outcome.
//!
//! A launch follows the intent protocol: the intent is stored (by the queue's policy run), the records move
//! to `launching`, the provider is called with the intent id as client token, and the instances are recorded.
//! A crash anywhere in between leaves the intent open, and the next leader replays it with the same token.

use std::sync::Arc;

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, WrapFuture};

use super::core::{FleetCore, LaunchJob, TerminateJob, now_ms};
use super::supervisor::stops_on_shutdown;
use crate::failpoint;
use crate::providers::{ErrorClass, LaunchOutcome, Offering, ProviderError};
use crate::registry::Launched;
use crate::store::{BackoffRecord, LaunchIntent};

#[derive(Message)]
#[rtype(result = "()")]
pub struct Launch(pub LaunchJob);

#[derive(Message)]
#[rtype(result = "()")]
pub struct Terminate(pub TerminateJob);

pub struct CloudActor {
    core: Arc<FleetCore>,
}

impl CloudActor {
    pub fn new(core: Arc<FleetCore>) -> Self {
        Self { core }
    }
}

impl Actor for CloudActor {
    type Context = Context<Self>;
}

impl Handler<Launch> for CloudActor {
    type Result = ();

    fn handle(&mut self, Launch(job): Launch, ctx: &mut Self::Context) {
        if !self.core.begin_launch(&job.intent.id) {
            return;
        }
        let core = self.core.clone();
        let intent_id = job.intent.id.clone();
        ctx.spawn(
            async move { launch(&core, job).await }
                .into_actor(self)
                .map(move |_, actor, _| actor.core.end_launch(&intent_id)),
        );
    }
}

impl Handler<Terminate> for CloudActor {
    type Result = ();

    fn handle(&mut self, Terminate(job): Terminate, ctx: &mut Self::Context) {
        let core = self.core.clone();
        ctx.spawn(async move { terminate(&core, job).await }.into_actor(self));
    }
}

stops_on_shutdown!(CloudActor);

async fn launch(core: &FleetCore, job: LaunchJob) {
    let intent = &job.intent;
    if let Err(err) = core.may_act() {
        tracing::debug!(intent = %intent.id, error = %err, "launch not sent");
        return;
    }
    let Some(provider) = core.provider_of(&intent.resource).cloned() else {
        let reason = format!("resource {} has no provider", intent.resource);
        record_failure(core, &intent.id, &reason).await;
        return;
    };
    {
        let mut registry = core.registry.lock().await;
        if !registry.state().intents.contains_key(&intent.id) {
            return;
        }
        if let Err(err) = registry.mark_launching(&intent.id, now_ms()).await {
            core.metrics.inc("fleet_state_write_errors_total", &[]);
            tracing::warn!(intent = %intent.id, error = %err, "launch not sent: the launching state was not stored");
            return;
        }
    }
    failpoint::hit(failpoint::AFTER_INTENT);
    if core.may_act().is_err() {
        return;
    }
    if job.replay {
        core.metrics.inc("fleet_intents_replayed_total", &[]);
        tracing::info!(intent = %intent.id, "replaying open launch intent with its client token");
    }

    let result = provider
        .launch(&job.request, intent.count, &intent.id)
        .await;
    failpoint::hit(failpoint::AFTER_LAUNCH);
    let labels = [
        ("queue", intent.queue.as_str()),
        ("resource", intent.resource.as_str()),
    ];
    match result {
        Ok(outcome) if !outcome.instances.is_empty() => {
            let launched = launched(&*provider, &outcome, job.planned_price_usd);
            core.metrics
                .add("fleet_launches_total", &labels, launched.len() as f64);
            if let Some(err) = &outcome.stopped_by {
                tracing::warn!(intent = %intent.id, error = %err, launched = launched.len(), "launch stopped part way");
            }
            let mut registry = core.registry.lock().await;
            if let Err(err) = registry
                .record_launched(&intent.id, &launched, now_ms())
                .await
            {
                core.metrics.inc("fleet_state_write_errors_total", &[]);
                tracing::warn!(intent = %intent.id, error = %err, "launched instances not recorded; the intent stays open and is replayed");
            }
        }
        Ok(outcome) => {
            core.metrics.inc("fleet_launch_failures_total", &labels);
            match &outcome.stopped_by {
                Some(err) => {
                    let reason = err.to_string();
                    record_failure(core, &intent.id, &reason).await;
                    back_off_resource(core, intent, &reason).await;
                }
                // Every offering failed on capacity: the provider backed off each one already.
                None => {
                    let reason = format!(
                        "no offering had capacity ({} capacity error(s), {} offering(s) in backoff)",
                        outcome.capacity_failures.len(),
                        outcome.skipped_in_backoff.len()
                    );
                    record_failure(core, &intent.id, &reason).await;
                }
            }
        }
        Err(err) if keeps_intent_open(&err) => {
            core.metrics.inc("fleet_launch_failures_total", &labels);
            tracing::warn!(intent = %intent.id, error = %err, "launch failed with a transient error; the intent stays open and is replayed with the same client token");
        }
        Err(err) => {
            core.metrics.inc("fleet_launch_failures_total", &labels);
            let reason = err.to_string();
            record_failure(core, &intent.id, &reason).await;
            if !matches!(err, ProviderError::NoCapacity { .. }) {
                back_off_resource(core, intent, &reason).await;
            }
        }
    }
}

/// Errors after which the first call may still have launched: the intent stays open and is replayed with
/// the same client token, which returns what the first call launched.
fn keeps_intent_open(err: &ProviderError) -> bool {
    match err {
        ProviderError::Unavailable { .. } | ProviderError::Throttled { .. } => true,
        ProviderError::Api { code, .. } => {
            crate::providers::error::classify(Some(code), None) == ErrorClass::Transient
        }
        _ => false,
    }
}

/// Backs off every offering of the intent's resource after a failure that another try would repeat (an
/// unknown error code, a disabled resource), with the schedule of capacity backoffs: 3 min doubling to 30 min.
// NOTE: no command ends these backoffs early. After the cause is fixed, launches wait until they expire.
async fn back_off_resource(core: &FleetCore, intent: &LaunchIntent, reason: &str) {
    let Some(resource) = core
        .config
        .policy
        .queue(&intent.queue)
        .and_then(|queue| queue.resource(&intent.resource))
    else {
        return;
    };
    let now = now_ms();
    let schedule = &core.config.policy.backoff;
    let mut registry = core.registry.lock().await;
    let backoffs: Vec<BackoffRecord> = resource
        .offerings
        .iter()
        .map(|offering| {
            let failures = registry
                .state()
                .backoffs
                .get(&offering.id)
                .map_or(0, |previous| previous.failures)
                + 1;
            BackoffRecord {
                offering: offering.id.clone(),
                failures,
                until_ms: now + schedule.delay(failures).as_millis() as u64,
            }
        })
        .collect();
    let Some(longest) = backoffs.iter().map(|backoff| backoff.until_ms).max() else {
        return;
    };
    let message = format!(
        "resource {} backed off for {} s after a failed launch: {reason}",
        intent.resource,
        longest.saturating_sub(now) / 1000
    );
    tracing::warn!(resource = %intent.resource, queue = %intent.queue, backoff_s = longest.saturating_sub(now) / 1000, "launches on the resource paused after a failed launch");
    if let Err(err) = registry
        .back_off_resource(&intent.queue, &intent.resource, backoffs, message, now)
        .await
    {
        core.metrics.inc("fleet_state_write_errors_total", &[]);
        tracing::warn!(resource = %intent.resource, error = %err, "resource backoff not stored");
    }
}

async fn record_failure(core: &FleetCore, intent_id: &str, reason: &str) {
    tracing::warn!(intent = %intent_id, reason = %reason, "launch failed");
    let mut registry = core.registry.lock().await;
    if let Err(err) = registry
        .record_launch_failed(intent_id, reason, now_ms())
        .await
    {
        core.metrics.inc("fleet_state_write_errors_total", &[]);
        tracing::warn!(intent = %intent_id, error = %err, "failed launch not recorded");
    }
}

fn launched(
    provider: &dyn crate::providers::CloudProvider,
    outcome: &LaunchOutcome,
    planned_price_usd: f64,
) -> Vec<Launched> {
    outcome
        .instances
        .iter()
        .map(|instance| {
            let offering = Offering {
                instance_type: instance.instance_type.clone().unwrap_or_default(),
                zone: instance.zone.clone().unwrap_or_default(),
                market: instance.market,
            };
            Launched {
                instance_id: instance.id.clone(),
                hourly_price_usd: provider
                    .hourly_price(&offering)
                    .unwrap_or(planned_price_usd),
                offering: offering.key(),
            }
        })
        .collect()
}

async fn terminate(core: &FleetCore, job: TerminateJob) {
    if core.may_act().is_err() {
        return;
    }
    let now = now_ms();
    {
        let mut registry = core.registry.lock().await;
        if let Err(err) = registry.mark_terminating(&job.key, &job.reason, now).await {
            tracing::debug!(instance = %job.key, error = %err, "termination not recorded");
            return;
        }
    }
    core.metrics.inc(
        "fleet_terminations_total",
        &[("reason", job.reason.as_str())],
    );
    let Some(instance_id) = job.instance_id.clone() else {
        // The cloud never returned an id: nothing runs under this record.
        let mut registry = core.registry.lock().await;
        let _ = registry
            .mark_terminated(&job.key, &job.reason, now_ms())
            .await;
        return;
    };
    let Some(provider) = core.provider_of(&job.resource).cloned() else {
        return;
    };
    if core.may_act().is_err() {
        return;
    }
    match provider.terminate(std::slice::from_ref(&instance_id)).await {
        Ok(outcome) if outcome.not_found.contains(&instance_id) => {
            let mut registry = core.registry.lock().await;
            let _ = registry
                .mark_terminated(&job.key, "the cloud no longer knows the instance", now_ms())
                .await;
        }
        Ok(_) => {
            tracing::info!(instance = %instance_id, reason = %job.reason, "terminate call accepted");
        }
        Err(err) => {
            tracing::warn!(instance = %instance_id, error = %err, "terminate call failed; the reconciler retries");
        }
    }
}
