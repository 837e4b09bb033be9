//! The HTTP front: path parsing, authentication, body parsing, injected faults and endpoint dispatch.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State as AxumState};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::auth::{self, Identity};
use super::envelope::{self, ApiError, CallMeta, EndpointPath};
use super::state::{Call, Object, State, filters};
use super::{EmulatorConfig, Fault, misc, projects, queues, tasks, workers};

type Handler = fn(&mut State, &Call) -> Result<Value, ApiError>;

/// `auth.login` has no state handler because it signs with the emulator's token key.
const AUTH_LOGIN_MIN_VERSION: &str = "1.0";

/// Everything the request handler shares with the [`super::Emulator`] handle.
pub(crate) struct Shared {
    pub config: EmulatorConfig,
    /// Key of the HS256 token signature, random per emulator so tokens never outlive it.
    pub token_secret: Vec<u8>,
    pub state: Mutex<State>,
    pub faults: Mutex<HashMap<String, VecDeque<Fault>>>,
    pub unknown_calls: Mutex<Vec<String>>,
    /// While set, every call fails with HTTP 503 and no body, as from a load balancer whose backend is down.
    pub outage: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn new(config: EmulatorConfig) -> Shared {
        let identity = Identity {
            user: "emulator-user".to_owned(),
            user_name: "Emulator User".to_owned(),
            company: "d1bd92a3b039400cbafc60a7a5b1e52b".to_owned(),
            company_name: "emulator".to_owned(),
            role: "admin".to_owned(),
        };
        let state = State::new(identity, config.worker_timeout);
        Shared {
            config,
            token_secret: uuid::Uuid::new_v4().as_bytes().to_vec(),
            state: Mutex::new(state),
            faults: Mutex::new(HashMap::new()),
            unknown_calls: Mutex::new(Vec::new()),
            outage: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Locks the state. A handler that panicked leaves consistent data behind (each one validates before it
    /// writes), so a poisoned lock is recovered instead of failing every later call.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take_fault(&self, endpoint: &str) -> Option<Fault> {
        let mut faults = self
            .faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let queue = faults.get_mut(endpoint)?;
        let fault = queue.pop_front();
        if queue.is_empty() {
            faults.remove(endpoint);
        }
        fault
    }
}

/// Returns an endpoint's minimum API version (its `min_version` in clearml-server's `apiserver/services/`, "1.0"
/// when none is declared) and its handler.
fn lookup(name: &str) -> Option<(&'static str, Handler)> {
    let endpoint: (&str, Handler) = match name {
        "queues.create" => ("2.4", queues::create),
        "queues.get_by_id" => ("2.4", queues::get_by_id),
        "queues.get_all" | "queues.get_all_ex" => ("2.4", queues::get_all),
        "queues.get_default" => ("2.4", queues::get_default),
        "queues.update" => ("2.4", queues::update),
        "queues.delete" => ("2.4", queues::delete),
        "queues.add_task" => ("2.4", queues::add_task),
        "queues.get_next_task" => ("1.0", queues::get_next_task),
        "queues.remove_task" => ("2.4", queues::remove_task),
        "queues.clear_queue" => ("1.0", queues::clear_queue),
        "queues.move_task_forward" => ("2.4", queues::move_task_forward),
        "queues.move_task_backward" => ("2.4", queues::move_task_backward),
        "queues.move_task_to_front" => ("2.4", queues::move_task_to_front),
        "queues.move_task_to_back" => ("2.4", queues::move_task_to_back),
        "queues.add_or_update_metadata" => ("2.13", queues::add_or_update_metadata),
        "queues.peek_task" => ("2.15", queues::peek_task),
        "queues.get_num_entries" => ("2.15", queues::get_num_entries),

        "workers.register" => ("2.4", workers::register),
        "workers.unregister" => ("2.4", workers::unregister),
        "workers.status_report" => ("2.4", workers::status_report),
        "workers.get_all" => ("2.4", workers::get_all),
        "workers.get_count" => ("1.0", workers::get_count),

        "tasks.create" => ("1.0", tasks::create),
        "tasks.edit" => ("1.0", tasks::edit),
        "tasks.update" => ("1.0", tasks::update),
        "tasks.get_by_id" => ("1.0", tasks::get_by_id),
        "tasks.get_all" | "tasks.get_all_ex" | "tasks.get_by_id_ex" => ("1.0", tasks::get_all),
        "tasks.get_types" => ("1.0", tasks::get_types),
        "tasks.enqueue" => ("1.0", tasks::enqueue),
        "tasks.dequeue" => ("1.0", tasks::dequeue),
        "tasks.reset" => ("1.0", tasks::reset),
        "tasks.stop" => ("1.0", tasks::stop),
        "tasks.started" => ("1.0", tasks::started),
        "tasks.completed" => ("2.2", tasks::completed),
        "tasks.failed" => ("1.0", tasks::failed),
        "tasks.stopped" => ("1.0", tasks::stopped),
        "tasks.close" => ("1.0", tasks::close),
        "tasks.publish" => ("1.0", tasks::publish),
        "tasks.ping" => ("1.0", tasks::ping),
        "tasks.delete" => ("1.0", tasks::delete),
        "tasks.edit_hyper_params" => ("1.0", tasks::edit_hyper_params),
        "tasks.get_hyper_params" => ("1.0", tasks::get_hyper_params),
        "tasks.edit_configuration" => ("1.0", tasks::edit_configuration),
        "tasks.get_configurations" => ("1.0", tasks::get_configurations),
        "tasks.get_configuration_names" => ("1.0", tasks::get_configuration_names),
        "tasks.set_requirements" => ("1.0", tasks::set_requirements),
        "tasks.add_or_update_artifacts" => ("2.10", tasks::add_or_update_artifacts),
        "tasks.delete_artifacts" => ("2.10", tasks::delete_artifacts),
        "tasks.edit_runtime" => ("1.0", tasks::edit_runtime),
        "tasks.add_or_update_model" => ("2.13", tasks::add_or_update_model),
        "tasks.update_tags" => ("1.0", tasks::update_tags),

        "projects.create" => ("1.0", projects::create),
        "projects.get_by_id" => ("1.0", projects::get_by_id),
        "projects.get_all" | "projects.get_all_ex" => ("1.0", projects::get_all),
        "projects.update" => ("1.0", projects::update),

        "users.get_current_user" => ("1.0", misc::get_current_user),
        "events.add_batch" => ("1.0", misc::add_batch),
        "events.get_task_log" => ("1.7", misc::get_task_log),
        "server.info" => ("1.0", misc::server_info),
        _ => return None,
    };
    Some(endpoint)
}

/// Returns whether the emulator implements endpoint `name`, `auth.login` included.
pub(crate) fn is_known(name: &str) -> bool {
    name == "auth.login" || lookup(name).is_some()
}

fn version_at_least(requested: &str, minimum: &str) -> bool {
    match (
        envelope::parse_version(requested),
        envelope::parse_version(minimum),
    ) {
        (Some(requested), Some(minimum)) => requested >= minimum,
        _ => false,
    }
}

/// Handles every request: the server routes by path alone and accepts GET and POST alike.
pub(crate) async fn handle_request(
    AxumState(shared): AxumState<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if shared.outage.load(std::sync::atomic::Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable\n").into_response();
    }
    let call_id = uuid::Uuid::new_v4().simple().to_string();
    let trx = ["X-ClearML-Trx", "X-Trains-Trx"]
        .iter()
        .find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
        .map_or_else(|| call_id.clone(), str::to_owned);
    let mut meta = CallMeta {
        id: call_id,
        trx,
        endpoint: String::new(),
        requested_version: None,
        actual_version: None,
    };

    let path = match envelope::parse_endpoint_path(uri.path()) {
        Ok(path) => path,
        Err(error) => {
            tracing::warn!(path = %uri.path(), "request path is not an endpoint");
            return respond(&meta, Err(error));
        }
    };
    meta.endpoint = path.name.clone();
    meta.requested_version = Some(path.requested_version.clone());

    let client = ["X-ClearML-Client", "X-Trains-Client", "User-Agent"]
        .iter()
        .find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
        .unwrap_or_default()
        .to_owned();
    let result = dispatch(&shared, &path, &mut meta, &uri, &headers, &body, peer).await;
    match result {
        Dispatched::Result(result) => {
            log_result(&path.name, &client, &result);
            respond(&meta, result)
        }
        Dispatched::Response(response) => response,
    }
}

enum Dispatched {
    Result(Result<Value, ApiError>),
    Response(Response),
}

async fn dispatch(
    shared: &Shared,
    path: &EndpointPath,
    meta: &mut CallMeta,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    peer: SocketAddr,
) -> Dispatched {
    let handler = lookup(&path.name);
    let min_version = if path.name == "auth.login" {
        Some(AUTH_LOGIN_MIN_VERSION)
    } else {
        handler.map(|(min, _)| min)
    };
    let Some(min_version) =
        min_version.filter(|min| version_at_least(&path.requested_version, min))
    else {
        let call = format!("{} (version {})", path.name, path.requested_version);
        tracing::error!(endpoint = %path.name, version = %path.requested_version, "unknown endpoint called");
        shared
            .unknown_calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(call);
        return Dispatched::Result(Err(ApiError::plain(
            404,
            0,
            format!(
                "Unable to find endpoint for name {} and version {}",
                path.name, path.requested_version
            ),
        )));
    };
    meta.actual_version = Some(min_version.to_owned());

    let now = chrono::Utc::now();
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(error) = auth::authorize(
        authorization,
        &shared.config.access_key,
        &shared.config.secret_key,
        &shared.token_secret,
        now.timestamp(),
    ) {
        return Dispatched::Result(Err(error));
    }

    let body = match parse_body(headers, body, uri.query()) {
        Ok(body) => body,
        Err(error) => return Dispatched::Result(Err(error)),
    };

    let fault = shared.take_fault(&path.name);
    if let Some(fault) = &fault {
        tracing::warn!(endpoint = %path.name, ?fault, "injecting fault");
    }
    match &fault {
        Some(Fault::Delay(delay)) => tokio::time::sleep(*delay).await,
        Some(Fault::ServerError) => {
            return Dispatched::Result(Err(ApiError::plain(500, 0, "general server error")));
        }
        _ => {}
    }

    let call = Call {
        body,
        now,
        instant: tokio::time::Instant::now(),
        ip: peer.ip().to_string(),
    };
    let mut result = match handler {
        Some((_, handler)) => handler(&mut shared.state(), &call),
        None => login(shared, &call),
    };

    match fault {
        Some(Fault::MalformedJson) => {
            tracing::warn!(endpoint = %path.name, "replacing the response with a body that is not JSON");
            Dispatched::Response(malformed_response())
        }
        Some(Fault::DropField(field)) => {
            if let Ok(Value::Object(data)) = &mut result {
                let keys: Vec<&str> = field.split('.').collect();
                filters::remove_path(data, &keys);
            }
            Dispatched::Result(result)
        }
        _ => Dispatched::Result(result),
    }
}

/// `auth.login`: issues a token for the emulated user, valid for `expiration_sec` or the server's 30 days.
fn login(shared: &Shared, call: &Call) -> Result<Value, ApiError> {
    let expiration = call
        .body
        .get("expiration_sec")
        .and_then(Value::as_i64)
        .unwrap_or(auth::DEFAULT_TOKEN_EXPIRATION_SECS);
    let identity = shared.state().identity.clone();
    let token = auth::issue_token(
        &shared.token_secret,
        &identity,
        call.now.timestamp(),
        expiration,
    );
    tracing::info!(user = %identity.user, expiration_secs = expiration, "token issued");
    Ok(json!({ "token": token }))
}

/// Reads the call data: a JSON object, or JSON lines (`application/json-lines`, used by `events.add_batch`)
/// as an `events` list. Query arguments are merged in, as the server's request handler does.
fn parse_body(headers: &HeaderMap, body: &Bytes, query: Option<&str>) -> Result<Object, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(body);

    let mut data = if content_type.starts_with("application/json-lines") {
        let mut events = Vec::new();
        for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let event: Value = serde_json::from_str(line)
                .map_err(|e| ApiError::plain(400, 0, format!("{e} in batch item #{i}")))?;
            events.push(event);
        }
        Object::from_iter([("events".to_owned(), Value::Array(events))])
    } else if text.trim().is_empty() {
        Object::new()
    } else {
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(object)) => object,
            Ok(Value::Null) => Object::new(),
            // The SDK sends `events.add_batch` as newline-separated JSON objects without the json-lines type.
            Ok(Value::Array(items)) => {
                Object::from_iter([("events".to_owned(), Value::Array(items))])
            }
            Ok(other) => {
                return Err(ApiError::plain(
                    400,
                    0,
                    format!("request body must be a JSON object, got {other}"),
                ));
            }
            Err(_) if text.lines().filter(|l| !l.trim().is_empty()).count() > 1 => {
                let events: Result<Vec<Value>, _> = text
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(serde_json::from_str)
                    .collect();
                let events = events.map_err(|e| {
                    ApiError::plain(400, 0, format!("Failed to decode JSON object: {e}"))
                })?;
                Object::from_iter([("events".to_owned(), Value::Array(events))])
            }
            Err(e) => {
                return Err(ApiError::plain(
                    400,
                    0,
                    format!("Failed to decode JSON object: {e}"),
                ));
            }
        }
    };

    for (key, value) in query.map(parse_query).unwrap_or_default() {
        data.insert(key, value);
    }
    Ok(data)
}

/// Parses query arguments with the server's value conversion: numbers, `true`/`false`, else strings.
fn parse_query(query: &str) -> Vec<(String, Value)> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| {
            let value = match value {
                "true" | "True" | "TRUE" => Value::Bool(true),
                "false" | "False" | "FALSE" => Value::Bool(false),
                v => v
                    .parse::<i64>()
                    .map(Value::from)
                    .or_else(|_| v.parse::<f64>().map(Value::from))
                    .unwrap_or_else(|_| Value::from(v)),
            };
            (key.trim_end_matches("[]").to_owned(), value)
        })
        .collect()
}

/// Logs a call with the client that made it (`X-ClearML-Client`, else `User-Agent`), as the server does:
/// success at debug level, 4xx as a warning and 5xx as an error.
fn log_result(endpoint: &str, client: &str, result: &Result<Value, ApiError>) {
    match result {
        Ok(_) => tracing::debug!(endpoint, client, "call succeeded"),
        Err(error) if error.code >= 500 => {
            tracing::error!(endpoint, client, code = error.code, subcode = error.subcode, msg = %error.msg, "call failed")
        }
        Err(error) => {
            tracing::warn!(endpoint, client, code = error.code, subcode = error.subcode, msg = %error.msg, "call rejected")
        }
    }
}

fn respond(meta: &CallMeta, result: Result<Value, ApiError>) -> Response {
    let (code, body) = envelope::build_envelope(meta, &result);
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("a response with a valid status and header builds")
}

fn malformed_response() -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"meta\": {\"id\": \"truncated"))
        .expect("a response with a valid status and header builds")
}
