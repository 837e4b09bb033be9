//! The emulated server's data: queues, tasks, projects, workers and task events, behind one lock.
//!
//! Every endpoint runs with the lock held from start to end, so each call is atomic, which is what makes
//! `queues.get_next_task` hand a task to exactly one caller.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::auth::Identity;
use super::envelope::{ApiError, errors};

/// A JSON object, the shape of every request body and stored document.
pub(crate) type Object = Map<String, Value>;

/// One endpoint call as the handlers see it.
pub(crate) struct Call {
    pub body: Object,
    /// Wall-clock time for the timestamps the API returns.
    pub now: DateTime<Utc>,
    /// Monotonic time for worker expiry, paused and advanced by tests through tokio's clock.
    pub instant: Instant,
    /// The caller's address, which the server records as a worker's `ip`.
    pub ip: String,
}

pub(crate) struct QueueRecord {
    pub id: String,
    pub name: String,
    pub display_name: Option<String>,
    pub created: DateTime<Utc>,
    pub tags: Vec<String>,
    pub system_tags: Vec<String>,
    /// Waiting tasks, front first, with the time each was added.
    pub entries: VecDeque<(String, DateTime<Utc>)>,
    pub last_update: Option<DateTime<Utc>>,
    pub metadata: Object,
}

impl QueueRecord {
    pub fn to_json(&self, company: &str) -> Value {
        let entries: Vec<Value> = self
            .entries
            .iter()
            .map(|(task, added)| json!({ "task": task, "added": iso(*added) }))
            .collect();
        let mut queue = json!({
            "id": self.id,
            "name": self.name,
            "company": company,
            "created": iso(self.created),
            "tags": self.tags,
            "system_tags": self.system_tags,
            "entries": entries,
            "metadata": self.metadata,
        });
        if let Some(display_name) = &self.display_name {
            queue["display_name"] = json!(display_name);
        }
        if let Some(last_update) = self.last_update {
            queue["last_update"] = json!(iso(last_update));
        }
        queue
    }
}

pub(crate) struct WorkerRecord {
    pub id: String,
    pub ip: String,
    pub queues: Vec<String>,
    pub task: Option<String>,
    /// The queue the current task was taken from.
    pub queue: Option<String>,
    pub register_time: DateTime<Utc>,
    pub register_timeout_secs: u64,
    pub last_activity_time: DateTime<Utc>,
    pub last_report_time: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub system_tags: Vec<String>,
    /// The server keeps a worker in Redis with a TTL of `register_timeout`, renewed by every status report.
    pub expires_at: Instant,
}

pub(crate) struct State {
    pub identity: Identity,
    pub default_worker_timeout: Duration,
    pub queues: Vec<QueueRecord>,
    /// Tasks in creation order.
    pub tasks: Vec<Object>,
    pub projects: Vec<Object>,
    pub workers: BTreeMap<String, WorkerRecord>,
    /// Events per task from `events.add_batch` (console output, scalars), in arrival order.
    pub task_events: HashMap<String, Vec<Value>>,
}

impl State {
    pub fn new(identity: Identity, default_worker_timeout: Duration) -> State {
        State {
            identity,
            default_worker_timeout,
            queues: Vec::new(),
            tasks: Vec::new(),
            projects: Vec::new(),
            workers: BTreeMap::new(),
            task_events: HashMap::new(),
        }
    }

    pub fn queue_index(&self, id: &str) -> Result<usize, ApiError> {
        self.queues.iter().position(|q| q.id == id).ok_or_else(|| {
            errors::invalid_queue_id(&[
                ("id", json!(id)),
                ("company", json!(self.identity.company)),
            ])
        })
    }

    /// Finds a queue by id, then by name, as the Rust test API accepts either.
    pub fn queue_by_id_or_name(&self, id_or_name: &str) -> Option<&QueueRecord> {
        self.queues
            .iter()
            .find(|q| q.id == id_or_name)
            .or_else(|| self.queues.iter().find(|q| q.name == id_or_name))
    }

    pub fn task(&self, id: &str) -> Result<&Object, ApiError> {
        self.tasks
            .iter()
            .find(|t| t.get("id").and_then(Value::as_str) == Some(id))
            .ok_or_else(|| errors::invalid_task_id(&[("id", json!(id))]))
    }

    pub fn task_mut(&mut self, id: &str) -> Result<&mut Object, ApiError> {
        self.tasks
            .iter_mut()
            .find(|t| t.get("id").and_then(Value::as_str) == Some(id))
            .ok_or_else(|| errors::invalid_task_id(&[("id", json!(id))]))
    }

    pub fn project_name(&self, id: &str) -> Option<String> {
        self.projects
            .iter()
            .find(|p| p.get("id").and_then(Value::as_str) == Some(id))
            .and_then(|p| p.get("name").and_then(Value::as_str))
            .map(str::to_owned)
    }

    /// Drops workers whose registration expired, as Redis drops their keys when the TTL runs out.
    pub fn expire_workers(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .workers
            .values()
            .filter(|w| w.expires_at <= now)
            .map(|w| w.id.clone())
            .collect();
        for id in expired {
            tracing::info!(worker = %id, "worker registration expired");
            self.workers.remove(&id);
        }
    }

    /// Removes a task from every queue except `except`, returning how many entries were removed.
    pub fn remove_from_all_queues(&mut self, task: &str, except: Option<&str>) -> usize {
        let mut removed = 0;
        for queue in self
            .queues
            .iter_mut()
            .filter(|q| Some(q.id.as_str()) != except)
        {
            let before = queue.entries.len();
            queue.entries.retain(|(t, _)| t != task);
            removed += before - queue.entries.len();
        }
        removed
    }
}

/// Formats a time as the server's JSON encoder does (`datetime.isoformat()` of an aware UTC time).
pub(crate) fn iso(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Reads request fields, failing with the server's validation errors.
pub(crate) mod params {
    use serde_json::Value;

    use super::Object;
    use crate::emulator::envelope::{ApiError, errors};

    pub fn required_str<'a>(body: &'a Object, key: &str) -> Result<&'a str, ApiError> {
        match body.get(key) {
            Some(Value::String(s)) => Ok(s),
            None | Some(Value::Null) => Err(errors::missing_required_fields(key)),
            Some(other) => Err(errors::validation_error(&format!(
                "field '{key}' must be a string, got {other}"
            ))),
        }
    }

    pub fn optional_str<'a>(body: &'a Object, key: &str) -> Option<&'a str> {
        body.get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    pub fn bool_or(body: &Object, key: &str, default: bool) -> bool {
        body.get(key).and_then(Value::as_bool).unwrap_or(default)
    }

    /// Reads a list of strings; a single string counts as a list of one, as the server's list fields accept.
    pub fn string_list(body: &Object, key: &str) -> Option<Vec<String>> {
        match body.get(key)? {
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(items) => Some(
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// Query filters of the `get_all` endpoints, after `GetMixin.get_all_query` of clearml-server.
pub(crate) mod filters {
    use serde_json::Value;

    use super::Object;
    use crate::emulator::envelope::ApiError;

    /// Matches a `name` filter, a case-sensitive regular expression search as the server's pattern fields do.
    pub fn matches_pattern(pattern: &str, value: &str) -> Result<bool, ApiError> {
        let regex = regex::Regex::new(pattern).map_err(|e| {
            ApiError::new(
                400,
                21,
                "malformed regular expression",
                Some(&e.to_string()),
                &[],
            )
        })?;
        Ok(regex.is_match(value))
    }

    /// A tag filter: every plain tag must be present and every `-tag` absent. `__$not`/`__$all` operators are not
    /// supported.
    pub fn matches_tags(filter: &[String], tags: &[String]) -> bool {
        filter.iter().all(|tag| match tag.strip_prefix('-') {
            Some(excluded) => !tags.iter().any(|t| t == excluded),
            None => tags.iter().any(|t| t == tag),
        })
    }

    /// Keeps only the dotted `only_fields` paths of a document, plus `id`.
    pub fn project(document: &Object, only_fields: &[String]) -> Object {
        let mut result = Object::new();
        if let Some(id) = document.get("id") {
            result.insert("id".to_owned(), id.clone());
        }
        for path in only_fields {
            let keys: Vec<&str> = path.split('.').collect();
            if let Some(value) = get_path(document, &keys) {
                set_path(&mut result, &keys, value.clone());
            }
        }
        result
    }

    pub fn get_path<'a>(document: &'a Object, keys: &[&str]) -> Option<&'a Value> {
        let (first, rest) = keys.split_first()?;
        let value = document.get(*first)?;
        if rest.is_empty() {
            Some(value)
        } else {
            get_path(value.as_object()?, rest)
        }
    }

    pub fn set_path(document: &mut Object, keys: &[&str], value: Value) {
        let Some((first, rest)) = keys.split_first() else {
            return;
        };
        if rest.is_empty() {
            document.insert((*first).to_owned(), value);
            return;
        }
        let child = document
            .entry((*first).to_owned())
            .or_insert_with(|| Value::Object(Object::new()));
        if !child.is_object() {
            *child = Value::Object(Object::new());
        }
        if let Some(child) = child.as_object_mut() {
            set_path(child, rest, value);
        }
    }

    /// Removes a dotted path, returning whether it existed.
    pub fn remove_path(document: &mut Object, keys: &[&str]) -> bool {
        let Some((first, rest)) = keys.split_first() else {
            return false;
        };
        if rest.is_empty() {
            return document.remove(*first).is_some();
        }
        match document.get_mut(*first).and_then(Value::as_object_mut) {
            Some(child) => remove_path(child, rest),
            None => false,
        }
    }

    /// Pages a result list with the server's `page` and `page_size` (both optional, page counted from 0).
    pub fn paginate(items: Vec<Value>, body: &Object) -> Vec<Value> {
        let page_size = body.get("page_size").and_then(Value::as_u64);
        let page = body.get("page").and_then(Value::as_u64).unwrap_or(0);
        match page_size {
            Some(size) if size > 0 => items
                .into_iter()
                .skip((page * size) as usize)
                .take(size as usize)
                .collect(),
            _ => items,
        }
    }
}
