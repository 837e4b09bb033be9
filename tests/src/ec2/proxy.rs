//! An in-process HTTP proxy in front of moto that injects EC2 faults and implements ClientToken idempotency.
//!
//! EC2's query API sends every call as a form-encoded POST with an `Action` parameter. The proxy counts calls by
//! action, applies the first matching fault rule, and forwards the rest to moto. Faults use EC2's error format:
//! `<Response><Errors><Error><Code>..</Code><Message>..</Message></Error></Errors><RequestID>..</RequestID></Response>`.
//!
//! moto 5.2.5 stores RunInstances' ClientToken but launches again on every repeat. EC2 documents that a repeated
//! token with the same parameters returns the first call's reservation, and with other parameters fails with
//! IdempotentParameterMismatch. The proxy does both, and reads the first reservation back from moto.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// What a matching rule does to a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Returns an EC2 error response without calling moto.
    Error {
        status: u16,
        code: String,
        message: String,
    },
    /// Returns this body and status without calling moto.
    Respond { status: u16, body: String },
    /// Waits this long, then lets the call continue to other rules and moto.
    Delay(Duration),
}

/// A fault applied to calls of one action (or `*` for all) whose parameters include every listed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    pub action: String,
    pub params: Vec<(String, String)>,
    pub fault: Fault,
    /// Calls the rule still applies to; `None` applies it forever.
    pub remaining: Option<u32>,
}

impl FaultRule {
    /// Creates a rule that returns an EC2 error with the HTTP status EC2 uses for `code` (see `ec2_status`).
    pub fn error(action: &str, code: &str) -> Self {
        Self::new(
            action,
            Fault::Error {
                status: ec2_status(code),
                code: code.to_owned(),
                message: format!("{code} (injected by the fault proxy)"),
            },
        )
    }

    /// Creates a rule that returns a canned response.
    pub fn respond(action: &str, status: u16, body: &str) -> Self {
        Self::new(
            action,
            Fault::Respond {
                status,
                body: body.to_owned(),
            },
        )
    }

    /// Creates a rule that adds latency.
    pub fn delay(action: &str, delay: Duration) -> Self {
        Self::new(action, Fault::Delay(delay))
    }

    fn new(action: &str, fault: Fault) -> Self {
        Self {
            action: action.to_owned(),
            params: Vec::new(),
            fault,
            remaining: None,
        }
    }

    /// Applies the rule only when parameter `name` equals `value`, for example `("InstanceType", "m5.large")`.
    pub fn when(mut self, name: &str, value: &str) -> Self {
        self.params.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Applies the rule to the next `calls` matching calls only.
    pub fn times(mut self, calls: u32) -> Self {
        self.remaining = Some(calls);
        self
    }

    /// Sets the error message of an error fault.
    pub fn message(mut self, text: &str) -> Self {
        if let Fault::Error { message, .. } = &mut self.fault {
            *message = text.to_owned();
        }
        self
    }

    /// Sets the HTTP status of an error fault.
    pub fn status(mut self, http_status: u16) -> Self {
        if let Fault::Error { status, .. } = &mut self.fault {
            *status = http_status;
        }
        self
    }

    fn matches(&self, action: &str, params: &BTreeMap<String, String>) -> bool {
        let action_matches = self.action == "*" || self.action == action;
        let params_match = self
            .params
            .iter()
            .all(|(name, value)| params.get(name) == Some(value));
        action_matches && params_match && self.remaining != Some(0)
    }
}

/// Returns the HTTP status the proxy sends with an error code: 500 for InsufficientInstanceCapacity and
/// InsufficientHostCapacity (EC2 reports them as server errors) and InternalError, 503 for RequestLimitExceeded
/// and Unavailable, 403 for UnauthorizedOperation, 400 for the rest.
///
/// NOTE: EC2's error code reference only states 400-series statuses for client errors and 500-series for server
/// errors, so 503 and 403 are estimates. The provider classifies by code first, so they do not change its
/// decisions.
pub fn ec2_status(code: &str) -> u16 {
    match code {
        "InsufficientInstanceCapacity" | "InsufficientHostCapacity" | "InternalError" => 500,
        "RequestLimitExceeded" | "Unavailable" | "ServiceUnavailable" => 503,
        "UnauthorizedOperation" => 403,
        _ => 400,
    }
}

/// Renders an EC2 error response body.
pub fn ec2_error_body(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>{}</Message>\
         </Error></Errors><RequestID>{}</RequestID></Response>",
        xml_escape(code),
        xml_escape(message),
        uuid::Uuid::new_v4()
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The first reservation launched with a client token and the parameters it was launched with.
struct TokenRecord {
    parameters: String,
    reservation_id: String,
    instance_ids: Vec<String>,
}

struct Shared {
    upstream: String,
    http: reqwest::Client,
    rules: Mutex<Vec<FaultRule>>,
    calls: Mutex<BTreeMap<String, usize>>,
    /// Parameters of every call received, in order.
    requests: Mutex<Vec<BTreeMap<String, String>>>,
    /// When each recorded request arrived, in the order of `requests`.
    arrivals: Mutex<Vec<std::time::Instant>>,
    /// Held for the whole of a RunInstances call with a token, so two calls with one token run one at a time.
    tokens: tokio::sync::Mutex<HashMap<String, TokenRecord>>,
}

/// Errors of the fault proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("failed to bind the EC2 fault proxy to 127.0.0.1: {0}")]
    Bind(#[source] std::io::Error),
}

/// A running fault proxy. Dropping it stops the server task.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts the proxy on a free loopback port, forwarding to `upstream` (moto's endpoint).
    pub async fn start(upstream: &str) -> Result<FaultProxy, ProxyError> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(ProxyError::Bind)?;
        let addr = listener.local_addr().map_err(ProxyError::Bind)?;
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("a reqwest client with a timeout builds"),
            rules: Mutex::new(Vec::new()),
            calls: Mutex::new(BTreeMap::new()),
            requests: Mutex::new(Vec::new()),
            arrivals: Mutex::new(Vec::new()),
            tokens: tokio::sync::Mutex::new(HashMap::new()),
        });

        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = shutdown_rx.await;
                })
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "EC2 fault proxy failed");
            }
        });
        tracing::info!(%addr, upstream, "EC2 fault proxy listening");

        Ok(FaultProxy {
            addr,
            shared,
            shutdown: Some(shutdown_tx),
            server: Some(server),
        })
    }

    /// Returns the endpoint URL for the SDK, for example `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a rule after the existing ones; the first matching error or response rule wins.
    pub fn inject(&self, rule: FaultRule) {
        lock(&self.shared.rules).push(rule);
    }

    /// Removes every rule.
    pub fn clear_faults(&self) {
        lock(&self.shared.rules).clear();
    }

    /// Returns the calls of `action` the proxy received, faulted ones included.
    pub fn calls(&self, action: &str) -> usize {
        lock(&self.shared.calls).get(action).copied().unwrap_or(0)
    }

    /// Returns the calls received per action.
    pub fn all_calls(&self) -> BTreeMap<String, usize> {
        lock(&self.shared.calls).clone()
    }

    /// Returns the parameters of every call of `action` received so far, in order.
    pub fn requests(&self, action: &str) -> Vec<BTreeMap<String, String>> {
        lock(&self.shared.requests)
            .iter()
            .filter(|params| params.get("Action").map(String::as_str) == Some(action))
            .cloned()
            .collect()
    }

    /// Returns every call of `action` received so far with the instant it arrived, in order.
    pub fn timed_requests(
        &self,
        action: &str,
    ) -> Vec<(std::time::Instant, BTreeMap<String, String>)> {
        let requests = lock(&self.shared.requests);
        let arrivals = lock(&self.shared.arrivals);
        requests
            .iter()
            .zip(arrivals.iter())
            .filter(|(params, _)| params.get("Action").map(String::as_str) == Some(action))
            .map(|(params, at)| (*at, params.clone()))
            .collect()
    }

    /// Sets every call count to zero and clears the recorded requests.
    pub fn reset_calls(&self) {
        lock(&self.shared.calls).clear();
        lock(&self.shared.requests).clear();
        lock(&self.shared.arrivals).clear();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params: BTreeMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    let action = params.get("Action").cloned().unwrap_or_default();
    *lock(&shared.calls).entry(action.clone()).or_default() += 1;
    {
        let mut requests = lock(&shared.requests);
        requests.push(params.clone());
        lock(&shared.arrivals).push(std::time::Instant::now());
    }

    let (delay, fault) = take_faults(&shared, &action, &params);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match fault {
        Some(Fault::Error {
            status,
            code,
            message,
        }) => {
            tracing::info!(action, code, status, "fault proxy injected an error");
            return xml_response(status, ec2_error_body(&code, &message));
        }
        Some(Fault::Respond { status, body }) => {
            tracing::info!(action, status, "fault proxy injected a response");
            return xml_response(status, body);
        }
        Some(Fault::Delay(_)) | None => {}
    }

    if action == "RunInstances" {
        let body = launch_max_count(&params).unwrap_or(body);
        if let Some(token) = params.get("ClientToken") {
            return run_instances_idempotent(
                &shared, token, &params, &method, &uri, &headers, body,
            )
            .await;
        }
        return forward(&shared, &method, &uri, &headers, body).await;
    }
    forward(&shared, &method, &uri, &headers, body).await
}

/// Returns the total delay of the matching delay rules and the first matching error or response rule, and
/// counts both against their `remaining` calls.
fn take_faults(
    shared: &Shared,
    action: &str,
    params: &BTreeMap<String, String>,
) -> (Duration, Option<Fault>) {
    let mut rules = lock(&shared.rules);
    let mut delay = Duration::ZERO;
    let mut chosen = None;
    for rule in rules.iter_mut() {
        if !rule.matches(action, params) {
            continue;
        }
        let is_delay = matches!(rule.fault, Fault::Delay(_));
        if !is_delay && chosen.is_some() {
            continue;
        }
        if let Some(remaining) = &mut rule.remaining {
            *remaining -= 1;
        }
        match &rule.fault {
            Fault::Delay(extra) => delay += *extra,
            fault => chosen = Some(fault.clone()),
        }
    }
    (delay, chosen)
}

async fn run_instances_idempotent(
    shared: &Shared,
    token: &str,
    params: &BTreeMap<String, String>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let parameters = parameters_without_token(params);
    let mut tokens = shared.tokens.lock().await;

    if let Some(record) = tokens.get(token) {
        if record.parameters != parameters {
            tracing::info!(
                token,
                "repeated client token with other parameters, IdempotentParameterMismatch"
            );
            return xml_response(
                400,
                ec2_error_body(
                    "IdempotentParameterMismatch",
                    "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).",
                ),
            );
        }
        tracing::info!(token, reservation_id = %record.reservation_id, "repeated client token, returning the first reservation");
        return first_reservation(shared, record, uri, headers).await;
    }

    let response = forward(shared, method, uri, headers, body).await;
    if response.status() != StatusCode::OK {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    if let Some(reservation_id) = element(&text, "reservationId") {
        tokens.insert(
            token.to_owned(),
            TokenRecord {
                parameters,
                reservation_id: reservation_id.to_owned(),
                instance_ids: elements(&text, "instanceId"),
            },
        );
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Rewrites a RunInstances body so that moto launches MaxCount instances.
///
/// EC2 launches as many instances as capacity allows between MinCount and MaxCount, which without a capacity
/// fault means MaxCount. moto 5.2.5 launches MinCount (`moto/ec2/responses/instances.py`), so the proxy raises
/// MinCount to MaxCount. Returns `None` when there is nothing to change.
fn launch_max_count(params: &BTreeMap<String, String>) -> Option<Bytes> {
    let max_count = params.get("MaxCount")?;
    if params.get("MinCount") == Some(max_count) {
        return None;
    }
    let mut body = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in params {
        let value = if name == "MinCount" { max_count } else { value };
        body.append_pair(name, value);
    }
    Some(Bytes::from(body.finish()))
}

/// Returns the request's parameters without ClientToken, in a canonical order, for comparing two requests.
fn parameters_without_token(params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .filter(|(name, _)| name.as_str() != "ClientToken")
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Reads the reservation back from moto with DescribeInstances and reshapes it into a RunInstances response,
/// which EC2 does too: the repeated call returns the instances with their current state.
///
/// moto 5.2.5 does not implement the `reservation-id` filter, so the instances are looked up by id.
async fn first_reservation(
    shared: &Shared,
    record: &TokenRecord,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    // The serializer is not Send, so it must not live across the await below.
    let describe = {
        let mut describe = url::form_urlencoded::Serializer::new(String::new());
        describe.append_pair("Action", "DescribeInstances");
        describe.append_pair("Version", "2016-11-15");
        for (index, id) in record.instance_ids.iter().enumerate() {
            describe.append_pair(&format!("InstanceId.{}", index + 1), id);
        }
        describe.finish()
    };
    let response = forward(shared, &Method::POST, uri, headers, Bytes::from(describe)).await;
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);

    let reservation_id = &record.reservation_id;
    let Some(reservation) = single_reservation(&text) else {
        tracing::error!(
            reservation_id,
            "moto did not return the first reservation of a client token"
        );
        return xml_response(
            500,
            ec2_error_body(
                "InternalError",
                &format!("reservation {reservation_id} not found in moto"),
            ),
        );
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<RunInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
         <requestId>{}</requestId>{reservation}</RunInstancesResponse>",
        uuid::Uuid::new_v4()
    );
    xml_response(200, body)
}

/// Returns the content of the one `<item>` in `<reservationSet>`: reservationId, ownerId, groupSet, instancesSet.
fn single_reservation(describe_response: &str) -> Option<&str> {
    let start = describe_response.find("<reservationSet>")? + "<reservationSet>".len();
    let end = describe_response.rfind("</reservationSet>")?;
    let set = describe_response[start..end].trim();
    let inner = set.strip_prefix("<item>")?.strip_suffix("</item>")?;
    Some(inner)
}

/// Returns the texts of every `<name>` element, in document order.
fn elements(xml: &str, name: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(text) = element(rest, name) {
        found.push(text.to_owned());
        let consumed = rest
            .find(&format!("</{name}>"))
            .map_or(rest.len(), |end| end + name.len() + 3);
        rest = &rest[consumed..];
    }
    found
}

/// Returns the text of the first `<name>` element.
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(&xml[start..end])
}

async fn forward(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path_and_query().map_or("/", |path| path.as_str());
    let mut request = shared
        .http
        .request(method.clone(), format!("{}{path}", shared.upstream))
        .body(body);
    for (name, value) in headers {
        if name != header::HOST && name != header::CONTENT_LENGTH {
            request = request.header(name, value);
        }
    }

    match request.send().await {
        Ok(upstream) => {
            let status = upstream.status();
            let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
            let bytes = upstream.bytes().await.unwrap_or_default();
            let mut response = Response::builder().status(status);
            if let Some(content_type) = content_type {
                response = response.header(header::CONTENT_TYPE, content_type);
            }
            response
                .body(Body::from(bytes))
                .expect("a status, a content type and bytes make a valid response")
        }
        Err(error) => {
            tracing::error!(%error, upstream = %shared.upstream, "fault proxy failed to reach moto");
            xml_response(
                502,
                ec2_error_body(
                    "InternalError",
                    &format!("proxy failed to reach moto: {error}"),
                ),
            )
        }
    }
}

fn xml_response(status: u16, body: String) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "text/xml;charset=UTF-8")
        .body(Body::from(body))
        .expect("a status, a content type and a string make a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_reservation_extracts_the_item_content() {
        let xml = "<DescribeInstancesResponse><reservationSet><item><reservationId>r-1</reservationId>\
                   <instancesSet><item><instanceId>i-1</instanceId></item></instancesSet></item></reservationSet>\
                   </DescribeInstancesResponse>";
        assert_eq!(
            single_reservation(xml),
            Some(
                "<reservationId>r-1</reservationId><instancesSet><item><instanceId>i-1</instanceId></item></instancesSet>"
            )
        );
    }

    #[test]
    fn rule_with_times_stops_matching() {
        let mut rule = FaultRule::error("RunInstances", "RequestLimitExceeded").times(1);
        let params = BTreeMap::new();
        assert!(rule.matches("RunInstances", &params));
        rule.remaining = Some(0);
        assert!(!rule.matches("RunInstances", &params));
    }

    #[test]
    fn rule_requires_listed_parameters() {
        let rule = FaultRule::error("RunInstances", "InsufficientInstanceCapacity")
            .when("InstanceType", "m5.large")
            .when("SubnetId", "subnet-1");
        let both = BTreeMap::from([
            ("InstanceType".to_owned(), "m5.large".to_owned()),
            ("SubnetId".to_owned(), "subnet-1".to_owned()),
        ]);
        let other_subnet = BTreeMap::from([
            ("InstanceType".to_owned(), "m5.large".to_owned()),
            ("SubnetId".to_owned(), "subnet-2".to_owned()),
        ]);
        assert!(rule.matches("RunInstances", &both));
        assert!(!rule.matches("RunInstances", &other_subnet));
        assert!(!rule.matches("DescribeInstances", &both));
    }

    #[test]
    fn error_body_uses_ec2_format() {
        let body = ec2_error_body(
            "InvalidAMIID.NotFound",
            "The image id '[ami-1]' does not exist",
        );
        assert!(body.contains(
            "<Response><Errors><Error><Code>InvalidAMIID.NotFound</Code><Message>The image id &apos;[ami-1]&apos; \
             does not exist</Message></Error></Errors><RequestID>"
        ));
    }
}
