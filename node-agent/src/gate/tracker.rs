//! The gate's view of the worker: which task it holds, since when it is idle, and whether it may take tasks.
//!
//! The rules follow clearml-agent 3.0.3's daemon loop (`run_tasks_loop` in `clearml_agent/commands/worker.py`):
//! it takes a task with `queues.get_next_task`, runs it to the end in `run_one_task`, and only then polls
//! again. So a task is held from a `get_next_task` response with an entry until the task gets a final status or
//! the worker polls again, whichever comes first.

use tokio::time::Instant;

/// Task status calls after which the task no longer runs on this worker.
const FINAL_STATUS_CALLS: &[&str] = &[
    "tasks.completed",
    "tasks.failed",
    "tasks.stopped",
    "tasks.close",
    "tasks.publish",
    "tasks.reset",
    "tasks.delete",
];

/// Returns true for a task call whose request the gate reads: `tasks.started` and the final status calls.
pub fn is_observed_task_call(endpoint: &str) -> bool {
    endpoint == "tasks.started" || FINAL_STATUS_CALLS.contains(&endpoint)
}

/// A task the worker took from a queue and still runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldTask {
    pub task_id: String,
    /// Id of the queue the task came from, the one `queues.get_next_task` named.
    pub queue_id: String,
    pub taken_at: Instant,
    /// True once a `tasks.started` call for the task succeeded.
    pub started: bool,
}

/// The gate's decision on one `queues.get_next_task` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollDecision {
    /// Forward the call; the caller must report the response with [`Tracker::finish_poll`].
    Forward,
    /// The gate is closed, so it returns "no task" without calling the server.
    AnswerEmpty,
}

/// The worker's state as seen through its API calls.
#[derive(Debug, Clone)]
pub struct Tracker {
    draining: bool,
    /// `queues.get_next_task` calls forwarded whose response has not come back.
    in_flight_polls: u32,
    held: Option<HeldTask>,
    /// Tasks released without a `tasks.started`, waiting to be requeued.
    dropped: Vec<HeldTask>,
    /// True from the worker's first poll on; before it, clearml-agent is still starting.
    worker_ready: bool,
    /// When the worker last became idle; `None` before its first poll and while it runs a task.
    idle_since: Option<Instant>,
    /// Wall-clock form of `idle_since`, in milliseconds since the UNIX epoch, for heartbeats.
    idle_since_unix_ms: i64,
    tasks_taken: u64,
    polls_answered_empty: u64,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new()
    }
}

impl Tracker {
    /// Creates the state of a worker that has not polled yet. Its idle time starts at its first poll, so a
    /// slow clearml-agent start does not count as idle time.
    pub fn new() -> Tracker {
        Tracker {
            draining: false,
            in_flight_polls: 0,
            held: None,
            dropped: Vec::new(),
            worker_ready: false,
            idle_since: None,
            idle_since_unix_ms: 0,
            tasks_taken: 0,
            polls_answered_empty: 0,
        }
    }

    /// Decides what to do with a `queues.get_next_task` call.
    ///
    /// A poll means the daemon finished its previous task, so a task still held is released here even when
    /// no final status call was seen (for example a task aborted from the UI).
    pub fn begin_poll(&mut self, now: Instant, now_unix_ms: i64) -> PollDecision {
        if !self.worker_ready {
            tracing::info!("worker polled for the first time; it is ready");
            self.worker_ready = true;
            self.become_idle(now, now_unix_ms);
        }
        if let Some(task) = self.held.take() {
            self.become_idle(now, now_unix_ms);
            if task.started {
                tracing::info!(task_id = %task.task_id, "worker polled again; task no longer held");
            } else {
                // clearml-agent marks every task it receives started before it runs it, so this one's poll
                // response never reached it: the task left its queue but no worker runs it.
                tracing::warn!(task_id = %task.task_id, queue_id = %task.queue_id, "worker polled again without starting its task; the task must be requeued");
                self.dropped.push(task);
            }
        }

        if self.draining {
            self.polls_answered_empty += 1;
            return PollDecision::AnswerEmpty;
        }
        self.in_flight_polls += 1;
        PollDecision::Forward
    }

    /// Records the response of a forwarded poll: `taken` is the task id in `data.entry.task`, `None` when the
    /// queue was empty or the call failed.
    pub fn finish_poll(&mut self, queue_id: &str, taken: Option<String>, now: Instant) {
        assert!(
            self.in_flight_polls > 0,
            "finish_poll without a matching begin_poll that returned Forward"
        );
        self.in_flight_polls -= 1;

        if let Some(task_id) = taken {
            tracing::info!(task_id = %task_id, queue_id, draining = self.draining, "worker took a task");
            self.tasks_taken += 1;
            self.idle_since = None;
            self.held = Some(HeldTask {
                task_id,
                queue_id: queue_id.to_owned(),
                taken_at: now,
                started: false,
            });
        }
    }

    /// Records a successful task call; releases the held task when `endpoint` gives it a final status.
    pub fn status_call(&mut self, endpoint: &str, task_id: &str, now: Instant, now_unix_ms: i64) {
        if endpoint == "tasks.started" {
            if let Some(held) = self.held.as_mut().filter(|held| held.task_id == task_id) {
                held.started = true;
            }
            return;
        }
        if !FINAL_STATUS_CALLS.contains(&endpoint) {
            return;
        }
        if self
            .held
            .as_ref()
            .is_some_and(|held| held.task_id == task_id)
        {
            tracing::info!(task_id, endpoint, "held task reached a final status");
            self.held = None;
            self.become_idle(now, now_unix_ms);
        }
    }

    /// Removes and returns the tasks the worker took but never started, for requeueing.
    pub fn take_dropped(&mut self) -> Vec<HeldTask> {
        std::mem::take(&mut self.dropped)
    }

    /// Returns true when tasks wait in [`Tracker::take_dropped`].
    pub fn has_dropped(&self) -> bool {
        !self.dropped.is_empty()
    }

    /// Removes the held task, for example after clearml-agent died running it.
    pub fn take_held(&mut self, now: Instant, now_unix_ms: i64) -> Option<HeldTask> {
        let held = self.held.take();
        if held.is_some() {
            self.become_idle(now, now_unix_ms);
        }
        held
    }

    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    pub fn draining(&self) -> bool {
        self.draining
    }

    pub fn in_flight_polls(&self) -> u32 {
        self.in_flight_polls
    }

    pub fn held(&self) -> Option<&HeldTask> {
        self.held.as_ref()
    }

    pub fn worker_ready(&self) -> bool {
        self.worker_ready
    }

    pub fn idle_since(&self) -> Option<Instant> {
        self.idle_since
    }

    /// Milliseconds since the UNIX epoch at which the worker became idle; 0 while it runs a task or before
    /// its first poll.
    pub fn idle_since_unix_ms(&self) -> i64 {
        if self.idle_since.is_some() {
            self.idle_since_unix_ms
        } else {
            0
        }
    }

    pub fn tasks_taken(&self) -> u64 {
        self.tasks_taken
    }

    pub fn polls_answered_empty(&self) -> u64 {
        self.polls_answered_empty
    }

    fn become_idle(&mut self, now: Instant, now_unix_ms: i64) {
        self.idle_since = Some(now);
        self.idle_since_unix_ms = now_unix_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns a tracker whose worker polled once, at unix time 1000 ms, and found no task.
    fn tracker() -> (Tracker, Instant) {
        let now = Instant::now();
        let mut tracker = Tracker::new();
        tracker.begin_poll(now, 1_000);
        tracker.finish_poll("q1", None, now);
        (tracker, now)
    }

    #[test]
    fn idle_time_starts_at_first_poll() {
        let now = Instant::now();
        let mut tracker = Tracker::new();
        assert!(!tracker.worker_ready());
        assert_eq!(tracker.idle_since(), None);

        tracker.begin_poll(now, 7_000);

        assert!(tracker.worker_ready());
        assert_eq!(tracker.idle_since(), Some(now));
        assert_eq!(tracker.idle_since_unix_ms(), 7_000);
    }

    #[test]
    fn taken_task_is_held_until_completed() {
        let (mut tracker, now) = tracker();

        assert_eq!(tracker.begin_poll(now, 1_000), PollDecision::Forward);
        tracker.finish_poll("q1", Some("t1".to_owned()), now);

        assert_eq!(tracker.held().map(|t| t.task_id.as_str()), Some("t1"));
        assert_eq!(tracker.idle_since(), None);
        assert_eq!(tracker.idle_since_unix_ms(), 0);

        tracker.status_call("tasks.started", "t1", now, 2_000);
        assert!(tracker.held().is_some(), "tasks.started is not final");
        tracker.status_call("tasks.completed", "other", now, 2_000);
        assert!(
            tracker.held().is_some(),
            "another task's status does not release t1"
        );
        tracker.status_call("tasks.completed", "t1", now, 3_000);
        assert_eq!(tracker.held(), None);
        assert_eq!(tracker.idle_since_unix_ms(), 3_000);
    }

    #[test]
    fn empty_poll_keeps_idle_since() {
        let (mut tracker, now) = tracker();
        tracker.begin_poll(now, 5_000);
        tracker.finish_poll("q1", None, now);
        assert_eq!(tracker.idle_since(), Some(now));
        assert_eq!(tracker.idle_since_unix_ms(), 1_000);
    }

    #[test]
    fn next_poll_releases_task_without_final_status() {
        let (mut tracker, now) = tracker();
        tracker.begin_poll(now, 1_000);
        tracker.finish_poll("q1", Some("t1".to_owned()), now);
        tracker.status_call("tasks.started", "t1", now, 2_000);

        tracker.begin_poll(now, 9_000);

        assert_eq!(tracker.held(), None);
        assert_eq!(tracker.idle_since_unix_ms(), 9_000);
        assert!(tracker.take_dropped().is_empty());
    }

    #[test]
    fn task_never_started_is_dropped_for_requeue() {
        let (mut tracker, now) = tracker();
        tracker.begin_poll(now, 1_000);
        tracker.finish_poll("q1", Some("t1".to_owned()), now);

        tracker.begin_poll(now, 9_000);

        assert_eq!(tracker.held(), None);
        let dropped = tracker.take_dropped();
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].task_id, "t1");
        assert_eq!(dropped[0].queue_id, "q1");
        assert!(!tracker.has_dropped());
    }

    #[test]
    fn draining_gate_answers_empty_and_counts() {
        let (mut tracker, now) = tracker();
        tracker.set_draining(true);

        assert_eq!(tracker.begin_poll(now, 1_000), PollDecision::AnswerEmpty);
        assert_eq!(tracker.in_flight_polls(), 0);
        assert_eq!(tracker.polls_answered_empty(), 1);
    }

    #[test]
    fn poll_in_flight_at_close_still_records_task() {
        let (mut tracker, now) = tracker();
        assert_eq!(tracker.begin_poll(now, 1_000), PollDecision::Forward);
        tracker.set_draining(true);
        assert_eq!(tracker.in_flight_polls(), 1);

        tracker.finish_poll("q1", Some("t1".to_owned()), now);

        assert_eq!(tracker.in_flight_polls(), 0);
        assert_eq!(tracker.held().map(|t| t.task_id.as_str()), Some("t1"));
    }
}
