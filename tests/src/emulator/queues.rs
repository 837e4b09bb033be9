//! `queues.*` endpoints, after `apiserver/services/queues.py` and `apiserver/bll/queue/queue_bll.py`.

use std::collections::VecDeque;

use serde_json::{Value, json};

use super::envelope::{ApiError, errors};
use super::state::{Call, Object, QueueRecord, State, filters, iso, new_id, params};

/// Shortest queue name the server accepts (`Queue.name`, `min_length=3`).
const MIN_QUEUE_NAME_LEN: usize = 3;

/// Creates a queue, as `queues.create` and the test API do.
pub(crate) fn create_queue(
    state: &mut State,
    name: &str,
    call_time: chrono::DateTime<chrono::Utc>,
) -> Result<String, ApiError> {
    let name = name.trim();
    if name.chars().count() < MIN_QUEUE_NAME_LEN {
        return Err(errors::validation_error(&format!(
            "String value is too short: name={name}"
        )));
    }
    if state.queues.iter().any(|q| q.name == name) {
        return Err(errors::expected_unique_data(&[("name", json!(name))]));
    }

    let id = new_id();
    state.queues.push(QueueRecord {
        id: id.clone(),
        name: name.to_owned(),
        display_name: None,
        created: call_time,
        tags: Vec::new(),
        system_tags: Vec::new(),
        entries: VecDeque::new(),
        last_update: Some(call_time),
        metadata: Object::new(),
    });
    tracing::info!(queue_id = %id, queue = %name, "queue created");
    Ok(id)
}

pub(crate) fn create(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let name = params::required_str(&call.body, "name")?;
    let id = create_queue(state, name, call.now)?;

    let index = state.queue_index(&id)?;
    let queue = &mut state.queues[index];
    queue.tags = params::string_list(&call.body, "tags").unwrap_or_default();
    queue.system_tags = params::string_list(&call.body, "system_tags").unwrap_or_default();
    queue.display_name = params::optional_str(&call.body, "display_name").map(str::to_owned);
    Ok(json!({ "id": id }))
}

pub(crate) fn get_by_id(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let id = params::required_str(&call.body, "queue")?;
    let index = state.queue_index(id)?;
    Ok(json!({ "queue": state.queues[index].to_json(&state.identity.company) }))
}

/// `queues.get_all` and `queues.get_all_ex`: filters by `id`, `name` (a regular expression), `tags` and
/// `system_tags`, then applies `only_fields` and paging.
pub(crate) fn get_all(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let body = &call.body;
    let ids = params::string_list(body, "id");
    let name_pattern = params::optional_str(body, "name");
    let tags = params::string_list(body, "tags").unwrap_or_default();
    let system_tags = params::string_list(body, "system_tags").unwrap_or_default();
    let only_fields = params::string_list(body, "only_fields");

    let mut queues = Vec::new();
    for queue in &state.queues {
        if ids.as_ref().is_some_and(|ids| !ids.contains(&queue.id)) {
            continue;
        }
        if let Some(pattern) = name_pattern
            && !filters::matches_pattern(pattern, &queue.name)?
        {
            continue;
        }
        if !filters::matches_tags(&tags, &queue.tags)
            || !filters::matches_tags(&system_tags, &queue.system_tags)
        {
            continue;
        }

        let Value::Object(document) = queue.to_json(&state.identity.company) else {
            unreachable!("a queue serializes to an object");
        };
        let document = match &only_fields {
            Some(fields) => filters::project(&document, fields),
            None => document,
        };
        queues.push(Value::Object(document));
    }
    Ok(json!({ "queues": filters::paginate(queues, body) }))
}

/// `queues.get_default`: the one queue tagged with the `default` system tag.
pub(crate) fn get_default(state: &mut State, _call: &Call) -> Result<Value, ApiError> {
    let defaults: Vec<&QueueRecord> = state
        .queues
        .iter()
        .filter(|q| q.system_tags.iter().any(|t| t == "default"))
        .collect();
    match defaults.as_slice() {
        [] => Err(errors::no_default_queue()),
        [queue] => Ok(json!({ "id": queue.id, "name": queue.name })),
        many => Err(errors::multiple_default_queues(&[(
            "queues",
            json!(many.iter().map(|q| q.id.clone()).collect::<Vec<_>>()),
        )])),
    }
}

pub(crate) fn update(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let id = params::required_str(&call.body, "queue")?;
    let index = state.queue_index(id)?;
    let mut fields = Object::new();

    if let Some(name) = params::optional_str(&call.body, "name") {
        if state.queues.iter().any(|q| q.name == name && q.id != id) {
            return Err(errors::expected_unique_data(&[("name", json!(name))]));
        }
        state.queues[index].name = name.to_owned();
        fields.insert("name".into(), json!(name));
    }
    if let Some(tags) = params::string_list(&call.body, "tags") {
        fields.insert("tags".into(), json!(tags));
        state.queues[index].tags = tags;
    }
    if let Some(system_tags) = params::string_list(&call.body, "system_tags") {
        fields.insert("system_tags".into(), json!(system_tags));
        state.queues[index].system_tags = system_tags;
    }
    state.queues[index].last_update = Some(call.now);
    Ok(json!({ "updated": 1, "fields": fields }))
}

pub(crate) fn delete(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let id = params::required_str(&call.body, "queue")?;
    let force = params::bool_or(&call.body, "force", false);
    let index = state.queue_index(id)?;

    if !state.queues[index].entries.is_empty() && !force {
        return Err(errors::queue_not_empty(&[(
            "num_entries",
            json!(state.queues[index].entries.len()),
        )]));
    }
    state.queues.remove(index);
    Ok(json!({ "deleted": 1 }))
}

/// `queues.add_task`: appends a task, rejecting a task that is already in this queue.
pub(crate) fn add_task(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let queue_id = params::required_str(&call.body, "queue")?;
    let task_id = params::required_str(&call.body, "task")?;
    push_task(state, queue_id, task_id, call.now)?;

    if params::bool_or(&call.body, "update_execution_queue", false)
        && let Ok(task) = state.task_mut(task_id)
    {
        filters::set_path(task, &["execution", "queue"], json!(queue_id));
    }
    Ok(json!({ "added": 1 }))
}

pub(crate) fn push_task(
    state: &mut State,
    queue_id: &str,
    task_id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), ApiError> {
    let index = state.queue_index(queue_id)?;
    let queue = &mut state.queues[index];
    if queue.entries.iter().any(|(t, _)| t == task_id) {
        return Err(errors::task_already_queued(&[("task", json!(task_id))]));
    }
    queue.entries.push_back((task_id.to_owned(), now));
    queue.last_update = Some(now);
    tracing::info!(
        queue_id,
        task_id,
        waiting = queue.entries.len(),
        "task added to queue"
    );
    Ok(())
}

/// `queues.get_next_task`: pops the first entry atomically. An empty queue returns empty data, and a task that
/// was stopped while queued goes back to `queued`, as the server fixes that race.
pub(crate) fn get_next_task(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let queue_id = params::required_str(&call.body, "queue")?;
    let expected_task = params::optional_str(&call.body, "task");
    let index = state.queue_index(queue_id)?;

    let queue = &mut state.queues[index];
    let first_matches = match expected_task {
        Some(task) => queue.entries.front().is_some_and(|(t, _)| t == task),
        None => true,
    };
    if !first_matches {
        return Ok(json!({}));
    }
    let Some((task_id, added)) = queue.entries.pop_front() else {
        return Ok(json!({}));
    };
    queue.last_update = Some(call.now);
    tracing::info!(queue_id, task_id = %task_id, "task taken from queue");

    let mut data = json!({ "entry": { "task": task_id, "added": iso(added) } });
    let company = state.identity.company.clone();
    let user = state.identity.user.clone();
    if let Ok(task) = state.task_mut(&task_id) {
        if task.get("status").and_then(Value::as_str) == Some("stopped") {
            task.insert("status".into(), json!("queued"));
        }
        if params::bool_or(&call.body, "get_task_info", false) {
            data["task_info"] = json!({ "company": company, "user": user });
        }
    }
    Ok(data)
}

/// `queues.remove_task`: removes a task, optionally moving a queued task back to its pre-enqueue status.
pub(crate) fn remove_task(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let queue_id = params::required_str(&call.body, "queue")?;
    let task_id = params::required_str(&call.body, "task")?;
    let update_status = params::bool_or(&call.body, "update_task_status", false);
    let index = state.queue_index(queue_id)?;

    let queue = &mut state.queues[index];
    let before = queue.entries.len();
    queue.entries.retain(|(t, _)| t != task_id);
    let removed = before - queue.entries.len();
    if removed == 0 {
        return Err(errors::invalid_queue_or_task_not_queued(&[
            ("task", json!(task_id)),
            ("id", json!(queue_id)),
            ("company", json!(state.identity.company)),
        ]));
    }
    queue.last_update = Some(call.now);

    if update_status && let Ok(task) = state.task_mut(task_id) {
        super::tasks::revert_queued_status(task, call.now);
    }
    Ok(json!({ "removed": removed }))
}

pub(crate) fn clear_queue(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let queue_id = params::required_str(&call.body, "queue")?;
    let index = state.queue_index(queue_id)?;
    let removed: Vec<String> = state.queues[index]
        .entries
        .drain(..)
        .map(|(t, _)| t)
        .collect();
    for task_id in &removed {
        if let Ok(task) = state.task_mut(task_id) {
            super::tasks::revert_queued_status(task, call.now);
        }
    }
    Ok(json!({ "removed_tasks": removed }))
}

/// How `queues.move_task_*` repositions a task.
enum Move {
    First,
    Last,
    By(i64),
}

fn reposition(state: &mut State, call: &Call, movement: Move) -> Result<Value, ApiError> {
    let queue_id = params::required_str(&call.body, "queue")?;
    let task_id = params::required_str(&call.body, "task")?;
    let index = state.queue_index(queue_id)?;

    let queue = &mut state.queues[index];
    let Some(position) = queue.entries.iter().position(|(t, _)| t == task_id) else {
        return Err(errors::invalid_queue_or_task_not_queued(&[
            ("task", json!(task_id)),
            ("id", json!(queue_id)),
            ("company", json!(state.identity.company)),
        ]));
    };
    let last = queue.entries.len() - 1;
    let new_position = match movement {
        Move::First => 0,
        Move::Last => last,
        Move::By(count) => (position as i64 + count).clamp(0, last as i64) as usize,
    };
    if new_position != position {
        let entry = queue
            .entries
            .remove(position)
            .expect("the position was just found");
        queue.entries.insert(new_position, entry);
        queue.last_update = Some(call.now);
    }
    Ok(json!({ "position": new_position }))
}

fn move_count(call: &Call) -> i64 {
    call.body.get("count").and_then(Value::as_i64).unwrap_or(1)
}

pub(crate) fn move_task_to_front(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    reposition(state, call, Move::First)
}

pub(crate) fn move_task_to_back(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    reposition(state, call, Move::Last)
}

pub(crate) fn move_task_forward(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    reposition(state, call, Move::By(-move_count(call)))
}

pub(crate) fn move_task_backward(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    reposition(state, call, Move::By(move_count(call)))
}

pub(crate) fn get_num_entries(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let queue_id = params::required_str(&call.body, "queue")?;
    let index = state.queue_index(queue_id)?;
    Ok(json!({ "num": state.queues[index].entries.len() }))
}

pub(crate) fn peek_task(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let queue_id = params::required_str(&call.body, "queue")?;
    let index = state.queue_index(queue_id)?;
    Ok(json!({ "task": state.queues[index].entries.front().map(|(t, _)| t.clone()) }))
}

pub(crate) fn add_or_update_metadata(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let queue_id = params::required_str(&call.body, "queue")?;
    let index = state.queue_index(queue_id)?;
    let replace = params::bool_or(&call.body, "replace_metadata", false);

    let queue = &mut state.queues[index];
    if replace {
        queue.metadata.clear();
    }
    let items = call
        .body
        .get("metadata")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for item in items {
        if let Some(key) = item.get("key").and_then(Value::as_str) {
            queue.metadata.insert(key.to_owned(), item.clone());
        }
    }
    Ok(json!({ "updated": 1 }))
}
