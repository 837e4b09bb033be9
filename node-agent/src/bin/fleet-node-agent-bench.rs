//! `fleet-node-agent-bench`: prints the node agent's idle RSS and CPU use and the API gate's added latency.
//!
//! Everything runs on 127.0.0.1 in this process: one HTTP server plays the instance metadata service and the
//! ClearML API server (every API call gets an empty success envelope), and a minimal AgentService refuses
//! every termination so the agent stays idle. The agent is the real `fleet-node-agent` binary, and its worker
//! is this program in `--fake-daemon` mode, which polls `queues.get_next_task` through the gate every 5 s as
//! clearml-agent does by default. RSS and CPU are read from /proc for the agent's own pid, without the child.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use fleet_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use fleet_proto::v1::{
    AgentConfig, AgentTimeouts, ClearmlAccess, HealthReport, HealthResponse, HeartbeatRequest,
    HeartbeatResponse, InterruptionReport, InterruptionResponse, RegisterRequest, RegisterResponse,
    TerminationRequest, TerminationResponse,
};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Node agent benchmark: idle RSS and CPU, and the gate's added latency on loopback.
#[derive(Debug, Parser)]
#[command(name = "fleet-node-agent-bench")]
struct Args {
    /// Path of the fleet-node-agent binary; defaults to the one next to this program.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Seconds over which idle CPU use is measured.
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
    /// Requests per latency series (direct and through the gate).
    #[arg(long, default_value_t = 5_000)]
    requests: usize,
    /// Run as the stand-in for clearml-agent's daemon loop (used by the benchmark itself).
    #[arg(long, hide = true)]
    fake_daemon: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    use anyhow::Context;

    let args = Args::parse();
    if args.fake_daemon {
        return fake_daemon().await;
    }

    let services = serve_http(fake_services).await?;
    let coordinator = serve_coordinator(services).await?;
    let dir = tempfile_dir()?;
    let config_path = write_config(&dir, services, coordinator)?;
    let agent_binary = match args.agent {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("the benchmark binary has a parent directory")?
            .join("fleet-node-agent"),
    };

    let mut agent = tokio::process::Command::new(&agent_binary)
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "failed to start {}; build it with cargo build --release -p fleet-node-agent",
                agent_binary.display()
            )
        })?;
    let pid = agent.id().context("the agent has a pid")?;
    let ready = wait_for_ready(&dir.join("state")).await?;
    println!("fleet-node-agent pid {pid}, gate {}", ready.gate);

    // Let the agent settle: clearml.conf written, first polls through the gate, heartbeats running.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_before, _) = read_proc(pid)?;
    let cpu_start = cpu_ticks(pid)?;
    let wall_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let cpu_ticks_used = cpu_ticks(pid)? - cpu_start;
    let wall = wall_start.elapsed().as_secs_f64();
    let (rss_after, rss_peak) = read_proc(pid)?;
    let ticks_per_second = clock_ticks_per_second();
    let cpu_percent = 100.0 * (cpu_ticks_used as f64 / ticks_per_second) / wall;

    println!("idle over {wall:.1} s (worker polling every 5 s, heartbeat every 5 s):");
    println!(
        "  RSS {:.1} MB at start, {:.1} MB at end, peak {:.1} MB (goal <= 20 MB)",
        kb_to_mb(rss_before),
        kb_to_mb(rss_after),
        kb_to_mb(rss_peak)
    );
    println!("  CPU {cpu_percent:.3} % of one core (goal <= 1 %)");

    let latency = measure_latency(services, ready.gate, args.requests).await?;
    println!(
        "gate latency over {} sequential keep-alive requests per series:",
        args.requests
    );
    for (name, direct, gated) in latency {
        println!(
            "  {name}: direct {:.3} ms, through the gate {:.3} ms, added {:.3} ms",
            direct.as_secs_f64() * 1e3,
            gated.as_secs_f64() * 1e3,
            gated.saturating_sub(direct).as_secs_f64() * 1e3
        );
    }
    println!("  (goal: added p99 <= 1 ms on loopback)");

    agent.kill().await.ok();
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// Returns `(label, direct, through gate)` for p50, p90, p99 and max.
async fn measure_latency(
    upstream: SocketAddr,
    gate: SocketAddr,
    requests: usize,
) -> anyhow::Result<Vec<(&'static str, Duration, Duration)>> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let body = r#"{"queue": "bench-queue-id", "tasks": ["a", "b"]}"#;
    let mut direct = Vec::with_capacity(requests);
    let mut gated = Vec::with_capacity(requests);
    for round in 0..requests + 200 {
        for (target, samples) in [(upstream, &mut direct), (gate, &mut gated)] {
            let started = Instant::now();
            let response = client
                .post(format!("http://{target}/v2.14/tasks.get_all"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            response.bytes().await?;
            // The first 200 rounds warm up connections and caches.
            if round >= 200 {
                samples.push(started.elapsed());
            }
        }
    }
    direct.sort();
    gated.sort();
    let at = |samples: &[Duration], quantile: f64| {
        let index = ((samples.len() as f64 * quantile).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index]
    };
    Ok(vec![
        ("p50", at(&direct, 0.50), at(&gated, 0.50)),
        ("p90", at(&direct, 0.90), at(&gated, 0.90)),
        ("p99", at(&direct, 0.99), at(&gated, 0.99)),
        ("max", at(&direct, 1.0), at(&gated, 1.0)),
    ])
}

/// Polls `queues.get_next_task` through the gate every 5 s, reading the gate's address from clearml.conf.
async fn fake_daemon() -> anyhow::Result<()> {
    use anyhow::Context;

    let conf_path = std::env::var("CLEARML_CONFIG_FILE").context("CLEARML_CONFIG_FILE is set")?;
    let conf = std::fs::read_to_string(&conf_path)?;
    let api_server = conf
        .lines()
        .find_map(|line| line.trim().strip_prefix("api_server: "))
        .map(|value| value.trim_matches('"').to_owned())
        .context("clearml.conf has api_server")?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    loop {
        let _ = client
            .post(format!("{api_server}/v2.14/queues.get_next_task"))
            .header("content-type", "application/json")
            .body(r#"{"queue": "bench-queue-id"}"#)
            .send()
            .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Serves the instance metadata paths and, for every other path, an empty ClearML success envelope.
async fn fake_services(request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let _ = request.into_body().collect().await;
    let (status, body): (StatusCode, &'static str) = match path.as_str() {
        "/latest/api/token" => (StatusCode::OK, "bench-imds-token"),
        "/latest/meta-data/instance-id" => (StatusCode::OK, "i-0bench0000000000"),
        p if p.starts_with("/latest/") => (StatusCode::NOT_FOUND, "Not Found"),
        _ => (
            StatusCode::OK,
            r#"{"meta": {"id": "bench", "trx": "bench", "endpoint": {"name": "", "requested_version": "2.14", "actual_version": "2.14"}, "result_code": 200, "result_subcode": 0, "result_msg": "OK", "error_stack": null, "error_data": {}}, "data": {}}"#,
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

async fn serve_http<F, Fut>(handler: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

struct BenchCoordinator {
    clearml: SocketAddr,
}

#[tonic::async_trait]
impl AgentService for BenchCoordinator {
    async fn register(
        &self,
        _request: tonic::Request<RegisterRequest>,
    ) -> Result<tonic::Response<RegisterResponse>, tonic::Status> {
        let url = format!("http://{}", self.clearml);
        Ok(tonic::Response::new(RegisterResponse {
            session_token: "bench-session".to_owned(),
            config: Some(AgentConfig {
                worker_id: "fleet:bench:i-0bench0000000000".to_owned(),
                resource: "bench".to_owned(),
                queues: vec!["bench".to_owned()],
                clearml: Some(ClearmlAccess {
                    api_server: url.clone(),
                    web_server: url.clone(),
                    files_server: url,
                    access_key: "bench-access".to_owned(),
                    secret_key: "bench-secret".to_owned(),
                }),
                timeouts: Some(AgentTimeouts {
                    max_idle_seconds: 1,
                    heartbeat_interval_seconds: 5,
                    orphan_timeout_seconds: 3_600,
                    drain_grace_seconds: 60,
                    termination_retry_seconds: 5,
                }),
                ..AgentConfig::default()
            }),
        }))
    }

    async fn heartbeat(
        &self,
        _request: tonic::Request<HeartbeatRequest>,
    ) -> Result<tonic::Response<HeartbeatResponse>, tonic::Status> {
        Ok(tonic::Response::new(HeartbeatResponse { drain: false }))
    }

    async fn request_termination(
        &self,
        _request: tonic::Request<TerminationRequest>,
    ) -> Result<tonic::Response<TerminationResponse>, tonic::Status> {
        Ok(tonic::Response::new(TerminationResponse {
            granted: false,
            reason: "the benchmark keeps the agent idle".to_owned(),
            retry_after_seconds: 5,
        }))
    }

    async fn report_interruption(
        &self,
        _request: tonic::Request<InterruptionReport>,
    ) -> Result<tonic::Response<InterruptionResponse>, tonic::Status> {
        Ok(tonic::Response::new(InterruptionResponse {}))
    }

    async fn report_health(
        &self,
        _request: tonic::Request<HealthReport>,
    ) -> Result<tonic::Response<HealthResponse>, tonic::Status> {
        Ok(tonic::Response::new(HealthResponse { replace: false }))
    }
}

async fn serve_coordinator(clearml: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(BenchCoordinator { clearml }))
            .serve_with_incoming(incoming)
            .await;
    });
    Ok(addr)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("fleet-node-agent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn write_config(
    dir: &std::path::Path,
    services: SocketAddr,
    coordinator: SocketAddr,
) -> anyhow::Result<PathBuf> {
    let path = dir.join("agent.toml");
    let me = std::env::current_exe()?;
    let daemon = dir.join("fake-daemon.sh");
    std::fs::write(
        &daemon,
        format!("#!/bin/sh\nexec '{}' --fake-daemon\n", me.display()),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&daemon, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(
        &path,
        format!(
            r#"[coordinator]
endpoints = ["http://{coordinator}"]
bootstrap_token = "bench-token"
allow_plaintext_loopback = true

[imds]
endpoint = "http://{services}"

[agent]
state_dir = "{state}"
gate_listen = "127.0.0.1:0"
grpc_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
shutdown_command = ["true"]

[clearml_agent]
program = "{daemon}"
"#,
            state = dir.join("state").display(),
            daemon = daemon.display(),
        ),
    )?;
    Ok(path)
}

async fn wait_for_ready(
    state_dir: &std::path::Path,
) -> anyhow::Result<fleet_node_agent::run::ReadyInfo> {
    let path = state_dir.join("ready.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return Ok(serde_json::from_str(&text)?);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the agent did not write {} within 30 s", path.display())
}

/// Returns `(VmRSS, VmHWM)` in kB from /proc/PID/status.
fn read_proc(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// Returns utime + stime of a process in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name can contain spaces; the fields after it start after the last ')'.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn kb_to_mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}
