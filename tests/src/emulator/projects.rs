//! `projects.*` endpoints, after `apiserver/services/projects.py` of clearml-server.

use serde_json::{Value, json};

use super::envelope::{ApiError, errors};
use super::state::{Call, Object, State, filters, iso, new_id, params};

/// Shortest project name the server accepts (`Project.name`, `min_length=3`).
const MIN_PROJECT_NAME_LEN: usize = 3;

/// Creates a project, or returns the id of the existing one with that name.
pub(crate) fn ensure_project(
    state: &mut State,
    name: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    if let Some(existing) = state
        .projects
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
    {
        return existing
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
    }
    insert_project(state, name, &Object::new(), now)
}

fn insert_project(
    state: &mut State,
    name: &str,
    body: &Object,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let id = new_id();
    let basename = name.rsplit('/').next().unwrap_or(name);
    let project = json!({
        "id": id,
        "name": name,
        "basename": basename,
        "description": body.get("description").cloned().unwrap_or(json!("")),
        "user": state.identity.user,
        "company": state.identity.company,
        "created": iso(now),
        "last_update": iso(now),
        "tags": body.get("tags").cloned().unwrap_or(json!([])),
        "system_tags": body.get("system_tags").cloned().unwrap_or(json!([])),
        "default_output_destination": body.get("default_output_destination").cloned().unwrap_or(Value::Null),
    });
    if let Value::Object(project) = project {
        state.projects.push(project);
    }
    tracing::info!(project_id = %id, project = %name, "project created");
    id
}

pub(crate) fn create(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let name = params::required_str(&call.body, "name")?.trim().to_owned();
    if name.chars().count() < MIN_PROJECT_NAME_LEN {
        return Err(errors::invalid_project_name(
            "String value is too short",
            &[("name", json!(name))],
        ));
    }
    if state
        .projects
        .iter()
        .any(|p| p.get("name").and_then(Value::as_str) == Some(&name))
    {
        return Err(errors::expected_unique_data(&[("name", json!(name))]));
    }
    let id = insert_project(state, &name, &call.body, call.now);
    Ok(json!({ "id": id }))
}

pub(crate) fn get_by_id(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let id = params::required_str(&call.body, "project")?;
    let project = state
        .projects
        .iter()
        .find(|p| p.get("id").and_then(Value::as_str) == Some(id))
        .ok_or_else(|| errors::invalid_project_id(&[("id", json!(id))]))?;
    Ok(json!({ "project": project }))
}

/// `projects.get_all` and `projects.get_all_ex`: filters by `id` and `name` (a regular expression).
pub(crate) fn get_all(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let ids = params::string_list(&call.body, "id");
    let name_pattern = params::optional_str(&call.body, "name");
    let only_fields = params::string_list(&call.body, "only_fields");

    let mut projects = Vec::new();
    for project in &state.projects {
        let id = project
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if ids.as_ref().is_some_and(|ids| !ids.iter().any(|i| i == id)) {
            continue;
        }
        let name = project
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(pattern) = name_pattern
            && !filters::matches_pattern(pattern, name)?
        {
            continue;
        }
        let document = match &only_fields {
            Some(fields) => filters::project(project, fields),
            None => project.clone(),
        };
        projects.push(Value::Object(document));
    }
    Ok(json!({ "projects": filters::paginate(projects, &call.body) }))
}

pub(crate) fn update(state: &mut State, call: &Call) -> Result<Value, ApiError> {
    let id = params::required_str(&call.body, "project")?;
    let project = state
        .projects
        .iter_mut()
        .find(|p| p.get("id").and_then(Value::as_str) == Some(id))
        .ok_or_else(|| errors::invalid_project_id(&[("id", json!(id))]))?;
    let mut fields = Object::new();
    for key in [
        "name",
        "description",
        "tags",
        "system_tags",
        "default_output_destination",
    ] {
        if let Some(value) = call.body.get(key) {
            project.insert(key.to_owned(), value.clone());
            fields.insert(key.to_owned(), value.clone());
        }
    }
    project.insert("last_update".into(), json!(iso(call.now)));
    Ok(json!({ "updated": 1, "fields": fields }))
}
