//! Startup and the whole agent's life: instance id, registration, gate, clearml-agent, servers, main loop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::v1::RegisterRequest;
use fleet_proto::v1::node_agent_server::NodeAgentServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::Config;
use crate::controller::{self, Agent, Contact, Exit};
use crate::coordinator::{CoordinatorClient, CoordinatorError};
use crate::gate::{Gate, GateServer, Upstream};
use crate::grpc::NodeAgentService;
use crate::imds::{ImdsClient, ImdsError};
use crate::logs::LogBuffer;
use crate::policy::Timeouts;
use crate::requeue::{self, RequeueReason};
use crate::shutdown::ShutdownAction;
use crate::supervisor::{ChildSpec, ExitHook, Supervisor};

/// Process exit codes, from sysexits.h where one fits, so scripts and systemd can tell the causes apart.
pub mod exit_code {
    /// The agent shut the machine down or stopped on SIGTERM.
    pub const OK: i32 = 0;
    /// Any failure without a code of its own.
    pub const FAILURE: i32 = 1;
    /// EX_UNAVAILABLE: no coordinator accepted the registration in time (none reachable, or each returned an error).
    pub const COORDINATOR_UNREACHABLE: i32 = 69;
    /// EX_NOHOST: the instance metadata service did not return an instance id.
    pub const IMDS_UNAVAILABLE: i32 = 68;
    /// EX_NOPERM: the coordinator rejected the bootstrap token.
    pub const TOKEN_REJECTED: i32 = 77;
    /// EX_CONFIG: the config file is missing, malformed or invalid.
    pub const CONFIG: i32 = 78;
}

/// Errors that end the agent before or while it starts.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("failed to read the instance id: {0}")]
    Imds(#[source] ImdsError),
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    #[error("failed to {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid ClearML settings from the coordinator: {0}")]
    Clearml(#[from] clearml_api::Error),
    #[error(transparent)]
    Conf(#[from] crate::clearml_conf::WriteConfError),
}

impl StartError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) => exit_code::CONFIG,
            StartError::Imds(_) => exit_code::IMDS_UNAVAILABLE,
            StartError::Coordinator(CoordinatorError::TokenRejected { .. }) => {
                exit_code::TOKEN_REJECTED
            }
            StartError::Coordinator(CoordinatorError::RegistrationTimedOut { .. }) => {
                exit_code::COORDINATOR_UNREACHABLE
            }
            _ => exit_code::FAILURE,
        }
    }
}

/// Addresses of the agent's local servers, written to `<state_dir>/ready.json` once the agent runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReadyInfo {
    pub instance_id: String,
    pub worker_id: String,
    pub gate: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub pid: u32,
}

/// Starts the agent and runs it until it powers the machine off or stops after SIGTERM.
///
/// `sigterm` delivers SIGTERM (the binary forwards the signal, tests send on the channel).
pub async fn run(config: Config, mut sigterm: mpsc::Receiver<()>) -> Result<Exit, StartError> {
    let state_dir = &config.agent.state_dir;
    create_private_dir(state_dir)?;

    let imds = Arc::new(ImdsClient::new(config.imds.endpoint.clone()).map_err(StartError::Imds)?);
    let coordinator = Arc::new(CoordinatorClient::new(&config.coordinator)?);

    // Startup can retry for up to twice registration_timeout. A stop signal ends it at once, and because
    // clearml-agent has not started yet, there is nothing to drain.
    let startup = register_instance(&config, &imds, &coordinator);
    let (instance_id, registration) = tokio::select! {
        result = startup => result?,
        Some(()) = sigterm.recv() => {
            tracing::info!("stop signal received before registration finished; exiting without starting clearml-agent");
            return Ok(Exit::Stopped);
        }
    };
    let registered = registration.config;
    let clearml_access = registered.clearml.clone().unwrap_or_default();
    let timeouts = Timeouts::from_proto(registered.timeouts.as_ref());
    // NOTE: clearml_agent_version is logged, not enforced: the agent runs whatever clearml_agent.program is.
    tracing::info!(worker_id = %registered.worker_id, clearml_agent_version = %registered.clearml_agent_version, docker_image = %registered.docker_image, ?timeouts, "agent config received");

    let clearml = clearml_api::Client::new(clearml_api::ClientConfig::new(
        &clearml_access.api_server,
        clearml_access.access_key.clone(),
        clearml_access.secret_key.clone(),
    )?)?;

    let gate = Gate::new();
    let upstream_url = url::Url::parse(&clearml_access.api_server).map_err(|error| {
        clearml_api::Error::InvalidConfig {
            reason: format!("api_server {:?}: {error}", clearml_access.api_server),
        }
    })?;
    let upstream = Upstream::new(upstream_url).map_err(|error| StartError::Io {
        what: "build the gate's HTTP client".to_owned(),
        source: std::io::Error::other(error),
    })?;
    let gate_listener = bind(config.agent.gate_listen, "agent.gate_listen").await?;
    let gate_server =
        GateServer::start(gate_listener, gate.clone(), upstream).map_err(|source| {
            StartError::Io {
                what: "start the API gate".to_owned(),
                source,
            }
        })?;

    if let Some(warning) =
        crate::clearml_conf::docker_network_warning(&gate_server.url(), &registered)
    {
        tracing::warn!("{warning}");
    }
    let conf_path = crate::clearml_conf::write(state_dir, &gate_server.url(), &registered)?;
    let home = config
        .clearml_agent
        .home
        .clone()
        .unwrap_or_else(|| state_dir.join("home"));
    create_private_dir(&home)?;

    let logs = Arc::new(LogBuffer::new());
    logs.add_secrets(
        [
            clearml_access.secret_key.clone(),
            registered
                .git
                .as_ref()
                .map(|g| g.password.clone())
                .unwrap_or_default(),
            registration.session_token.expose().to_owned(),
            config.coordinator.bootstrap_token.expose().to_owned(),
        ]
        .into_iter()
        .chain(registered.storage_env.values().cloned()),
    );

    let spec = child_spec(&config, &registered, &conf_path, &home);
    let exit_hook = requeue_on_exit(gate.clone(), clearml.clone(), registered.worker_id.clone());
    let supervisor = Arc::new(Supervisor::start(
        spec,
        config.clearml_agent.clone(),
        logs.clone(),
        exit_hook,
    ));

    let (commands_sender, commands) = mpsc::channel(16);
    let started_at = Instant::now();
    let agent = Arc::new(Agent {
        instance_id: instance_id.clone(),
        worker_id: registered.worker_id.clone(),
        timeouts,
        check_interval: config.agent.check_interval,
        coordinator,
        clearml,
        gate,
        supervisor,
        logs,
        shutdown_action: Arc::new(ShutdownAction::new(config.agent.shutdown_command.clone())),
        contact: Arc::new(Contact::new(started_at)),
        started_at,
        commands: commands_sender.clone(),
    });

    let grpc_listener = bind(config.agent.grpc_listen, "agent.grpc_listen").await?;
    let grpc_addr = local_addr(&grpc_listener)?;
    let service = NodeAgentServer::new(NodeAgentService::new(
        agent.clone(),
        commands_sender.clone(),
    ));
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
        if let Err(error) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(%error, "NodeAgent gRPC server failed");
        }
    });
    tracing::info!(addr = %grpc_addr, "NodeAgent gRPC server listening");

    let metrics_listener = bind(config.agent.metrics_listen, "agent.metrics_listen").await?;
    let metrics_addr =
        crate::metrics::serve(metrics_listener, agent.clone()).map_err(|source| {
            StartError::Io {
                what: "start the metrics server".to_owned(),
                source,
            }
        })?;

    let (notice_sender, notices) = mpsc::channel(1);
    let notice_task = if config.imds.instance_id.is_some() {
        // No metadata service: no interruption notice can come. The sender stays alive with the task.
        tokio::spawn(async move {
            let _sender = notice_sender;
            std::future::pending::<()>().await
        })
    } else {
        tokio::spawn(controller::notice_loop(
            imds,
            config.imds.notice_poll_interval,
            notice_sender,
        ))
    };
    let (stop_heartbeats, heartbeat_stop) = watch::channel(false);
    let heartbeat_task = tokio::spawn(controller::heartbeat_loop(
        agent.clone(),
        commands_sender,
        heartbeat_stop,
    ));

    write_ready_file(
        state_dir,
        &ReadyInfo {
            instance_id,
            worker_id: agent.worker_id.clone(),
            gate: gate_server.addr(),
            grpc: grpc_addr,
            metrics: metrics_addr,
            pid: std::process::id(),
        },
    )?;

    let exit = agent.clone().run(commands, notices, sigterm).await;
    let _ = stop_heartbeats.send(true);
    notice_task.abort();
    let _ = heartbeat_task.await;
    drop(gate_server);
    tracing::info!(?exit, "node agent finished");
    Ok(exit)
}

/// Requeues the task clearml-agent held when it died, so a restart does not leave the task in_progress.
fn requeue_on_exit(gate: Gate, clearml: clearml_api::Client, worker_id: String) -> ExitHook {
    Arc::new(move || {
        let gate = gate.clone();
        let clearml = clearml.clone();
        let worker_id = worker_id.clone();
        Box::pin(async move {
            let Some(task) = gate.take_held() else {
                return;
            };
            tracing::warn!(task_id = %task.task_id, "clearml-agent exited while running a task; requeueing it");
            if let Err(error) = requeue::requeue(
                &clearml,
                &task,
                RequeueReason::ClearmlAgentExited,
                &worker_id,
            )
            .await
            {
                tracing::error!(task_id = %task.task_id, %error, "failed to requeue the task of the exited clearml-agent");
            }
        })
    })
}

fn child_spec(
    config: &Config,
    registered: &fleet_proto::v1::AgentConfig,
    conf_path: &Path,
    home: &Path,
) -> ChildSpec {
    let mut args = vec!["daemon".to_owned(), "--queue".to_owned()];
    args.extend(registered.queues.iter().cloned());
    // NOTE: docker mode is untested. The container's clearml-agent reports task status through the gate's
    // address in clearml.conf, so that address must be reachable from the container. On docker's default
    // bridge network 127.0.0.1 is not, and agent.gate_listen sets the address.
    if !registered.docker_image.is_empty() {
        args.push("--docker".to_owned());
        args.push(registered.docker_image.clone());
    }
    args.push("--foreground".to_owned());

    let mut env: BTreeMap<String, String> = registered
        .storage_env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.extend(config.clearml_agent.env.clone());
    env.insert("HOME".to_owned(), home.display().to_string());
    env.insert(
        "CLEARML_CONFIG_FILE".to_owned(),
        conf_path.display().to_string(),
    );
    env.insert("CLEARML_WORKER_ID".to_owned(), registered.worker_id.clone());
    env.insert("PYTHONUNBUFFERED".to_owned(), "1".to_owned());

    ChildSpec {
        program: config.clearml_agent.program.clone(),
        args,
        env,
        work_dir: home.to_path_buf(),
        init_script: registered.init_script.clone(),
    }
}

/// Reads the instance id from the config or the metadata service, then registers with the coordinator.
async fn register_instance(
    config: &Config,
    imds: &ImdsClient,
    coordinator: &CoordinatorClient,
) -> Result<(String, crate::coordinator::Registration), StartError> {
    let instance_id = match &config.imds.instance_id {
        Some(id) => {
            tracing::info!(instance_id = %id, "instance id from the config; no metadata service");
            id.clone()
        }
        None => {
            let id = read_instance_id(imds, config.coordinator.registration_timeout).await?;
            tracing::info!(instance_id = %id, "instance id read from the metadata service");
            id
        }
    };

    let saved = config
        .agent
        .state_dir
        .join(format!("registration-{instance_id}.pb"));
    if let Some(response) = read_saved_registration(&saved) {
        match coordinator.resume(&instance_id, response) {
            Ok(registration) => {
                tracing::info!(%instance_id, path = %saved.display(), "resumed the registration saved before a restart");
                return Ok((instance_id, registration));
            }
            Err(error) => {
                tracing::warn!(%instance_id, %error, "the saved registration is invalid; registering again");
            }
        }
    }

    let registration = coordinator
        .register(
            RegisterRequest {
                instance_id: instance_id.clone(),
                bootstrap_token: config.coordinator.bootstrap_token.expose().to_owned(),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                hostname: hostname(),
            },
            config.coordinator.registration_timeout,
        )
        .await?;
    save_registration(&saved, &registration)?;
    Ok((instance_id, registration))
}

/// Reads a registration saved by an earlier run of this agent on this instance, if any.
fn read_saved_registration(path: &Path) -> Option<fleet_proto::v1::RegisterResponse> {
    use prost::Message;
    let bytes = std::fs::read(path).ok()?;
    match fleet_proto::v1::RegisterResponse::decode(bytes.as_slice()) {
        Ok(response) => Some(response),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "unreadable saved registration; registering again");
            None
        }
    }
}

/// Saves the registration (mode 0600, because it contains the session token and the ClearML credentials), so a restarted
/// agent resumes it instead of presenting its one-time bootstrap token again.
fn save_registration(
    path: &Path,
    registration: &crate::coordinator::Registration,
) -> Result<(), StartError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    use prost::Message;
    let response = fleet_proto::v1::RegisterResponse {
        session_token: registration.session_token.expose().to_owned(),
        config: Some(registration.config.clone()),
    };
    let io_error = |source| StartError::Io {
        what: format!("save the registration to {}", path.display()),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error)?;
    file.write_all(&response.encode_to_vec()).map_err(io_error)
}

/// Reads the instance id, retrying for up to `timeout` because IMDS can lag at boot.
async fn read_instance_id(imds: &ImdsClient, timeout: Duration) -> Result<String, StartError> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(200);
    loop {
        match imds.instance_id().await {
            Ok(id) => return Ok(id),
            Err(error) if Instant::now() + delay < deadline => {
                tracing::warn!(%error, delay_ms = delay.as_millis() as u64, "failed to read the instance id; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(StartError::Imds(error)),
        }
    }
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Io {
            what: format!("bind {key} = {addr}; choose a free address"),
            source,
        })
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Io {
        what: "read a listener's local address".to_owned(),
        source,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StartError::Io {
            what: format!("create directory {}; check agent.state_dir", dir.display()),
            source,
        })
}

fn write_ready_file(state_dir: &Path, info: &ReadyInfo) -> Result<(), StartError> {
    let path: PathBuf = state_dir.join("ready.json");
    let temp = state_dir.join("ready.json.tmp");
    let text = serde_json::to_string_pretty(info).expect("ReadyInfo always serializes");
    std::fs::write(&temp, text)
        .and_then(|()| std::fs::rename(&temp, &path))
        .map_err(|source| StartError::Io {
            what: format!("write {}", path.display()),
            source,
        })
}

fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer it is given.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result != 0 {
        return String::new();
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}
