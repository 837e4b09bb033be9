//! `users.*`, `events.*` and `server.*` endpoints that the clients call around a task run.

use serde_json::{Value, json};

use super::envelope::{ApiError, errors};
use super::state::{Call, State};

/// `users.get_current_user`: the single emulated user, in the shape of the server's `users.get_current_user`.
pub(crate) fn get_current_user(state: &mut State, _call: &Call) -> Result<Value, ApiError> {
    let identity = &state.identity;
    Ok(json!({
        "user": {
            "id": identity.user,
            "name": identity.user_name,
            "given_name": identity.user_name,
            "family_name": "",
            "company": { "id": identity.company, "name": identity.company_name },
            "role": identity.role,
            "preferences": {},
        },
        "getting_started": {},
        "settings": { "max_download_items": 1000 },
    }))
}

/// `events.add_batch`: stores each event under its task. The body is JSON lines
/// (`application/json-lines`), which the request handler turns into an `events` list.
pub(crate) fn add_batch(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let events = call
        .body
        .get("events")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if events.is_empty() {
        return Err(ApiError::new(
            400,
            17,
            "batch request contains no items",
            None,
            &[],
        ));
    }
    let added = events.len();
    for event in events {
        let task = event
            .get("task")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        state.task_events.entry(task).or_default().push(event);
    }
    Ok(json!({ "added": added, "errors": 0, "errors_info": {} }))
}

/// `events.get_task_log`: the console lines a task reported, oldest first.
pub(crate) fn get_task_log(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let task = call
        .body
        .get("task")
        .and_then(Value::as_str)
        .ok_or_else(|| errors::missing_required_fields("task"))?;
    let events: Vec<Value> = state
        .task_events
        .get(task)
        .map(|events| {
            events
                .iter()
                .filter(|e| e.get("type").and_then(Value::as_str) == Some("log"))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Ok(
        json!({ "events": events, "returned": events.len(), "total": events.len(), "scroll_id": Value::Null }),
    )
}

/// `server.info`: the version the emulator reports for itself.
pub(crate) fn server_info(_state: &mut State, _call: &Call) -> Result<Value, ApiError> {
    Ok(json!({
        "version": super::auth::SERVER_VERSION,
        "build": "emulator",
        "commit": "",
        "api_version": super::envelope::MAX_API_VERSION,
        "uid": "clearml-emulator",
    }))
}
