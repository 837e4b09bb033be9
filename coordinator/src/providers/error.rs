//! Provider errors and the classes of cloud errors that decide what happens next.

use std::time::Duration;

/// Class of a failed cloud call, which decides the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// No capacity or quota for this offering: back off the offering and try the next one.
    Capacity,
    /// The account's request rate is exceeded: retry with jittered exponential delays.
    Throttling,
    /// The resource's configuration is wrong: disable the resource until the configuration changes.
    Configuration,
    /// A server error or timeout: retry.
    Transient,
    /// Anything else: fail the call without retrying.
    Other,
}

/// EC2 error codes that mean "no capacity or no quota for this offering right now".
const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "Unsupported",
    "InsufficientFreeAddressesInSubnet",
];

/// EC2 error codes of throttled requests.
const THROTTLING_CODES: &[&str] = &["RequestLimitExceeded", "Throttling"];

/// EC2 error codes, or code prefixes ending in `.`, that mean the request's configuration is wrong.
const CONFIGURATION_CODES: &[&str] = &[
    "InvalidAMIID.",
    "InvalidSubnetID.",
    "InvalidGroup.NotFound",
    "InvalidKeyPair.NotFound",
    "InvalidParameterValue",
    "UnauthorizedOperation",
];

/// EC2 error codes of server-side failures that a retry can fix.
const TRANSIENT_CODES: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
];

/// Classifies a cloud error by its error code and HTTP status.
///
/// The code decides first: EC2 returns InsufficientInstanceCapacity with HTTP 500, and it is a capacity error,
/// not a transient one. Without a code (timeouts, connection failures) the error is transient.
pub fn classify(code: Option<&str>, http_status: Option<u16>) -> ErrorClass {
    let Some(code) = code else {
        return ErrorClass::Transient;
    };
    if CAPACITY_CODES.contains(&code) {
        return ErrorClass::Capacity;
    }
    if THROTTLING_CODES.contains(&code) {
        return ErrorClass::Throttling;
    }
    let is_configuration = CONFIGURATION_CODES.iter().any(|known| {
        if known.ends_with('.') {
            code.starts_with(known)
        } else {
            code == *known
        }
    });
    if is_configuration {
        return ErrorClass::Configuration;
    }
    if TRANSIENT_CODES.contains(&code) || http_status.is_some_and(|status| status >= 500) {
        return ErrorClass::Transient;
    }
    ErrorClass::Other
}

/// A configuration error of one resource: the parameter it names and the cloud's error code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misconfiguration {
    pub resource: String,
    /// Configuration key, for example `image_id`.
    pub parameter: String,
    pub value: String,
    /// Cloud error code, for example `InvalidAMIID.NotFound`.
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for Misconfiguration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "resource {}: {} on {} = {} ({})",
            self.resource, self.code, self.parameter, self.value, self.message
        )
    }
}

/// Errors of cloud providers.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(
        "resource {resource} is not configured in provider {provider}; add it to the provider's resources"
    )]
    UnknownResource { provider: String, resource: String },

    #[error(
        "{detail}; the resource stays disabled, fix {} in its configuration to enable it again",
        .detail.parameter
    )]
    ResourceDisabled { detail: Box<Misconfiguration> },

    #[error(
        "{action} failed with a configuration error: {detail}; the resource is disabled until {} is fixed in its \
         configuration",
        .detail.parameter
    )]
    Configuration {
        action: &'static str,
        detail: Box<Misconfiguration>,
    },

    #[error(
        "{action} was throttled {attempts} times in a row (last error {code}); the account's EC2 request rate is \
         exhausted, lower the call rate or ask AWS for a higher limit"
    )]
    Throttled {
        action: &'static str,
        attempts: u32,
        code: String,
    },

    #[error("{action} failed after {attempts} attempts with transient errors, the last: {message}")]
    Unavailable {
        action: &'static str,
        attempts: u32,
        message: String,
    },

    #[error("{action} failed: {code}: {message}")]
    Api {
        action: &'static str,
        code: String,
        message: String,
    },

    #[error("invalid client token {token:?}: {reason}")]
    InvalidClientToken { token: String, reason: String },

    #[error("failed to render the user data of resource {resource}: {reason}")]
    UserData { resource: String, reason: String },

    #[error("invalid configuration of provider {provider}: {reason}")]
    InvalidConfig { provider: String, reason: String },

    #[error(
        "failed to start instance {instance_id} ({program}): {source}; check that the program exists and is executable"
    )]
    Spawn {
        instance_id: String,
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to prepare directory {path} of instance {instance_id}: {source}")]
    InstanceDir {
        instance_id: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("no offering of resource {resource} accepted the launch; retry after {retry_after:?}")]
    NoCapacity {
        resource: String,
        retry_after: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_codes_win_over_server_status() {
        assert_eq!(
            classify(Some("InsufficientInstanceCapacity"), Some(500)),
            ErrorClass::Capacity
        );
    }

    #[test]
    fn error_codes_map_to_classes() {
        let cases = [
            ("InsufficientInstanceCapacity", 500, ErrorClass::Capacity),
            ("InsufficientHostCapacity", 500, ErrorClass::Capacity),
            ("MaxSpotInstanceCountExceeded", 400, ErrorClass::Capacity),
            ("SpotMaxPriceTooLow", 400, ErrorClass::Capacity),
            ("InstanceLimitExceeded", 400, ErrorClass::Capacity),
            ("VcpuLimitExceeded", 400, ErrorClass::Capacity),
            ("Unsupported", 400, ErrorClass::Capacity),
            (
                "InsufficientFreeAddressesInSubnet",
                400,
                ErrorClass::Capacity,
            ),
            ("RequestLimitExceeded", 503, ErrorClass::Throttling),
            ("Throttling", 400, ErrorClass::Throttling),
            ("InvalidAMIID.NotFound", 400, ErrorClass::Configuration),
            ("InvalidAMIID.Malformed", 400, ErrorClass::Configuration),
            ("InvalidSubnetID.NotFound", 400, ErrorClass::Configuration),
            ("InvalidGroup.NotFound", 400, ErrorClass::Configuration),
            ("InvalidKeyPair.NotFound", 400, ErrorClass::Configuration),
            ("InvalidParameterValue", 400, ErrorClass::Configuration),
            ("UnauthorizedOperation", 403, ErrorClass::Configuration),
            ("InternalError", 500, ErrorClass::Transient),
            ("ServiceUnavailable", 503, ErrorClass::Transient),
            ("SomethingNew", 502, ErrorClass::Transient),
            ("IdempotentParameterMismatch", 400, ErrorClass::Other),
            ("InvalidInstanceID.NotFound", 400, ErrorClass::Other),
        ];
        for (code, status, expected) in cases {
            assert_eq!(classify(Some(code), Some(status)), expected, "code {code}");
        }
    }

    #[test]
    fn errors_without_code_are_transient() {
        assert_eq!(classify(None, None), ErrorClass::Transient);
    }
}
