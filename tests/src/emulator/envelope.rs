//! The clearml-server response envelope, its error codes and request path parsing.
//!
//! Mirrors `apiserver/service_repo/apicall.py` (`get_response`), `apiserver/apierrors/base.py` (how an error
//! message is built) and `apiserver/apierrors/errors.conf` (codes, subcodes and default messages) of
//! clearml-server.

use std::sync::LazyLock;

use serde_json::{Map, Value, json};

/// The highest API version the emulated server reports, as clearml-server 2.3 does (`ServiceRepo._max_version`).
pub(crate) const MAX_API_VERSION: &str = "2.34";

/// A failed call: the HTTP status (`result_code`), `result_subcode`, `result_msg` and `error_data` of the envelope.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub code: u16,
    pub subcode: u32,
    pub msg: String,
    pub error_data: Map<String, Value>,
}

impl ApiError {
    /// Builds an error the way clearml-server's `BaseError` does: the default message, then ` (extra)`, then
    /// `: key=value, ...` for the keyword arguments, which also become `error_data`.
    pub fn new(
        code: u16,
        subcode: u32,
        default_msg: &str,
        extra: Option<&str>,
        kwargs: &[(&str, Value)],
    ) -> Self {
        let mut msg = default_msg.to_owned();
        if let Some(extra) = extra {
            msg.push_str(&format!(" ({extra})"));
        }
        if !kwargs.is_empty() {
            let formatted: Vec<String> = kwargs
                .iter()
                .map(|(k, v)| format!("{k}={}", format_kwarg(v)))
                .collect();
            msg.push_str(": ");
            msg.push_str(&formatted.join(", "));
        }
        let error_data = kwargs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        ApiError {
            code,
            subcode,
            msg,
            error_data,
        }
    }

    /// An error whose message is given whole, as the server's request handler and endpoint lookup produce.
    pub fn plain(code: u16, subcode: u32, msg: impl Into<String>) -> Self {
        ApiError {
            code,
            subcode,
            msg: msg.into(),
            error_data: Map::new(),
        }
    }
}

/// Formats a keyword argument as Python's `str()` would, with collections as `(a, b)` (`BaseError._format_kwarg`).
fn format_kwarg(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => format!(
            "({})",
            items
                .iter()
                .map(format_kwarg)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        other => other.to_string(),
    }
}

/// Constructors for the errors of `errors.conf` that the emulator raises, named after their subcode names.
pub(crate) mod errors {
    use super::ApiError;
    use serde_json::Value;

    type Kwargs<'a> = &'a [(&'a str, Value)];

    /// Builds the server's `validate_required_fields` error, which names the missing fields in a `missing` list.
    pub fn missing_required_fields(field: &str) -> ApiError {
        ApiError::new(
            400,
            11,
            "missing required fields",
            None,
            &[("missing", Value::from(vec![field]))],
        )
    }
    pub fn validation_error(extra: &str) -> ApiError {
        ApiError::new(400, 12, "validation error", Some(extra), &[])
    }
    pub fn invalid_task_id(kwargs: Kwargs) -> ApiError {
        ApiError::new(400, 101, "invalid task id", None, kwargs)
    }
    pub fn invalid_task_status(extra: Option<&str>, kwargs: Kwargs) -> ApiError {
        ApiError::new(400, 110, "invalid task status", extra, kwargs)
    }
    pub fn task_cannot_be_deleted(extra: &str, kwargs: Kwargs) -> ApiError {
        ApiError::new(400, 123, "task cannot be deleted", Some(extra), kwargs)
    }
    pub fn invalid_project_id(kwargs: Kwargs) -> ApiError {
        ApiError::new(400, 401, "invalid project id", None, kwargs)
    }
    pub fn invalid_project_name(extra: &str, kwargs: Kwargs) -> ApiError {
        ApiError::new(400, 407, "invalid project name", Some(extra), kwargs)
    }
    pub fn invalid_queue_id(kwargs: Kwargs) -> ApiError {
        ApiError::new(400, 701, "invalid queue id", None, kwargs)
    }
    pub fn queue_not_empty(kwargs: Kwargs) -> ApiError {
        ApiError::new(400, 702, "queue is not empty", None, kwargs)
    }
    pub fn invalid_queue_or_task_not_queued(kwargs: Kwargs) -> ApiError {
        ApiError::new(
            400,
            703,
            "invalid queue id or task not in queue",
            None,
            kwargs,
        )
    }
    pub fn task_already_queued(kwargs: Kwargs) -> ApiError {
        ApiError::new(
            400,
            706,
            "failed adding task to queue since task is already queued",
            None,
            kwargs,
        )
    }
    pub fn no_default_queue() -> ApiError {
        ApiError::new(
            400,
            707,
            "no queue is tagged as the default queue for this company",
            None,
            &[],
        )
    }
    pub fn multiple_default_queues(kwargs: Kwargs) -> ApiError {
        ApiError::new(
            400,
            708,
            "more than one queue is tagged as the default queue for this company",
            None,
            kwargs,
        )
    }
    pub fn expected_unique_data(kwargs: Kwargs) -> ApiError {
        ApiError::new(
            400,
            801,
            "value combination already exists (unique field already contains this value)",
            None,
            kwargs,
        )
    }
    pub fn invalid_worker_id(kwargs: Kwargs) -> ApiError {
        ApiError::new(400, 1001, "invalid worker id", None, kwargs)
    }
    pub fn worker_registration_failed(extra: &str, kwargs: Kwargs) -> ApiError {
        ApiError::new(400, 1002, "worker registration failed", Some(extra), kwargs)
    }
    pub fn worker_not_registered(kwargs: Kwargs) -> ApiError {
        ApiError::new(400, 1004, "worker is not registered", None, kwargs)
    }
    pub fn bad_auth_type() -> ApiError {
        ApiError::new(
            401,
            10,
            "unauthorized (bad authentication header type)",
            None,
            &[],
        )
    }
    pub fn no_credentials() -> ApiError {
        ApiError::new(401, 20, "unauthorized (missing credentials)", None, &[])
    }
    pub fn bad_credentials(extra: &str) -> ApiError {
        ApiError::new(
            401,
            21,
            "unauthorized (malformed credentials)",
            Some(extra),
            &[],
        )
    }
    pub fn invalid_credentials(extra: &str) -> ApiError {
        ApiError::new(
            401,
            22,
            "unauthorized (invalid credentials)",
            Some(extra),
            &[],
        )
    }
    pub fn invalid_token(extra: &str, kwargs: Kwargs) -> ApiError {
        ApiError::new(401, 30, "invalid token", Some(extra), kwargs)
    }
    pub fn general_error(msg: &str) -> ApiError {
        ApiError::plain(500, 0, msg)
    }
}

/// The endpoint part of a request path: `/queues.get_all` or `/v2.23/queues.get_all`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EndpointPath {
    pub name: String,
    /// The version in the path, or [`MAX_API_VERSION`] when the path has none, as the server does.
    pub requested_version: String,
}

/// The server's path expression with the version optional (`ServiceRepo._endpoint_exp`).
static ENDPOINT_PATH: LazyLock<regex::Regex> = LazyLock::new(|| {
    regex::Regex::new(r"^/?(v(?P<version>\d+\.?\d+)/)?(?P<name>[a-zA-Z_]\w+\.[a-zA-Z_]\w+)/?$")
        .expect("the endpoint path expression is valid")
});

/// Parses a request path, or returns the server's 400 for a malformed one.
pub(crate) fn parse_endpoint_path(path: &str) -> Result<EndpointPath, ApiError> {
    let captures = ENDPOINT_PATH
        .captures(path)
        .ok_or_else(|| ApiError::plain(400, 0, format!("Invalid request path {path}")))?;
    let requested_version = captures
        .name("version")
        .map_or(MAX_API_VERSION, |m| m.as_str())
        .to_owned();
    Ok(EndpointPath {
        name: captures["name"].to_owned(),
        requested_version,
    })
}

/// Parses a version like `2.23` into a comparable (major, minor) pair.
pub(crate) fn parse_version(version: &str) -> Option<(u32, u32)> {
    let (major, minor) = version.split_once('.').unwrap_or((version, "0"));
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The `meta` fields that do not depend on the result.
#[derive(Debug, Clone)]
pub(crate) struct CallMeta {
    pub id: String,
    pub trx: String,
    pub endpoint: String,
    pub requested_version: Option<String>,
    pub actual_version: Option<String>,
}

/// Builds the response body and HTTP status for a call result, exactly in the server's field order.
pub(crate) fn build_envelope(meta: &CallMeta, result: &Result<Value, ApiError>) -> (u16, Value) {
    let (code, subcode, msg, error_data, data) = match result {
        Ok(data) => (200, 0, "OK".to_owned(), Map::new(), data.clone()),
        Err(error) => (
            error.code,
            error.subcode,
            error.msg.clone(),
            error.error_data.clone(),
            json!({}),
        ),
    };
    let body = json!({
        "meta": {
            "id": meta.id,
            "trx": meta.trx,
            "endpoint": {
                "name": meta.endpoint,
                "requested_version": meta.requested_version,
                "actual_version": meta.actual_version,
            },
            "result_code": code,
            "result_subcode": subcode,
            "result_msg": msg,
            "error_stack": Value::Null,
            "error_data": error_data,
        },
        "data": data,
    });
    (code, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_appends_extra_and_kwargs() {
        let error = errors::invalid_credentials("failed to locate provided credentials");
        assert_eq!(
            error.msg,
            "unauthorized (invalid credentials) (failed to locate provided credentials)"
        );

        let error = errors::invalid_queue_id(&[("id", json!("q1")), ("company", json!("c1"))]);
        assert_eq!(error.msg, "invalid queue id: id=q1, company=c1");
        assert_eq!(error.error_data.get("id"), Some(&json!("q1")));
    }

    #[test]
    fn endpoint_path_with_and_without_version() {
        let parsed = parse_endpoint_path("/v2.23/queues.get_all").unwrap();
        assert_eq!(parsed.name, "queues.get_all");
        assert_eq!(parsed.requested_version, "2.23");

        let parsed = parse_endpoint_path("/tasks.create").unwrap();
        assert_eq!(parsed.requested_version, MAX_API_VERSION);

        let error = parse_endpoint_path("/not-an-endpoint").unwrap_err();
        assert_eq!(error.code, 400);
        assert_eq!(error.msg, "Invalid request path /not-an-endpoint");
    }
}
