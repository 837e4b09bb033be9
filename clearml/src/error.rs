use std::time::Duration;

/// Every way a ClearML API call can fail. Each variant names the endpoint, so a log line or an error
/// chain shows which call failed without more context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server returned an error envelope (HTTP status >= 400, or `result_code` != 200).
    #[error(
        "ClearML API call {endpoint} failed: HTTP {http_status}, result_code {result_code}, result_subcode {result_subcode}: {result_msg}"
    )]
    Api {
        endpoint: String,
        http_status: u16,
        result_code: u16,
        result_subcode: u16,
        result_msg: String,
    },

    /// The server responded, but the body is not the envelope or the data does not match the schema.
    #[error(
        "ClearML API call {endpoint} returned an invalid response (HTTP {http_status}): {reason}; check that api_server points at a ClearML API server of a supported version"
    )]
    MalformedResponse {
        endpoint: String,
        http_status: u16,
        reason: String,
    },

    #[error(
        "ClearML API call {endpoint} timed out after {after:?}; the server is overloaded or unreachable"
    )]
    Timeout { endpoint: String, after: Duration },

    #[error("ClearML API call {endpoint} could not reach the server: {reason}")]
    Connection { endpoint: String, reason: String },

    #[error("invalid ClearML client configuration: {reason}")]
    InvalidConfig { reason: String },
}

impl Error {
    /// Returns true when the same request may succeed later: server errors, timeouts, connection
    /// failures. The caller still decides whether repeating the request is safe.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Api { http_status, .. } => *http_status >= 500,
            Error::Timeout { .. } | Error::Connection { .. } => true,
            Error::MalformedResponse { http_status, .. } => *http_status >= 500,
            Error::InvalidConfig { .. } => false,
        }
    }

    /// Returns true for HTTP 401: the token expired or the credentials are wrong.
    pub fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            Error::Api {
                http_status: 401,
                ..
            }
        )
    }

    /// Returns the server's `(result_code, result_subcode)` for an error envelope.
    pub fn result_codes(&self) -> Option<(u16, u16)> {
        match self {
            Error::Api {
                result_code,
                result_subcode,
                ..
            } => Some((*result_code, *result_subcode)),
            _ => None,
        }
    }

    pub fn endpoint(&self) -> Option<&str> {
        match self {
            Error::Api { endpoint, .. }
            | Error::MalformedResponse { endpoint, .. }
            | Error::Timeout { endpoint, .. }
            | Error::Connection { endpoint, .. } => Some(endpoint),
            Error::InvalidConfig { .. } => None,
        }
    }
}
