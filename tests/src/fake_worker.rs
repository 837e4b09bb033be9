//! A stand-in for `clearml-agent` that scale tests can run by the hundred.
//!
//! It speaks the same API calls as the real agent's daemon loop: `workers.register`, then
//! `queues.get_next_task` on each queue in turn, `tasks.started`, periodic `workers.status_report` and
//! `tasks.ping`, and `tasks.completed` (or `tasks.failed`). Instead of running code it waits for the
//! task's hyperparameter `fleet/run_seconds` (or the configured default), and fails the task when
//! `fleet/exit_code` is non-zero.

use std::time::Duration;

use clearml_api::queues::GetAllQueues;
use clearml_api::tasks::StatusChange;
use clearml_api::workers::{RegisterWorker, StatusReport};
use clearml_api::{Client, Error};
use tokio::sync::watch;
use tracing::{info, warn};

/// Hyperparameter section the fake worker reads its instructions from.
pub const PARAM_SECTION: &str = "fleet";
/// Seconds the fake worker spends "running" a task (a decimal number).
pub const PARAM_RUN_SECONDS: &str = "run_seconds";
/// Exit code the task "ends" with; non-zero marks the task failed.
pub const PARAM_EXIT_CODE: &str = "exit_code";

/// Settings of one fake worker.
#[derive(Debug, Clone)]
pub struct FakeWorkerConfig {
    pub worker_id: String,
    /// Queue names, polled in this order like clearml-agent's `--queue A B`.
    pub queues: Vec<String>,
    /// Run time of a task that has no `fleet/run_seconds` parameter.
    pub default_run_time: Duration,
    /// Pause between two rounds of `get_next_task` while every queue is empty.
    pub poll_interval: Duration,
    /// Interval of `workers.status_report` and `tasks.ping`.
    pub report_interval: Duration,
    /// Registration timeout sent to the server, after which it drops a silent worker.
    pub worker_timeout: Duration,
    /// Exit after this many tasks; `None` runs until shutdown.
    pub max_tasks: Option<u64>,
}

/// Why the fake worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum FakeWorkerError {
    #[error("queue {name:?} was not found on the ClearML server; create it or fix the queue name")]
    QueueNotFound { name: String },
    #[error(
        "the ClearML server rejected the credentials ({0}); check the access key and secret key"
    )]
    Unauthorized(Error),
    #[error("ClearML API call failed while starting the worker: {0}")]
    Api(Error),
}

/// What a finished run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeWorkerSummary {
    pub tasks_completed: u64,
    pub tasks_failed: u64,
}

const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(30);

/// Runs the worker until `shutdown` turns true (then it finishes the running task first, the way a
/// drained agent would) or `max_tasks` tasks are done, and unregisters it at the end.
pub async fn run(
    client: Client,
    config: FakeWorkerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<FakeWorkerSummary, FakeWorkerError> {
    let queue_ids = resolve_queues(&client, &config.queues).await?;
    register(&client, &config, &queue_ids).await?;
    info!(worker = %config.worker_id, queues = ?config.queues, "fake worker registered");

    let mut summary = FakeWorkerSummary::default();
    let mut error_backoff = Duration::from_secs(1);
    while !*shutdown.borrow() && !reached_limit(&config, &summary) {
        match poll_once(&client, &config, &queue_ids).await {
            Ok(Some((queue_id, task_id))) => {
                error_backoff = Duration::from_secs(1);
                run_task(&client, &config, &queue_id, &task_id, &mut summary).await;
            }
            Ok(None) => {
                report_idle(&client, &config, &queue_ids).await;
                wait_or_shutdown(&mut shutdown, config.poll_interval).await;
            }
            Err(err) => {
                warn!(worker = %config.worker_id, error = %err, backoff_ms = error_backoff.as_millis() as u64, "polling the queues failed");
                wait_or_shutdown(&mut shutdown, error_backoff).await;
                error_backoff = (error_backoff * 2).min(MAX_ERROR_BACKOFF);
            }
        }
    }

    if let Err(err) = client.workers().unregister(&config.worker_id).await {
        warn!(worker = %config.worker_id, error = %err, "unregistering the worker failed; the server drops it after its timeout");
    }
    info!(worker = %config.worker_id, completed = summary.tasks_completed, failed = summary.tasks_failed, "fake worker stopped");
    Ok(summary)
}

fn reached_limit(config: &FakeWorkerConfig, summary: &FakeWorkerSummary) -> bool {
    config
        .max_tasks
        .is_some_and(|max| summary.tasks_completed + summary.tasks_failed >= max)
}

async fn resolve_queues(client: &Client, names: &[String]) -> Result<Vec<String>, FakeWorkerError> {
    let mut ids = Vec::with_capacity(names.len());
    for name in names {
        let filter = GetAllQueues {
            name: Some(format!("^{}$", regex_escape(name))),
            ..GetAllQueues::default()
        };
        let queues = client
            .queues()
            .get_all(&filter)
            .await
            .map_err(startup_error)?;
        let queue = queues
            .into_iter()
            .find(|queue| queue.name.as_deref() == Some(name.as_str()))
            .ok_or_else(|| FakeWorkerError::QueueNotFound { name: name.clone() })?;
        ids.push(queue.id);
    }
    Ok(ids)
}

async fn register(
    client: &Client,
    config: &FakeWorkerConfig,
    queue_ids: &[String],
) -> Result<(), FakeWorkerError> {
    let request = RegisterWorker {
        worker: config.worker_id.clone(),
        timeout: Some(config.worker_timeout.as_secs()),
        queues: queue_ids.to_vec(),
        tags: Vec::new(),
    };
    client
        .workers()
        .register(&request)
        .await
        .map_err(startup_error)
}

fn startup_error(err: Error) -> FakeWorkerError {
    if err.is_unauthorized() {
        FakeWorkerError::Unauthorized(err)
    } else {
        FakeWorkerError::Api(err)
    }
}

/// Asks each queue in order for a task, as clearml-agent does, and returns the first one found.
async fn poll_once(
    client: &Client,
    config: &FakeWorkerConfig,
    queue_ids: &[String],
) -> Result<Option<(String, String)>, Error> {
    for queue_id in queue_ids {
        if let Some(next) = client.queues().get_next_task(queue_id).await? {
            info!(worker = %config.worker_id, queue = %queue_id, task = %next.entry.task, "task pulled");
            return Ok(Some((queue_id.clone(), next.entry.task)));
        }
    }
    Ok(None)
}

async fn run_task(
    client: &Client,
    config: &FakeWorkerConfig,
    queue_id: &str,
    task_id: &str,
    summary: &mut FakeWorkerSummary,
) {
    let (run_time, exit_code) = match read_instructions(client, task_id, config).await {
        Ok(instructions) => instructions,
        Err(err) => {
            warn!(worker = %config.worker_id, task = %task_id, error = %err, "reading the task failed; running it with the default run time");
            (config.default_run_time, 0)
        }
    };

    let started =
        StatusChange::new(task_id).with_message("worker", "started by fake-clearml-worker");
    if let Err(err) = client.tasks().started(&started).await {
        warn!(worker = %config.worker_id, task = %task_id, error = %err, "marking the task started failed; skipping it");
        summary.tasks_failed += 1;
        return;
    }

    let deadline = tokio::time::Instant::now() + run_time;
    loop {
        report_busy(client, config, queue_id, task_id).await;
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep((deadline - now).min(config.report_interval)).await;
    }

    finish_task(client, config, task_id, exit_code, summary).await;
}

async fn read_instructions(
    client: &Client,
    task_id: &str,
    config: &FakeWorkerConfig,
) -> Result<(Duration, i64), Error> {
    let task = client.tasks().get_by_id(task_id).await?;
    let run_time = match task.hyperparam(PARAM_SECTION, PARAM_RUN_SECONDS) {
        Some(text) => parse_seconds(text).unwrap_or_else(|| {
            warn!(task = %task_id, value = text, "invalid fleet/run_seconds, expected a non-negative number; using the default run time");
            config.default_run_time
        }),
        None => config.default_run_time,
    };
    let exit_code = task
        .hyperparam(PARAM_SECTION, PARAM_EXIT_CODE)
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0);
    Ok((run_time, exit_code))
}

fn parse_seconds(text: &str) -> Option<Duration> {
    let seconds: f64 = text.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

async fn finish_task(
    client: &Client,
    config: &FakeWorkerConfig,
    task_id: &str,
    exit_code: i64,
    summary: &mut FakeWorkerSummary,
) {
    let result = if exit_code == 0 {
        let change =
            StatusChange::new(task_id).with_message("worker", "completed by fake-clearml-worker");
        client.tasks().completed(&change).await
    } else {
        let message = format!("fake-clearml-worker: task exited with code {exit_code}");
        let change = StatusChange::new(task_id)
            .forced()
            .with_message("worker", message);
        client.tasks().failed(&change).await
    };

    match result {
        Ok(_) if exit_code == 0 => {
            summary.tasks_completed += 1;
            info!(worker = %config.worker_id, task = %task_id, "task completed");
        }
        Ok(_) => {
            summary.tasks_failed += 1;
            info!(worker = %config.worker_id, task = %task_id, exit_code, "task failed");
        }
        Err(err) => {
            summary.tasks_failed += 1;
            warn!(worker = %config.worker_id, task = %task_id, error = %err, "reporting the task's end failed");
        }
    }
}

async fn report_busy(client: &Client, config: &FakeWorkerConfig, queue_id: &str, task_id: &str) {
    let report = StatusReport {
        worker: config.worker_id.clone(),
        task: Some(task_id.to_owned()),
        queue: Some(queue_id.to_owned()),
        queues: None,
        timestamp: now_millis(),
        tags: Vec::new(),
    };
    if let Err(err) = client.workers().status_report(&report).await {
        warn!(worker = %config.worker_id, task = %task_id, error = %err, "status report failed");
    }
    if let Err(err) = client.tasks().ping(task_id).await {
        warn!(worker = %config.worker_id, task = %task_id, error = %err, "task ping failed");
    }
}

async fn report_idle(client: &Client, config: &FakeWorkerConfig, queue_ids: &[String]) {
    let report = StatusReport {
        worker: config.worker_id.clone(),
        task: None,
        queue: None,
        queues: Some(queue_ids.to_vec()),
        timestamp: now_millis(),
        tags: Vec::new(),
    };
    if let Err(err) = client.workers().status_report(&report).await {
        warn!(worker = %config.worker_id, error = %err, "status report failed");
    }
}

async fn wait_or_shutdown(shutdown: &mut watch::Receiver<bool>, delay: Duration) {
    // An error means the sender is gone, which no caller uses as a shutdown signal, so wait out the delay.
    let _ = tokio::time::timeout(delay, shutdown.wait_for(|stop| *stop)).await;
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// Escapes regular expression metacharacters, because `queues.get_all` matches `name` as a pattern.
fn regex_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_seconds_accepts_decimals() {
        assert_eq!(parse_seconds("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_seconds(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(parse_seconds("0"), Some(Duration::ZERO));
    }

    #[test]
    fn parse_seconds_rejects_bad_values() {
        assert_eq!(parse_seconds("-1"), None);
        assert_eq!(parse_seconds("soon"), None);
        assert_eq!(parse_seconds("NaN"), None);
        assert_eq!(parse_seconds("inf"), None);
    }

    #[test]
    fn regex_escape_quotes_metacharacters() {
        assert_eq!(regex_escape("gpu.a100"), "gpu\\.a100");
        assert_eq!(regex_escape("q(1)"), "q\\(1\\)");
        assert_eq!(regex_escape("default"), "default");
    }
}
