//! The HTTP server: `/metrics` (Prometheus), `/healthz` (the process runs), `/readyz` (the replica can do its
//! job: it leads with a running fleet, or it follows a known leader) and `/status` (JSON for people and
//! scripts).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;

use super::Node;

/// Limit on the etcd lookup of the leader in `/readyz` and `/status`, so probes return quickly when etcd
/// does not respond.
const PROBE_LOOKUP_LIMIT: std::time::Duration = std::time::Duration::from_millis(800);

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(node)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    if node.fleet().is_some() {
        return (StatusCode::OK, "ready: leader\n").into_response();
    }
    if matches!(node.source, super::StateSource::File(_)) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the standalone fleet is not running; see the log\n",
        )
            .into_response();
    }
    match node.leader_within(PROBE_LOOKUP_LIMIT).await {
        Some((leader, _)) => {
            (StatusCode::OK, format!("ready: follower of {leader}\n")).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no leader is elected, or etcd cannot be reached\n",
        )
            .into_response(),
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.metrics.render(),
    )
        .into_response()
}

#[derive(Serialize)]
struct Status {
    cluster: String,
    replica_id: String,
    role: &'static str,
    term: i64,
    leader_id: Option<String>,
    leader_address: Option<String>,
    /// When this replica's fleet started, in ms since the epoch; 0 for a follower.
    leader_since_ms: u64,
    /// When this replica's fleet made its first policy decision, in ms since the epoch; 0 before it.
    first_decision_ms: u64,
}

async fn status(State(node): State<Arc<Node>>) -> Json<Status> {
    let fleet = node.fleet();
    let leader = node.leader_within(PROBE_LOOKUP_LIMIT).await;
    Json(Status {
        cluster: node.config.cluster.clone(),
        replica_id: node.replica_id.clone(),
        role: if fleet.is_some() {
            "leader"
        } else {
            "follower"
        },
        term: node.term(),
        leader_id: leader.as_ref().map(|(id, _)| id.clone()),
        leader_address: leader.map(|(_, address)| address),
        leader_since_ms: fleet.as_ref().map_or(0, |fleet| fleet.core.leader_since_ms),
        first_decision_ms: fleet.map_or(0, |fleet| fleet.core.first_decision_ms()),
    })
}
