//! The bootstrap config: a small TOML file that cloud-init writes or the VM image contains.
//!
//! It holds only what the agent needs before it registers: where the coordinators are, the one-time bootstrap
//! token, the CA certificate, the instance metadata endpoint, local listen addresses and the shutdown action.
//! Everything else (queues, ClearML credentials, timeouts) comes from the registration response.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// Errors of reading and validating the bootstrap config. Each names the file or key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read the config file {path}: {source}; check the path given to --config")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TOML in config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config key {key} = {value:?}: {fix}")]
    Invalid {
        key: &'static str,
        value: String,
        fix: String,
    },
    #[error(
        "failed to read {key} from {path}: {source}; check that the file exists and is readable"
    )]
    ReadReferenced {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The validated bootstrap config.
#[derive(Debug, Clone)]
pub struct Config {
    pub coordinator: CoordinatorConfig,
    pub imds: ImdsConfig,
    pub agent: AgentLocalConfig,
    pub clearml_agent: ClearmlAgentConfig,
}

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// gRPC endpoints of the coordinator replicas, tried in order.
    pub endpoints: Vec<Url>,
    /// One-time token that proves this instance was launched by the fleet. Never logged.
    pub bootstrap_token: clearml_api::Secret,
    /// PEM text of the CA that signed the coordinators' certificates; `None` only with plaintext loopback.
    pub ca_certificate_pem: Option<String>,
    /// Allows `http://` endpoints on a loopback address (tests and single-host demos).
    pub allow_plaintext_loopback: bool,
    /// Total time to keep retrying registration before exiting.
    pub registration_timeout: Duration,
    /// Limit on one call to the coordinator.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ImdsConfig {
    /// Base URL of the instance metadata service (`http://169.254.169.254` on EC2).
    pub endpoint: Url,
    /// Interval between two polls of the spot interruption and rebalance notices.
    pub notice_poll_interval: Duration,
    /// Instance id given in the config, for a machine without a metadata service (a local instance of the
    /// coordinator's local provider, an on-premises box). With it, the metadata service is never called and
    /// no interruption notice is watched.
    pub instance_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AgentLocalConfig {
    /// Directory for the generated clearml.conf, clearml-agent's HOME and the agent's own files.
    pub state_dir: PathBuf,
    /// Address of the API gate that clearml-agent uses as its API server; port 0 picks a free port.
    pub gate_listen: SocketAddr,
    /// Address of the NodeAgent gRPC server.
    pub grpc_listen: SocketAddr,
    /// Address of the HTTP server for `/metrics`.
    pub metrics_listen: SocketAddr,
    /// Program and arguments run once to power the machine off.
    pub shutdown_command: Vec<String>,
    /// Interval between two idle and orphan checks.
    pub check_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct ClearmlAgentConfig {
    /// Path or name of the `clearml-agent` executable.
    pub program: PathBuf,
    /// Extra environment variables for clearml-agent (no secrets: they may appear in process listings).
    pub env: BTreeMap<String, String>,
    /// Sets clearml-agent's HOME; defaults to `<state_dir>/home`.
    pub home: Option<PathBuf>,
    /// First restart delay after a crash; doubles up to `restart_backoff_max`.
    pub restart_backoff_initial: Duration,
    pub restart_backoff_max: Duration,
    /// This many exits within `crash_loop_window` count as a crash loop and are reported as unhealthy.
    pub crash_loop_restarts: u32,
    pub crash_loop_window: Duration,
    /// Time clearml-agent gets to exit after SIGTERM before its process group is killed.
    pub stop_timeout: Duration,
}

/// The file layout, with every optional key as an `Option`, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    coordinator: RawCoordinator,
    #[serde(default)]
    imds: RawImds,
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    clearml_agent: RawClearmlAgent,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    endpoints: Vec<String>,
    bootstrap_token: Option<String>,
    bootstrap_token_file: Option<PathBuf>,
    ca_certificate: Option<PathBuf>,
    #[serde(default)]
    allow_plaintext_loopback: bool,
    registration_timeout_seconds: Option<u64>,
    request_timeout_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImds {
    endpoint: Option<String>,
    notice_poll_interval_ms: Option<u64>,
    instance_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    state_dir: Option<PathBuf>,
    gate_listen: Option<String>,
    grpc_listen: Option<String>,
    metrics_listen: Option<String>,
    shutdown_command: Option<Vec<String>>,
    check_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClearmlAgent {
    program: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    home: Option<PathBuf>,
    restart_backoff_initial_ms: Option<u64>,
    restart_backoff_max_ms: Option<u64>,
    crash_loop_restarts: Option<u32>,
    crash_loop_window_seconds: Option<u64>,
    stop_timeout_seconds: Option<u64>,
}

const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";
const DEFAULT_STATE_DIR: &str = "/var/lib/clearml-fleet-agent";

impl Config {
    /// Reads and validates the config file at `path`, including the files it names (token, CA certificate).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` is used in messages and to resolve nothing else.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: error.to_string().trim_end().to_owned(),
        })?;

        let coordinator = validate_coordinator(raw.coordinator)?;
        let imds = validate_imds(raw.imds)?;
        let agent = validate_agent(raw.agent)?;
        let clearml_agent = validate_clearml_agent(raw.clearml_agent)?;
        Ok(Config {
            coordinator,
            imds,
            agent,
            clearml_agent,
        })
    }
}

fn validate_coordinator(raw: RawCoordinator) -> Result<CoordinatorConfig, ConfigError> {
    if raw.endpoints.is_empty() {
        return Err(invalid(
            "coordinator.endpoints",
            "[]",
            "list at least one coordinator, for example [\"https://coordinator-1:7443\"]",
        ));
    }

    let mut endpoints = Vec::with_capacity(raw.endpoints.len());
    let mut plaintext = false;
    for endpoint in &raw.endpoints {
        let url = Url::parse(endpoint).map_err(|error| {
            invalid(
                "coordinator.endpoints",
                endpoint,
                &format!("not a URL ({error}); use for example https://coordinator-1:7443"),
            )
        })?;
        match url.scheme() {
            "https" => {}
            "http" if raw.allow_plaintext_loopback && is_loopback(&url) => plaintext = true,
            "http" => {
                return Err(invalid(
                    "coordinator.endpoints",
                    endpoint,
                    "plain http is allowed only for loopback addresses with allow_plaintext_loopback = true; use https",
                ));
            }
            other => {
                return Err(invalid(
                    "coordinator.endpoints",
                    endpoint,
                    &format!("scheme {other:?} is not supported; use https"),
                ));
            }
        }
        endpoints.push(url);
    }

    let bootstrap_token = match (raw.bootstrap_token, raw.bootstrap_token_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "coordinator.bootstrap_token",
                "***",
                "set either bootstrap_token or bootstrap_token_file, not both",
            ));
        }
        (Some(token), None) => token,
        (None, Some(file)) => std::fs::read_to_string(&file)
            .map_err(|source| ConfigError::ReadReferenced {
                key: "coordinator.bootstrap_token_file",
                path: file,
                source,
            })?
            .trim()
            .to_owned(),
        (None, None) => String::new(),
    };
    if bootstrap_token.is_empty() {
        return Err(invalid(
            "coordinator.bootstrap_token",
            "",
            "missing or empty; set bootstrap_token or bootstrap_token_file to the token the coordinator issued at launch",
        ));
    }

    let ca_certificate_pem = match raw.ca_certificate {
        Some(path) => {
            Some(
                std::fs::read_to_string(&path).map_err(|source| ConfigError::ReadReferenced {
                    key: "coordinator.ca_certificate",
                    path,
                    source,
                })?,
            )
        }
        None if plaintext && raw.endpoints.iter().all(|e| e.starts_with("http://")) => None,
        None => {
            return Err(invalid(
                "coordinator.ca_certificate",
                "",
                "missing; set it to the PEM file of the CA that signed the coordinators' certificates",
            ));
        }
    };

    Ok(CoordinatorConfig {
        endpoints,
        bootstrap_token: clearml_api::Secret::new(bootstrap_token),
        ca_certificate_pem,
        allow_plaintext_loopback: raw.allow_plaintext_loopback,
        registration_timeout: Duration::from_secs(
            positive(
                "coordinator.registration_timeout_seconds",
                raw.registration_timeout_seconds,
            )?
            .unwrap_or(900),
        ),
        request_timeout: Duration::from_secs(
            positive(
                "coordinator.request_timeout_seconds",
                raw.request_timeout_seconds,
            )?
            .unwrap_or(10),
        ),
    })
}

fn validate_imds(raw: RawImds) -> Result<ImdsConfig, ConfigError> {
    if let Some(id) = &raw.instance_id {
        if raw.endpoint.is_some() {
            return Err(invalid(
                "imds.instance_id",
                id,
                "set either imds.instance_id (no metadata service) or imds.endpoint, not both",
            ));
        }
        if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(
                "imds.instance_id",
                id,
                "must be a non-empty id without spaces, for example local-0123456789ab",
            ));
        }
    }
    let text = raw
        .endpoint
        .unwrap_or_else(|| DEFAULT_IMDS_ENDPOINT.to_owned());
    let endpoint = Url::parse(&text).map_err(|error| {
        invalid(
            "imds.endpoint",
            &text,
            &format!("not a URL ({error}); the EC2 default is {DEFAULT_IMDS_ENDPOINT}"),
        )
    })?;
    if endpoint.scheme() != "http" {
        return Err(invalid(
            "imds.endpoint",
            &text,
            "the instance metadata service is plain http; use for example http://169.254.169.254",
        ));
    }
    let poll_ms =
        positive("imds.notice_poll_interval_ms", raw.notice_poll_interval_ms)?.unwrap_or(5_000);
    Ok(ImdsConfig {
        endpoint,
        notice_poll_interval: Duration::from_millis(poll_ms),
        instance_id: raw.instance_id,
    })
}

fn validate_agent(raw: RawAgent) -> Result<AgentLocalConfig, ConfigError> {
    let shutdown_command = raw
        .shutdown_command
        .unwrap_or_else(|| vec!["systemctl".to_owned(), "poweroff".to_owned()]);
    if shutdown_command
        .first()
        .is_none_or(|program| program.is_empty())
    {
        return Err(invalid(
            "agent.shutdown_command",
            &format!("{shutdown_command:?}"),
            "give a program and its arguments, for example [\"systemctl\", \"poweroff\"]",
        ));
    }
    let check_ms = positive("agent.check_interval_ms", raw.check_interval_ms)?.unwrap_or(1_000);

    Ok(AgentLocalConfig {
        state_dir: raw
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        gate_listen: socket_addr("agent.gate_listen", raw.gate_listen, "127.0.0.1:0")?,
        grpc_listen: socket_addr("agent.grpc_listen", raw.grpc_listen, "127.0.0.1:7444")?,
        metrics_listen: socket_addr("agent.metrics_listen", raw.metrics_listen, "127.0.0.1:9464")?,
        shutdown_command,
        check_interval: Duration::from_millis(check_ms),
    })
}

fn validate_clearml_agent(raw: RawClearmlAgent) -> Result<ClearmlAgentConfig, ConfigError> {
    if let Some(name) = raw
        .env
        .keys()
        .find(|name| crate::supervisor::SCRUBBED_ENV.contains(&name.as_str()))
    {
        return Err(invalid(
            "clearml_agent.env",
            name,
            "remove it: the agent keeps this variable from clearml-agent, because it would bypass the gate or its task tracking",
        ));
    }
    let initial = positive(
        "clearml_agent.restart_backoff_initial_ms",
        raw.restart_backoff_initial_ms,
    )?;
    let max = positive(
        "clearml_agent.restart_backoff_max_ms",
        raw.restart_backoff_max_ms,
    )?;
    let restarts = positive(
        "clearml_agent.crash_loop_restarts",
        raw.crash_loop_restarts.map(u64::from),
    )?;
    let window = positive(
        "clearml_agent.crash_loop_window_seconds",
        raw.crash_loop_window_seconds,
    )?;
    let stop = positive(
        "clearml_agent.stop_timeout_seconds",
        raw.stop_timeout_seconds,
    )?;

    Ok(ClearmlAgentConfig {
        program: raw
            .program
            .unwrap_or_else(|| PathBuf::from("clearml-agent")),
        env: raw.env,
        home: raw.home,
        restart_backoff_initial: Duration::from_millis(initial.unwrap_or(1_000)),
        restart_backoff_max: Duration::from_millis(max.unwrap_or(60_000)),
        crash_loop_restarts: restarts.map_or(5, |value| value as u32),
        crash_loop_window: Duration::from_secs(window.unwrap_or(300)),
        stop_timeout: Duration::from_secs(stop.unwrap_or(10)),
    })
}

fn invalid(key: &'static str, value: &str, fix: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        fix: fix.to_owned(),
    }
}

fn positive(key: &'static str, value: Option<u64>) -> Result<Option<u64>, ConfigError> {
    match value {
        Some(0) => Err(invalid(key, "0", "must be greater than 0")),
        other => Ok(other),
    }
}

fn socket_addr(
    key: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let text = value.unwrap_or_else(|| default.to_owned());
    text.parse().map_err(|error| {
        invalid(
            key,
            &text,
            &format!("not an IP address and port ({error}); use for example {default}"),
        )
    })
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("agent.toml"))
    }

    const LOOPBACK: &str = r#"
        [coordinator]
        endpoints = ["http://127.0.0.1:7443"]
        bootstrap_token = "boot"
        allow_plaintext_loopback = true
    "#;

    #[test]
    fn static_instance_id_replaces_the_metadata_service() {
        let config = parse(&format!(
            "{LOOPBACK}\n[imds]\ninstance_id = \"local-0123\"\n"
        ))
        .unwrap();
        assert_eq!(config.imds.instance_id.as_deref(), Some("local-0123"));

        let both = parse(&format!(
            "{LOOPBACK}\n[imds]\ninstance_id = \"local-0123\"\nendpoint = \"http://127.0.0.1:1\"\n"
        ))
        .unwrap_err();
        assert!(both.to_string().contains("imds.instance_id"), "{both}");
        let blank = parse(&format!("{LOOPBACK}\n[imds]\ninstance_id = \"a b\"\n")).unwrap_err();
        assert!(blank.to_string().contains("without spaces"), "{blank}");
    }

    #[test]
    fn zero_clearml_agent_timers_are_rejected() {
        for key in [
            "restart_backoff_initial_ms",
            "restart_backoff_max_ms",
            "crash_loop_restarts",
            "crash_loop_window_seconds",
            "stop_timeout_seconds",
        ] {
            let text = format!("{LOOPBACK}\n[clearml_agent]\n{key} = 0\n");

            let error = parse(&text).unwrap_err().to_string();

            assert!(error.contains(&format!("clearml_agent.{key}")), "{error}");
            assert!(error.contains("must be greater than 0"), "{error}");
        }
    }

    #[test]
    fn rank_in_clearml_agent_env_is_rejected() {
        let text = format!("{LOOPBACK}\n[clearml_agent.env]\nRANK = \"1\"\n");

        let error = parse(&text).unwrap_err().to_string();

        assert!(error.contains("clearml_agent.env"), "{error}");
        assert!(error.contains("RANK"), "{error}");
    }

    #[test]
    fn loopback_config_gets_defaults() {
        let config = parse(LOOPBACK).unwrap();
        assert_eq!(config.coordinator.endpoints.len(), 1);
        assert_eq!(config.coordinator.bootstrap_token.expose(), "boot");
        assert!(config.coordinator.ca_certificate_pem.is_none());
        assert_eq!(config.imds.endpoint.as_str(), "http://169.254.169.254/");
        assert_eq!(config.imds.notice_poll_interval, Duration::from_secs(5));
        assert_eq!(
            config.agent.shutdown_command,
            vec!["systemctl".to_owned(), "poweroff".to_owned()]
        );
        assert_eq!(config.clearml_agent.crash_loop_restarts, 5);
    }

    #[test]
    fn plaintext_needs_loopback_and_opt_in() {
        let error = parse(
            r#"
            [coordinator]
            endpoints = ["http://10.0.0.5:7443"]
            bootstrap_token = "boot"
            allow_plaintext_loopback = true
        "#,
        )
        .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("coordinator.endpoints"), "{message}");
        assert!(message.contains("use https"), "{message}");

        let error = parse(
            r#"
            [coordinator]
            endpoints = ["http://127.0.0.1:7443"]
            bootstrap_token = "boot"
        "#,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("allow_plaintext_loopback"),
            "{error}"
        );
    }

    #[test]
    fn https_needs_ca_certificate() {
        let error = parse(
            r#"
            [coordinator]
            endpoints = ["https://coordinator-1:7443"]
            bootstrap_token = "boot"
        "#,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("coordinator.ca_certificate"),
            "{error}"
        );
    }

    #[test]
    fn missing_token_is_named() {
        let error = parse(
            r#"
            [coordinator]
            endpoints = ["http://127.0.0.1:7443"]
            allow_plaintext_loopback = true
        "#,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("coordinator.bootstrap_token"),
            "{error}"
        );
    }

    #[test]
    fn unknown_key_is_a_parse_error() {
        let error = parse(&format!("{LOOPBACK}\n[agent]\nshutdown = \"now\"\n")).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("agent.toml"), "{message}");
        assert!(message.contains("shutdown"), "{message}");
    }

    #[test]
    fn empty_shutdown_command_is_rejected() {
        let error = parse(&format!("{LOOPBACK}\n[agent]\nshutdown_command = []\n")).unwrap_err();
        assert!(
            error.to_string().contains("agent.shutdown_command"),
            "{error}"
        );
    }

    #[test]
    fn bad_listen_address_is_rejected() {
        let error = parse(&format!(
            "{LOOPBACK}\n[agent]\ngate_listen = \"localhost\"\n"
        ))
        .unwrap_err();
        assert!(error.to_string().contains("agent.gate_listen"), "{error}");
    }
}
