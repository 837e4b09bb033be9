//! `queues.*`: the task queues that workers pull from.

use serde::{Deserialize, Serialize};

use crate::client::{Client, Retry};
use crate::error::Error;

/// clearml-server's `(result_code, result_subcode)` for "invalid queue id or task not in queue".
const TASK_NOT_QUEUED: (u16, u16) = (400, 703);

/// A queue as `queues.get_all` and `queues.get_by_id` return it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Queue {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    /// ISO 8601 creation time, as the server formats it.
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub system_tags: Vec<String>,
    /// Waiting tasks, the head of the queue first.
    #[serde(default)]
    pub entries: Vec<QueueEntry>,
}

/// One waiting task in a queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub task: String,
    /// ISO 8601 time the task entered the queue.
    #[serde(default)]
    pub added: Option<String>,
}

/// Filter of `queues.get_all`. Every field left empty matches all queues.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GetAllQueues {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub id: Vec<String>,
    /// Pattern matched against the queue name (the server treats it as a regular expression).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub only_fields: Vec<String>,
}

/// A new queue for `queues.create`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateQueue {
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub system_tags: Vec<String>,
}

/// A task taken from the head of a queue by `queues.get_next_task`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NextTask {
    pub entry: QueueEntry,
}

#[derive(Serialize)]
struct QueueRequest<'a> {
    queue: &'a str,
}

#[derive(Serialize)]
struct QueueTaskRequest<'a> {
    queue: &'a str,
    task: &'a str,
}

#[derive(Deserialize)]
struct QueuesResponse {
    queues: Vec<Queue>,
}

#[derive(Deserialize)]
struct QueueResponse {
    queue: Queue,
}

#[derive(Deserialize)]
struct NumEntriesResponse {
    num: u64,
}

#[derive(Deserialize)]
struct CreatedResponse {
    id: String,
}

#[derive(Deserialize)]
struct AddedResponse {
    added: u32,
}

#[derive(Deserialize)]
struct RemovedResponse {
    removed: u32,
}

#[derive(Deserialize)]
struct PositionResponse {
    position: i64,
}

#[derive(Deserialize)]
struct NextTaskResponse {
    #[serde(default)]
    entry: Option<QueueEntry>,
}

/// The `queues.*` endpoints; see [`Client::queues`].
pub struct Queues<'a> {
    pub(crate) client: &'a Client,
}

impl Client {
    pub fn queues(&self) -> Queues<'_> {
        Queues { client: self }
    }
}

impl Queues<'_> {
    pub async fn get_all(&self, filter: &GetAllQueues) -> Result<Vec<Queue>, Error> {
        let response: QueuesResponse = self
            .client
            .call("queues.get_all", filter, Retry::Safe)
            .await?;
        Ok(response.queues)
    }

    pub async fn get_by_id(&self, queue: &str) -> Result<Queue, Error> {
        let response: QueueResponse = self
            .client
            .call("queues.get_by_id", &QueueRequest { queue }, Retry::Safe)
            .await?;
        Ok(response.queue)
    }

    /// Returns the number of tasks waiting in the queue.
    pub async fn get_num_entries(&self, queue: &str) -> Result<u64, Error> {
        let response: NumEntriesResponse = self
            .client
            .call(
                "queues.get_num_entries",
                &QueueRequest { queue },
                Retry::Safe,
            )
            .await?;
        Ok(response.num)
    }

    /// Creates a queue and returns its id. Not retried: the queue may exist even when the response was lost.
    pub async fn create(&self, queue: &CreateQueue) -> Result<String, Error> {
        let response: CreatedResponse = self
            .client
            .call("queues.create", queue, Retry::Never)
            .await?;
        Ok(response.id)
    }

    /// Takes the task at the head of the queue, or returns `None` when the queue is empty.
    ///
    /// Never retried: when the response is lost the task has already left the queue, and a second call
    /// would take another one.
    pub async fn get_next_task(&self, queue: &str) -> Result<Option<NextTask>, Error> {
        let response: NextTaskResponse = self
            .client
            .call(
                "queues.get_next_task",
                &QueueRequest { queue },
                Retry::Never,
            )
            .await?;
        Ok(response.entry.map(|entry| NextTask { entry }))
    }

    /// Appends a task entry to the queue without changing the task's status (`tasks.enqueue` does
    /// both). Returns whether an entry was added.
    pub async fn add_task(&self, queue: &str, task: &str) -> Result<bool, Error> {
        let response: AddedResponse = self
            .client
            .call(
                "queues.add_task",
                &QueueTaskRequest { queue, task },
                Retry::Never,
            )
            .await?;
        Ok(response.added > 0)
    }

    /// Removes a task entry from the queue. Returns false when the task was not in the queue, which the
    /// server reports as error 400/703 (`invalid_queue_or_task_not_queued`). A retry after a lost response
    /// gets the same error.
    pub async fn remove_task(&self, queue: &str, task: &str) -> Result<bool, Error> {
        let result: Result<RemovedResponse, Error> = self
            .client
            .call(
                "queues.remove_task",
                &QueueTaskRequest { queue, task },
                Retry::Safe,
            )
            .await;
        match result {
            Ok(response) => Ok(response.removed > 0),
            Err(err) if err.result_codes() == Some(TASK_NOT_QUEUED) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Moves a queued task to the head of the queue, so the next `get_next_task` returns it. Returns its
    /// new position (0).
    pub async fn move_task_to_front(&self, queue: &str, task: &str) -> Result<i64, Error> {
        let response: PositionResponse = self
            .client
            .call(
                "queues.move_task_to_front",
                &QueueTaskRequest { queue, task },
                Retry::Safe,
            )
            .await?;
        Ok(response.position)
    }
}
