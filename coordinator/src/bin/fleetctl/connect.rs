//! Calls to the coordinator: the replicas in order, the leader named by a follower, and the mapping of
//! failures to exit codes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_proto::v1::fleet_service_client::FleetServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};
use tonic::{Code, Request, Response, Status};

/// Metadata key in which a follower returns the leader's address (`host:port`) when it rejects a write.
pub const LEADER_METADATA: &str = "fleet-leader";

pub const EXIT_SERVER: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_AUTH: u8 = 3;
pub const EXIT_NOT_FOUND: u8 = 4;
pub const EXIT_UNREACHABLE: u8 = 5;

/// A failed command: the message for stderr and the process exit code.
#[derive(Debug)]
pub struct Failure {
    pub exit: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            exit: EXIT_USAGE,
            message: message.into(),
        }
    }
}

/// Source of the token, which errors name in place of the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    File(PathBuf),
    Environment,
    Missing,
}

/// Reads the token from `token_file`, or else from `FLEET_TOKEN`.
pub fn read_token(
    token_file: Option<&Path>,
    environment: Option<String>,
) -> Result<(Option<String>, TokenSource), Failure> {
    if let Some(path) = token_file {
        let text = std::fs::read_to_string(path).map_err(|err| {
            Failure::usage(format!(
                "cannot read the token file {}: {err}; pass a readable file to --token-file",
                path.display()
            ))
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(Failure::usage(format!(
                "the token file {} is empty; write the API token into it",
                path.display()
            )));
        }
        return Ok((Some(token.to_owned()), TokenSource::File(path.to_owned())));
    }
    match environment.map(|value| value.trim().to_owned()) {
        Some(token) if !token.is_empty() => Ok((Some(token), TokenSource::Environment)),
        _ => Ok((None, TokenSource::Missing)),
    }
}

/// Settings of all calls of one command.
pub struct Connection {
    endpoints: Vec<String>,
    tls: Option<ClientTlsConfig>,
    authorization: Option<MetadataValue<Ascii>>,
    token_source: TokenSource,
    pub timeout: Duration,
}

/// Failure of one attempt on one replica.
enum AttemptError {
    /// The replica did not respond, or returned UNAVAILABLE or DEADLINE_EXCEEDED, so the next one may work.
    Unreachable(String),
    Status(Status),
}

impl Connection {
    /// Checks the endpoints, token and CA file, without connecting.
    pub fn new(
        endpoints: &[String],
        token: Option<String>,
        token_source: TokenSource,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Connection, Failure> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|endpoint| endpoint.trim().trim_end_matches('/').to_owned())
            .filter(|endpoint| !endpoint.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(Failure::usage(
                "no endpoint given; pass --endpoint http://HOST:PORT or set FLEET_ENDPOINTS",
            ));
        }
        let mut uses_tls = false;
        for endpoint in &endpoints {
            uses_tls |= scheme_of(endpoint)? == "https";
        }

        let tls = match ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|err| {
                    Failure::usage(format!(
                        "cannot read the CA file {}: {err}; pass a readable PEM file to --ca-file",
                        path.display()
                    ))
                })?;
                // NOTE: no test runs fleetctl against a TLS coordinator yet.
                Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            }
            None if uses_tls => {
                return Err(Failure::usage(
                    "an https:// endpoint needs --ca-file PEM, the CA certificate that signed the \
                     coordinator's certificate",
                ));
            }
            None => None,
        };

        let authorization = match &token {
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                Failure::usage(format!(
                    "the token from {} contains characters that gRPC metadata cannot carry; an API \
                     token is printable ASCII",
                    describe_source(&token_source)
                ))
            })?),
            None => None,
        };

        Ok(Connection {
            endpoints,
            tls,
            authorization,
            token_source,
            timeout,
        })
    }

    /// Sends one call to the replicas in order until one responds, following a follower's pointer to the
    /// leader once per replica. Returns the response and the endpoint that sent it.
    ///
    /// `what` names the operation in error messages, for example `drain instance "i-1"`.
    pub async fn call<T, R, F, Fut>(
        &self,
        what: &str,
        message: T,
        call: F,
    ) -> Result<(R, String), Failure>
    where
        T: Clone,
        F: Fn(FleetServiceClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let mut unreachable = Vec::new();
        let mut without_leader = false;
        for endpoint in &self.endpoints {
            let status = match self.attempt(endpoint, &message, &call).await {
                Ok(response) => return Ok((response, endpoint.clone())),
                Err(AttemptError::Unreachable(reason)) => {
                    unreachable.push(format!("{endpoint}: {reason}"));
                    continue;
                }
                Err(AttemptError::Status(status)) => status,
            };

            let Some(leader) = leader_endpoint(&status, endpoint) else {
                if is_without_leader(&status) {
                    without_leader = true;
                    unreachable.push(format!("{endpoint}: {}", describe_status(&status)));
                    continue;
                }
                return Err(self.status_failure(what, endpoint, &status));
            };
            let leader = leader.map_err(|reason| Failure {
                exit: EXIT_SERVER,
                message: format!("{what} failed on {endpoint}: {reason}"),
            })?;
            match self.attempt(&leader, &message, &call).await {
                Ok(response) => return Ok((response, leader)),
                Err(AttemptError::Unreachable(reason)) => unreachable.push(format!(
                    "{leader} (the leader named by {endpoint}): {reason}"
                )),
                // A second FAILED_PRECONDITION means the leadership moved again. It is reported and not
                // followed, so that two replicas cannot send the call back and forth.
                Err(AttemptError::Status(status)) => {
                    if is_without_leader(&status) || leader_address(&status).is_some() {
                        without_leader = true;
                        unreachable.push(format!("{leader}: {}", describe_status(&status)));
                        continue;
                    }
                    return Err(self.status_failure(what, &leader, &status));
                }
            }
        }
        let advice = if without_leader {
            "No leader is elected now: retry in a few seconds, and `fleetctl status` shows the leader \
             once there is one"
        } else {
            "Check that a coordinator runs at these endpoints (--endpoint or FLEET_ENDPOINTS), or raise \
             --timeout"
        };
        Err(Failure {
            exit: EXIT_UNREACHABLE,
            message: format!(
                "{what} failed: no replica completed the call. {}. {advice}",
                unreachable.join("; ")
            ),
        })
    }

    async fn attempt<T, R, F, Fut>(
        &self,
        endpoint: &str,
        message: &T,
        call: &F,
    ) -> Result<R, AttemptError>
    where
        T: Clone,
        F: Fn(FleetServiceClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let channel = self.connect(endpoint).await?;
        let mut request = Request::new(message.clone());
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        let response = tokio::time::timeout(
            self.timeout,
            call(FleetServiceClient::new(channel), request),
        )
        .await
        .map_err(|_| {
            AttemptError::Unreachable(format!(
                "no response within {} s (--timeout)",
                self.timeout.as_secs()
            ))
        })?;
        match response {
            Ok(response) => Ok(response.into_inner()),
            Err(status) if is_unreachable(status.code()) => {
                Err(AttemptError::Unreachable(describe_status(&status)))
            }
            Err(status) => Err(AttemptError::Status(status)),
        }
    }

    async fn connect(&self, endpoint: &str) -> Result<Channel, AttemptError> {
        let mut builder = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|err| {
                AttemptError::Unreachable(format!("invalid URL: {}", error_chain(&err)))
            })?
            .connect_timeout(self.timeout);
        if endpoint.starts_with("https://")
            && let Some(tls) = &self.tls
        {
            builder = builder.tls_config(tls.clone()).map_err(|err| {
                AttemptError::Unreachable(format!("TLS setup failed: {}", error_chain(&err)))
            })?;
        }
        match tokio::time::timeout(self.timeout, builder.connect()).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(err)) => Err(AttemptError::Unreachable(format!(
                "connection failed: {}",
                error_chain(&err)
            ))),
            Err(_) => Err(AttemptError::Unreachable(format!(
                "connection not established within {} s (--timeout)",
                self.timeout.as_secs()
            ))),
        }
    }

    /// Builds the failure for a status that no other replica can change.
    pub fn status_failure(&self, what: &str, endpoint: &str, status: &Status) -> Failure {
        let exit = match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => EXIT_AUTH,
            Code::NotFound => EXIT_NOT_FOUND,
            code if is_unreachable(code) || is_without_leader(status) => EXIT_UNREACHABLE,
            _ => EXIT_SERVER,
        };
        let hint = match status.code() {
            Code::Unauthenticated if self.token_source == TokenSource::Missing => {
                ". No token was sent: set FLEET_TOKEN or pass --token-file PATH".to_owned()
            }
            Code::Unauthenticated => format!(
                ". Check the token from {}: it must be one of the coordinator's [[api.tokens]]",
                describe_source(&self.token_source)
            ),
            Code::PermissionDenied => format!(
                ". Use an operator token in place of the one from {}",
                describe_source(&self.token_source)
            ),
            Code::NotFound => ". List the instances with `fleetctl instances`".to_owned(),
            _ => String::new(),
        };
        Failure {
            exit,
            message: format!(
                "{what} failed on {endpoint}: {}{hint}",
                describe_status(status)
            ),
        }
    }
}

fn describe_source(source: &TokenSource) -> String {
    match source {
        TokenSource::File(path) => format!("--token-file {}", path.display()),
        TokenSource::Environment => "FLEET_TOKEN".to_owned(),
        TokenSource::Missing => "nowhere (no token was sent)".to_owned(),
    }
}

/// Returns the scheme of an endpoint URL, `http` or `https`.
fn scheme_of(endpoint: &str) -> Result<String, Failure> {
    let invalid = || {
        Failure::usage(format!(
            "endpoint {endpoint:?} is not a URL of the form http://HOST:PORT or https://HOST:PORT; \
             fix --endpoint or FLEET_ENDPOINTS"
        ))
    };
    let uri: Uri = endpoint.parse().map_err(|_| invalid())?;
    if uri.host().is_none() {
        return Err(invalid());
    }
    match uri.scheme_str() {
        Some(scheme @ ("http" | "https")) => Ok(scheme.to_owned()),
        _ => Err(invalid()),
    }
}

/// Returns the leader's address from a follower's FAILED_PRECONDITION, if the status carries one.
pub fn leader_address(status: &Status) -> Option<String> {
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    let value = status.metadata().get(LEADER_METADATA)?;
    let address = value.to_str().ok()?.trim();
    (!address.is_empty()).then(|| address.to_owned())
}

/// Returns the URL of the leader named in `status`, with the scheme of `endpoint`: `None` when the status
/// names no leader, and an error when the address is not `host:port`.
pub fn leader_endpoint(status: &Status, endpoint: &str) -> Option<Result<String, String>> {
    let address = leader_address(status)?;
    let scheme = if endpoint.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{address}");
    let valid = url
        .parse::<Uri>()
        .ok()
        .is_some_and(|uri| uri.host().is_some() && uri.port().is_some() && uri.path() == "/");
    Some(if valid {
        Ok(url)
    } else {
        Err(format!(
            "the replica is not the leader and returned {LEADER_METADATA} = {address:?}, which is not \
             host:port; pass the leader's URL with --endpoint"
        ))
    })
}

/// Tells whether a status is a follower's rejection while no leader is elected.
///
/// NOTE: the coordinator marks this case only in the message text ("is not the leader"), so this test
/// depends on that wording. Other FAILED_PRECONDITION errors, such as an instance that is already
/// terminated, do not match.
pub fn is_without_leader(status: &Status) -> bool {
    status.code() == Code::FailedPrecondition
        && leader_address(status).is_none()
        && status.message().contains("not the leader")
}

fn is_unreachable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::DeadlineExceeded)
}

/// Formats a status as `message (CODE)`.
pub fn describe_status(status: &Status) -> String {
    let message = status.message().trim();
    if message.is_empty() {
        code_name(status.code()).to_owned()
    } else {
        format!("{message} ({})", code_name(status.code()))
    }
}

/// Returns the canonical gRPC name of a status code, as in the gRPC specification.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Joins an error and its sources, which carry the useful part of a transport error.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected_by_follower(address: &str) -> Status {
        let mut status = Status::failed_precondition(
            "replica b is not the leader; send writes to the leader a at 10.0.0.1:7443",
        );
        status
            .metadata_mut()
            .insert(LEADER_METADATA, address.parse().unwrap());
        status
    }

    #[test]
    fn leader_endpoint_keeps_scheme() {
        let status = rejected_by_follower("10.0.0.1:7443");
        assert_eq!(
            leader_endpoint(&status, "http://10.0.0.2:7443"),
            Some(Ok("http://10.0.0.1:7443".to_owned()))
        );
        assert_eq!(
            leader_endpoint(&status, "https://fleet-b.example:7443"),
            Some(Ok("https://10.0.0.1:7443".to_owned()))
        );
    }

    #[test]
    fn leader_endpoint_rejects_bad_address() {
        for address in ["10.0.0.1", "10.0.0.1:7443/x", "http://10.0.0.1:7443"] {
            let status = rejected_by_follower(address);
            let result = leader_endpoint(&status, "http://10.0.0.2:7443");
            assert!(
                matches!(result, Some(Err(_))),
                "{address:?} gave {result:?}"
            );
        }
    }

    #[test]
    fn leader_endpoint_needs_failed_precondition() {
        let mut status = Status::unavailable("down");
        status
            .metadata_mut()
            .insert(LEADER_METADATA, "10.0.0.1:7443".parse().unwrap());
        assert_eq!(leader_endpoint(&status, "http://10.0.0.2:7443"), None);
        let plain = Status::failed_precondition("instance i-1 is already terminated");
        assert_eq!(leader_endpoint(&plain, "http://10.0.0.2:7443"), None);
    }

    #[test]
    fn no_leader_told_apart_from_other_preconditions() {
        let no_leader = Status::failed_precondition(
            "replica b is not the leader and no leader is elected now; retry in a few seconds",
        );
        assert!(is_without_leader(&no_leader));
        let terminated = Status::failed_precondition("instance i-1 is already terminated");
        assert!(!is_without_leader(&terminated));
        assert!(!is_without_leader(&rejected_by_follower("10.0.0.1:7443")));
    }

    fn connection(token_source: TokenSource) -> Connection {
        let token = (token_source != TokenSource::Missing).then(|| "secret-token".to_owned());
        Connection::new(
            &["http://127.0.0.1:7443".to_owned()],
            token,
            token_source,
            None,
            Duration::from_secs(1),
        )
        .unwrap()
    }

    #[test]
    fn exit_codes_by_status() {
        let connection = connection(TokenSource::Environment);
        let cases = [
            (Status::unauthenticated("invalid token"), EXIT_AUTH),
            (Status::permission_denied("viewer"), EXIT_AUTH),
            (Status::not_found("no instance record i-1"), EXIT_NOT_FOUND),
            (Status::invalid_argument("limits is empty"), EXIT_SERVER),
            (
                Status::failed_precondition("instance i-1 is already terminated"),
                EXIT_SERVER,
            ),
            (
                Status::failed_precondition(
                    "replica b is not the leader and no leader is elected now",
                ),
                EXIT_UNREACHABLE,
            ),
            (Status::unavailable("etcd lost quorum"), EXIT_UNREACHABLE),
            (Status::internal("bug"), EXIT_SERVER),
        ];
        for (status, exit) in cases {
            let failure = connection.status_failure("call", "http://127.0.0.1:7443", &status);
            assert_eq!(failure.exit, exit, "{status:?}");
        }
    }

    #[test]
    fn messages_never_contain_token() {
        let connection = connection(TokenSource::Environment);
        let failure = connection.status_failure(
            "list queues",
            "http://127.0.0.1:7443",
            &Status::unauthenticated("invalid token"),
        );
        assert!(
            !failure.message.contains("secret-token"),
            "{}",
            failure.message
        );
        assert!(
            failure.message.contains("FLEET_TOKEN"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn missing_token_hint() {
        let connection = connection(TokenSource::Missing);
        let failure = connection.status_failure(
            "list queues",
            "http://127.0.0.1:7443",
            &Status::unauthenticated("missing bearer token"),
        );
        assert!(
            failure
                .message
                .contains("set FLEET_TOKEN or pass --token-file"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn endpoints_are_checked() {
        for endpoint in ["127.0.0.1:7443", "ftp://127.0.0.1:7443", "http://"] {
            let result = Connection::new(
                &[endpoint.to_owned()],
                None,
                TokenSource::Missing,
                None,
                Duration::from_secs(1),
            );
            let failure = result
                .err()
                .unwrap_or_else(|| panic!("{endpoint} was accepted"));
            assert_eq!(failure.exit, EXIT_USAGE);
            assert!(failure.message.contains(endpoint), "{}", failure.message);
        }
    }

    #[test]
    fn https_needs_ca_file() {
        let result = Connection::new(
            &["https://127.0.0.1:7443".to_owned()],
            None,
            TokenSource::Missing,
            None,
            Duration::from_secs(1),
        );
        let failure = result.err().expect("https without --ca-file was accepted");
        assert_eq!(failure.exit, EXIT_USAGE);
        assert!(failure.message.contains("--ca-file"), "{}", failure.message);
    }

    #[test]
    fn token_file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  operator-token\n").unwrap();
        let (token, source) = read_token(Some(&path), Some("from-env".to_owned())).unwrap();
        assert_eq!(token.as_deref(), Some("operator-token"));
        assert_eq!(source, TokenSource::File(path.clone()));

        std::fs::write(&path, "\n").unwrap();
        let failure = read_token(Some(&path), None).unwrap_err();
        assert_eq!(failure.exit, EXIT_USAGE);
        assert!(failure.message.contains("is empty"), "{}", failure.message);
    }

    #[test]
    fn token_from_environment() {
        let (token, source) = read_token(None, Some("viewer-token".to_owned())).unwrap();
        assert_eq!(token.as_deref(), Some("viewer-token"));
        assert_eq!(source, TokenSource::Environment);
        let (token, source) = read_token(None, Some("  ".to_owned())).unwrap();
        assert_eq!((token, source), (None, TokenSource::Missing));
    }
}
