//! The HTTP side of the gate: accepts clearml-agent's calls and forwards them to the ClearML API server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use url::Url;

use super::{Gate, PollDecision};

/// Limit on one forwarded call. clearml-agent's own requests time out sooner, so this only bounds calls
/// whose client vanished.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(300);

/// Headers that belong to one connection and are not forwarded (RFC 9110, section 7.6.1), plus the ones the
/// HTTP clients on either side set themselves.
const SKIPPED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// The ClearML API server the gate forwards to.
#[derive(Clone)]
pub struct Upstream {
    base: Url,
    http: reqwest::Client,
}

impl Upstream {
    /// Builds the forwarding client for `base`, for example `https://api.clear.ml` or
    /// `http://127.0.0.1:8008`.
    pub fn new(base: Url) -> Result<Upstream, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(UPSTREAM_TIMEOUT)
            .pool_max_idle_per_host(8)
            .build()?;
        Ok(Upstream { base, http })
    }

    fn url(&self, path_and_query: &str) -> Url {
        let mut url = self.base.clone();
        let base_path = self.base.path().trim_end_matches('/');
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        url.set_path(&format!("{base_path}{path}"));
        url.set_query(query);
        url
    }
}

/// A running gate server. Dropping it stops accepting connections.
pub struct GateServer {
    addr: SocketAddr,
    accept_loop: JoinHandle<()>,
}

impl GateServer {
    /// Serves the gate on `listener`, forwarding to `upstream` and recording into `gate`.
    pub fn start(listener: TcpListener, gate: Gate, upstream: Upstream) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let context = Arc::new(Context { gate, upstream });
        let accept_loop = tokio::spawn(accept_loop(listener, context));
        tracing::info!(%addr, "API gate listening");
        Ok(GateServer { addr, accept_loop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the URL clearml-agent uses as its `api_server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for GateServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

struct Context {
    gate: Gate,
    upstream: Upstream,
}

async fn accept_loop(listener: TcpListener, context: Arc<Context>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "API gate failed to accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let context = context.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let context = context.clone();
                async move { Ok::<_, Infallible>(handle(request, context).await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %error, "API gate connection ended with an error");
            }
        });
    }
}

async fn handle(request: Request<Incoming>, context: Arc<Context>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            tracing::warn!(%error, path = parts.uri.path(), "API gate failed to read a request body");
            return plain(StatusCode::BAD_REQUEST, "failed to read the request body");
        }
    };
    let endpoint = endpoint_name(parts.uri.path()).to_owned();
    let forward = Forward {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned()),
        headers: parts.headers,
        body,
    };

    if endpoint == "queues.get_next_task" {
        return poll(forward, context).await;
    }
    if super::tracker::is_observed_task_call(&endpoint) {
        return status_call(&endpoint, forward, context).await;
    }
    forward_call(&forward, &context).await.into_response()
}

/// Handles `queues.get_next_task`: returns "no task" while closed, else forwards and records the response.
///
/// The forwarded call runs in its own tokio task, so it is recorded even if clearml-agent hangs up before the
/// response arrives: the server has handed the task out either way.
async fn poll(forward: Forward, context: Arc<Context>) -> Response<Full<Bytes>> {
    let queue_id = request_field(&forward.body, "queue").unwrap_or_default();

    if context.gate.begin_poll() == PollDecision::AnswerEmpty {
        tracing::debug!(queue_id = %queue_id, "gate closed; returning no task for get_next_task");
        return empty_next_task(forward.path_and_query.as_str());
    }

    let recorder = tokio::spawn(async move {
        let answer = forward_call(&forward, &context).await;
        let taken = answer
            .succeeded()
            .then(|| taken_task(&answer.body))
            .flatten();
        context.gate.finish_poll(&queue_id, taken);
        answer
    });
    match recorder.await {
        Ok(answer) => answer.into_response(),
        Err(error) => {
            tracing::error!(%error, "API gate poll task failed");
            plain(
                StatusCode::BAD_GATEWAY,
                "the gate failed to forward the call",
            )
        }
    }
}

async fn status_call(
    endpoint: &str,
    forward: Forward,
    context: Arc<Context>,
) -> Response<Full<Bytes>> {
    let task_id = request_field(&forward.body, "task");
    let answer = forward_call(&forward, &context).await;
    if answer.succeeded()
        && let Some(task_id) = task_id
    {
        context.gate.status_call(endpoint, &task_id);
    }
    answer.into_response()
}

struct Forward {
    method: hyper::Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    /// Returns true for HTTP 200 with `meta.result_code` 200.
    fn succeeded(&self) -> bool {
        if self.status != StatusCode::OK {
            return false;
        }
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|value| value.pointer("/meta/result_code").and_then(Value::as_u64))
            == Some(200)
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

async fn forward_call(forward: &Forward, context: &Context) -> Answer {
    let url = context.upstream.url(&forward.path_and_query);
    let mut request = context
        .upstream
        .http
        .request(forward.method.clone(), url)
        .body(forward.body.clone());
    for (name, value) in forward.headers.iter().filter(|(name, _)| !skipped(name)) {
        request = request.header(name, value);
    }

    context.gate.count_forwarded();
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return upstream_failure(context, &forward.path_and_query, &error),
    };
    let status = response.status();
    let mut headers = HeaderMap::new();
    for (name, value) in response.headers().iter().filter(|(name, _)| !skipped(name)) {
        headers.append(name.clone(), value.clone());
    }
    match response.bytes().await {
        Ok(body) => Answer {
            status,
            headers,
            body,
        },
        Err(error) => upstream_failure(context, &forward.path_and_query, &error),
    }
}

fn upstream_failure(context: &Context, path: &str, error: &reqwest::Error) -> Answer {
    context.gate.count_upstream_error();
    tracing::warn!(path, error = %error, "API gate failed to reach the ClearML API server");
    let mut headers = HeaderMap::new();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    Answer {
        status: StatusCode::BAD_GATEWAY,
        headers,
        body: Bytes::from(format!(
            "the fleet node agent's API gate failed to reach the ClearML API server: {error}"
        )),
    }
}

fn skipped(name: &HeaderName) -> bool {
    SKIPPED_HEADERS.contains(&name.as_str())
}

/// Returns the endpoint of an API path: `/v2.14/queues.get_next_task` -> `queues.get_next_task`.
fn endpoint_name(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

fn request_field(body: &[u8], key: &str) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.get(key)?.as_str().map(str::to_owned)
}

fn taken_task(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value
        .pointer("/data/entry/task")?
        .as_str()
        .filter(|task| !task.is_empty())
        .map(str::to_owned)
}

/// Builds the response clearml-server returns when the queue is empty: a success envelope with `data: {}`.
fn empty_next_task(path: &str) -> Response<Full<Bytes>> {
    let requested_version = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .and_then(|segment| segment.strip_prefix('v'))
        .unwrap_or("2.4");
    let id = format!("{:032x}", rand_id());
    let body = json!({
        "meta": {
            "id": id,
            "trx": id,
            "endpoint": {
                "name": "queues.get_next_task",
                "requested_version": requested_version,
                "actual_version": "2.4",
            },
            "result_code": 200,
            "result_subcode": 0,
            "result_msg": "OK",
            "error_stack": null,
            "error_data": {},
        },
        "data": {},
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn plain(status: StatusCode, message: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(message.as_bytes())));
    *response.status_mut() = status;
    response
}

/// Returns a request id that differs between calls; it only needs to be unique, not unpredictable.
fn rand_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or(0);
    nanos ^ (u128::from(COUNTER.fetch_add(1, Ordering::Relaxed)) << 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_name_drops_version() {
        assert_eq!(
            endpoint_name("/v2.14/queues.get_next_task"),
            "queues.get_next_task"
        );
        assert_eq!(
            endpoint_name("/queues.get_next_task"),
            "queues.get_next_task"
        );
        assert_eq!(
            endpoint_name("/api/v2.23/tasks.completed/"),
            "tasks.completed"
        );
    }

    #[test]
    fn taken_task_reads_entry() {
        let body =
            br#"{"meta": {"result_code": 200}, "data": {"entry": {"task": "t1", "added": "x"}}}"#;
        assert_eq!(taken_task(body), Some("t1".to_owned()));
        assert_eq!(taken_task(br#"{"meta": {}, "data": {}}"#), None);
    }

    #[tokio::test]
    async fn empty_answer_matches_server_envelope() {
        let response = empty_next_task("/v2.14/queues.get_next_task");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["data"], json!({}));
        assert_eq!(value["meta"]["result_code"], json!(200));
        assert_eq!(
            value["meta"]["endpoint"]["requested_version"],
            json!("2.14")
        );
    }

    #[test]
    fn upstream_url_keeps_base_path_and_query() {
        let upstream = Upstream::new(Url::parse("https://example.invalid/api/").unwrap()).unwrap();
        assert_eq!(
            upstream.url("/v2.14/queues.get_all?x=1").as_str(),
            "https://example.invalid/api/v2.14/queues.get_all?x=1"
        );
    }
}
