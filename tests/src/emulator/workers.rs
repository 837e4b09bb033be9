//! `workers.*` endpoints, after `apiserver/services/workers.py` and `apiserver/bll/workers/__init__.py`.
//!
//! The server stores a worker in Redis with a TTL of its registration `timeout` and renews the TTL on every
//! status report, so a worker disappears `timeout` seconds after its last registration or report.

use std::time::Duration;

use serde_json::{Value, json};

use super::envelope::{ApiError, errors};
use super::state::{Call, State, WorkerRecord, filters, iso, params};

/// `workers.register`: `timeout` defaults to the emulator's worker timeout, like the server's
/// `apiserver.workers.default_timeout`; every listed queue must exist.
pub(crate) fn register(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let worker = params::required_str(&call.body, "worker")?.to_owned();
    let queues = params::string_list(&call.body, "queues").unwrap_or_default();
    let timeout_secs = match call.body.get("timeout").and_then(Value::as_i64) {
        None | Some(0) => state.default_worker_timeout.as_secs() as i64,
        Some(timeout) => timeout,
    };
    if timeout_secs <= 0 {
        return Err(errors::worker_registration_failed(
            "invalid timeout",
            &[("timeout", json!(timeout_secs)), ("worker", json!(worker))],
        ));
    }
    let invalid: Vec<&String> = queues
        .iter()
        .filter(|q| state.queue_index(q).is_err())
        .collect();
    if !invalid.is_empty() {
        return Err(errors::invalid_queue_id(&[("ids", json!(invalid))]));
    }

    state.expire_workers(call.instant);
    let timeout = Duration::from_secs(timeout_secs as u64);
    let record = WorkerRecord {
        id: worker.clone(),
        ip: call.ip.clone(),
        queues: queues.clone(),
        task: None,
        queue: None,
        register_time: call.now,
        register_timeout_secs: timeout_secs as u64,
        last_activity_time: call.now,
        last_report_time: None,
        tags: params::string_list(&call.body, "tags").unwrap_or_default(),
        system_tags: params::string_list(&call.body, "system_tags").unwrap_or_default(),
        expires_at: call.instant + timeout,
    };
    state.workers.insert(worker.clone(), record);
    tracing::info!(worker = %worker, ?queues, timeout_secs, "worker registered");
    Ok(json!({}))
}

pub(crate) fn unregister(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let worker = params::required_str(&call.body, "worker")?;
    state.expire_workers(call.instant);
    if state.workers.remove(worker).is_none() {
        return Err(errors::worker_not_registered(&[("worker", json!(worker))]));
    }
    tracing::info!(worker, "worker unregistered");
    Ok(json!({}))
}

/// `workers.status_report`: records the running task (and marks the task with `last_worker`) and renews the
/// registration. An unknown or expired worker is rejected with `invalid_worker_id`.
pub(crate) fn status_report(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let worker_id = params::required_str(&call.body, "worker")?.to_owned();
    if call.body.get("timestamp").is_none_or(Value::is_null) {
        return Err(errors::missing_required_fields("timestamp"));
    }
    state.expire_workers(call.instant);
    if !state.workers.contains_key(&worker_id) {
        return Err(errors::invalid_worker_id(&[("worker", json!(worker_id))]));
    }

    let task_id = params::optional_str(&call.body, "task").map(str::to_owned);
    if let Some(task_id) = &task_id {
        let company = state.identity.company.clone();
        let task = state.task_mut(task_id).map_err(|_| {
            errors::invalid_task_id(&[("id", json!(task_id)), ("company", json!(company))])
        })?;
        task.insert("last_worker".into(), json!(worker_id));
        task.insert("last_worker_report".into(), json!(iso(call.now)));
        task.insert("last_update".into(), json!(iso(call.now)));
        task.insert("last_change".into(), json!(iso(call.now)));
    }

    let worker = state.workers.get_mut(&worker_id).expect("checked above");
    worker.ip = call.ip.clone();
    worker.last_activity_time = call.now;
    worker.last_report_time = Some(call.now);
    worker.queue = params::optional_str(&call.body, "queue").map(str::to_owned);
    if let Some(queues) = params::string_list(&call.body, "queues").filter(|q| !q.is_empty()) {
        worker.queues = queues;
    }
    if let Some(tags) = params::string_list(&call.body, "tags") {
        worker.tags = tags;
    }
    worker.task = task_id;
    worker.expires_at = call.instant + Duration::from_secs(worker.register_timeout_secs);
    Ok(json!({}))
}

/// Serializes a worker as `WorkerResponseEntry`, with queue and task names filled in.
fn worker_json(state: &State, worker: &WorkerRecord) -> Value {
    let queue_entry = |id: &str| {
        let Ok(index) = state.queue_index(id) else {
            return json!({ "id": id });
        };
        let queue = &state.queues[index];
        let mut entry =
            json!({ "id": queue.id, "name": queue.name, "num_tasks": queue.entries.len() });
        if let Some((next, _)) = queue.entries.front() {
            let name = state.task(next).ok().and_then(|t| t.get("name").cloned());
            entry["next_task"] = json!({ "id": next, "name": name });
        }
        entry
    };

    let mut value = json!({
        "key": format!("worker_{}_{}_{}", state.identity.company, state.identity.user, worker.id),
        "id": worker.id,
        "user": { "id": state.identity.user, "name": state.identity.user_name },
        "company": { "id": state.identity.company, "name": state.identity.company_name },
        "ip": worker.ip,
        "queues": worker.queues.iter().map(|q| queue_entry(q)).collect::<Vec<_>>(),
        "register_time": iso(worker.register_time),
        "register_timeout": worker.register_timeout_secs,
        "last_activity_time": iso(worker.last_activity_time),
        "tags": worker.tags,
        "system_tags": worker.system_tags,
    });
    if let Some(last_report_time) = worker.last_report_time {
        value["last_report_time"] = json!(iso(last_report_time));
    }
    if let Some(queue) = &worker.queue {
        value["queue"] = queue_entry(queue);
    }
    if let Some(task_id) = &worker.task
        && let Ok(task) = state.task(task_id)
    {
        value["task"] = json!({
            "id": task_id,
            "name": task.get("name"),
            "running_time": 0,
            "last_iteration": task.get("last_iteration").cloned().unwrap_or(json!(0)),
        });
        if let Some(project) = task.get("project").and_then(Value::as_str) {
            value["project"] = json!({ "id": project, "name": state.project_name(project) });
        }
    }
    value
}

/// Returns the live workers active within `last_seen` seconds (default 3600), matching `worker_pattern`
/// (`*` and `?` wildcards) and tags.
fn live_workers<'a>(
    state: &'a State,
    call: &Call,
    default_last_seen: i64,
) -> Vec<&'a WorkerRecord> {
    let last_seen = call
        .body
        .get("last_seen")
        .and_then(Value::as_i64)
        .unwrap_or(default_last_seen);
    let pattern = params::optional_str(&call.body, "worker_pattern").map(|p| {
        let translated: String = p
            .chars()
            .map(|c| match c {
                '*' => ".*".to_owned(),
                '?' => ".?".to_owned(),
                other => other.to_string(),
            })
            .collect();
        format!("{translated}$")
    });
    let tags = params::string_list(&call.body, "tags").unwrap_or_default();
    let system_tags = params::string_list(&call.body, "system_tags").unwrap_or_default();

    state
        .workers
        .values()
        .filter(|w| {
            last_seen <= 0 || (call.now - w.last_activity_time).num_seconds() <= last_seen.max(1)
        })
        .filter(|w| {
            pattern
                .as_deref()
                .is_none_or(|p| filters::matches_pattern(p, &w.id).unwrap_or(false))
        })
        .filter(|w| {
            filters::matches_tags(&tags, &w.tags)
                && filters::matches_tags(&system_tags, &w.system_tags)
        })
        .collect()
}

pub(crate) fn get_all(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    state.expire_workers(call.instant);
    let workers: Vec<Value> = live_workers(state, call, 3600)
        .into_iter()
        .map(|w| worker_json(state, w))
        .collect();
    Ok(json!({ "workers": workers }))
}

pub(crate) fn get_count(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    state.expire_workers(call.instant);
    Ok(json!({ "count": live_workers(state, call, 0).len() }))
}
