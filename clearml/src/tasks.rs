//! `tasks.*`: the units of work that queues hold and workers run.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::client::{Client, Retry};
use crate::error::Error;

/// Task status, as clearml-server names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Created,
    Queued,
    InProgress,
    Stopped,
    Published,
    Publishing,
    Closed,
    Failed,
    Completed,
    /// The server's own `unknown`, and any status a newer server adds.
    #[serde(other)]
    Unknown,
}

impl TaskStatus {
    /// Returns true once the task will not run again without a reset.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Stopped
                | TaskStatus::Published
                | TaskStatus::Publishing
                | TaskStatus::Closed
                | TaskStatus::Failed
                | TaskStatus::Completed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Created => "created",
            TaskStatus::Queued => "queued",
            TaskStatus::InProgress => "in_progress",
            TaskStatus::Stopped => "stopped",
            TaskStatus::Published => "published",
            TaskStatus::Publishing => "publishing",
            TaskStatus::Closed => "closed",
            TaskStatus::Failed => "failed",
            TaskStatus::Completed => "completed",
            TaskStatus::Unknown => "unknown",
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The task fields the fleet reads. Every field but `id` is optional, because `only_fields` can leave
/// any of them out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub status: Option<TaskStatus>,
    #[serde(default)]
    pub status_message: Option<String>,
    #[serde(default)]
    pub status_reason: Option<String>,
    #[serde(default, rename = "type")]
    pub task_type: Option<String>,
    #[serde(default)]
    pub project: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// ISO 8601 times, as the server formats them.
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub started: Option<String>,
    #[serde(default)]
    pub completed: Option<String>,
    #[serde(default)]
    pub last_update: Option<String>,
    /// Id of the worker that ran the task last.
    #[serde(default)]
    pub last_worker: Option<String>,
    #[serde(default)]
    pub execution: Option<Execution>,
    #[serde(default)]
    pub container: Option<Container>,
    /// Parameters by section and name, for example `hyperparams["Args"]["epochs"]`.
    #[serde(default)]
    pub hyperparams: BTreeMap<String, BTreeMap<String, ParamsItem>>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub system_tags: Vec<String>,
}

impl Task {
    /// Returns the value of hyperparameter `section/name`, if the task has it.
    pub fn hyperparam(&self, section: &str, name: &str) -> Option<&str> {
        self.hyperparams.get(section)?.get(name)?.value.as_deref()
    }

    /// Returns the queue id the task was last enqueued to.
    pub fn execution_queue(&self) -> Option<&str> {
        self.execution.as_ref()?.queue.as_deref()
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Execution {
    /// Queue id the task was last enqueued to.
    #[serde(default)]
    pub queue: Option<String>,
}

/// The container a task requests, which overrides the agent's default image.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub arguments: Option<String>,
}

/// One hyperparameter.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ParamsItem {
    #[serde(default)]
    pub section: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default, rename = "type")]
    pub value_type: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// Filter of `tasks.get_all`. Every field left empty matches all tasks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GetAllTasks {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub id: Vec<String>,
    /// Pattern matched against the task name (the server treats it as a regular expression).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub status: Vec<TaskStatus>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub project: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub only_fields: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub order_by: Vec<String>,
}

/// `tasks.enqueue`: puts a task in a queue and sets it `queued`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EnqueueTask {
    pub task: String,
    /// Queue id; when both this and `queue_name` are empty the server uses its default queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    /// Enqueue even when the task's status does not allow it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// A status change of one task (`tasks.dequeue`, `reset`, `stop`, `started`, `completed`, `failed`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusChange {
    pub task: String,
    /// Apply the change even when the current status does not allow it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
}

impl StatusChange {
    pub fn new(task: impl Into<String>) -> Self {
        Self {
            task: task.into(),
            ..Self::default()
        }
    }

    pub fn with_message(mut self, reason: impl Into<String>, message: impl Into<String>) -> Self {
        self.status_reason = Some(reason.into());
        self.status_message = Some(message.into());
        self
    }

    pub fn forced(mut self) -> Self {
        self.force = true;
        self
    }
}

/// How many tasks a status call changed, and the fields it set.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Updated {
    #[serde(default)]
    pub updated: u32,
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// Result of `tasks.enqueue`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Enqueued {
    /// 1 when the task entered the queue.
    #[serde(default)]
    pub queued: u32,
    #[serde(default)]
    pub updated: u32,
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// Result of `tasks.dequeue`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Dequeued {
    /// 1 when the task left its queue.
    #[serde(default)]
    pub dequeued: u32,
    #[serde(default)]
    pub updated: u32,
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
struct TaskRequest<'a> {
    task: &'a str,
}

#[derive(Deserialize)]
struct TasksResponse {
    tasks: Vec<Task>,
}

#[derive(Deserialize)]
struct TaskResponse {
    task: Task,
}

/// The `tasks.*` endpoints; see [`Client::tasks`].
pub struct Tasks<'a> {
    client: &'a Client,
}

impl Client {
    pub fn tasks(&self) -> Tasks<'_> {
        Tasks { client: self }
    }
}

impl Tasks<'_> {
    pub async fn get_all(&self, filter: &GetAllTasks) -> Result<Vec<Task>, Error> {
        let response: TasksResponse = self
            .client
            .call("tasks.get_all", filter, Retry::Safe)
            .await?;
        Ok(response.tasks)
    }

    pub async fn get_by_id(&self, task: &str) -> Result<Task, Error> {
        let response: TaskResponse = self
            .client
            .call("tasks.get_by_id", &TaskRequest { task }, Retry::Safe)
            .await?;
        Ok(response.task)
    }

    /// Enqueues a task. Not retried: after a lost response the task may already be queued, and a second
    /// call fails on its status or adds a second entry when forced.
    pub async fn enqueue(&self, request: &EnqueueTask) -> Result<Enqueued, Error> {
        self.client
            .call("tasks.enqueue", request, Retry::Never)
            .await
    }

    /// Takes a queued task out of its queue and sets it back to `created`. Not retried, for the same
    /// reason as [`Tasks::enqueue`].
    pub async fn dequeue(&self, change: &StatusChange) -> Result<Dequeued, Error> {
        self.client
            .call("tasks.dequeue", change, Retry::Never)
            .await
    }

    /// Resets a task to `created`, clearing its run. Safe to repeat: a second reset leaves the same state.
    pub async fn reset(&self, change: &StatusChange) -> Result<Updated, Error> {
        self.client.call("tasks.reset", change, Retry::Safe).await
    }

    /// Asks a running task to stop (`force` sets `stopped` at once). Safe to repeat. The server keeps
    /// `status_reason` but writes its own `status_message` ("Stopped by <user>").
    pub async fn stop(&self, change: &StatusChange) -> Result<Updated, Error> {
        self.client.call("tasks.stop", change, Retry::Safe).await
    }

    /// Marks a task `in_progress`, as a worker does when it starts running it.
    pub async fn started(&self, change: &StatusChange) -> Result<Updated, Error> {
        self.client
            .call("tasks.started", change, Retry::Never)
            .await
    }

    pub async fn completed(&self, change: &StatusChange) -> Result<Updated, Error> {
        self.client
            .call("tasks.completed", change, Retry::Never)
            .await
    }

    pub async fn failed(&self, change: &StatusChange) -> Result<Updated, Error> {
        self.client.call("tasks.failed", change, Retry::Never).await
    }

    /// Tells the server a running task is alive, so it is not marked stale. Safe to repeat.
    pub async fn ping(&self, task: &str) -> Result<(), Error> {
        let _: serde_json::Map<String, serde_json::Value> = self
            .client
            .call("tasks.ping", &TaskRequest { task }, Retry::Safe)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_status_decodes_as_unknown() {
        let status: TaskStatus = serde_json::from_str("\"frozen\"").unwrap();
        assert_eq!(status, TaskStatus::Unknown);
        let status: TaskStatus = serde_json::from_str("\"in_progress\"").unwrap();
        assert_eq!(status, TaskStatus::InProgress);
    }

    #[test]
    fn hyperparam_reads_section_and_name() {
        let task: Task = serde_json::from_value(serde_json::json!({
            "id": "t1",
            "hyperparams": {"fleet": {"run_seconds": {"section": "fleet", "name": "run_seconds", "value": "3"}}}
        }))
        .unwrap();
        assert_eq!(task.hyperparam("fleet", "run_seconds"), Some("3"));
        assert_eq!(task.hyperparam("fleet", "missing"), None);
        assert_eq!(task.hyperparam("Args", "run_seconds"), None);
    }

    #[test]
    fn status_change_omits_unset_fields() {
        let change = StatusChange::new("t1");
        assert_eq!(
            serde_json::to_value(&change).unwrap(),
            serde_json::json!({"task": "t1"})
        );
        let change = StatusChange::new("t1")
            .forced()
            .with_message("spot", "reclaimed");
        assert_eq!(
            serde_json::to_value(&change).unwrap(),
            serde_json::json!({"task": "t1", "force": true, "status_reason": "spot", "status_message": "reclaimed"})
        );
    }
}
