//! The API gate: a local reverse proxy that clearml-agent uses as its ClearML API server.
//!
//! The gate forwards every call unchanged and watches two kinds: `queues.get_next_task`, whose response names
//! the task the worker took, and the final task status calls, which tell when it let go. Once closed it
//! returns the server's empty result to `queues.get_next_task`, so the worker takes no new task while a
//! running one goes on. Closing waits for polls already forwarded, so after [`Gate::close`] returns, the held
//! task it reports is final until the gate opens again.

mod proxy;
mod tracker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;
use tokio::time::Instant;

pub use proxy::{GateServer, Upstream};
pub use tracker::{HeldTask, PollDecision, Tracker};

use crate::unix_ms_now;

/// Shared handle on the gate's state. Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    state: watch::Sender<Tracker>,
    counters: Arc<GateCounters>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct GateCounters {
    pub requests_forwarded: AtomicU64,
    pub upstream_errors: AtomicU64,
}

/// A copy of the gate's state at one moment.
#[derive(Debug, Clone)]
pub struct GateSnapshot {
    pub draining: bool,
    /// True once the worker polled; before that clearml-agent is starting.
    pub worker_ready: bool,
    pub held: Option<HeldTask>,
    pub idle_since: Option<Instant>,
    pub idle_since_unix_ms: i64,
    pub tasks_taken: u64,
    pub polls_answered_empty: u64,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    /// Creates an open gate for a worker that has not polled yet.
    pub fn new() -> Gate {
        let (state, _) = watch::channel(Tracker::new());
        Gate {
            state,
            counters: Arc::new(GateCounters::default()),
        }
    }

    /// Closes the gate and waits until no forwarded poll is pending; returns the task the worker runs then.
    ///
    /// A poll forwarded before the close may still hand out a task. Waiting for it makes the result exact:
    /// after this returns, the worker cannot take a task until [`Gate::open`].
    pub async fn close(&self) -> Option<HeldTask> {
        self.state.send_modify(|tracker| tracker.set_draining(true));
        let mut receiver = self.state.subscribe();
        let tracker = receiver
            .wait_for(|tracker| tracker.in_flight_polls() == 0)
            .await
            .expect("the gate owns the sender, so the channel is open while self lives");
        tracker.held().cloned()
    }

    /// Opens the gate, so the worker takes tasks again.
    pub fn open(&self) {
        self.state
            .send_modify(|tracker| tracker.set_draining(false));
    }

    /// Waits until the worker runs no task.
    pub async fn wait_until_idle(&self) {
        let mut receiver = self.state.subscribe();
        let _ = receiver.wait_for(|tracker| tracker.held().is_none()).await;
    }

    /// Removes the held task from the state, so it counts as idle; used after clearml-agent died.
    pub fn take_held(&self) -> Option<HeldTask> {
        let mut taken = None;
        self.state.send_modify(|tracker| {
            taken = tracker.take_held(Instant::now(), unix_ms_now());
        });
        taken
    }

    /// Removes and returns the tasks the worker took but never started; they must be requeued.
    pub fn take_dropped(&self) -> Vec<HeldTask> {
        if !self.state.borrow().has_dropped() {
            return Vec::new();
        }
        let mut dropped = Vec::new();
        self.state
            .send_modify(|tracker| dropped = tracker.take_dropped());
        dropped
    }

    pub fn snapshot(&self) -> GateSnapshot {
        let tracker = self.state.borrow();
        GateSnapshot {
            draining: tracker.draining(),
            worker_ready: tracker.worker_ready(),
            held: tracker.held().cloned(),
            idle_since: tracker.idle_since(),
            idle_since_unix_ms: tracker.idle_since_unix_ms(),
            tasks_taken: tracker.tasks_taken(),
            polls_answered_empty: tracker.polls_answered_empty(),
        }
    }

    /// Returns a receiver that changes whenever the state does.
    pub fn subscribe(&self) -> watch::Receiver<Tracker> {
        self.state.subscribe()
    }

    pub fn counters(&self) -> &GateCounters {
        &self.counters
    }

    pub(crate) fn begin_poll(&self) -> PollDecision {
        let mut decision = PollDecision::AnswerEmpty;
        self.state.send_modify(|tracker| {
            decision = tracker.begin_poll(Instant::now(), unix_ms_now());
        });
        decision
    }

    pub(crate) fn finish_poll(&self, queue_id: &str, taken: Option<String>) {
        self.state
            .send_modify(|tracker| tracker.finish_poll(queue_id, taken, Instant::now()));
    }

    pub(crate) fn status_call(&self, endpoint: &str, task_id: &str) {
        self.state.send_modify(|tracker| {
            tracker.status_call(endpoint, task_id, Instant::now(), unix_ms_now());
        });
    }

    pub(crate) fn count_forwarded(&self) {
        self.counters
            .requests_forwarded
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_upstream_error(&self) {
        self.counters
            .upstream_errors
            .fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn close_waits_for_forwarded_poll() {
        let gate = Gate::new();
        assert_eq!(gate.begin_poll(), PollDecision::Forward);

        let closing = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.close().await })
        };
        tokio::task::yield_now().await;
        assert!(
            !closing.is_finished(),
            "close must wait for the poll in flight"
        );

        gate.finish_poll("q1", Some("t1".to_owned()));
        let held = closing.await.unwrap();

        assert_eq!(held.map(|t| t.task_id), Some("t1".to_owned()));
        assert_eq!(gate.begin_poll(), PollDecision::AnswerEmpty);
    }

    #[tokio::test(start_paused = true)]
    async fn open_gate_forwards_again() {
        let gate = Gate::new();
        assert_eq!(gate.close().await, None);
        gate.open();
        assert_eq!(gate.begin_poll(), PollDecision::Forward);
        gate.finish_poll("q1", None);
        assert!(gate.snapshot().held.is_none());
    }
}
