//! `workers.*`: the machines that pull tasks from queues.

use serde::{Deserialize, Serialize};

use crate::client::{Client, Retry};
use crate::error::Error;

/// A worker as `workers.get_all` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    /// Worker id, for example `fleet:gpu-spot:i-0abc` (clearml-agent's `--worker-id`).
    pub id: String,
    #[serde(default)]
    pub user: Option<IdName>,
    #[serde(default)]
    pub company: Option<IdName>,
    #[serde(default)]
    pub ip: Option<String>,
    /// ISO 8601 times, as the server formats them.
    #[serde(default)]
    pub register_time: Option<String>,
    #[serde(default)]
    pub last_activity_time: Option<String>,
    #[serde(default)]
    pub last_report_time: Option<String>,
    /// The task the worker runs; absent while it is idle.
    #[serde(default)]
    pub task: Option<WorkerTask>,
    #[serde(default)]
    pub project: Option<IdName>,
    /// The queue the current task came from.
    #[serde(default)]
    pub queue: Option<WorkerQueue>,
    /// The queues the worker listens on.
    #[serde(default)]
    pub queues: Vec<WorkerQueue>,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdName {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// The task a worker is running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerTask {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Seconds since the task started on this worker.
    #[serde(default)]
    pub running_time: Option<u64>,
    #[serde(default)]
    pub last_iteration: Option<i64>,
}

/// A queue as a worker entry refers to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerQueue {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub num_tasks: Option<u64>,
}

/// A worker announcing itself with `workers.register`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegisterWorker {
    pub worker: String,
    /// Seconds without a report after which the server drops the worker (server default 600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Queue ids the worker listens on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// A periodic `workers.status_report`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusReport {
    pub worker: String,
    /// The running task; `None` clears the worker's task on the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Queue id the running task came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<Vec<String>>,
    /// UNIX time in milliseconds. The schema describes seconds, but clearml-agent 3.0 sends
    /// milliseconds (`clearml_agent/helper/resource_monitor.py`), so this client does the same.
    pub timestamp: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

#[derive(Serialize)]
struct GetAllRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen: Option<u64>,
}

#[derive(Serialize)]
struct WorkerRequest<'a> {
    worker: &'a str,
}

#[derive(Deserialize)]
struct WorkersResponse {
    workers: Vec<Worker>,
}

#[derive(Deserialize)]
struct EmptyResponse {}

/// The `workers.*` endpoints; see [`Client::workers`].
pub struct Workers<'a> {
    client: &'a Client,
}

impl Client {
    pub fn workers(&self) -> Workers<'_> {
        Workers { client: self }
    }
}

impl Workers<'_> {
    /// Lists workers active within `last_seen` seconds (the server's default is 3600 when `None`).
    pub async fn get_all(&self, last_seen: Option<u64>) -> Result<Vec<Worker>, Error> {
        let response: WorkersResponse = self
            .client
            .call("workers.get_all", &GetAllRequest { last_seen }, Retry::Safe)
            .await?;
        Ok(response.workers)
    }

    /// Registers a worker. Safe to repeat: registering again refreshes the same entry.
    pub async fn register(&self, request: &RegisterWorker) -> Result<(), Error> {
        let _: EmptyResponse = self
            .client
            .call("workers.register", request, Retry::Safe)
            .await?;
        Ok(())
    }

    pub async fn unregister(&self, worker: &str) -> Result<(), Error> {
        let _: EmptyResponse = self
            .client
            .call("workers.unregister", &WorkerRequest { worker }, Retry::Safe)
            .await?;
        Ok(())
    }

    /// Sends a status report. Safe to repeat: each report replaces the last one.
    pub async fn status_report(&self, report: &StatusReport) -> Result<(), Error> {
        let _: EmptyResponse = self
            .client
            .call("workers.status_report", report, Retry::Safe)
            .await?;
        Ok(())
    }
}
