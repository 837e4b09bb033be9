//! The reconciler: compares the cloud, the registry and ClearML's workers, in both directions, once per
//! reconcile interval and right after election.
//!
//! - Open launch intents that no cloud call serves are replayed with their client token (a new leader's first
//!   pass replays what its predecessor left open).
//! - Records whose instance the cloud reports gone, or no longer lists, are closed, and their ClearML worker
//!   is unregistered.
//! - Instances with the cluster's tags and no record, older than the grace period, are terminated. An agent
//!   that registers before that with its launch's bootstrap token is adopted instead.
//! - ClearML workers that name a fleet instance the registry does not know are reported.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::{Actor, ActorFutureExt, Addr, AsyncContext, Context, WrapFuture};

use super::cloud::{CloudActor, Launch};
use super::core::{FleetCore, LaunchJob, now_ms};
use super::supervisor::stops_on_shutdown;
use crate::providers::{Instance, TAG_INTENT, TagFilter};
use crate::store::InstanceState;

pub struct Reconciler {
    core: Arc<FleetCore>,
    cloud: Addr<CloudActor>,
    running: bool,
    /// Workers already reported as unknown, so each is reported once.
    reported_workers: BTreeSet<String>,
}

impl Reconciler {
    pub fn new(core: Arc<FleetCore>, cloud: Addr<CloudActor>) -> Self {
        Self {
            core,
            cloud,
            running: false,
            reported_workers: BTreeSet::new(),
        }
    }

    fn run(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            return;
        }
        self.running = true;
        let core = self.core.clone();
        let cloud = self.cloud.clone();
        let reported = self.reported_workers.clone();
        ctx.spawn(
            async move { reconcile(&core, &cloud, reported).await }
                .into_actor(self)
                .map(|reported, actor, _| {
                    actor.running = false;
                    actor.reported_workers = reported;
                }),
        );
    }
}

impl Actor for Reconciler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.run(ctx);
        ctx.run_interval(self.core.config.reconcile_interval, |actor, ctx| {
            actor.run(ctx)
        });
    }
}

stops_on_shutdown!(Reconciler);

async fn reconcile(
    core: &FleetCore,
    cloud: &Addr<CloudActor>,
    mut reported: BTreeSet<String>,
) -> BTreeSet<String> {
    if core.may_act().is_err() {
        return reported;
    }
    replay_open_intents(core, cloud).await;

    let mut listed = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for provider in core.providers.values() {
        if !seen.insert(Arc::as_ptr(provider) as *const () as usize) {
            continue;
        }
        match provider
            .describe(&TagFilter::cluster(&core.config.cluster))
            .await
        {
            Ok(instances) => {
                for instance in instances {
                    listed.insert(instance.id.clone(), instance);
                }
            }
            Err(err) => {
                // Without a full listing, a gone instance and an unknown one look the same, so skip this pass.
                tracing::warn!(provider = provider.name(), error = %err, "describe failed; reconcile skipped");
                return reported;
            }
        }
    }
    if core.may_act().is_err() {
        return reported;
    }
    close_gone_records(core, &listed).await;
    handle_unknown_instances(core, &listed).await;
    report_unknown_workers(core, &mut reported).await;
    reported
}

async fn replay_open_intents(core: &FleetCore, cloud: &Addr<CloudActor>) {
    let in_flight = core.in_flight();
    let intents: Vec<_> = {
        let registry = core.registry.lock().await;
        registry
            .state()
            .intents
            .values()
            .filter(|intent| !in_flight.contains(&intent.id))
            .cloned()
            .collect()
    };
    for intent in intents {
        let request = core.launch_request(&intent);
        cloud.do_send(Launch(LaunchJob {
            intent,
            request,
            planned_price_usd: 0.0,
            replay: true,
        }));
    }
}

async fn close_gone_records(core: &FleetCore, listed: &BTreeMap<String, Instance>) {
    let grace = core.config.orphan_grace.as_millis() as u64;
    let now = now_ms();
    let mut registry = core.registry.lock().await;
    let gone: Vec<(String, String, Option<String>)> = registry
        .state()
        .instances
        .values()
        .filter(|record| {
            matches!(
                record.state,
                InstanceState::Booting
                    | InstanceState::Idle
                    | InstanceState::Busy
                    | InstanceState::Draining
                    | InstanceState::Terminating
            )
        })
        .filter_map(|record| {
            let id = record.instance_id.as_ref()?;
            let reason = match listed.get(id) {
                Some(instance) if instance.state.is_terminal() => {
                    format!("the cloud reports the instance {:?}", instance.state)
                }
                Some(_) => return None,
                // A fresh launch may not be listed yet.
                None if now.saturating_sub(record.state_since_ms) < grace => return None,
                None => "the cloud no longer lists the instance".to_owned(),
            };
            Some((record.key.clone(), reason, record.worker_id.clone()))
        })
        .collect();
    for (key, reason, worker) in gone {
        if core.may_act().is_err() {
            return;
        }
        if let Err(err) = registry.mark_terminated(&key, &reason, now_ms()).await {
            tracing::warn!(instance = %key, error = %err, "closing a gone instance failed");
            continue;
        }
        if let Some(worker) = worker
            && let Err(err) = core.clearml.workers().unregister(&worker).await
        {
            tracing::debug!(worker = %worker, error = %err, "unregistering the worker of a gone instance failed");
        }
    }
}

async fn handle_unknown_instances(core: &FleetCore, listed: &BTreeMap<String, Instance>) {
    let grace = core.config.orphan_grace;
    let known: BTreeSet<String> = {
        let registry = core.registry.lock().await;
        registry
            .state()
            .instances
            .values()
            .filter_map(|record| record.instance_id.clone())
            .collect()
    };
    let mut unknown = BTreeMap::new();
    for instance in listed.values() {
        if instance.state.is_terminal() || known.contains(&instance.id) {
            continue;
        }
        let age = instance
            .launch_time
            .and_then(|launched| SystemTime::now().duration_since(launched).ok())
            .unwrap_or(Duration::ZERO);
        if age < grace {
            unknown.insert(instance.id.clone(), instance.clone());
            continue;
        }
        if core.may_act().is_err() {
            return;
        }
        let Some(resource) = instance.tag(crate::providers::TAG_RESOURCE) else {
            continue;
        };
        let intent = instance.tag(TAG_INTENT).unwrap_or("unknown");
        tracing::warn!(instance = %instance.id, intent = %intent, age_s = age.as_secs(), "terminating an instance with this cluster's tags and no record");
        core.metrics.inc("fleet_orphans_terminated_total", &[]);
        let Some(provider) = core.provider_of(resource) else {
            continue;
        };
        match provider.terminate(std::slice::from_ref(&instance.id)).await {
            Ok(_) => {
                let mut registry = core.registry.lock().await;
                let _ = registry
                    .record_event(
                        "instance.orphan_terminated",
                        instance.tag(crate::providers::TAG_QUEUE),
                        Some(&instance.id),
                        format!(
                            "instance of launch {intent} had no record for {} s and no agent registered; terminated",
                            age.as_secs()
                        ),
                        now_ms(),
                    )
                    .await;
            }
            Err(err) => {
                tracing::warn!(instance = %instance.id, error = %err, "terminating an orphan failed; retried next pass")
            }
        }
    }
    core.set_unknown(unknown);
}

async fn report_unknown_workers(core: &FleetCore, reported: &mut BTreeSet<String>) {
    let Some(observation) = core.latest_observation() else {
        return;
    };
    let prefix = format!("{}:", core.config.worker_prefix);
    let known: BTreeSet<String> = {
        let registry = core.registry.lock().await;
        registry
            .state()
            .instances
            .values()
            // A terminated record's worker may still be listed until ClearML drops it; it is not unknown.
            .filter_map(|record| record.worker_id.clone())
            .collect()
    };
    for worker in observation.workers.keys() {
        if !worker.starts_with(&prefix) || known.contains(worker) || reported.contains(worker) {
            continue;
        }
        reported.insert(worker.clone());
        tracing::warn!(worker = %worker, "a ClearML worker claims a fleet instance this cluster has no record of");
        let mut registry = core.registry.lock().await;
        let _ = registry
            .record_event(
                "worker.unknown",
                None,
                None,
                format!("ClearML worker {worker} claims a fleet instance that has no record"),
                now_ms(),
            )
            .await;
    }
}
