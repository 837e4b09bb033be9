//! The coordinator's configuration: one TOML file, checked as a whole at start.
//!
//! [`load`] reads the file, rejects unknown keys, checks every value and reports all problems at once, each
//! with the key, the value and what would be valid. Secrets (the ClearML secret key, API tokens) come from
//! environment variables or files named in the file, never from the file itself, and never appear in an error
//! or a log line.

mod agent;
mod file;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clearml_api::Secret;

pub use agent::{AgentSettings, GitAccess};
pub use file::ConfigFile;
pub use validate::SUBNET_PLACEHOLDER_PREFIX;

use crate::election::ElectionConfig;
use crate::etcd::EtcdOptions;
use crate::policy::PolicyConfig;
use crate::providers::aws::AwsConfig;
use crate::providers::local::LocalConfig;

/// A checked configuration, ready to start a coordinator.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: String,
    pub replica_id: String,
    pub worker_prefix: String,
    /// `None` in a file without an `[etcd]` table, which only a standalone coordinator accepts.
    pub etcd: Option<EtcdConfig>,
    pub clearml: ClearmlConfig,
    pub policy: PolicyConfig,
    pub orphan_timeout: Duration,
    pub reconcile_interval: Duration,
    /// Instances with the cluster's tags and no record are left alone while younger than this.
    pub orphan_grace: Duration,
    /// Time a node agent stopped by SIGTERM lets its running task finish, sent to agents at registration.
    pub drain_grace: Duration,
    pub api: ApiConfig,
    pub aws: Option<AwsConfig>,
    pub local: Option<LocalConfig>,
    /// Settings node agents get at registration besides their queue and the ClearML access.
    pub agent: AgentSettings,
}

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub options: EtcdOptions,
    pub election: ElectionConfig,
    /// Root of every key this cluster writes, `/<prefix>/<cluster>/`.
    pub key_prefix: String,
}

#[derive(Debug, Clone)]
pub struct ClearmlConfig {
    pub api_server: String,
    pub web_server: String,
    pub files_server: String,
    pub access_key: String,
    pub secret_key: Secret,
    pub api_version: Option<String>,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub tokens: Vec<ApiToken>,
    /// Key of the node agents' bootstrap and session tokens; `None` only for a standalone coordinator, which
    /// then makes a random one at start.
    pub bootstrap_key: Option<Secret>,
    /// Coordinator URLs written into the node agents' bootstrap config.
    pub agent_endpoints: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

/// A bearer token for FleetService and the role it grants.
#[derive(Debug, Clone)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    pub token: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads: status, queues, instances, events, dry-run.
    Viewer,
    /// Reads and writes: drain, terminate, pause, resume, limits.
    Operator,
}

/// Source of environment variables, so tests can check secret handling without touching the process
/// environment.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// One invalid setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the key, for example `queues[1].max_instances`.
    pub key: String,
    /// The value as written, or a description such as `(missing)`; empty when `message` starts with the
    /// verb that describes the value ("is empty; ..."). Never a secret.
    pub value: String,
    /// The fault and the valid values.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{} {}", self.key, self.message)
        } else {
            write!(f, "{} = {}: {}", self.key, self.value, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// TOML syntax, a wrong type or an unknown key; toml's message names the line, column and key.
    #[error("config file {origin} is not valid: {message}")]
    Syntax { origin: String, message: String },

    #[error("config file {origin} has {} invalid setting(s):\n{}", problems.len(), list(problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|problem| format!("  - {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads and checks the file at `path`, taking secrets from `env`.
pub fn load(path: &Path, env: &dyn Environment) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    parse(&text, &path.display().to_string(), base_dir, env)
}

/// Parses and checks configuration text; `origin` names it in errors and `base_dir` resolves relative file
/// paths inside it.
pub fn parse(
    text: &str,
    origin: &str,
    base_dir: &Path,
    env: &dyn Environment,
) -> Result<Config, ConfigError> {
    let file: ConfigFile = toml::from_str(text).map_err(|err| ConfigError::Syntax {
        origin: origin.to_owned(),
        message: err.to_string().trim_end().to_owned(),
    })?;
    validate::check(&file, base_dir, env).map_err(|problems| ConfigError::Invalid {
        origin: origin.to_owned(),
        problems,
    })
}
