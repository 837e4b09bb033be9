//! A fake EC2 instance metadata service that speaks IMDSv2 only, with settable spot and rebalance notices.
//!
//! Like EC2 with `HttpTokens=required`, it returns 401 for any read without a valid `X-aws-ec2-metadata-token`
//! header and counts those reads, so a test can assert that the agent never tried token-less IMDSv1.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};
use tokio::task::JoinHandle;

#[derive(Default)]
struct ImdsState {
    instance_id: String,
    tokens: Vec<String>,
    spot_action: Option<String>,
    rebalance: Option<String>,
    /// Reads without a token or with an unknown one.
    rejected_reads: u64,
    token_requests: u64,
}

/// A running fake IMDS on 127.0.0.1. Dropping it stops the server.
pub struct FakeImds {
    addr: SocketAddr,
    state: Arc<Mutex<ImdsState>>,
    server: JoinHandle<()>,
}

impl FakeImds {
    /// Starts the service on a free port; `instance-id` returns `instance_id`.
    pub async fn start(instance_id: &str) -> FakeImds {
        let state = Arc::new(Mutex::new(ImdsState {
            instance_id: instance_id.to_owned(),
            ..ImdsState::default()
        }));
        let app = Router::new()
            .route("/latest/api/token", put(issue_token))
            .route("/latest/meta-data/instance-id", get(instance_id_handler))
            .route("/latest/meta-data/spot/instance-action", get(spot_action))
            .route(
                "/latest/meta-data/events/recommendations/rebalance",
                get(rebalance),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0 must succeed");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "fake IMDS failed");
            }
        });
        FakeImds {
            addr,
            state,
            server,
        }
    }

    /// Returns the base URL for `imds.endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the spot interruption notice, as EC2 does two minutes before it reclaims the instance.
    pub fn set_spot_action(&self, action: &str, time: &str) {
        self.lock().spot_action = Some(format!(r#"{{"action": "{action}", "time": "{time}"}}"#));
    }

    pub fn set_rebalance(&self, notice_time: &str) {
        self.lock().rebalance = Some(format!(r#"{{"noticeTime": "{notice_time}"}}"#));
    }

    /// Returns the number of reads rejected for a missing or unknown token.
    pub fn rejected_reads(&self) -> u64 {
        self.lock().rejected_reads
    }

    pub fn token_requests(&self) -> u64 {
        self.lock().token_requests
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ImdsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Shared = Arc<Mutex<ImdsState>>;

async fn issue_token(State(state): State<Shared>, headers: HeaderMap) -> (StatusCode, String) {
    let ttl = headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    if !ttl.is_some_and(|ttl| (1..=21_600).contains(&ttl)) {
        return (
            StatusCode::BAD_REQUEST,
            "missing or invalid X-aws-ec2-metadata-token-ttl-seconds".to_owned(),
        );
    }
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    state.token_requests += 1;
    let token = format!("fake-imds-token-{}", state.token_requests);
    state.tokens.push(token.clone());
    (StatusCode::OK, token)
}

/// Returns the value for a read with a valid token, `Err(401)` otherwise.
fn authorize<'a>(
    state: &'a Shared,
    headers: &HeaderMap,
) -> Result<std::sync::MutexGuard<'a, ImdsState>, StatusCode> {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let token = headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok());
    if token.is_some_and(|token| state.tokens.iter().any(|known| known == token)) {
        Ok(state)
    } else {
        state.rejected_reads += 1;
        Err(StatusCode::UNAUTHORIZED)
    }
}

async fn instance_id_handler(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    match authorize(&state, &headers) {
        Ok(state) => (StatusCode::OK, state.instance_id.clone()),
        Err(status) => (status, String::new()),
    }
}

async fn spot_action(State(state): State<Shared>, headers: HeaderMap) -> (StatusCode, String) {
    match authorize(&state, &headers) {
        Ok(state) => match &state.spot_action {
            Some(body) => (StatusCode::OK, body.clone()),
            None => (StatusCode::NOT_FOUND, "Not Found".to_owned()),
        },
        Err(status) => (status, String::new()),
    }
}

async fn rebalance(State(state): State<Shared>, headers: HeaderMap) -> (StatusCode, String) {
    match authorize(&state, &headers) {
        Ok(state) => match &state.rebalance {
            Some(body) => (StatusCode::OK, body.clone()),
            None => (StatusCode::NOT_FOUND, "Not Found".to_owned()),
        },
        Err(status) => (status, String::new()),
    }
}
