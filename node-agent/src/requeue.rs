//! Puts a task that this machine can no longer run back at the head of the queue it came from.

use clearml_api::Client;
use clearml_api::tasks::{EnqueueTask, StatusChange};

use crate::gate::HeldTask;

/// The cause of a requeue; each has a status reason and message that users see in the ClearML UI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeueReason {
    SpotInterruption,
    Rebalance,
    AgentShutdown,
    ClearmlAgentExited,
    /// The worker took the task but its poll response was lost, so it never ran.
    ResponseLost,
}

impl RequeueReason {
    pub fn status_reason(self) -> &'static str {
        match self {
            RequeueReason::SpotInterruption => "spot interruption",
            RequeueReason::Rebalance => "spot rebalance",
            RequeueReason::AgentShutdown => "node shutdown",
            RequeueReason::ClearmlAgentExited => "clearml-agent exited",
            RequeueReason::ResponseLost => "queue response lost",
        }
    }

    /// Returns the status message, which names the worker so users can tell which machine gave the task back.
    pub fn status_message(self, worker_id: &str) -> String {
        match self {
            RequeueReason::SpotInterruption => format!(
                "interrupted by a spot reclaim of worker {worker_id}; requeued at the head of its queue by clearml-fleet"
            ),
            RequeueReason::Rebalance => format!(
                "interrupted by a spot rebalance recommendation for worker {worker_id}; requeued at the head of its queue by clearml-fleet"
            ),
            RequeueReason::AgentShutdown => format!(
                "interrupted by the shutdown of worker {worker_id} after the drain grace period; requeued at the head of its queue by clearml-fleet"
            ),
            RequeueReason::ClearmlAgentExited => format!(
                "interrupted because clearml-agent on worker {worker_id} exited; requeued at the head of its queue by clearml-fleet"
            ),
            RequeueReason::ResponseLost => format!(
                "taken from its queue for worker {worker_id}, but the response never reached clearml-agent; requeued at the head of its queue by clearml-fleet"
            ),
        }
    }
}

/// Errors of requeueing; each names the task, the queue and the step.
#[derive(Debug, thiserror::Error)]
#[error("failed to requeue task {task_id} to queue {queue_id} at step {step}: {source}")]
pub struct RequeueError {
    pub task_id: String,
    pub queue_id: String,
    pub step: &'static str,
    #[source]
    pub source: clearml_api::Error,
}

/// Resets the task (stopping its run), enqueues it with the reason's message, and moves it to the queue head.
///
/// clearml-agent must be stopped first, or it could still report a final status for the task and take it out
/// of the queue again.
pub async fn requeue(
    client: &Client,
    task: &HeldTask,
    reason: RequeueReason,
    worker_id: &str,
) -> Result<(), RequeueError> {
    let message = reason.status_message(worker_id);
    let step_error = |step: &'static str| {
        move |source| RequeueError {
            task_id: task.task_id.clone(),
            queue_id: task.queue_id.clone(),
            step,
            source,
        }
    };

    client
        .tasks()
        .reset(
            &StatusChange::new(&task.task_id)
                .forced()
                .with_message(reason.status_reason(), &message),
        )
        .await
        .map_err(step_error("tasks.reset"))?;

    client
        .tasks()
        .enqueue(&EnqueueTask {
            task: task.task_id.clone(),
            queue: Some(task.queue_id.clone()),
            status_reason: Some(reason.status_reason().to_owned()),
            status_message: Some(message),
            ..EnqueueTask::default()
        })
        .await
        .map_err(step_error("tasks.enqueue"))?;

    client
        .queues()
        .move_task_to_front(&task.queue_id, &task.task_id)
        .await
        .map_err(step_error("queues.move_task_to_front"))?;

    tracing::info!(task_id = %task.task_id, queue_id = %task.queue_id, reason = reason.status_reason(), "task requeued at the head of its queue");
    Ok(())
}
