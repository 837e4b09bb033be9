//! `tasks.*` endpoints and the task status machine, after `apiserver/services/tasks.py`,
//! `apiserver/bll/task/task_operations.py` and `apiserver/bll/task/utils.py` of clearml-server.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::envelope::{ApiError, errors};
use super::queues;
use super::state::{Call, Object, State, filters, iso, new_id, params};

/// Fields `tasks.create` and `tasks.edit` accept (`create_fields` in the server's `services/tasks.py`).
const CREATE_FIELDS: &[&str] = &[
    "name",
    "tags",
    "system_tags",
    "type",
    "error",
    "comment",
    "parent",
    "project",
    "input",
    "models",
    "container",
    "output_dest",
    "execution",
    "hyperparams",
    "configuration",
    "script",
    "runtime",
];

/// Status changes the server allows without `force` (`state_machine` in `bll/task/utils.py`).
fn allowed_transitions(current: &str) -> &'static [&'static str] {
    match current {
        "created" => &["queued", "in_progress"],
        "queued" => &["created", "in_progress", "stopped"],
        "in_progress" => &["stopped", "failed", "created", "completed"],
        "stopped" => &[
            "closed",
            "created",
            "failed",
            "queued",
            "in_progress",
            "published",
            "publishing",
            "completed",
        ],
        "closed" => &["created", "failed", "published", "publishing", "stopped"],
        "failed" => &["created", "stopped", "published", "queued"],
        "publishing" => &["published"],
        "completed" => &["published", "in_progress", "created"],
        _ => &[],
    }
}

fn status_of(task: &Object) -> String {
    task.get("status")
        .and_then(Value::as_str)
        .unwrap_or("created")
        .to_owned()
}

fn task_id_of(task: &Object) -> String {
    task.get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// A status change request, as the server's `ChangeStatusRequest`.
struct StatusChange<'a> {
    new_status: &'a str,
    status_reason: &'a str,
    status_message: &'a str,
    force: bool,
}

/// Validates and applies a status change, then sets `extra` fields. Returns the server's
/// `{updated, fields}` result.
fn change_status(
    task: &mut Object,
    change: &StatusChange,
    extra: Object,
    now: DateTime<Utc>,
) -> Result<Value, ApiError> {
    let current = status_of(task);
    if !change.force
        && change.new_status != current
        && !allowed_transitions(&current).contains(&change.new_status)
    {
        return Err(errors::invalid_task_status(
            Some("Invalid status change"),
            &[
                ("current_status", json!(current)),
                ("new_status", json!(change.new_status)),
            ],
        ));
    }

    let mut fields = Object::new();
    fields.insert("status".into(), json!(change.new_status));
    fields.insert("status_reason".into(), json!(change.status_reason));
    fields.insert("status_message".into(), json!(change.status_message));
    fields.insert("status_changed".into(), json!(iso(now)));
    fields.insert("last_update".into(), json!(iso(now)));
    fields.insert("last_change".into(), json!(iso(now)));
    fields.extend(extra);

    for (key, value) in &fields {
        if value.is_null() {
            task.remove(key);
        } else {
            task.insert(key.clone(), value.clone());
        }
    }
    if change.new_status == "queued"
        && let Some(Value::Array(tags)) = task.get_mut("system_tags")
    {
        tags.retain(|t| t != "development");
    }
    tracing::info!(task_id = %task_id_of(task), from = %current, to = %change.new_status, "task status changed");
    Ok(json!({ "updated": 1, "fields": fields }))
}

/// Moves a task that left its queue back to the status it had before it was enqueued.
pub(crate) fn revert_queued_status(task: &mut Object, now: DateTime<Utc>) {
    if status_of(task) != "queued" {
        return;
    }
    let previous = task
        .get("enqueue_status")
        .and_then(Value::as_str)
        .unwrap_or("created")
        .to_owned();
    let change = StatusChange {
        new_status: &previous,
        status_reason: "",
        status_message: "",
        force: true,
    };
    let extra = Object::from_iter([("enqueue_status".to_owned(), Value::Null)]);
    if let Err(error) = change_status(task, &change, extra, now) {
        tracing::error!(task_id = %task_id_of(task), %error.msg, "failed to revert a dequeued task's status");
    }
}

/// Builds a task document with the fields the server sets on creation.
pub(crate) fn new_task(
    state: &State,
    name: &str,
    project: Option<&str>,
    now: DateTime<Utc>,
) -> Object {
    let task = json!({
        "id": new_id(),
        "name": name,
        "type": "training",
        "status": "created",
        "status_reason": "",
        "status_message": "",
        "comment": "",
        "user": state.identity.user,
        "company": state.identity.company,
        "project": project,
        "created": iso(now),
        "last_update": iso(now),
        "last_change": iso(now),
        "status_changed": iso(now),
        "tags": [],
        "system_tags": [],
        "script": {},
        "execution": {},
        "hyperparams": {},
        "configuration": {},
        "runtime": {},
        "container": {},
        "models": { "input": [], "output": [] },
        "output": {},
        "last_iteration": 0,
    });
    match task {
        Value::Object(task) => task,
        _ => unreachable!("the task literal is an object"),
    }
}

/// Copies the accepted create/edit fields of a request into a task.
fn apply_fields(task: &mut Object, body: &Object) -> Object {
    let mut fields = Object::new();
    for key in CREATE_FIELDS {
        if let Some(value) = body.get(*key) {
            task.insert((*key).to_owned(), value.clone());
            fields.insert((*key).to_owned(), value.clone());
        }
    }
    fields
}

pub(crate) fn create(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let name = params::required_str(&call.body, "name")?;
    params::required_str(&call.body, "type")?;
    let project = params::optional_str(&call.body, "project");
    if let Some(project) = project
        && state.project_name(project).is_none()
    {
        return Err(errors::invalid_project_id(&[("id", json!(project))]));
    }

    let mut task = new_task(state, name, project, call.now);
    apply_fields(&mut task, &call.body);
    let id = task_id_of(&task);
    state.tasks.push(task);
    tracing::info!(task_id = %id, task = %name, "task created");
    Ok(json!({ "id": id }))
}

/// `tasks.edit`: only a `created` task may be edited unless `force` is set.
pub(crate) fn edit(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let id = params::required_str(&call.body, "task")?;
    let force = params::bool_or(&call.body, "force", false);
    let task = state.task_mut(id)?;

    let status = status_of(task);
    if !force && status != "created" {
        return Err(errors::invalid_task_status(
            None,
            &[("expected", json!("created")), ("status", json!(status))],
        ));
    }
    let mut fields = apply_fields(task, &call.body);
    if let Some(new_status) = params::optional_str(&call.body, "status") {
        task.insert("status".into(), json!(new_status));
        fields.insert("status".into(), json!(new_status));
    }
    task.insert("last_change".into(), json!(iso(call.now)));
    task.insert("last_update".into(), json!(iso(call.now)));
    let updated = if fields.is_empty() { 0 } else { 1 };
    Ok(json!({ "updated": updated, "fields": fields }))
}

/// `tasks.update`: the fields a user may change in any status.
pub(crate) fn update(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let id = params::required_str(&call.body, "task")?;
    let task = state.task_mut(id)?;

    let mut fields = Object::new();
    for key in [
        "name",
        "comment",
        "tags",
        "system_tags",
        "project",
        "created",
        "started",
        "completed",
    ] {
        if let Some(value) = call.body.get(key) {
            task.insert(key.to_owned(), value.clone());
            fields.insert(key.to_owned(), value.clone());
        }
    }
    if let Some(error) = call.body.get("output__error") {
        filters::set_path(task, &["output", "error"], error.clone());
        fields.insert("output.error".into(), error.clone());
    }
    task.insert("last_update".into(), json!(iso(call.now)));
    Ok(json!({ "updated": 1, "fields": fields }))
}

pub(crate) fn get_by_id(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let id = params::required_str(&call.body, "task")?;
    Ok(json!({ "task": state.task(id)? }))
}

/// `tasks.get_all`, `tasks.get_all_ex` and `tasks.get_by_id_ex`: filters by `id`, `name` (a regular
/// expression), `status`, `project`, `type`, `tags`, `system_tags` and `parent`, then applies `only_fields`
/// and paging. Results keep creation order.
pub(crate) fn get_all(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let body = &call.body;
    let ids = params::string_list(body, "id");
    let name_pattern = params::optional_str(body, "name");
    let statuses = params::string_list(body, "status");
    let projects = params::string_list(body, "project");
    let types = params::string_list(body, "type");
    let parents = params::string_list(body, "parent");
    let tags = params::string_list(body, "tags").unwrap_or_default();
    let system_tags = params::string_list(body, "system_tags").unwrap_or_default();
    let only_fields = params::string_list(body, "only_fields");

    let field = |task: &Object, key: &str| {
        task.get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let list = |task: &Object, key: &str| -> Vec<String> {
        task.get(key)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let allowed = |filter: &Option<Vec<String>>, value: String| {
        filter.as_ref().is_none_or(|f| f.contains(&value))
    };

    let mut tasks = Vec::new();
    for task in &state.tasks {
        if !allowed(&ids, field(task, "id"))
            || !allowed(&statuses, field(task, "status"))
            || !allowed(&projects, field(task, "project"))
            || !allowed(&types, field(task, "type"))
            || !allowed(&parents, field(task, "parent"))
        {
            continue;
        }
        if let Some(pattern) = name_pattern
            && !filters::matches_pattern(pattern, &field(task, "name"))?
        {
            continue;
        }
        if !filters::matches_tags(&tags, &list(task, "tags"))
            || !filters::matches_tags(&system_tags, &list(task, "system_tags"))
        {
            continue;
        }
        let document = match &only_fields {
            Some(fields) => filters::project(task, fields),
            None => task.clone(),
        };
        tasks.push(Value::Object(document));
    }
    Ok(json!({ "tasks": filters::paginate(tasks, body) }))
}

/// `tasks.enqueue`: by queue id, by queue name (created when missing), or into the default queue.
pub(crate) fn enqueue(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let body = &call.body;
    let task_id = params::required_str(body, "task")?;
    let queue_id = params::optional_str(body, "queue");
    let queue_name = params::optional_str(body, "queue_name");
    let force = params::bool_or(body, "force", false);
    let status_reason = params::optional_str(body, "status_reason").unwrap_or_default();
    let status_message = params::optional_str(body, "status_message").unwrap_or_default();
    state.task(task_id)?;

    let queue_id = match (queue_id, queue_name) {
        (Some(_), Some(_)) => {
            return Err(errors::validation_error(
                "Either queue id or queue name should be provided",
            ));
        }
        (Some(id), None) => id.to_owned(),
        (None, Some(name)) => match state.queues.iter().find(|q| q.name == name) {
            Some(queue) => queue.id.clone(),
            None => queues::create_queue(state, name, call.now)?,
        },
        (None, None) => queues::get_default(state, call)?["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    };
    state.queue_index(&queue_id)?;

    let task = state.task_mut(task_id)?;
    let current = status_of(task);
    let before_enqueue = match task.get("enqueue_status").and_then(Value::as_str) {
        Some(previous) if current == "queued" => previous.to_owned(),
        _ => current.clone(),
    };
    let change = StatusChange {
        new_status: "queued",
        status_reason,
        status_message,
        force,
    };
    let extra = Object::from_iter([("enqueue_status".to_owned(), json!(before_enqueue))]);
    let mut result = change_status(task, &change, extra, call.now)?;

    if let Err(error) = queues::push_task(state, &queue_id, task_id, call.now) {
        let task = state.task_mut(task_id)?;
        let revert = StatusChange {
            new_status: &current,
            status_reason: "failed enqueueing",
            status_message: "",
            force: true,
        };
        change_status(
            task,
            &revert,
            Object::from_iter([("enqueue_status".to_owned(), Value::Null)]),
            call.now,
        )?;
        return Err(error);
    }

    let task = state.task_mut(task_id)?;
    filters::set_path(task, &["execution", "queue"], json!(queue_id));
    result["fields"]["execution.queue"] = json!(queue_id);
    state.remove_from_all_queues(task_id, Some(&queue_id));
    result["queued"] = json!(1);
    Ok(result)
}

/// `tasks.dequeue`, as the server's `dequeue_task`: removes a queued task from its queue, then moves a
/// `queued` or `in_progress` task to `new_status`, else to its status from before the enqueue. clearml-agent
/// calls it with `new_status: in_progress` on a task it already took, to claim it.
pub(crate) fn dequeue(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let new_status = params::optional_str(&call.body, "new_status").map(str::to_owned);
    if let Some(status) = &new_status
        && allowed_transitions(status).is_empty()
        && status != "published"
    {
        return Err(errors::validation_error(&format!(
            "Invalid task status: {status}"
        )));
    }
    let Ok(task) = state.task(task_id) else {
        state.remove_from_all_queues(task_id, None);
        return Ok(json!({ "dequeued": 1, "updated": 0 }));
    };

    let status = status_of(task);
    let queue_id = filters::get_path(task, &["execution", "queue"])
        .and_then(Value::as_str)
        .map(str::to_owned);
    let enqueue_status = task
        .get("enqueue_status")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if status == "queued"
        && let Some(queue_id) = queue_id
        && let Ok(index) = state.queue_index(&queue_id)
    {
        state.queues[index].entries.retain(|(t, _)| t != task_id);
    }
    if params::bool_or(&call.body, "remove_from_all_queues", false) {
        state.remove_from_all_queues(task_id, None);
    }
    if status != "queued" && status != "in_progress" {
        return Ok(json!({ "dequeued": 1, "updated": 0 }));
    }

    let new_status = new_status
        .or(enqueue_status)
        .unwrap_or_else(|| "created".to_owned());
    let change = StatusChange {
        new_status: &new_status,
        status_reason: params::optional_str(&call.body, "status_reason").unwrap_or_default(),
        status_message: params::optional_str(&call.body, "status_message").unwrap_or_default(),
        force: true,
    };
    let extra = Object::from_iter([("enqueue_status".to_owned(), Value::Null)]);
    let mut result = change_status(state.task_mut(task_id)?, &change, extra, call.now)?;
    result["dequeued"] = json!(1);
    Ok(result)
}

/// `tasks.reset`: dequeues the task and returns it to `created`, clearing what a run produced.
pub(crate) fn reset(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let force = params::bool_or(&call.body, "force", false);
    let status = status_of(state.task(task_id)?);
    if !force && status == "published" {
        return Err(errors::invalid_task_status(
            None,
            &[("task_id", json!(task_id)), ("status", json!(status))],
        ));
    }
    let dequeued = state.remove_from_all_queues(task_id, None);

    let task = state.task_mut(task_id)?;
    if let Some(Value::Object(execution)) = task.get_mut("execution") {
        execution.remove("queue");
    }
    let mut extra = Object::new();
    for key in [
        "last_worker",
        "last_worker_report",
        "started",
        "completed",
        "published",
        "active_duration",
        "enqueue_status",
    ] {
        extra.insert(key.to_owned(), Value::Null);
    }
    extra.insert("runtime".into(), json!({}));
    extra.insert("last_iteration".into(), json!(0));
    let change = StatusChange {
        new_status: "created",
        status_reason: "reset",
        status_message: "reset",
        force,
    };
    let mut result = change_status(task, &change, extra, call.now)?;
    if dequeued > 0 {
        result["dequeued"] = json!({ "removed": dequeued });
    }
    Ok(result)
}

/// `tasks.stop`: a queued task, or one that no worker reported on within the server's 600 s
/// `task_update_timeout`, stops at once. A running task only gets the status message `stopping`, which its
/// agent acts on.
pub(crate) fn stop(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let force = params::bool_or(&call.body, "force", false);
    let status_reason = params::optional_str(&call.body, "status_reason").unwrap_or_default();
    let user_name = state.identity.user_name.clone();

    let task = state.task(task_id)?;
    let status = status_of(task);
    let is_queued = status == "queued";
    let development = task
        .get("system_tags")
        .and_then(Value::as_array)
        .is_some_and(|tags| tags.iter().any(|t| t == "development"));
    let run_by_worker = task.get("last_worker").is_some_and(|w| !w.is_null())
        && task
            .get("last_update")
            .and_then(Value::as_str)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| (call.now - t.with_timezone(&Utc)).num_seconds() < 600);

    if is_queued {
        state.remove_from_all_queues(task_id, None);
    }
    let (new_status, status_message) = if is_queued || development || !run_by_worker {
        ("stopped".to_owned(), format!("Stopped by {user_name}"))
    } else {
        (status, "stopping".to_owned())
    };
    let change = StatusChange {
        new_status: &new_status,
        status_reason,
        status_message: &status_message,
        force,
    };
    change_status(state.task_mut(task_id)?, &change, Object::new(), call.now)
}

/// Applies the status change of `tasks.started`, `completed`, `failed`, `stopped`, `close` and `publish`.
fn set_status(
    state: &mut State,
    call: &Call,
    new_status: &str,
    extra: Object,
) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let change = StatusChange {
        new_status,
        status_reason: params::optional_str(&call.body, "status_reason").unwrap_or_default(),
        status_message: params::optional_str(&call.body, "status_message").unwrap_or_default(),
        force: params::bool_or(&call.body, "force", false),
    };
    change_status(state.task_mut(task_id)?, &change, extra, call.now)
}

pub(crate) fn started(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let task = state.task(task_id)?;
    let mut extra = Object::new();
    let already_started =
        status_of(task) == "in_progress" && task.get("started").is_some_and(|s| !s.is_null());
    if !already_started {
        extra.insert("started".into(), json!(iso(call.now)));
        extra.insert("completed".into(), Value::Null);
        extra.insert("active_duration".into(), Value::Null);
    }
    let mut result = set_status(state, call, "in_progress", extra)?;
    result["started"] = result["updated"].clone();
    Ok(result)
}

fn completed_now(call: &Call) -> Object {
    Object::from_iter([("completed".to_owned(), json!(iso(call.now)))])
}

pub(crate) fn completed(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let mut result = set_status(state, call, "completed", completed_now(call))?;
    if params::bool_or(&call.body, "publish", false) {
        let published = set_status(state, call, "published", Object::new())?;
        result["published"] = published["updated"].clone();
        result["fields"]["status"] = json!("published");
    }
    Ok(result)
}

pub(crate) fn failed(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    set_status(state, call, "failed", completed_now(call))
}

pub(crate) fn stopped(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    set_status(state, call, "stopped", completed_now(call))
}

pub(crate) fn close(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    set_status(state, call, "closed", Object::new())
}

pub(crate) fn publish(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    set_status(
        state,
        call,
        "published",
        Object::from_iter([("published".to_owned(), json!(iso(call.now)))]),
    )
}

pub(crate) fn ping(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    state
        .task_mut(task_id)?
        .insert("last_update".into(), json!(iso(call.now)));
    Ok(json!({}))
}

/// `tasks.delete`: only a `created` task unless `force`; it is also removed from every queue.
pub(crate) fn delete(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let force = params::bool_or(&call.body, "force", false);
    let status = status_of(state.task(task_id)?);
    if !force && status != "created" {
        return Err(errors::task_cannot_be_deleted(
            "due to status, use force=True",
            &[
                ("task", json!(task_id)),
                ("expected", json!("created")),
                ("current", json!(status)),
            ],
        ));
    }
    state.remove_from_all_queues(task_id, None);
    state
        .tasks
        .retain(|t| t.get("id").and_then(Value::as_str) != Some(task_id));
    Ok(json!({ "deleted": 1, "updated_children": 0, "updated_models": 0 }))
}

/// `tasks.edit_hyper_params`: `hyperparams` is stored as `{section: {name: param}}`, as the server does.
pub(crate) fn edit_hyper_params(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let replace = params::optional_str(&call.body, "replace_hyperparams")
        .unwrap_or("none")
        .to_owned();
    let items = call
        .body
        .get("hyperparams")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let task = state.task_mut(task_id)?;

    let hyperparams = task.entry("hyperparams").or_insert_with(|| json!({}));
    if replace == "all" {
        *hyperparams = json!({});
    }
    let Some(sections) = hyperparams.as_object_mut() else {
        return Err(errors::general_error("task hyperparams are not an object"));
    };
    if replace == "section" {
        for item in &items {
            if let Some(section) = item.get("section").and_then(Value::as_str) {
                sections.remove(section);
            }
        }
    }
    for item in items {
        let section = item
            .get("section")
            .and_then(Value::as_str)
            .unwrap_or("General")
            .to_owned();
        let name = item
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let entry = sections.entry(section).or_insert_with(|| json!({}));
        if let Some(entry) = entry.as_object_mut() {
            entry.insert(name, item);
        }
    }
    task.insert("last_change".into(), json!(iso(call.now)));
    Ok(json!({ "updated": 1 }))
}

pub(crate) fn get_hyper_params(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let ids = params::string_list(&call.body, "tasks").unwrap_or_default();
    let mut result = Vec::new();
    for id in ids {
        let task = state.task(&id)?;
        let params: Vec<Value> = task
            .get("hyperparams")
            .and_then(Value::as_object)
            .map(|sections| {
                sections
                    .values()
                    .filter_map(Value::as_object)
                    .flat_map(|s| s.values().cloned())
                    .collect()
            })
            .unwrap_or_default();
        result.push(json!({ "task": id, "hyperparams": params }));
    }
    Ok(json!({ "params": result }))
}

/// `tasks.edit_configuration`: `configuration` is stored as `{name: item}`, as the server does.
pub(crate) fn edit_configuration(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let replace = params::bool_or(&call.body, "replace_configuration", false);
    let items = call
        .body
        .get("configuration")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let task = state.task_mut(task_id)?;

    let configuration = task.entry("configuration").or_insert_with(|| json!({}));
    if replace || !configuration.is_object() {
        *configuration = json!({});
    }
    if let Some(configuration) = configuration.as_object_mut() {
        for item in items {
            if let Some(name) = item.get("name").and_then(Value::as_str) {
                configuration.insert(name.to_owned(), item.clone());
            }
        }
    }
    task.insert("last_change".into(), json!(iso(call.now)));
    Ok(json!({ "updated": 1 }))
}

pub(crate) fn get_configurations(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let ids = params::string_list(&call.body, "tasks").unwrap_or_default();
    let names = params::string_list(&call.body, "names");
    let mut result = Vec::new();
    for id in ids {
        let task = state.task(&id)?;
        let items: Vec<Value> = task
            .get("configuration")
            .and_then(Value::as_object)
            .map(|items| {
                items
                    .iter()
                    .filter(|(name, _)| names.as_ref().is_none_or(|names| names.contains(name)))
                    .map(|(_, item)| item.clone())
                    .collect()
            })
            .unwrap_or_default();
        result.push(json!({ "task": id, "configuration": items }));
    }
    Ok(json!({ "configurations": result }))
}

pub(crate) fn get_configuration_names(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let ids = params::string_list(&call.body, "tasks").unwrap_or_default();
    let mut result = Vec::new();
    for id in ids {
        let task = state.task(&id)?;
        let names: Vec<String> = task
            .get("configuration")
            .and_then(Value::as_object)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        result.push(json!({ "task": id, "names": names }));
    }
    Ok(json!({ "configurations": result }))
}

pub(crate) fn set_requirements(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let requirements = call
        .body
        .get("requirements")
        .cloned()
        .unwrap_or(Value::Null);
    let task = state.task_mut(task_id)?;
    filters::set_path(task, &["script", "requirements"], requirements.clone());
    Ok(json!({ "updated": 1, "fields": { "script.requirements": requirements } }))
}

/// `tasks.add_or_update_artifacts`: artifacts are a list in `execution.artifacts`, replaced by `(key, mode)`.
pub(crate) fn add_or_update_artifacts(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let artifacts = call
        .body
        .get("artifacts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let task = state.task_mut(task_id)?;

    let identity = |a: &Value| {
        (
            a.get("key").cloned(),
            a.get("mode").cloned().unwrap_or(json!("output")),
        )
    };
    let mut stored: Vec<Value> = filters::get_path(task, &["execution", "artifacts"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for artifact in &artifacts {
        stored.retain(|existing| identity(existing) != identity(artifact));
        stored.push(artifact.clone());
    }
    filters::set_path(task, &["execution", "artifacts"], Value::Array(stored));
    Ok(json!({ "updated": artifacts.len() }))
}

pub(crate) fn delete_artifacts(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let keys: Vec<Value> = call
        .body
        .get("artifacts")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|item| item.get("key").cloned())
                .collect()
        })
        .unwrap_or_default();
    let task = state.task_mut(task_id)?;
    let mut stored: Vec<Value> = filters::get_path(task, &["execution", "artifacts"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let before = stored.len();
    stored.retain(|a| a.get("key").is_none_or(|k| !keys.contains(k)));
    let deleted = before - stored.len();
    filters::set_path(task, &["execution", "artifacts"], Value::Array(stored));
    Ok(json!({ "deleted": deleted }))
}

pub(crate) fn edit_runtime(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let add = call
        .body
        .get("add_or_update")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let remove = params::string_list(&call.body, "remove").unwrap_or_default();
    let task = state.task_mut(task_id)?;

    let runtime = task.entry("runtime").or_insert_with(|| json!({}));
    if !runtime.is_object() {
        *runtime = json!({});
    }
    if let Some(runtime) = runtime.as_object_mut() {
        runtime.extend(add);
        for key in &remove {
            runtime.remove(key);
        }
    }
    Ok(json!({ "updated": 1 }))
}

/// `tasks.add_or_update_model`: `models.input` or `models.output` entries, replaced by name.
pub(crate) fn add_or_update_model(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task_id = params::required_str(&call.body, "task")?;
    let name = params::required_str(&call.body, "name")?.to_owned();
    let model = params::required_str(&call.body, "model")?.to_owned();
    let kind = params::required_str(&call.body, "type")?.to_owned();
    let task = state.task_mut(task_id)?;

    let mut list: Vec<Value> = filters::get_path(task, &["models", &kind])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    list.retain(|m| m.get("name").and_then(Value::as_str) != Some(&name));
    list.push(json!({ "name": name, "model": model }));
    filters::set_path(task, &["models", &kind], Value::Array(list));
    Ok(json!({ "updated": 1 }))
}

pub(crate) fn update_tags(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let ids = params::string_list(&call.body, "ids").unwrap_or_default();
    let add = params::string_list(&call.body, "add_tags").unwrap_or_default();
    let remove = params::string_list(&call.body, "remove_tags").unwrap_or_default();
    let mut updated = 0;
    for id in ids {
        let task = state.task_mut(&id)?;
        let tags = task.entry("tags").or_insert_with(|| json!([]));
        if let Some(tags) = tags.as_array_mut() {
            tags.retain(|t| t.as_str().is_none_or(|t| !remove.iter().any(|r| r == t)));
            for tag in &add {
                if !tags.iter().any(|t| t == tag) {
                    tags.push(json!(tag));
                }
            }
            updated += 1;
        }
    }
    Ok(json!({ "updated": updated }))
}

pub(crate) fn get_types(_state: &mut State, _call: &Call) -> Result<Value, ApiError> {
    Ok(
        json!({ "types": ["training", "testing", "inference", "data_processing", "application", "monitor",
        "controller", "optimizer", "service", "qc", "custom"] }),
    )
}
