//! `fleet-coordinator run`: one replica from start to shutdown.
//!
//! The replica binds its gRPC and HTTP listeners, campaigns in the etcd election (or, standalone, leads at
//! once over a local state file), and starts the fleet each time it wins and stops it each time it loses.
//! SIGTERM or SIGINT stops the fleet, resigns the leadership so another replica takes over at once, and ends
//! the process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::v1::agent_service_server::AgentServiceServer;
use fleet_proto::v1::fleet_service_server::FleetServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use super::{AgentApi, FleetApi, Node, StateSource, http, members};
use crate::config::{Config, TlsFiles};
use crate::election::{Elector, Role, Term};
use crate::etcd::{EtcdError, EtcdPool};
use crate::fleet::{self, FleetCore, FleetHandle};
use crate::keys::AgentKeys;
use crate::metrics::Metrics;
use crate::providers::aws::AwsProvider;
use crate::providers::local::LocalProvider;
use crate::providers::{CloudProvider, ProviderError, SystemClock};
use crate::registry::Registry;
use crate::store::{EtcdStateStore, FileStateStore, StateStore};

/// Limit on loading the records when this replica becomes the leader.
const LOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit on one ClearML API request of the poller.
const CLEARML_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run as the only replica, with the records in `state_file` instead of etcd.
    pub standalone: bool,
    pub state_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {address} ({key}): {source}; free the port or change {key}")]
    Listen {
        key: &'static str,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed: cannot read {path}: {source}")]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error(
        "the configuration has no [etcd] table; add one, or run a single replica with --standalone"
    )]
    NoEtcd,
    #[error("cannot read or create the agent token key {path}: {source}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the records: {0}; fix or delete the state file")]
    Load(String),
    #[error("cannot set up the etcd client: {0}")]
    Etcd(#[from] EtcdError),
    #[error("cannot set up a cloud provider: {0}")]
    Provider(#[from] ProviderError),
    #[error("cannot set up the ClearML client: {0}")]
    Clearml(#[from] clearml_api::Error),
    #[error("cannot install the SIGTERM and SIGINT handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("the gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Runs one replica until SIGTERM or SIGINT.
pub fn run(config: Config, options: RunOptions) -> Result<(), RunError> {
    install_crypto_provider();
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("the tokio runtime starts")
    });
    system.block_on(run_replica(Arc::new(config), options))
}

/// Selects aws-lc-rs as rustls's process-wide crypto provider. The AWS SDK brings rustls with aws-lc-rs and
/// tonic with ring, and with both compiled in rustls cannot pick one by itself: the first TLS handshake would
/// panic. aws-lc-rs also offers post-quantum key exchange, which ring lacks.
fn install_crypto_provider() {
    // An error means a provider is installed already, which is as good.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

async fn run_replica(config: Arc<Config>, options: RunOptions) -> Result<(), RunError> {
    if !options.standalone && config.etcd.is_none() {
        return Err(RunError::NoEtcd);
    }
    let metrics = Arc::new(Metrics::new());
    let state_file = options
        .state_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.state.json", config.cluster)));
    let keys = match &config.api.bootstrap_key {
        Some(key) => AgentKeys::new(key.clone()),
        None => standalone_key(&state_file)?,
    };
    let clearml = clearml_client(&config)?;
    let providers = build_providers(&config).await?;

    let grpc_listener = bind("api.grpc_listen", config.api.grpc_listen).await?;
    let http_listener = bind("api.http_listen", config.api.http_listen).await?;
    let grpc_address = grpc_listener.local_addr().unwrap_or(config.api.grpc_listen);
    let http_address = http_listener.local_addr().unwrap_or(config.api.http_listen);
    let tls = match &config.api.tls {
        Some(files) => Some(tls_config(files).await?),
        None => None,
    };

    // A standalone replica's role never changes; the sender lives as long as the replica.
    let mut _standalone_role = None;
    let mut _standalone_deadline = None;
    let (role, deadline, source, elector, pool, advertise) = if options.standalone {
        let path = state_file.clone();
        tracing::info!(state_file = %path.display(), "standalone: this replica leads over a local state file");
        let (sender, role) = watch::channel(Role::Leader(Term {
            revision: 1,
            leader_key: Vec::new(),
            lease_id: 0,
        }));
        _standalone_role = Some(sender);
        // A standalone replica has no lease: its authority never runs out.
        let (deadline_sender, deadline) = watch::channel(Some(
            tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600),
        ));
        _standalone_deadline = Some(deadline_sender);
        let store = Arc::new(FileStateStore::new(path));
        (
            role,
            deadline,
            StateSource::File(store),
            None,
            None,
            grpc_address.to_string(),
        )
    } else {
        let etcd = config.etcd.as_ref().ok_or(RunError::NoEtcd)?;
        let pool = Arc::new(EtcdPool::connect(&etcd.endpoints, &etcd.options).await?);
        let mut election = etcd.election.clone();
        election.replica_id = config.replica_id.clone();
        if election.advertise_address.is_empty()
            || election.advertise_address.starts_with("0.0.0.0")
        {
            election.advertise_address = grpc_address.to_string();
        }
        let advertise = election.advertise_address.clone();
        let elector = Elector::spawn(pool.clone(), election.clone());
        let source = StateSource::Etcd {
            pool: pool.clone(),
            key_prefix: etcd.key_prefix.clone(),
            election_key: election.election_key.clone(),
        };
        (
            elector.role(),
            elector.deadline(),
            source,
            Some(elector),
            Some(pool),
            advertise,
        )
    };

    let node = Arc::new(Node::new(
        config.clone(),
        advertise.clone(),
        role.clone(),
        keys.clone(),
        metrics.clone(),
        source,
    ));
    let announcer = pool.clone().zip(config.etcd.as_ref()).map(|(pool, etcd)| {
        tokio::spawn(members::announce(
            pool,
            etcd.key_prefix.clone(),
            config.replica_id.clone(),
            advertise.clone(),
        ))
    });

    let (stop_servers, servers_stopped) = watch::channel(false);
    let grpc = spawn_grpc(node.clone(), grpc_listener, tls, servers_stopped.clone())?;
    let http = spawn_http(node.clone(), http_listener, servers_stopped);
    tracing::info!(
        replica = %config.replica_id,
        cluster = %config.cluster,
        grpc = %grpc_address,
        http = %http_address,
        "coordinator replica started"
    );

    let mut role_changes = role.clone();
    let mut fleet: Option<FleetHandle> = None;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Signals)?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(RunError::Signals)?;
    // When the next attempt to load the records is due, after a failed one.
    let mut retry_load: Option<tokio::time::Instant> = None;
    let mut failure = None;
    loop {
        let current = role_changes.borrow_and_update().clone();
        match (&current, &fleet) {
            (Role::Leader(term), None)
                if retry_load.is_none_or(|at| tokio::time::Instant::now() >= at) =>
            {
                let leader = LeaderParts {
                    config: &config,
                    providers: &providers,
                    clearml: &clearml,
                    keys: &keys,
                    metrics: &metrics,
                    pool: pool.as_ref(),
                    role: &role,
                    deadline: &deadline,
                };
                match become_leader(&node, term, leader).await {
                    Ok(handle) => {
                        fleet = Some(handle);
                        retry_load = None;
                    }
                    // A standalone replica's file does not repair itself: stop with the reason.
                    Err(reason) if options.standalone => {
                        failure = Some(RunError::Load(reason));
                        break;
                    }
                    Err(reason) => {
                        tracing::warn!(term = term.revision, error = %reason, "elected, but the records could not be loaded; retrying in 1 s");
                        retry_load = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            (Role::Leader(term), Some(handle)) if handle.core.term != term.revision => {
                step_down(&node, &mut fleet, &metrics, "a newer term began");
                continue;
            }
            (Role::Follower, Some(_)) => step_down(&node, &mut fleet, &metrics, "leadership ended"),
            (Role::Follower, None) => retry_load = None,
            _ => {}
        }
        let retry_due = async {
            match retry_load {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = role_changes.changed() => if changed.is_err() { break },
            _ = retry_due => {}
            _ = interrupt.recv() => { tracing::info!("SIGINT received; stopping"); break }
            _ = terminate.recv() => { tracing::info!("SIGTERM received; stopping"); break }
        }
    }

    step_down(&node, &mut fleet, &metrics, "the replica is stopping");
    if let Some(elector) = elector {
        elector.shutdown().await;
    }
    if let Some(announcer) = announcer {
        announcer.abort();
    }
    let _ = stop_servers.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    match failure {
        Some(err) => Err(err),
        None => {
            tracing::info!("coordinator replica stopped");
            Ok(())
        }
    }
}

/// Parts a replica needs to start its fleet.
struct LeaderParts<'a> {
    config: &'a Arc<Config>,
    providers: &'a BTreeMap<String, Arc<dyn CloudProvider>>,
    clearml: &'a clearml_api::Client,
    keys: &'a AgentKeys,
    metrics: &'a Arc<Metrics>,
    pool: Option<&'a Arc<EtcdPool>>,
    role: &'a watch::Receiver<Role>,
    deadline: &'a watch::Receiver<Option<tokio::time::Instant>>,
}

/// Reads the agent token key of a standalone replica from `<state file>.key`, or creates it there (mode 0600)
/// on the first start, so agents' tokens stay valid across restarts. Config validation requires a configured
/// key whenever etcd is used, so only a standalone replica gets here.
fn standalone_key(state_file: &std::path::Path) -> Result<AgentKeys, RunError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let mut path = state_file.as_os_str().to_owned();
    path.push(".key");
    let path = PathBuf::from(path);
    let key_error = |source| RunError::KeyFile {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => {
            return Ok(AgentKeys::new(clearml_api::Secret::new(text.trim())));
        }
        Ok(_) => {
            return Err(key_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the key file holds fewer than 32 characters; delete it to make a new key",
            )));
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(key_error(err)),
    }
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(key_error)?;
    }
    let key = crate::auth::generate_token();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(key_error)?;
    file.write_all(key.expose().as_bytes()).map_err(key_error)?;
    tracing::info!(key_file = %path.display(), "created the key of the node agents' tokens");
    Ok(AgentKeys::new(key))
}

/// Loads the records under `term` and starts the fleet. The error describes why the records could not be loaded.
async fn become_leader(
    node: &Arc<Node>,
    term: &Term,
    parts: LeaderParts<'_>,
) -> Result<FleetHandle, String> {
    let LeaderParts {
        config,
        providers,
        clearml,
        keys,
        metrics,
        pool,
        role,
        deadline,
    } = parts;
    let store: Arc<dyn StateStore> = match (&node.source, pool, &config.etcd) {
        (StateSource::File(store), _, _) => store.clone(),
        (StateSource::Etcd { .. }, Some(pool), Some(etcd)) => Arc::new(EtcdStateStore::new(
            pool.clone(),
            term.clone(),
            &etcd.key_prefix,
        )),
        _ => return Err("no state store is configured".to_owned()),
    };
    let registry =
        match tokio::time::timeout(LOAD_TIMEOUT, Registry::load(store, term.revision)).await {
            Ok(Ok(registry)) => registry,
            Ok(Err(err)) => return Err(err.to_string()),
            Err(_) => {
                return Err(format!(
                    "loading took longer than {} s",
                    LOAD_TIMEOUT.as_secs()
                ));
            }
        };
    let core = Arc::new(FleetCore::new(
        config.clone(),
        term.revision,
        registry,
        providers.clone(),
        keys.clone(),
        metrics.clone(),
        clearml.clone(),
        role.clone(),
        deadline.clone(),
    ));
    let handle = fleet::start(core);
    node.set_fleet(Some(handle.clone()));
    metrics.set("fleet_coordinator_leader", &[], 1.0);
    metrics.set("fleet_coordinator_term", &[], term.revision as f64);
    metrics.inc("fleet_coordinator_leader_elections_total", &[]);
    tracing::info!(term = term.revision, "this replica leads; fleet started");
    Ok(handle)
}

/// Stops the fleet, if one runs. A stop on shutdown is logged at info level, a lost leadership as a warning.
fn step_down(node: &Node, fleet: &mut Option<FleetHandle>, metrics: &Metrics, reason: &str) {
    if let Some(handle) = fleet.take() {
        handle.stop();
        node.set_fleet(None);
        if reason == "the replica is stopping" {
            tracing::info!(term = handle.core.term, "fleet stopped: {reason}");
        } else {
            tracing::warn!(term = handle.core.term, "fleet stopped: {reason}");
        }
    }
    metrics.set("fleet_coordinator_leader", &[], 0.0);
    metrics.set("fleet_coordinator_term", &[], 0.0);
}

fn clearml_client(config: &Config) -> Result<clearml_api::Client, RunError> {
    let clearml = &config.clearml;
    let mut client_config = clearml_api::ClientConfig::new(
        &clearml.api_server,
        clearml.access_key.clone(),
        clearml.secret_key.clone(),
    )?;
    if let Some(version) = &clearml.api_version {
        client_config.api_version = version.clone();
    }
    client_config.request_timeout = CLEARML_REQUEST_TIMEOUT;
    Ok(clearml_api::Client::new(client_config)?)
}

/// Builds the provider of every resource: the AWS provider for the resources it configures, the local provider
/// for the others.
async fn build_providers(
    config: &Config,
) -> Result<BTreeMap<String, Arc<dyn CloudProvider>>, RunError> {
    let clock = Arc::new(SystemClock);
    let aws: Option<Arc<dyn CloudProvider>> = match &config.aws {
        Some(aws) => Some(Arc::new(
            AwsProvider::new(aws.clone(), clock.clone()).await?,
        )),
        None => None,
    };
    let local: Option<Arc<dyn CloudProvider>> = config.local.as_ref().map(|local| {
        Arc::new(LocalProvider::new(local.clone(), clock.clone())) as Arc<dyn CloudProvider>
    });
    let mut providers = BTreeMap::new();
    for queue in &config.policy.queues {
        for resource in &queue.resources {
            let is_aws = config
                .aws
                .as_ref()
                .is_some_and(|aws| aws.resources.contains_key(&resource.name));
            let provider = if is_aws { aws.clone() } else { local.clone() };
            if let Some(provider) = provider {
                providers.insert(resource.name.clone(), provider);
            }
        }
    }
    Ok(providers)
}

async fn bind(key: &'static str, address: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| RunError::Listen {
            key,
            address,
            source,
        })
}

async fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig, RunError> {
    let read = |path: PathBuf| async move {
        tokio::fs::read(&path)
            .await
            .map_err(|source| RunError::TlsFile { path, source })
    };
    let cert = read(files.cert_file.clone()).await?;
    let key = read(files.key_file.clone()).await?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &files.client_ca_file {
        let ca = read(ca.clone()).await?;
        tls = tls
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(true);
    }
    Ok(tls)
}

fn spawn_grpc(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, RunError> {
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|err| RunError::Tls(err.to_string()))?;
    }
    let router = builder
        .add_service(FleetServiceServer::new(FleetApi::new(node.clone())))
        .add_service(AgentServiceServer::new(AgentApi::new(node)));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        if let Err(err) = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::error!(error = %err, "gRPC server failed");
        }
    }))
}

fn spawn_http(
    node: Arc<Node>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        if let Err(err) = axum::serve(listener, http::router(node))
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %err, "HTTP server failed");
        }
    })
}
