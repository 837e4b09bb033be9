//! The agent's main loop: idle checks, the termination protocol, spot notices, SIGTERM and operator commands.
//!
//! The termination protocol closes the gate before it requests termination from the coordinator, not after the grant. Closing waits
//! for polls already forwarded, so when the gate reports no held task, none can start until it opens again:
//! a grant then never races with a task taken in between. A refusal or a failed request opens the gate again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_proto::v1::{
    AgentState, HealthReport, HeartbeatRequest, InterruptionKind, InterruptionReport,
    TerminationRequest,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::coordinator::CoordinatorClient;
use crate::gate::{Gate, HeldTask};
use crate::imds::Notice;
use crate::logs::LogBuffer;
use crate::policy::{self, CheckAction, CheckInput, Timeouts};
use crate::requeue::{self, RequeueReason};
use crate::shutdown::ShutdownAction;
use crate::supervisor::{ChildStatus, Supervisor};

/// Requests from the NodeAgent gRPC server and the heartbeat task.
#[derive(Debug)]
pub enum Command {
    /// Close the gate for good; the reply is the task still running.
    Drain {
        reason: String,
        reply: oneshot::Sender<Option<String>>,
    },
    /// Drain, then stop and power off: at once with the running task requeued, or when it ends.
    Shutdown {
        reason: String,
        requeue_running_task: bool,
    },
}

/// The reason the main loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The shutdown action ran.
    PoweredOff,
    /// SIGTERM: clearml-agent stopped and the worker was unregistered, the machine stays up.
    Stopped,
}

/// The agent's registration data and the parts it drives.
pub struct Agent {
    pub instance_id: String,
    pub worker_id: String,
    pub timeouts: Timeouts,
    pub check_interval: Duration,
    pub coordinator: Arc<CoordinatorClient>,
    /// Client of the ClearML API server itself, not the gate, for unregistering and requeueing.
    pub clearml: clearml_api::Client,
    pub gate: Gate,
    pub supervisor: Arc<Supervisor>,
    pub logs: Arc<LogBuffer>,
    pub shutdown_action: Arc<ShutdownAction>,
    pub contact: Arc<Contact>,
    pub started_at: Instant,
    /// Sender of the main loop's command channel, for decisions made in spawned tasks.
    pub commands: mpsc::Sender<Command>,
}

/// The time of the last successful coordinator call, shared by the heartbeat task and the main loop.
#[derive(Debug)]
pub struct Contact(Mutex<Instant>);

impl Contact {
    pub fn new(now: Instant) -> Contact {
        Contact(Mutex::new(now))
    }

    pub fn record(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    pub fn last(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Returns the state to report for a gate and supervisor state.
pub fn agent_state(gate: &Gate, child: &ChildStatus) -> AgentState {
    let snapshot = gate.snapshot();
    if child.crash_loop {
        AgentState::Unhealthy
    } else if snapshot.draining {
        AgentState::Draining
    } else if snapshot.held.is_some() {
        AgentState::Busy
    } else if !snapshot.worker_ready {
        AgentState::Starting
    } else {
        AgentState::Idle
    }
}

/// The loop's own state between events.
struct LoopState {
    next_request_at: Instant,
    /// An operator or the coordinator asked to drain; the gate stays closed.
    drain_requested: bool,
    /// The gate was closed because the coordinator is gone while a task runs.
    orphan_drain: bool,
    /// Power off once the worker is idle.
    shutdown_when_idle: Option<String>,
}

impl Agent {
    /// Runs until the machine shuts down or SIGTERM stops the agent.
    pub async fn run(
        self: Arc<Self>,
        mut commands: mpsc::Receiver<Command>,
        mut notices: mpsc::Receiver<Notice>,
        mut sigterm: mpsc::Receiver<()>,
    ) -> Exit {
        let mut state = LoopState {
            next_request_at: Instant::now(),
            drain_requested: false,
            orphan_drain: false,
            shutdown_when_idle: None,
        };
        let mut child_status = self.supervisor.subscribe();
        let mut ticker = tokio::time::interval(self.check_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Some(exit) = self.check(&mut state).await {
                        return exit;
                    }
                }
                Some(command) = commands.recv() => self.handle_command(command, &mut state).await,
                Some(notice) = notices.recv() => return self.interrupt(notice).await,
                Some(()) = sigterm.recv() => return self.stop_on_sigterm().await,
                Ok(()) = child_status.changed() => {
                    let crash_loop = child_status.borrow_and_update().crash_loop;
                    self.spawn_health_report(crash_loop);
                }
            }
        }
    }

    async fn check(&self, state: &mut LoopState) -> Option<Exit> {
        self.requeue_dropped().await;

        let snapshot = self.gate.snapshot();
        let now = Instant::now();

        if let Some(reason) = &state.shutdown_when_idle
            && snapshot.held.is_none()
        {
            let reason = reason.clone();
            return Some(self.power_off(&reason).await);
        }

        let input = CheckInput {
            now,
            idle_since: snapshot.idle_since,
            busy: snapshot.held.is_some(),
            last_contact: self.contact.last(),
            next_request_at: state.next_request_at,
        };
        if state.orphan_drain
            && now.duration_since(input.last_contact) < self.timeouts.orphan_timeout
        {
            tracing::info!(instance_id = %self.instance_id, "coordinator reachable again; opening the gate");
            state.orphan_drain = false;
            self.open_gate_unless_drained(state);
        }
        match policy::check(input, &self.timeouts) {
            CheckAction::Nothing => None,
            CheckAction::RequestTermination => self.request_termination(state).await,
            CheckAction::TerminateOrphan => {
                if self.gate.close().await.is_some() {
                    // A poll forwarded just before the close took a task; it runs to the end first.
                    state.orphan_drain = true;
                    return None;
                }
                tracing::warn!(instance_id = %self.instance_id, orphan_timeout_s = self.timeouts.orphan_timeout.as_secs(), "no coordinator for the orphan timeout while idle; terminating without a grant");
                Some(self.power_off("orphaned").await)
            }
            CheckAction::DrainOrphan => {
                if !state.orphan_drain {
                    tracing::warn!(instance_id = %self.instance_id, task_id = ?snapshot.held.as_ref().map(|t| &t.task_id), "no coordinator for the orphan timeout while busy; taking no new task and terminating when this one ends");
                    state.orphan_drain = true;
                    self.gate.close().await;
                }
                None
            }
        }
    }

    /// Closes the gate, confirms the worker took no task, and requests termination from the coordinator.
    async fn request_termination(&self, state: &mut LoopState) -> Option<Exit> {
        if let Some(task) = self.gate.close().await {
            tracing::info!(instance_id = %self.instance_id, task_id = %task.task_id, "worker took a task while the gate closed; not asking to terminate");
            self.open_gate_unless_drained(state);
            return None;
        }

        let idle_seconds = self
            .gate
            .snapshot()
            .idle_since
            .map(|since| since.elapsed().as_secs())
            .unwrap_or(0);
        let request = TerminationRequest {
            instance_id: self.instance_id.clone(),
            idle_seconds: u32::try_from(idle_seconds).unwrap_or(u32::MAX),
        };
        match self.coordinator.request_termination(request).await {
            Ok(response) if response.granted => {
                self.contact.record();
                tracing::info!(instance_id = %self.instance_id, idle_seconds, "termination granted");
                Some(self.power_off("termination granted").await)
            }
            Ok(response) => {
                self.contact.record();
                let retry = if response.retry_after_seconds > 0 {
                    Duration::from_secs(u64::from(response.retry_after_seconds))
                } else {
                    self.timeouts.termination_retry
                };
                tracing::info!(instance_id = %self.instance_id, reason = %response.reason, retry_after_s = retry.as_secs(), "termination rejected by the coordinator; the instance keeps running");
                state.next_request_at = Instant::now() + retry;
                self.open_gate_unless_drained(state);
                None
            }
            Err(error) => {
                tracing::warn!(instance_id = %self.instance_id, %error, retry_after_s = self.timeouts.termination_retry.as_secs(), "termination request failed; asking again later");
                state.next_request_at = Instant::now() + self.timeouts.termination_retry;
                self.open_gate_unless_drained(state);
                None
            }
        }
    }

    async fn handle_command(&self, command: Command, state: &mut LoopState) {
        match command {
            Command::Drain { reason, reply } => {
                state.drain_requested = true;
                let held = self.gate.close().await;
                tracing::info!(instance_id = %self.instance_id, %reason, task_id = ?held.as_ref().map(|t| &t.task_id), "gate closed on a drain request");
                let _ = reply.send(held.map(|task| task.task_id));
            }
            Command::Shutdown {
                reason,
                requeue_running_task,
            } => {
                state.drain_requested = true;
                let held = self.gate.close().await;
                tracing::info!(instance_id = %self.instance_id, %reason, requeue_running_task, task_id = ?held.as_ref().map(|t| &t.task_id), "shutdown requested");
                if requeue_running_task && held.is_some() {
                    let held = self.gate.take_held();
                    self.supervisor.stop().await;
                    if let Some(task) = held {
                        self.requeue(&task, RequeueReason::AgentShutdown).await;
                    }
                }
                state.shutdown_when_idle = Some(reason);
            }
        }
    }

    /// Handles a spot interruption or rebalance notice: the task goes back to its queue, the machine goes down.
    ///
    /// clearml-agent stops before the requeue, so it cannot report a final status on the requeued task. The
    /// coordinator hears of the notice once the task is back in its queue, so the report names it.
    async fn interrupt(&self, notice: Notice) -> Exit {
        let (kind, action_time_unix_ms, reason) = match &notice {
            Notice::SpotAction {
                action_time_unix_ms,
                ..
            } => (
                InterruptionKind::SpotTermination,
                *action_time_unix_ms,
                RequeueReason::SpotInterruption,
            ),
            Notice::Rebalance {
                notice_time_unix_ms,
            } => (
                InterruptionKind::Rebalance,
                *notice_time_unix_ms,
                RequeueReason::Rebalance,
            ),
        };
        tracing::warn!(instance_id = %self.instance_id, ?notice, "interruption notice; draining and shutting down");

        let held = self.gate.close().await;
        self.supervisor.stop().await;
        let mut requeued_task_id = String::new();
        if let Some(task) = &held
            && self.requeue(task, reason).await
        {
            requeued_task_id = task.task_id.clone();
        }

        let report = InterruptionReport {
            instance_id: self.instance_id.clone(),
            kind: kind as i32,
            action_time_unix_ms,
            requeued_task_id,
        };
        match self.coordinator.report_interruption(report).await {
            Ok(()) => {
                tracing::info!(instance_id = %self.instance_id, "interruption reported to the coordinator")
            }
            Err(error) => {
                tracing::warn!(instance_id = %self.instance_id, %error, "failed to report the interruption; shutting down anyway")
            }
        }
        self.power_off("interruption notice").await
    }

    /// Drains, lets a running task finish within the drain grace, requeues it otherwise, and stops.
    async fn stop_on_sigterm(&self) -> Exit {
        tracing::info!(instance_id = %self.instance_id, grace_s = self.timeouts.drain_grace.as_secs(), "SIGTERM received; draining");
        if let Some(task) = self.gate.close().await {
            let finished =
                tokio::time::timeout(self.timeouts.drain_grace, self.gate.wait_until_idle()).await;
            if finished.is_err() {
                tracing::warn!(instance_id = %self.instance_id, task_id = %task.task_id, "task still running after the drain grace; requeueing it");
                // Taken before the stop: clearml-agent reports `tasks.stopped` as it exits, which would
                // release the task from the gate's view before it could be requeued.
                let held = self.gate.take_held();
                self.supervisor.stop().await;
                if let Some(task) = held {
                    self.requeue(&task, RequeueReason::AgentShutdown).await;
                }
            }
        }
        self.supervisor.stop().await;
        self.requeue_dropped().await;
        self.unregister_worker().await;
        Exit::Stopped
    }

    /// Stops clearml-agent, unregisters the worker and runs the shutdown action; the gate is already closed.
    async fn power_off(&self, reason: &str) -> Exit {
        // Callers check that the worker is idle; a task held anyway is requeued rather than dropped.
        let held = self.gate.take_held();
        self.supervisor.stop().await;
        if let Some(task) = held {
            self.requeue(&task, RequeueReason::AgentShutdown).await;
        }
        self.requeue_dropped().await;
        self.unregister_worker().await;
        tracing::info!(instance_id = %self.instance_id, worker_id = %self.worker_id, reason, "terminating the instance");
        self.shutdown_action.run_once().await;
        Exit::PoweredOff
    }

    /// Requeues the tasks the worker took but never started, because their poll response was lost.
    async fn requeue_dropped(&self) {
        for task in self.gate.take_dropped() {
            self.requeue(&task, RequeueReason::ResponseLost).await;
        }
    }

    /// Requeues a task and returns whether it worked; a failure is logged, because the machine goes on down.
    async fn requeue(&self, task: &HeldTask, reason: RequeueReason) -> bool {
        match requeue::requeue(&self.clearml, task, reason, &self.worker_id).await {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(instance_id = %self.instance_id, task_id = %task.task_id, %error, "failed to requeue the running task");
                false
            }
        }
    }

    async fn unregister_worker(&self) {
        match self.clearml.workers().unregister(&self.worker_id).await {
            Ok(()) => tracing::info!(worker_id = %self.worker_id, "worker unregistered"),
            // clearml-server's subcode 1004: clearml-agent already unregistered itself as it stopped.
            Err(error) if error.result_codes() == Some((400, 1004)) => {
                tracing::info!(worker_id = %self.worker_id, "worker already unregistered by clearml-agent");
            }
            Err(error) => {
                tracing::warn!(worker_id = %self.worker_id, %error, "failed to unregister the worker; the server drops it when its registration expires")
            }
        }
    }

    fn open_gate_unless_drained(&self, state: &LoopState) {
        if !state.drain_requested && !state.orphan_drain && state.shutdown_when_idle.is_none() {
            self.gate.open();
        }
    }

    /// Reports health in a spawned task; a coordinator that will replace the instance gets it shut down.
    ///
    /// NOTE: only a clearml-agent crash loop counts as unhealthy; a full disk is not detected yet.
    fn spawn_health_report(&self, crash_loop: bool) {
        let coordinator = self.coordinator.clone();
        let instance_id = self.instance_id.clone();
        let commands = self.commands.clone();
        tokio::spawn(async move {
            let report = HealthReport {
                instance_id: instance_id.clone(),
                healthy: !crash_loop,
                reason: if crash_loop {
                    "clearml-agent is in a crash loop".to_owned()
                } else {
                    "clearml-agent runs".to_owned()
                },
            };
            match coordinator.report_health(report).await {
                Ok(response) => {
                    tracing::info!(%instance_id, healthy = !crash_loop, replace = response.replace, "health reported");
                    if response.replace {
                        let command = Command::Shutdown {
                            reason: "the coordinator replaces this unhealthy instance".to_owned(),
                            requeue_running_task: false,
                        };
                        let _ = commands.send(command).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(%instance_id, healthy = !crash_loop, %error, "failed to report health")
                }
            }
        });
    }
}

/// Sends heartbeats every interval, records contact, and turns a drain request into a [`Command::Drain`].
pub async fn heartbeat_loop(
    agent: Arc<Agent>,
    commands: mpsc::Sender<Command>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(agent.timeouts.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_sent = false;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let child = agent.supervisor.status();
        let snapshot = agent.gate.snapshot();
        let request = HeartbeatRequest {
            instance_id: agent.instance_id.clone(),
            state: agent_state(&agent.gate, &child) as i32,
            task_id: snapshot
                .held
                .as_ref()
                .map(|t| t.task_id.clone())
                .unwrap_or_default(),
            queue: snapshot
                .held
                .as_ref()
                .map(|t| t.queue_id.clone())
                .unwrap_or_default(),
            idle_since_unix_ms: snapshot.idle_since_unix_ms,
            clearml_agent_restarts: child.restarts,
        };
        match agent.coordinator.heartbeat(request).await {
            Ok(response) => {
                agent.contact.record();
                if failures > 0 {
                    tracing::info!(instance_id = %agent.instance_id, failures, "heartbeats reach the coordinator again");
                    failures = 0;
                }
                if response.drain && !drain_sent {
                    drain_sent = true;
                    let (reply, _) = oneshot::channel();
                    let command = Command::Drain {
                        reason: "the coordinator asked to drain".to_owned(),
                        reply,
                    };
                    let _ = commands.send(command).await;
                }
            }
            Err(error) => {
                failures += 1;
                // The first failure and then every tenth, so a long outage does not flood the log.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(instance_id = %agent.instance_id, failures, %error, "heartbeat failed");
                }
            }
        }
    }
}

/// Polls the metadata service for interruption notices and sends the first one.
pub async fn notice_loop(
    imds: Arc<crate::imds::ImdsClient>,
    interval: Duration,
    notices: mpsc::Sender<Notice>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        ticker.tick().await;
        match imds.notice().await {
            Ok(Some(notice)) => {
                let _ = notices.send(notice).await;
                return;
            }
            Ok(None) => failures = 0,
            Err(error) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(failures, %error, "failed to read interruption notices");
                }
            }
        }
    }
}
