//! Reads the ClearML AWS autoscaler's configuration into the values the output needs, collecting every problem
//! and every setting that cannot carry over.
//!
//! The keys and defaults follow what the clearml repository's code reads: `ScalerConfig.from_config` in
//! `clearml/automation/auto_scaler.py`, `CloudDriver.from_config` in `clearml/automation/cloud_driver.py`, and
//! `AWSDriver.from_config` and `spin_up_worker` in `clearml/automation/aws_driver.py`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::{Note, NoteKind};
use crate::config::{Problem, SUBNET_PLACEHOLDER_PREFIX};

/// Keys of `hyper_params` that the ClearML autoscaler reads.
const HYPER_PARAMS_KEYS: &[&str] = &[
    "git_user",
    "git_pass",
    "cloud_credentials_key",
    "cloud_credentials_secret",
    "cloud_credentials_token",
    "cloud_credentials_region",
    "use_credentials_chain",
    "use_iam_instance_profile",
    "iam_arn",
    "iam_name",
    "default_docker_image",
    "max_idle_time_min",
    "polling_interval_time_min",
    "max_spin_up_time_min",
    "workers_prefix",
    "cloud_provider",
    "tags",
];

/// Keys of `configurations`. `extra_trains_conf` is in the example's defaults but no code reads it.
const CONFIGURATIONS_KEYS: &[&str] = &[
    "resource_configurations",
    "queues",
    "extra_clearml_conf",
    "extra_trains_conf",
    "extra_vm_bash_script",
];

/// Keys of one entry of `resource_configurations` that `AWSDriver.spin_up_worker` reads.
const RESOURCE_KEYS: &[&str] = &[
    "instance_type",
    "ami_id",
    "is_spot",
    "availability_zone",
    "subnet_id",
    "key_name",
    "security_group_ids",
    "ebs_device_name",
    "ebs_volume_size",
    "ebs_volume_type",
    "ebs_snapshot_id",
    "tags",
    "enable_monitoring",
    "extra_configurations",
    "cpu_only",
];

/// ClearML's defaults in `ScalerConfig` (auto_scaler.py), used when a key is missing.
const DEFAULT_MAX_IDLE_MINUTES: f64 = 15.0;
const DEFAULT_POLLING_INTERVAL_MINUTES: f64 = 5.0;
const DEFAULT_MAX_SPIN_UP_MINUTES: f64 = 30.0;
/// `ebs_volume_size` when `ebs_device_name` is set without it (aws_driver.py).
const DEFAULT_EBS_VOLUME_SIZE_GIB: i64 = 80;
const DEFAULT_EBS_VOLUME_TYPE: &str = "gp3";

/// Problems and notes of one conversion.
#[derive(Default)]
pub(super) struct Report {
    problems: Vec<Problem>,
    notes: Vec<Note>,
}

impl Report {
    pub(super) fn problem(
        &mut self,
        key: impl Into<String>,
        value: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            key: key.into(),
            value: value.into(),
            message: message.into(),
        });
    }

    fn not_carried_over(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.notes.push(Note {
            kind: NoteKind::NotCarriedOver,
            key: key.into(),
            message: message.into(),
        });
    }

    fn warning(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.notes.push(Note {
            kind: NoteKind::Warning,
            key: key.into(),
            message: message.into(),
        });
    }

    pub(super) fn finish(self) -> (Vec<Problem>, Vec<Note>) {
        (self.problems, self.notes)
    }
}

/// The input's values, converted to this project's units and names.
#[derive(Debug, Clone)]
pub(super) struct Autoscaler {
    pub region: String,
    pub max_idle_seconds: u64,
    pub boot_timeout_seconds: u64,
    pub poll_interval_seconds: u64,
    pub servers: Servers,
    pub resources: Vec<Resource>,
    pub queues: Vec<Queue>,
    /// Whether the input had AWS access keys, which the coordinator must now get from its environment.
    pub had_aws_keys: bool,
    pub agent: AgentExtras,
}

/// Settings of the output's `[agent]` table.
#[derive(Debug, Clone, Default)]
pub(super) struct AgentExtras {
    pub docker_image: Option<String>,
    pub init_script: Option<String>,
    pub extra_clearml_conf: Option<String>,
    /// Git user; its password is never copied, and the output names the variable to set instead.
    pub git_user: Option<String>,
}

/// Variable the output's `agent.git_password_env` names, for the Git token the input held.
pub(super) const GIT_PASSWORD_ENV: &str = "FLEET_GIT_PASSWORD";

/// ClearML server URLs found in `extra_clearml_conf`.
#[derive(Debug, Clone, Default)]
pub(super) struct Servers {
    pub api: Option<String>,
    pub web: Option<String>,
    pub files: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum InstanceProfile {
    Name(String),
    Arn(String),
}

#[derive(Debug, Clone)]
pub(super) struct Resource {
    /// Name in the output: the input's name with characters other than letters, digits, '-' and '_' replaced.
    pub name: String,
    pub source_name: String,
    /// The cap from the one queue that lists this resource; `None` when no queue lists it.
    pub max_instances: Option<u32>,
    pub image_id: String,
    pub instance_type: String,
    pub spot: bool,
    pub subnet: Subnet,
    pub security_group_ids: Vec<String>,
    pub key_name: Option<String>,
    pub instance_profile: Option<InstanceProfile>,
    pub volume: Option<Volume>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub(super) struct Subnet {
    pub id: String,
    pub zone: String,
    /// The input named only the zone, so `id` is a placeholder the user must replace.
    pub placeholder: bool,
}

#[derive(Debug, Clone)]
pub(super) struct Volume {
    pub device_name: String,
    pub size_gib: i32,
    pub volume_type: String,
    pub snapshot_id: Option<String>,
}

#[derive(Debug, Clone)]
pub(super) struct Queue {
    pub name: String,
    /// Output resource names with their caps, in the input's order.
    pub resources: Vec<(String, u32)>,
}

/// Returns whether `name` is a valid `cluster.name`, by the rule of `config::validate`.
pub(super) fn is_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// One JSON object of the input and its dotted path.
struct Table<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Table<'a> {
    fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// Returns the value of `name`; `null`, as YAML writes a `None`, counts as absent.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|value| !value.is_null())
    }

    fn table(&self, name: &str, report: &mut Report) -> Option<Table<'a>> {
        match self.get(name) {
            Some(Value::Object(map)) => Some(Table {
                map,
                path: self.key(name),
            }),
            Some(other) => {
                report.problem(
                    self.key(name),
                    describe(other),
                    "must be a mapping of names to settings",
                );
                None
            }
            None => {
                report.problem(
                    self.key(name),
                    "(missing)",
                    "the ClearML autoscaler requires it; add it as in aws_autoscaler.yaml",
                );
                None
            }
        }
    }

    /// Returns a non-empty string, trimmed; an empty string counts as absent, as the wizard writes "" for an
    /// unanswered question.
    fn string(&self, name: &str, report: &mut Report) -> Option<String> {
        match self.get(name) {
            Some(Value::String(text)) if text.trim().is_empty() => None,
            Some(Value::String(text)) => Some(text.trim().to_owned()),
            Some(other) => {
                report.problem(self.key(name), describe(other), "must be a string");
                None
            }
            None => None,
        }
    }

    fn required_string(&self, name: &str, example: &str, report: &mut Report) -> Option<String> {
        let value = self.string(name, report);
        if value.is_none() && !matches!(self.get(name), Some(value) if !value.is_string()) {
            report.problem(
                self.key(name),
                "(missing)",
                format!("the ClearML autoscaler requires it; set it, for example {example:?}"),
            );
        }
        value
    }

    fn boolean(&self, name: &str, report: &mut Report) -> Option<bool> {
        match self.get(name) {
            Some(Value::Bool(value)) => Some(*value),
            Some(other) => {
                report.problem(self.key(name), describe(other), "must be true or false");
                None
            }
            None => None,
        }
    }

    fn number(&self, name: &str, report: &mut Report) -> Option<f64> {
        match self.get(name) {
            Some(Value::Number(number)) => match number.as_f64() {
                Some(value) if value.is_finite() && value >= 0.0 => Some(value),
                _ => {
                    report.problem(
                        self.key(name),
                        number.to_string(),
                        "must be a number of at least 0",
                    );
                    None
                }
            },
            Some(other) => {
                report.problem(
                    self.key(name),
                    describe(other),
                    "must be a number, for example 15",
                );
                None
            }
            None => None,
        }
    }

    /// Returns whether a secret is set, without ever reading its text into a message.
    fn has_secret(&self, name: &str) -> bool {
        match self.get(name) {
            Some(Value::String(text)) => !text.trim().is_empty(),
            Some(_) => true,
            None => false,
        }
    }

    /// Lists every key outside `known` as not carried over. The value is never shown: it may be a secret.
    fn unknown_keys(&self, known: &[&str], report: &mut Report) {
        for name in self.map.keys() {
            if !known.contains(&name.as_str()) {
                report.not_carried_over(
                    self.key(name),
                    "unknown key: the ClearML autoscaler does not read it, so it was not converted; check its \
                     spelling against aws_autoscaler.yaml",
                );
            }
        }
    }
}

/// Describes a value for a message: scalars as written (strings shortened), lists and mappings by kind.
fn describe(value: &Value) -> String {
    match value {
        Value::String(text) if text.chars().count() > 60 => {
            let head: String = text.chars().take(57).collect();
            format!("{:?}", format!("{head}..."))
        }
        Value::String(text) => format!("{text:?}"),
        Value::Array(_) => "(a list)".to_owned(),
        Value::Object(_) => "(a mapping)".to_owned(),
        other => other.to_string(),
    }
}

/// Reads the whole input; `None` only after adding a problem.
pub(super) fn read(value: &Value, report: &mut Report) -> Option<Autoscaler> {
    let Value::Object(map) = value else {
        report.problem(
            "(top level)",
            describe(value),
            "must be a mapping with the keys hyper_params and configurations, the layout of aws_autoscaler.yaml",
        );
        return None;
    };
    let root = Table {
        map,
        path: String::new(),
    };
    if root.get("hyper_params").is_none() && root.get("configurations").is_none() {
        report.problem(
            "(top level)",
            "(no hyper_params or configurations)",
            "this is not a ClearML autoscaler configuration; export the file that aws_autoscaler.py reads, with \
             hyper_params and configurations",
        );
        return None;
    }
    root.unknown_keys(&["hyper_params", "configurations"], report);
    let hyper = root.table("hyper_params", report);
    let configurations = root.table("configurations", report);
    let (hyper, configurations) = (hyper?, configurations?);

    let before = report.problems.len();
    let settings = read_hyper_params(&hyper, report);
    let (servers, init_script, extra_clearml_conf) = read_extra_texts(&configurations, report);
    let mut resources = read_resources(&configurations, &settings, report);
    let queues = read_queues(&configurations, &mut resources, report);
    let region = region(&hyper, settings.region.clone(), &resources, report);
    if report.problems.len() > before {
        return None;
    }

    Some(Autoscaler {
        region: region?,
        max_idle_seconds: settings.max_idle_seconds,
        boot_timeout_seconds: settings.boot_timeout_seconds,
        poll_interval_seconds: settings.poll_interval_seconds,
        servers,
        resources,
        queues,
        had_aws_keys: settings.had_aws_keys,
        agent: AgentExtras {
            docker_image: settings.docker_image,
            init_script,
            extra_clearml_conf,
            git_user: settings.git_user,
        },
    })
}

/// Values of `hyper_params` that the resources and the output need.
struct HyperParams {
    region: Option<String>,
    max_idle_seconds: u64,
    boot_timeout_seconds: u64,
    poll_interval_seconds: u64,
    instance_profile: Option<InstanceProfile>,
    tags: Vec<(String, String)>,
    had_aws_keys: bool,
    docker_image: Option<String>,
    git_user: Option<String>,
}

fn read_hyper_params(hyper: &Table, report: &mut Report) -> HyperParams {
    hyper.unknown_keys(HYPER_PARAMS_KEYS, report);

    if let Some(provider) = hyper.string("cloud_provider", report)
        && !provider.eq_ignore_ascii_case("aws")
    {
        report.problem(
            hyper.key("cloud_provider"),
            format!("{provider:?}"),
            "only the AWS autoscaler's configuration can be converted; use \"AWS\" or leave it empty",
        );
    }

    let aws_keys = [
        ("cloud_credentials_key", "AWS_ACCESS_KEY_ID"),
        ("cloud_credentials_secret", "AWS_SECRET_ACCESS_KEY"),
        ("cloud_credentials_token", "AWS_SESSION_TOKEN"),
    ];
    let mut had_aws_keys = false;
    for (name, variable) in aws_keys {
        if hyper.has_secret(name) {
            had_aws_keys = true;
            report.not_carried_over(
                hyper.key(name),
                format!(
                    "secrets are never copied into the TOML; set {variable} in the coordinator's environment \
                     (the AWS SDK's default credential chain reads it), or give the coordinator's machine an IAM \
                     role instead of keys"
                ),
            );
        }
    }
    hyper.boolean("use_credentials_chain", report);
    // Read by AWSDriver.from_config but used nowhere: only iam_arn and iam_name reach the launch request.
    hyper.boolean("use_iam_instance_profile", report);

    // aws_driver.py: "you can have Arn OR Name, not both, Arn getting priority".
    let iam_arn = hyper.string("iam_arn", report);
    let iam_name = hyper.string("iam_name", report);
    let instance_profile = match (iam_arn, iam_name) {
        (Some(arn), Some(_)) => {
            report.warning(
                hyper.key("iam_name"),
                "both iam_arn and iam_name are set; the ClearML autoscaler used the ARN, so every resource gets \
                 instance_profile_arn and the name is dropped",
            );
            Some(InstanceProfile::Arn(arn))
        }
        (Some(arn), None) => Some(InstanceProfile::Arn(arn)),
        (None, Some(name)) => Some(InstanceProfile::Name(name)),
        (None, None) => None,
    };

    let git_user = hyper
        .string("git_user", report)
        .filter(|user| !user.trim().is_empty());
    let git_pass = hyper.has_secret("git_pass");
    let git_user = match (git_user, git_pass) {
        (Some(user), true) => {
            report.not_carried_over(
                hyper.key("git_pass"),
                format!(
                    "the Git password or token is never copied; export it as {GIT_PASSWORD_ENV} where the \
                     coordinator runs (agent.git_password_env), which hands it to the agents at registration"
                ),
            );
            Some(user)
        }
        (Some(_), false) => {
            report.not_carried_over(
                hyper.key("git_user"),
                "a Git user without git_pass cannot authenticate; set agent.git_user with agent.git_password_env, \
                 or give the image an SSH key for the repositories",
            );
            None
        }
        (None, true) => {
            report.not_carried_over(
                hyper.key("git_pass"),
                "a Git password without git_user is never copied; set agent.git_user and \
                 agent.git_password_env",
            );
            None
        }
        (None, false) => None,
    };
    let docker_image = hyper
        .string("default_docker_image", report)
        .filter(|image| !image.trim().is_empty());
    if docker_image.is_some() {
        report.warning(
            hyper.key("default_docker_image"),
            "became agent.docker_image, so clearml-agent runs tasks with --docker: the image needs a Docker \
             engine, and the containers must reach the node agent's gate (agent.gate_listen, \
             docs/node-agent.md); remove the key to run tasks in virtualenvs",
        );
    }
    if let Some(prefix) = hyper.string("workers_prefix", report) {
        // auto_scaler.py's get_workers treats every worker whose id starts with its prefix as its own.
        report.not_carried_over(
            hyper.key("workers_prefix"),
            format!(
                "worker ids become fleet:<resource>:<instance id> (cluster.worker_prefix, default \"fleet\"); \
                 keep it different from {prefix:?}, or a ClearML autoscaler that still runs counts these \
                 workers as its own and may terminate them"
            ),
        );
    }
    let tags = match hyper.get("tags") {
        Some(_) => read_tags(hyper, report),
        None => Vec::new(),
    };
    if !tags.is_empty() {
        report.warning(
            hyper.key("tags"),
            "aws_driver.py parses these tags but applies only each resource's own tags; they were added to \
             every resource, and a resource's own tag wins where both set a key",
        );
    }

    let max_idle = minutes(hyper, "max_idle_time_min", DEFAULT_MAX_IDLE_MINUTES, report);
    let spin_up = minutes(
        hyper,
        "max_spin_up_time_min",
        DEFAULT_MAX_SPIN_UP_MINUTES,
        report,
    );
    let polling = minutes(
        hyper,
        "polling_interval_time_min",
        DEFAULT_POLLING_INTERVAL_MINUTES,
        report,
    );
    HyperParams {
        region: hyper.string("cloud_credentials_region", report),
        max_idle_seconds: seconds(
            hyper,
            "max_idle_time_min",
            max_idle,
            ("defaults.max_idle_seconds", 10, 86_400),
            report,
        ),
        boot_timeout_seconds: seconds(
            hyper,
            "max_spin_up_time_min",
            spin_up,
            ("defaults.boot_timeout_seconds", 60, 7_200),
            report,
        ),
        poll_interval_seconds: seconds(
            hyper,
            "polling_interval_time_min",
            polling,
            ("clearml.poll_interval_seconds", 1, 300),
            report,
        ),
        instance_profile,
        tags,
        had_aws_keys,
        docker_image,
        git_user,
    }
}

fn minutes(hyper: &Table, name: &str, default: f64, report: &mut Report) -> f64 {
    if hyper.get(name).is_none() {
        report.warning(
            hyper.key(name),
            format!(
                "missing; used the ClearML autoscaler's default of {default} minutes (ScalerConfig)"
            ),
        );
        return default;
    }
    hyper.number(name, report).unwrap_or(default)
}

/// Converts minutes to whole seconds within `target`'s range (key, minimum, maximum), warning when clamped.
fn seconds(
    hyper: &Table,
    name: &str,
    minutes: f64,
    (target, min, max): (&str, u64, u64),
    report: &mut Report,
) -> u64 {
    let exact = (minutes * 60.0).round();
    let clamped = exact.clamp(min as f64, max as f64) as u64;
    if clamped as f64 != exact {
        report.warning(
            hyper.key(name),
            format!(
                "{minutes} minutes is {exact} s, outside the range of {target} ({min} to {max} s); set to \
                 {clamped} s"
            ),
        );
    }
    clamped
}

/// Parses a `tags` string as `parse_tags` in cloud_driver.py does: `k1=v1, k2=v2`.
fn read_tags(table: &Table, report: &mut Report) -> Vec<(String, String)> {
    let key = table.key("tags");
    let Some(value) = table.get("tags") else {
        return Vec::new();
    };
    let Value::String(text) = value else {
        report.problem(
            key,
            describe(value),
            "must be a string of comma-separated key=value pairs, for example \"team=ml, env=prod\"",
        );
        return Vec::new();
    };
    let mut tags = Vec::new();
    if text.trim().is_empty() {
        return tags;
    }
    for pair in text.trim().split(',') {
        let parsed = pair
            .split_once('=')
            .map(|(name, value)| (name.trim(), value.trim()))
            .filter(|(name, value)| !name.is_empty() && !value.is_empty());
        match parsed {
            Some((name, value)) => tags.push((name.to_owned(), value.to_owned())),
            None => report.problem(
                key.clone(),
                format!("{:?}", pair.trim()),
                "each comma-separated item must be key=value with both parts non-empty, as parse_tags in \
                 cloud_driver.py requires",
            ),
        }
    }
    tags
}

/// Reads the free-text settings: the VM script becomes the agents' init script, and `extra_clearml_conf`
/// gives the server URLs and, when it contains no credentials, the agents' extra clearml.conf text.
fn read_extra_texts(
    configurations: &Table,
    report: &mut Report,
) -> (Servers, Option<String>, Option<String>) {
    configurations.unknown_keys(CONFIGURATIONS_KEYS, report);

    let init_script = configurations
        .string("extra_vm_bash_script", report)
        .filter(|script| !script.trim().is_empty());
    if init_script.is_some() {
        report.warning(
            configurations.key("extra_vm_bash_script"),
            "became agent.init_script, which the node agent runs with sh as its own user (clearml-fleet-agent in \
             the systemd unit) before clearml-agent starts; the ClearML autoscaler ran it as root from the user \
             data, so move commands that need root (apt-get, sudo) into the AMI or the resource's \
             user_data_template_file",
        );
    }
    if configurations.string("extra_trains_conf", report).is_some() {
        report.not_carried_over(
            configurations.key("extra_trains_conf"),
            "the ClearML autoscaler ignores it too (cloud_driver.py reads only extra_clearml_conf); move what \
             it needs to agent.extra_clearml_conf",
        );
    }
    let Some(text) = configurations
        .string("extra_clearml_conf", report)
        .filter(|text| !text.trim().is_empty())
    else {
        return (Servers::default(), init_script, None);
    };
    let key = configurations.key("extra_clearml_conf");
    let servers = scan_clearml_conf(&text, &key, report);
    let extra = if has_credentials(&text) {
        report.not_carried_over(
            format!("{key} (credentials)"),
            "the text contains credentials, which are never copied, so none of it was carried over; set \
             CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY in the coordinator's environment, and put the \
             rest of the text in a file only the coordinator can read (agent.extra_clearml_conf_file)",
        );
        None
    } else {
        Some(text)
    };
    (servers, init_script, extra)
}

/// Returns whether clearml.conf text sets a credential, whose value must not be copied.
fn has_credentials(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    ["access_key", "secret", "git_pass", "token", "password"]
        .iter()
        .any(|word| text.contains(word))
}

/// Finds `api_server`, `web_server` and `files_server` lines (`key: value` or `key = value`, also dotted as
/// `api.api_server`).
fn scan_clearml_conf(text: &str, key: &str, report: &mut Report) -> Servers {
    let mut servers = Servers::default();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with("//") {
            continue;
        }
        let Some(split) = line.find([':', '=']) else {
            continue;
        };
        let name = line[..split].trim().trim_matches('"');
        let value = line[split + 1..]
            .trim()
            .trim_end_matches(',')
            .trim()
            .trim_matches(['"', '\'']);
        let slot = match name.rsplit('.').next() {
            Some("api_server") => &mut servers.api,
            Some("web_server") => &mut servers.web,
            Some("files_server") => &mut servers.files,
            _ => continue,
        };
        if is_http_url(value) {
            *slot = Some(value.to_owned());
        }
    }
    if servers.api.is_some() {
        report.warning(
            key,
            "clearml.api_server (and any web or files server) was taken from this text; the ClearML autoscaler \
             itself used the server of its own clearml.conf, so check that it is the same",
        );
    }
    servers
}

fn is_http_url(text: &str) -> bool {
    match url::Url::parse(text) {
        Ok(url) => matches!(url.scheme(), "http" | "https") && url.host_str().is_some(),
        Err(_) => false,
    }
}

/// Replaces every character that a resource name may not contain (letters, digits, '-', '_') with '-'.
fn resource_name(source: &str) -> String {
    let name: String = source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if name.is_empty() {
        "resource".to_owned()
    } else {
        name
    }
}

fn read_resources(
    configurations: &Table,
    settings: &HyperParams,
    report: &mut Report,
) -> Vec<Resource> {
    let Some(table) = configurations.table("resource_configurations", report) else {
        return Vec::new();
    };
    if table.map.is_empty() {
        report.problem(
            table.path.clone(),
            "{}",
            "define at least one resource with ami_id, instance_type, is_spot and availability_zone",
        );
    }
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut resources = Vec::new();
    for (source_name, value) in table.map {
        let name = resource_name(source_name);
        if let Some(other) = names.insert(name.clone(), source_name.clone()) {
            report.problem(
                table.key(source_name),
                format!("{source_name:?}"),
                format!(
                    "becomes the resource name {name:?}, as {other:?} does; rename one of them (names use \
                     letters, digits, '-' and '_')"
                ),
            );
            continue;
        }
        if name != *source_name {
            report.warning(
                table.key(source_name),
                format!("renamed to {name:?}: resource names use letters, digits, '-' and '_'"),
            );
        }
        let Value::Object(map) = value else {
            report.problem(
                table.key(source_name),
                describe(value),
                "must be a mapping with ami_id, instance_type, is_spot and availability_zone",
            );
            continue;
        };
        let resource = Table {
            map,
            path: table.key(source_name),
        };
        if let Some(resource) = read_resource(&resource, name, source_name, settings, report) {
            resources.push(resource);
        }
    }
    resources
}

fn read_resource(
    table: &Table,
    name: String,
    source_name: &str,
    settings: &HyperParams,
    report: &mut Report,
) -> Option<Resource> {
    table.unknown_keys(RESOURCE_KEYS, report);
    let before = report.problems.len();

    let instance_type = table.required_string("instance_type", "g4dn.xlarge", report);
    let image_id = table.required_string("ami_id", "ami-0123456789abcdef0", report);
    // spin_up_worker reads resource_conf["is_spot"] without a default.
    let spot = table.boolean("is_spot", report);
    if table.get("is_spot").is_none() {
        report.problem(
            table.key("is_spot"),
            "(missing)",
            "the ClearML autoscaler requires it; set true for spot or false for on-demand",
        );
    }
    let subnet = read_subnet(table, report);
    let security_group_ids = read_security_groups(table, report);
    let key_name = table.string("key_name", report);
    let volume = read_volume(table, report);

    let mut tags: BTreeMap<String, String> = settings.tags.iter().cloned().collect();
    tags.extend(read_tags(table, report));

    if table.boolean("enable_monitoring", report) == Some(true) {
        report.not_carried_over(
            table.key("enable_monitoring"),
            "clearml-fleet launches without detailed CloudWatch monitoring; enable it on the instances \
             another way if you need it",
        );
    }
    if table.boolean("cpu_only", report) == Some(true) {
        report.not_carried_over(
            table.key("cpu_only"),
            "cloud_driver.py exported NVIDIA_VISIBLE_DEVICES=none for it; set that variable in the node \
             agent's [clearml_agent.env] on this resource's image",
        );
    }
    match table.get("extra_configurations") {
        Some(Value::Object(map)) if map.is_empty() => {}
        Some(_) => report.not_carried_over(
            table.key("extra_configurations"),
            "aws_driver.py merged it into the launch request, and clearml-fleet has no such pass-through; \
             express it with this resource's keys, the AMI or the user data",
        ),
        None => {}
    }

    if report.problems.len() > before {
        return None;
    }
    Some(Resource {
        name,
        source_name: source_name.to_owned(),
        max_instances: None,
        image_id: image_id?,
        instance_type: instance_type?,
        spot: spot?,
        subnet: subnet?,
        security_group_ids,
        key_name,
        instance_profile: settings.instance_profile.clone(),
        volume,
        tags,
    })
}

fn read_subnet(table: &Table, report: &mut Report) -> Option<Subnet> {
    let subnet_id = table.string("subnet_id", report);
    let zone = table.string("availability_zone", report);
    match (subnet_id, zone) {
        (Some(id), Some(zone)) => Some(Subnet {
            id,
            zone,
            placeholder: false,
        }),
        (Some(id), None) => {
            report.problem(
                table.key("availability_zone"),
                "(missing)",
                format!(
                    "clearml-fleet needs the zone of subnet {id}; add availability_zone with the zone that \
                     `aws ec2 describe-subnets --subnet-ids {id}` shows"
                ),
            );
            None
        }
        (None, Some(zone)) => {
            // spin_up_worker launched with Placement.AvailabilityZone, which uses the default subnet of that
            // zone; RunInstances in clearml-fleet always names a subnet.
            report.warning(
                table.key("availability_zone"),
                format!(
                    "no subnet_id, so the ClearML autoscaler used the default subnet of {zone}; the output has a \
                     placeholder subnet id: replace it with the id that `aws ec2 describe-subnets --filters \
                     Name=availability-zone,Values={zone} Name=default-for-az,Values=true` shows"
                ),
            );
            Some(Subnet {
                id: format!("{SUBNET_PLACEHOLDER_PREFIX}default-for-{zone}"),
                zone,
                placeholder: true,
            })
        }
        (None, None) => {
            report.problem(
                table.key("availability_zone"),
                "(missing)",
                "set availability_zone, and subnet_id for a subnet other than the zone's default one \
                 (aws_driver.py requires one of them)",
            );
            None
        }
    }
}

fn read_security_groups(table: &Table, report: &mut Report) -> Vec<String> {
    match table.get("security_group_ids") {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            let mut ids = Vec::new();
            for (index, item) in items.iter().enumerate() {
                match item {
                    Value::String(id) if !id.trim().is_empty() => ids.push(id.trim().to_owned()),
                    other => report.problem(
                        format!("{}[{index}]", table.key("security_group_ids")),
                        describe(other),
                        "must be a security group id, for example \"sg-0123456789abcdef0\"",
                    ),
                }
            }
            ids
        }
        Some(other) => {
            report.problem(
                table.key("security_group_ids"),
                describe(other),
                "must be a list of security group ids, for example [\"sg-0123456789abcdef0\"]",
            );
            Vec::new()
        }
    }
}

/// Reads the EBS volume that spin_up_worker maps when `ebs_device_name` is set.
fn read_volume(table: &Table, report: &mut Report) -> Option<Volume> {
    let device_name = table.string("ebs_device_name", report);
    let snapshot_id = table.string("ebs_snapshot_id", report);
    let volume_type = table.string("ebs_volume_type", report);
    let size = match table.get("ebs_volume_size") {
        None => None,
        Some(value) => match integer(value) {
            Some(size) if (1..=i64::from(i32::MAX)).contains(&size) => Some(size as i32),
            _ => {
                report.problem(
                    table.key("ebs_volume_size"),
                    describe(value),
                    "must be a whole number of GiB, at least 1",
                );
                return None;
            }
        },
    };
    let Some(device_name) = device_name else {
        let ignored: Vec<&str> = ["ebs_volume_size", "ebs_volume_type", "ebs_snapshot_id"]
            .into_iter()
            .filter(|name| table.get(name).is_some())
            .collect();
        if !ignored.is_empty() {
            report.not_carried_over(
                table.key(ignored[0]),
                format!(
                    "{} without ebs_device_name: the ClearML autoscaler ignored it too; add ebs_device_name \
                     (for example \"/dev/sda1\") to convert the volume",
                    ignored.join(", ")
                ),
            );
        }
        return None;
    };
    if snapshot_id.is_some() && size.is_none() {
        // With a snapshot, spin_up_worker sends no VolumeSize; clearml-fleet always sends one.
        report.problem(
            table.key("ebs_volume_size"),
            "(missing)",
            "clearml-fleet needs the size of a volume made from ebs_snapshot_id; add ebs_volume_size with at \
             least the snapshot's size in GiB",
        );
        return None;
    }
    if snapshot_id.is_some() && volume_type.is_none() {
        report.warning(
            table.key("ebs_volume_type"),
            format!(
                "the ClearML autoscaler left the type of a volume from a snapshot to EC2; the output sets \
                 {DEFAULT_EBS_VOLUME_TYPE:?}"
            ),
        );
    }
    Some(Volume {
        device_name,
        size_gib: size.unwrap_or(DEFAULT_EBS_VOLUME_SIZE_GIB as i32),
        volume_type: volume_type.unwrap_or_else(|| DEFAULT_EBS_VOLUME_TYPE.to_owned()),
        snapshot_id,
    })
}

/// Reads a whole number as Python's `int()` does for the values the wizard and YAML produce: an integer, a
/// float without a fraction, or a string of digits.
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64().or_else(|| {
            number
                .as_f64()
                .filter(|value| value.fract() == 0.0 && value.abs() < 1e15)
                .map(|value| value as i64)
        }),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// Reads `queues` (queue name to a list of `[resource, max instances]`) and sets each listed resource's cap.
fn read_queues(
    configurations: &Table,
    resources: &mut [Resource],
    report: &mut Report,
) -> Vec<Queue> {
    let Some(table) = configurations.table("queues", report) else {
        return Vec::new();
    };
    if table.map.is_empty() {
        report.problem(
            table.path.clone(),
            "{}",
            "define at least one queue, for example {\"aws_gpu\": [[\"gpu_spot\", 3]]}",
        );
    }
    // Every defined name, also of resources with problems, so a queue does not report those as unknown.
    let known: Vec<String> = match configurations.get("resource_configurations") {
        Some(Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    };
    // has_duplicate_resource in auto_scaler.py rejects a resource listed twice, in one queue or in two.
    let mut listed_in: BTreeMap<String, String> = BTreeMap::new();
    let mut queues = Vec::new();
    for (queue_name, value) in table.map {
        let key = table.key(queue_name);
        if queue_name.trim().is_empty() {
            report.problem(key.clone(), "\"\"", "set the ClearML queue name as the key");
        }
        let Value::Array(entries) = value else {
            report.problem(
                key,
                describe(value),
                "must be a list of [resource name, max instances] pairs, for example [[\"gpu_spot\", 3]]",
            );
            continue;
        };
        if entries.is_empty() {
            report.problem(
                key.clone(),
                "[]",
                "list at least one [resource name, max instances] pair",
            );
        }
        let mut queue = Queue {
            name: queue_name.clone(),
            resources: Vec::new(),
        };
        for (index, entry) in entries.iter().enumerate() {
            let entry_key = format!("{key}[{index}]");
            let pair = match entry {
                Value::Array(pair) if pair.len() == 2 => pair,
                other => {
                    report.problem(
                        entry_key,
                        describe(other),
                        "must be a [resource name, max instances] pair, for example [\"gpu_spot\", 3]",
                    );
                    continue;
                }
            };
            let Value::String(resource_name) = &pair[0] else {
                report.problem(
                    format!("{entry_key}[0]"),
                    describe(&pair[0]),
                    "must be the name of a resource in resource_configurations",
                );
                continue;
            };
            let max_instances = match integer(&pair[1]) {
                Some(max) if max >= 1 && max <= i64::from(u32::MAX) => max as u32,
                _ => {
                    report.problem(
                        format!("{entry_key}[1]"),
                        describe(&pair[1]),
                        "must be a whole number of at least 1; remove the pair to stop using the resource",
                    );
                    continue;
                }
            };
            if let Some(other) = listed_in.insert(resource_name.clone(), queue_name.clone()) {
                report.problem(
                    format!("{entry_key}[0]"),
                    format!("{resource_name:?}"),
                    format!(
                        "already listed in queue {other:?}; the ClearML autoscaler allows each resource in one \
                         place only, so copy the resource under a new name"
                    ),
                );
                continue;
            }
            let Some(resource) = resources
                .iter_mut()
                .find(|resource| resource.source_name == *resource_name)
            else {
                if !known.contains(resource_name) {
                    report.problem(
                        format!("{entry_key}[0]"),
                        format!("{resource_name:?}"),
                        format!("no such resource; resource_configurations defines {known:?}"),
                    );
                }
                continue;
            };
            resource.max_instances = Some(max_instances);
            queue.resources.push((resource.name.clone(), max_instances));
        }
        queues.push(queue);
    }
    for resource in resources.iter() {
        if resource.max_instances.is_none() {
            report.warning(
                format!("configurations.resource_configurations.{}", resource.source_name),
                "no queue lists this resource, so the ClearML autoscaler never launched it; it is converted \
                 with max_instances = 1 and is not used by any queue",
            );
        }
    }
    queues
}

/// Returns the region: `cloud_credentials_region`, or else the region of the first resource's zone.
fn region(
    hyper: &Table,
    region: Option<String>,
    resources: &[Resource],
    report: &mut Report,
) -> Option<String> {
    if region.is_some() {
        return region;
    }
    let key = hyper.key("cloud_credentials_region");
    // A zone is its region followed by one letter, for example us-east-1b in us-east-1.
    let from_zone = resources.first().and_then(|resource| {
        let zone = &resource.subnet.zone;
        zone.ends_with(|c: char| c.is_ascii_lowercase())
            .then(|| zone[..zone.len() - 1].to_owned())
            .filter(|region| region.ends_with(|c: char| c.is_ascii_digit()))
    });
    match from_zone {
        Some(region) => {
            report.warning(
                key,
                format!(
                    "missing (boto3 then used AWS_DEFAULT_REGION); set to {region:?}, the region of the first \
                     resource's availability zone"
                ),
            );
            Some(region)
        }
        None => {
            report.problem(
                key,
                "(missing)",
                "set the AWS region of the instances, for example \"us-east-1\"",
            );
            None
        }
    }
}
