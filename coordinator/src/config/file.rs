//! The TOML layout of the coordinator's configuration file, as serde reads it. Every table rejects unknown
//! keys, so a misspelt key is an error and not a silently ignored setting.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub cluster: ClusterSection,
    #[serde(default)]
    pub etcd: Option<EtcdSection>,
    pub clearml: ClearmlSection,
    #[serde(default)]
    pub defaults: DefaultsSection,
    #[serde(default)]
    pub budget: BudgetSection,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub aws: Option<AwsSection>,
    #[serde(default)]
    pub local: Option<LocalSection>,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub resources: BTreeMap<String, ResourceSection>,
    #[serde(default)]
    pub queues: Vec<QueueSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub name: String,
    /// Unique per replica; defaults to the host name.
    pub replica_id: Option<String>,
    /// gRPC address clients use to reach this replica; defaults to `api.grpc_listen`.
    pub advertise_address: Option<String>,
    /// First part of every worker id, `<prefix>:<resource>:<instance id>`.
    #[serde(default = "default_worker_prefix")]
    pub worker_prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    pub endpoints: Vec<String>,
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_seconds: u64,
    #[serde(default = "default_etcd_timeout")]
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClearmlSection {
    pub api_server: String,
    /// Web and files server URLs handed to the agents; default to `api_server`.
    pub web_server: Option<String>,
    pub files_server: Option<String>,
    #[serde(default = "default_access_key_env")]
    pub access_key_env: String,
    /// Name of the environment variable with the secret key; ignored when `secret_key_file` is set.
    #[serde(default = "default_secret_key_env")]
    pub secret_key_env: String,
    pub secret_key_file: Option<PathBuf>,
    #[serde(default = "default_poll_interval")]
    pub poll_interval_seconds: u64,
    pub api_version: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSection {
    #[serde(default = "default_max_idle")]
    pub max_idle_seconds: u64,
    #[serde(default = "default_launch_timeout")]
    pub launch_timeout_seconds: u64,
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_seconds: u64,
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_seconds: u64,
    #[serde(default = "default_orphan_timeout")]
    pub orphan_timeout_seconds: u64,
    #[serde(default = "default_max_launches_per_tick")]
    pub max_launches_per_tick: u32,
    /// How often the reconciler compares the cloud, the records and ClearML's workers.
    #[serde(default = "default_reconcile_interval")]
    pub reconcile_interval_seconds: u64,
    /// Age below which an instance with this cluster's tags and no record is left alone, because the cloud's
    /// listing can lag behind a launch.
    #[serde(default = "default_orphan_grace")]
    pub orphan_grace_seconds: u64,
    /// Time a node agent stopped by SIGTERM lets its running task finish before it requeues the task.
    #[serde(default = "default_drain_grace")]
    pub drain_grace_seconds: u64,
}

impl Default for DefaultsSection {
    fn default() -> Self {
        Self {
            max_idle_seconds: default_max_idle(),
            launch_timeout_seconds: default_launch_timeout(),
            boot_timeout_seconds: default_boot_timeout(),
            heartbeat_timeout_seconds: default_heartbeat_timeout(),
            orphan_timeout_seconds: default_orphan_timeout(),
            max_launches_per_tick: default_max_launches_per_tick(),
            reconcile_interval_seconds: default_reconcile_interval(),
            orphan_grace_seconds: default_orphan_grace(),
            drain_grace_seconds: default_drain_grace(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSection {
    /// Maximum sum of hourly prices of live instances, in USD; no limit when absent.
    pub hourly_usd: Option<f64>,
    #[serde(default = "default_cluster_max")]
    pub max_instances: u32,
}

impl Default for BudgetSection {
    fn default() -> Self {
        Self {
            hourly_usd: None,
            max_instances: default_cluster_max(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: String,
    #[serde(default = "default_http_listen")]
    pub http_listen: String,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// CA that client certificates must chain to; client certificates are optional without it.
    pub client_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub tokens: Vec<TokenSection>,
    /// The key that signs bootstrap and session tokens of node agents, shared by every replica.
    pub bootstrap_key_env: Option<String>,
    pub bootstrap_key_file: Option<PathBuf>,
    /// Coordinator URLs the node agents register with, written into their bootstrap config.
    #[serde(default)]
    pub agent_endpoints: Vec<String>,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            grpc_listen: default_grpc_listen(),
            http_listen: default_http_listen(),
            tls_cert_file: None,
            tls_key_file: None,
            client_ca_file: None,
            tokens: Vec::new(),
            bootstrap_key_env: None,
            bootstrap_key_file: None,
            agent_endpoints: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSection {
    pub name: String,
    /// `viewer` (reads) or `operator` (reads and writes).
    pub role: String,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSection {
    pub region: String,
    /// EC2 endpoint URL for EC2-compatible clouds and tests; the SDK's default otherwise.
    pub endpoint_url: Option<String>,
    /// Read the credentials from these environment variables instead of the SDK's default chain.
    pub access_key_id_env: Option<String>,
    pub secret_access_key_env: Option<String>,
    pub session_token_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSection {
    pub base_dir: PathBuf,
    pub program: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Template of each instance's `agent.toml`, rendered into its directory before the program starts.
    pub agent_config_template_file: Option<PathBuf>,
}

/// Settings every node agent gets at registration besides its queue and the ClearML access.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Default docker image of the tasks; without one, clearml-agent runs tasks in virtualenvs.
    pub docker_image: Option<String>,
    /// Text appended to the clearml.conf the node agent writes, inline or from a file.
    pub extra_clearml_conf: Option<String>,
    pub extra_clearml_conf_file: Option<PathBuf>,
    /// Shell script the node agent runs once before clearml-agent starts, inline or from a file.
    pub init_script: Option<String>,
    pub init_script_file: Option<PathBuf>,
    /// Git user for private repositories, with the password or token from a variable or a file.
    pub git_user: Option<String>,
    pub git_password_env: Option<String>,
    pub git_password_file: Option<PathBuf>,
    /// Environment variables of clearml-agent and its tasks: name = the coordinator's variable with the value.
    #[serde(default)]
    pub task_env: BTreeMap<String, String>,
}

/// One resource. `provider` decides which of the other keys apply; a key of the other provider is an error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSection {
    pub provider: String,
    pub max_instances: u32,
    /// Hourly price in USD per instance type; for the local provider, the key `local`.
    #[serde(default)]
    pub hourly_price_usd: BTreeMap<String, f64>,

    pub image_id: Option<String>,
    #[serde(default)]
    pub instance_types: Vec<String>,
    #[serde(default)]
    pub subnets: Vec<SubnetSection>,
    /// `spot` or `on-demand`.
    pub market: Option<String>,
    pub spot_max_price: Option<String>,
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    pub key_name: Option<String>,
    pub instance_profile_name: Option<String>,
    pub instance_profile_arn: Option<String>,
    #[serde(default)]
    pub volumes: Vec<VolumeSection>,
    pub user_data_template_file: Option<PathBuf>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Docker image of this resource's tasks, in place of `agent.docker_image`.
    pub docker_image: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetSection {
    pub id: String,
    pub zone: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSection {
    pub device_name: String,
    pub size_gib: i32,
    #[serde(default = "default_volume_type")]
    pub volume_type: String,
    pub snapshot_id: Option<String>,
    #[serde(default = "default_true")]
    pub encrypted: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    pub name: String,
    /// Resource names in priority order.
    pub resources: Vec<String>,
    pub max_instances: u32,
    #[serde(default)]
    pub min_instances: u32,
    #[serde(default)]
    pub min_idle: u32,
}

fn default_worker_prefix() -> String {
    "fleet".to_owned()
}
fn default_etcd_prefix() -> String {
    "clearml-fleet".to_owned()
}
fn default_lease_ttl() -> u64 {
    5
}
fn default_etcd_timeout() -> u64 {
    2000
}
fn default_access_key_env() -> String {
    "CLEARML_API_ACCESS_KEY".to_owned()
}
fn default_secret_key_env() -> String {
    "CLEARML_API_SECRET_KEY".to_owned()
}
fn default_poll_interval() -> u64 {
    2
}
fn default_max_idle() -> u64 {
    300
}
fn default_launch_timeout() -> u64 {
    300
}
fn default_boot_timeout() -> u64 {
    900
}
fn default_heartbeat_timeout() -> u64 {
    120
}
fn default_orphan_timeout() -> u64 {
    900
}
fn default_max_launches_per_tick() -> u32 {
    20
}
fn default_reconcile_interval() -> u64 {
    30
}
fn default_orphan_grace() -> u64 {
    120
}
fn default_drain_grace() -> u64 {
    30
}
fn default_cluster_max() -> u32 {
    100
}
fn default_grpc_listen() -> String {
    "0.0.0.0:7443".to_owned()
}
fn default_http_listen() -> String {
    "0.0.0.0:9090".to_owned()
}
fn default_volume_type() -> String {
    "gp3".to_owned()
}
fn default_true() -> bool {
    true
}
