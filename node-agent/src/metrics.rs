//! `/metrics` in the Prometheus text format (version 0.0.4), served by a small hyper server.

use std::convert::Infallible;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::controller::{Agent, agent_state};

/// Serves `/metrics` on `listener` until the process exits.
pub fn serve(listener: TcpListener, agent: Arc<Agent>) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let agent = agent.clone();
                        async move { Ok::<_, Infallible>(respond(request.uri().path(), &agent)) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    tracing::info!(%addr, "metrics server listening");
    Ok(addr)
}

fn respond(path: &str, agent: &Agent) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        let mut response =
            Response::new(Full::new(Bytes::from_static(b"not found; use /metrics\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from(render(agent))));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// Renders every metric; the names share the prefix `fleet_node_agent_`.
pub fn render(agent: &Agent) -> String {
    let child = agent.supervisor.status();
    let snapshot = agent.gate.snapshot();
    let counters = agent.gate.counters();
    let state = agent_state(&agent.gate, &child);
    let idle_seconds = snapshot
        .idle_since
        .map(|since| since.elapsed().as_secs_f64())
        .unwrap_or(0.0);

    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(text, "# HELP fleet_node_agent_{name} {help}");
        let _ = writeln!(text, "# TYPE fleet_node_agent_{name} {kind}");
        let _ = writeln!(text, "fleet_node_agent_{name} {value}");
    };
    metric(
        "busy",
        "gauge",
        "Whether the worker runs a task (1) or not (0).",
        f64::from(u8::from(snapshot.held.is_some())),
    );
    metric(
        "draining",
        "gauge",
        "Whether the gate is closed and hands out no tasks (1) or open (0).",
        f64::from(u8::from(snapshot.draining)),
    );
    metric(
        "idle_seconds",
        "gauge",
        "Seconds since the worker became idle; 0 while busy.",
        idle_seconds,
    );
    metric(
        "tasks_taken_total",
        "counter",
        "Tasks the worker took through the gate.",
        snapshot.tasks_taken as f64,
    );
    metric(
        "polls_answered_empty_total",
        "counter",
        "queues.get_next_task calls the closed gate answered with no task.",
        snapshot.polls_answered_empty as f64,
    );
    metric(
        "gate_requests_total",
        "counter",
        "Calls the gate forwarded to the ClearML API server.",
        counters.requests_forwarded.load(Ordering::Relaxed) as f64,
    );
    metric(
        "gate_upstream_errors_total",
        "counter",
        "Forwarded calls that failed to reach the ClearML API server.",
        counters.upstream_errors.load(Ordering::Relaxed) as f64,
    );
    metric(
        "clearml_agent_restarts_total",
        "counter",
        "Restarts of clearml-agent after it exited on its own.",
        f64::from(child.restarts),
    );
    metric(
        "clearml_agent_crash_loop",
        "gauge",
        "Whether clearml-agent is in a crash loop (1) or not (0).",
        f64::from(u8::from(child.crash_loop)),
    );
    metric(
        "coordinator_contact_age_seconds",
        "gauge",
        "Seconds since the last successful call to the coordinator.",
        agent.contact.last().elapsed().as_secs_f64(),
    );
    metric(
        "uptime_seconds",
        "gauge",
        "Seconds since the agent registered.",
        agent.started_at.elapsed().as_secs_f64(),
    );
    let _ = writeln!(
        text,
        "# HELP fleet_node_agent_state The agent's current state, as a label with value 1."
    );
    let _ = writeln!(text, "# TYPE fleet_node_agent_state gauge");
    let _ = writeln!(
        text,
        "fleet_node_agent_state{{state=\"{}\"}} 1",
        state.as_str_name()
    );
    text
}
