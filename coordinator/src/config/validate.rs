//! Checks a parsed [`ConfigFile`] and builds the [`Config`] the coordinator runs with, collecting every
//! problem instead of stopping at the first.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clearml_api::Secret;

use super::file::{
    ApiSection, AwsSection, ClearmlSection, ConfigFile, EtcdSection, ResourceSection,
};
use super::{
    ApiConfig, ApiToken, ClearmlConfig, Config, Environment, EtcdConfig, Problem, Role, TlsFiles,
};
use crate::election::ElectionConfig;
use crate::etcd::EtcdOptions;
use crate::policy::{
    BackoffSchedule, OfferingConfig, PolicyConfig, QueueConfig, ResourceConfig, Timeouts,
};
use crate::providers::Market;
use crate::providers::aws::{
    AwsConfig, AwsResource, CredentialsSource, EbsVolume, InstanceProfile, OfferingPrice, Subnet,
};
use crate::providers::local::{LOCAL_INSTANCE_TYPE, LOCAL_ZONE, LocalConfig};

/// Key of `hourly_price_usd` that prices a local resource.
const LOCAL_PRICE_KEY: &str = "local";

#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn add(
        &mut self,
        key: impl Into<String>,
        value: impl ToString,
        message: impl Into<String>,
    ) {
        self.0.push(Problem {
            key: key.into(),
            value: value.to_string(),
            message: message.into(),
        });
    }

    fn range<T: PartialOrd + std::fmt::Display + Copy>(
        &mut self,
        key: &str,
        value: T,
        min: T,
        max: T,
        unit: &str,
    ) {
        if value < min || value > max {
            self.add(key, value, format!("must be between {min} and {max}{unit}"));
        }
    }
}

pub(super) fn check(
    file: &ConfigFile,
    base_dir: &Path,
    env: &dyn Environment,
) -> Result<Config, Vec<Problem>> {
    let mut problems = Problems::default();

    check_cluster(file, &mut problems);
    let api = check_api(&file.api, base_dir, env, &mut problems);
    let etcd = file
        .etcd
        .as_ref()
        .map(|section| check_etcd(section, file, api.as_ref(), &mut problems));
    let clearml = check_clearml(&file.clearml, base_dir, env, &mut problems);
    check_defaults(file, &mut problems);
    let resources = check_resources(file, base_dir, &mut problems);
    let queues = check_queues(file, &resources, &mut problems);
    let aws = file
        .aws
        .as_ref()
        .map(|section| build_aws(section, file, &resources, &mut problems));
    check_provider_sections(file, &mut problems);
    let agent = super::agent::check_agent(file, base_dir, env, &mut problems);
    let agent_template = file
        .local
        .as_ref()
        .and_then(|section| section.agent_config_template_file.as_ref())
        .and_then(|path| {
            let resolved = resolve(path, base_dir);
            match std::fs::read_to_string(&resolved) {
                Ok(text) => Some(text),
                Err(err) => {
                    problems.add(
                        "local.agent_config_template_file",
                        resolved.display(),
                        format!("cannot read the file ({err}); check the path"),
                    );
                    None
                }
            }
        });
    if file.etcd.is_some()
        && file.api.bootstrap_key_env.is_none()
        && file.api.bootstrap_key_file.is_none()
    {
        problems.add(
            "api.bootstrap_key_env",
            "(missing)",
            "replicas must share the key that signs the node agents' tokens; set api.bootstrap_key_env or \
             api.bootstrap_key_file (at least 32 characters, for example from `openssl rand -hex 32`)",
        );
    }

    if !problems.0.is_empty() {
        return Err(problems.0);
    }
    let (Some(api), Some(clearml)) = (api, clearml) else {
        unreachable!("every missing part added a problem");
    };

    let defaults = &file.defaults;
    let policy = PolicyConfig {
        queues,
        cluster_max_instances: file.budget.max_instances,
        hourly_budget_usd: file.budget.hourly_usd,
        max_launches_per_tick: defaults.max_launches_per_tick,
        max_idle: Duration::from_secs(defaults.max_idle_seconds),
        timeouts: Timeouts {
            launch: Duration::from_secs(defaults.launch_timeout_seconds),
            boot: Duration::from_secs(defaults.boot_timeout_seconds),
            heartbeat: Duration::from_secs(defaults.heartbeat_timeout_seconds),
        },
        backoff: BackoffSchedule::default(),
    };
    let local = file.local.as_ref().map(|section| {
        let mut config = LocalConfig::new(
            &file.cluster.name,
            section.base_dir.clone(),
            section.program.clone(),
        );
        config.args = section.args.clone();
        config.env = section.env.clone();
        config.agent_config_template = agent_template.clone();
        // Instances outlive a coordinator restart; the next provider finds them in base_dir.
        config.stop_on_drop = false;
        config
    });

    Ok(Config {
        cluster: file.cluster.name.clone(),
        replica_id: replica_id(file, env),
        worker_prefix: file.cluster.worker_prefix.clone(),
        etcd: etcd.flatten(),
        clearml,
        policy,
        orphan_timeout: Duration::from_secs(defaults.orphan_timeout_seconds),
        reconcile_interval: Duration::from_secs(defaults.reconcile_interval_seconds),
        orphan_grace: Duration::from_secs(defaults.orphan_grace_seconds),
        drain_grace: Duration::from_secs(defaults.drain_grace_seconds),
        api,
        aws: aws.flatten(),
        local,
        agent,
    })
}

/// The configured replica id, else the `HOSTNAME` variable (which tests set), else the host name from
/// gethostname(2). Shells and systemd do not export `HOSTNAME`, so the system call is what production uses.
fn replica_id(file: &ConfigFile, env: &dyn Environment) -> String {
    file.cluster
        .replica_id
        .clone()
        .or_else(|| env.var("HOSTNAME").filter(|name| !name.trim().is_empty()))
        .or_else(system_host_name)
        .unwrap_or_else(|| "replica".to_owned())
}

fn system_host_name() -> Option<String> {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname(2) writes at most `len` bytes into the buffer we own.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result != 0 {
        return None;
    }
    let end = buffer
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(buffer.len());
    let name = String::from_utf8_lossy(&buffer[..end]).trim().to_owned();
    (!name.is_empty()).then_some(name)
}

fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn check_cluster(file: &ConfigFile, problems: &mut Problems) {
    let cluster = &file.cluster;
    if !is_name(&cluster.name) {
        problems.add(
            "cluster.name",
            format!("{:?}", cluster.name),
            "use 1 to 63 lowercase letters, digits, '-' or '_'; it names etcd keys and cloud tags",
        );
    }
    if cluster.worker_prefix.is_empty() || cluster.worker_prefix.contains(':') {
        problems.add(
            "cluster.worker_prefix",
            format!("{:?}", cluster.worker_prefix),
            "must be non-empty and without ':', because worker ids are <prefix>:<resource>:<instance id>",
        );
    }
    if let Some(replica) = &cluster.replica_id
        && replica.trim().is_empty()
    {
        problems.add(
            "cluster.replica_id",
            "\"\"",
            "remove the key to use the host name, or set a unique id",
        );
    }
}

fn check_etcd(
    section: &EtcdSection,
    file: &ConfigFile,
    api: Option<&ApiConfig>,
    problems: &mut Problems,
) -> Option<EtcdConfig> {
    let before = problems.0.len();
    if section.endpoints.is_empty() {
        problems.add(
            "etcd.endpoints",
            "[]",
            "list at least one endpoint, for example [\"http://127.0.0.1:2379\"]",
        );
    }
    for (index, endpoint) in section.endpoints.iter().enumerate() {
        if !is_http_url(endpoint) {
            problems.add(
                format!("etcd.endpoints[{index}]"),
                format!("{endpoint:?}"),
                "must be an http:// or https:// URL with a host and port, for example http://10.0.0.5:2379",
            );
        }
    }
    if section.prefix.trim_matches('/').is_empty() {
        problems.add(
            "etcd.prefix",
            format!("{:?}", section.prefix),
            "must name a key prefix, for example \"clearml-fleet\"",
        );
    }
    problems.range(
        "etcd.lease_ttl_seconds",
        section.lease_ttl_seconds,
        2,
        60,
        " seconds",
    );
    problems.range(
        "etcd.request_timeout_ms",
        section.request_timeout_ms,
        100,
        30_000,
        " ms",
    );
    if problems.0.len() > before {
        return None;
    }

    let advertise = file
        .cluster
        .advertise_address
        .clone()
        .or_else(|| api.map(|api| api.grpc_listen.to_string()))
        .unwrap_or_default();
    let mut election = ElectionConfig::new(&section.prefix, &file.cluster.name, "", &advertise);
    election.lease_ttl = Duration::from_secs(section.lease_ttl_seconds);
    let timeout = Duration::from_millis(section.request_timeout_ms);
    Some(EtcdConfig {
        endpoints: section.endpoints.clone(),
        options: EtcdOptions {
            connect_timeout: timeout,
            request_timeout: timeout,
        },
        election,
        key_prefix: format!(
            "/{}/{}/",
            section.prefix.trim_matches('/'),
            file.cluster.name
        ),
    })
}

fn check_clearml(
    section: &ClearmlSection,
    base_dir: &Path,
    env: &dyn Environment,
    problems: &mut Problems,
) -> Option<ClearmlConfig> {
    let before = problems.0.len();
    for (key, value) in [
        ("clearml.api_server", Some(&section.api_server)),
        ("clearml.web_server", section.web_server.as_ref()),
        ("clearml.files_server", section.files_server.as_ref()),
    ] {
        let Some(value) = value else {
            continue;
        };
        if !is_http_url(value) {
            problems.add(
                key,
                format!("{value:?}"),
                "must be an http:// or https:// URL, for example https://api.clear.ml",
            );
        } else if is_placeholder_host(value) {
            problems.add(
                key,
                format!("{value:?}"),
                "the .invalid domain never resolves (import-clearml-config writes it when its input names no \
                 server); set the URL of your ClearML server",
            );
        }
    }
    problems.range(
        "clearml.poll_interval_seconds",
        section.poll_interval_seconds,
        1,
        300,
        " seconds",
    );

    let access_key = match env.var(&section.access_key_env) {
        Some(value) if !value.trim().is_empty() => Some(value.trim().to_owned()),
        _ => {
            problems.add(
                "clearml.access_key_env",
                format!("{:?}", section.access_key_env),
                format!(
                    "environment variable {} is not set or empty; export the ClearML API access key in it",
                    section.access_key_env
                ),
            );
            None
        }
    };
    let secret_key = match &section.secret_key_file {
        Some(path) => read_secret_file("clearml.secret_key_file", path, base_dir, problems),
        None => read_secret_env(
            "clearml.secret_key_env",
            &section.secret_key_env,
            env,
            problems,
        ),
    };
    if problems.0.len() > before {
        return None;
    }

    Some(ClearmlConfig {
        api_server: section.api_server.clone(),
        web_server: section
            .web_server
            .clone()
            .unwrap_or_else(|| section.api_server.clone()),
        files_server: section
            .files_server
            .clone()
            .unwrap_or_else(|| section.api_server.clone()),
        access_key: access_key?,
        secret_key: secret_key?,
        api_version: section.api_version.clone(),
        poll_interval: Duration::from_secs(section.poll_interval_seconds),
    })
}

pub(super) fn read_secret_env(
    key: &str,
    var: &str,
    env: &dyn Environment,
    problems: &mut Problems,
) -> Option<Secret> {
    match env.var(var) {
        Some(value) if !value.trim().is_empty() => Some(Secret::new(value.trim())),
        _ => {
            problems.add(
                key,
                format!("{var:?}"),
                format!("environment variable {var} is not set or empty; export the secret in it"),
            );
            None
        }
    }
}

pub(super) fn read_secret_file(
    key: &str,
    path: &Path,
    base_dir: &Path,
    problems: &mut Problems,
) -> Option<Secret> {
    let resolved = resolve(path, base_dir);
    match std::fs::read_to_string(&resolved) {
        Ok(text) if !text.trim().is_empty() => Some(Secret::new(text.trim())),
        Ok(_) => {
            problems.add(
                key,
                resolved.display(),
                "the file is empty; write the secret into it",
            );
            None
        }
        Err(err) => {
            problems.add(
                key,
                resolved.display(),
                format!("cannot read the file ({err}); check the path and its permissions"),
            );
            None
        }
    }
}

fn check_defaults(file: &ConfigFile, problems: &mut Problems) {
    let defaults = &file.defaults;
    problems.range(
        "defaults.reconcile_interval_seconds",
        defaults.reconcile_interval_seconds,
        1,
        3_600,
        " seconds",
    );
    problems.range(
        "defaults.drain_grace_seconds",
        defaults.drain_grace_seconds,
        1,
        3_600,
        " seconds",
    );
    problems.range(
        "defaults.orphan_grace_seconds",
        defaults.orphan_grace_seconds,
        0,
        3_600,
        " seconds",
    );
    problems.range(
        "defaults.max_idle_seconds",
        defaults.max_idle_seconds,
        10,
        86_400,
        " seconds",
    );
    problems.range(
        "defaults.launch_timeout_seconds",
        defaults.launch_timeout_seconds,
        30,
        3_600,
        " seconds",
    );
    problems.range(
        "defaults.boot_timeout_seconds",
        defaults.boot_timeout_seconds,
        60,
        7_200,
        " seconds",
    );
    problems.range(
        "defaults.heartbeat_timeout_seconds",
        defaults.heartbeat_timeout_seconds,
        10,
        3_600,
        " seconds",
    );
    problems.range(
        "defaults.orphan_timeout_seconds",
        defaults.orphan_timeout_seconds,
        60,
        86_400,
        " seconds",
    );
    problems.range(
        "defaults.max_launches_per_tick",
        defaults.max_launches_per_tick,
        1,
        1_000,
        "",
    );

    if let Some(budget) = file.budget.hourly_usd
        && !(budget.is_finite() && budget > 0.0)
    {
        problems.add(
            "budget.hourly_usd",
            budget,
            "must be a positive number of USD per hour; remove the key for no budget",
        );
    }
    problems.range(
        "budget.max_instances",
        file.budget.max_instances,
        1,
        100_000,
        "",
    );
}

fn check_api(
    section: &ApiSection,
    base_dir: &Path,
    env: &dyn Environment,
    problems: &mut Problems,
) -> Option<ApiConfig> {
    let before = problems.0.len();
    let grpc_listen = parse_addr("api.grpc_listen", &section.grpc_listen, problems);
    let http_listen = parse_addr("api.http_listen", &section.http_listen, problems);

    let tls = match (&section.tls_cert_file, &section.tls_key_file) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert_file: resolve(cert, base_dir),
            key_file: resolve(key, base_dir),
            client_ca_file: section
                .client_ca_file
                .as_ref()
                .map(|ca| resolve(ca, base_dir)),
        }),
        (None, None) => {
            if let Some(ca) = &section.client_ca_file {
                problems.add(
                    "api.client_ca_file",
                    ca.display(),
                    "client certificates need TLS; set api.tls_cert_file and api.tls_key_file too",
                );
            }
            None
        }
        (cert, _) => {
            let (set, missing) = if cert.is_some() {
                ("api.tls_cert_file", "api.tls_key_file")
            } else {
                ("api.tls_key_file", "api.tls_cert_file")
            };
            problems.add(
                missing,
                "(missing)",
                format!("{set} is set; TLS needs both the certificate and the key"),
            );
            None
        }
    };
    if let Some(tls) = &tls {
        for (key, path) in [
            ("api.tls_cert_file", Some(&tls.cert_file)),
            ("api.tls_key_file", Some(&tls.key_file)),
            ("api.client_ca_file", tls.client_ca_file.as_ref()),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                problems.add(key, path.display(), "file not found; check the path");
            }
        }
    }

    let mut names = BTreeSet::new();
    let mut tokens = Vec::new();
    for (index, token) in section.tokens.iter().enumerate() {
        let key = format!("api.tokens[{index}]");
        if !names.insert(token.name.as_str()) {
            problems.add(
                format!("{key}.name"),
                format!("{:?}", token.name),
                "another token has this name; names must be unique",
            );
        }
        let role = match token.role.as_str() {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            other => {
                problems.add(
                    format!("{key}.role"),
                    format!("{other:?}"),
                    "must be \"viewer\" or \"operator\"",
                );
                None
            }
        };
        let secret = match (&token.token_env, &token.token_file) {
            (Some(var), None) => read_secret_env(&format!("{key}.token_env"), var, env, problems),
            (None, Some(path)) => {
                read_secret_file(&format!("{key}.token_file"), path, base_dir, problems)
            }
            _ => {
                problems.add(
                    format!("{key}.token_env"),
                    "(see token_file)",
                    "set exactly one of token_env and token_file",
                );
                None
            }
        };
        if let (Some(role), Some(token_value)) = (role, secret) {
            tokens.push(ApiToken {
                name: token.name.clone(),
                role,
                token: token_value,
            });
        }
    }

    let bootstrap_key = match (&section.bootstrap_key_env, &section.bootstrap_key_file) {
        (Some(var), None) => read_secret_env("api.bootstrap_key_env", var, env, problems),
        (None, Some(path)) => read_secret_file("api.bootstrap_key_file", path, base_dir, problems),
        (None, None) => None,
        (Some(_), Some(_)) => {
            problems.add(
                "api.bootstrap_key_env",
                "(see bootstrap_key_file)",
                "set at most one of bootstrap_key_env and bootstrap_key_file",
            );
            None
        }
    };
    if let Some(key) = &bootstrap_key
        && key.expose().len() < 32
    {
        problems.add(
            "api.bootstrap_key_env",
            format!("({} characters)", key.expose().len()),
            "the bootstrap key must have at least 32 characters; generate one with `openssl rand -hex 32`",
        );
    }
    for (index, endpoint) in section.agent_endpoints.iter().enumerate() {
        if !is_http_url(endpoint) {
            problems.add(
                format!("api.agent_endpoints[{index}]"),
                format!("{endpoint:?}"),
                "must be an http:// or https:// URL, for example https://coordinator-0.fleet.internal:7443",
            );
        } else if endpoint.starts_with("https://") && tls.is_none() {
            problems.add(
                format!("api.agent_endpoints[{index}]"),
                format!("{endpoint:?}"),
                "agents would dial TLS, but this coordinator serves plain gRPC; set api.tls_cert_file and \
                 api.tls_key_file",
            );
        }
    }

    if problems.0.len() > before {
        return None;
    }
    Some(ApiConfig {
        grpc_listen: grpc_listen?,
        http_listen: http_listen?,
        tls,
        tokens,
        bootstrap_key,
        agent_endpoints: section.agent_endpoints.clone(),
    })
}

fn parse_addr(key: &str, value: &str, problems: &mut Problems) -> Option<SocketAddr> {
    match value.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problems.add(
                key,
                format!("{value:?}"),
                "must be an IP address and port, for example 0.0.0.0:7443",
            );
            None
        }
    }
}

/// A resource after its checks, with the offerings that the policy chooses from.
struct CheckedResource {
    config: ResourceConfig,
    /// The launch template, for resources of the aws provider.
    aws: Option<AwsResource>,
}

fn check_resources(
    file: &ConfigFile,
    base_dir: &Path,
    problems: &mut Problems,
) -> BTreeMap<String, CheckedResource> {
    let mut checked = BTreeMap::new();
    for (name, section) in &file.resources {
        let key = format!("resources.{name}");
        let before = problems.0.len();
        if !is_resource_name(name) {
            problems.add(&key, format!("{name:?}"), "resource names use letters, digits, '-' or '_' (they become part of worker ids and tags)");
        }
        if section.max_instances == 0 {
            problems.add(format!("{key}.max_instances"), 0, "must be at least 1");
        }
        for (price_key, price) in &section.hourly_price_usd {
            if !(price.is_finite() && *price >= 0.0) {
                problems.add(
                    format!("{key}.hourly_price_usd.{}", toml_key(price_key)),
                    price,
                    "must be a non-negative number of USD per hour",
                );
            }
        }

        let resource = match section.provider.as_str() {
            "aws" => {
                check_aws_resource(name, section, base_dir, problems).map(|(aws, offerings)| {
                    CheckedResource {
                        config: ResourceConfig {
                            name: name.clone(),
                            max_instances: section.max_instances,
                            offerings,
                        },
                        aws: Some(aws),
                    }
                })
            }
            "local" => {
                check_local_resource(name, section, problems).map(|offerings| CheckedResource {
                    config: ResourceConfig {
                        name: name.clone(),
                        max_instances: section.max_instances,
                        offerings,
                    },
                    aws: None,
                })
            }
            other => {
                problems.add(
                    format!("{key}.provider"),
                    format!("{other:?}"),
                    "must be \"aws\" or \"local\"",
                );
                None
            }
        };
        if let Some(resource) = resource
            && problems.0.len() == before
        {
            checked.insert(name.clone(), resource);
        }
    }
    checked
}

fn is_resource_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_aws_resource(
    name: &str,
    section: &ResourceSection,
    base_dir: &Path,
    problems: &mut Problems,
) -> Option<(AwsResource, Vec<OfferingConfig>)> {
    let key = format!("resources.{name}");
    let before = problems.0.len();
    let market = match section.market.as_deref() {
        Some("spot") => Market::Spot,
        Some("on-demand") | None => Market::OnDemand,
        Some(other) => {
            problems.add(
                format!("{key}.market"),
                format!("{other:?}"),
                "must be \"spot\" or \"on-demand\"",
            );
            Market::OnDemand
        }
    };
    for instance_type in &section.instance_types {
        if !section.hourly_price_usd.contains_key(instance_type) {
            problems.add(
                format!("{key}.hourly_price_usd"),
                format!("(no price for {instance_type})"),
                format!("add {instance_type:?} = <USD per hour>; the budget and the cost metrics need every price"),
            );
        }
    }
    for (price_key, price) in &section.hourly_price_usd {
        if *price == 0.0 {
            problems.add(
                format!("{key}.hourly_price_usd.{}", toml_key(price_key)),
                price,
                "an EC2 instance is never free, and 0.0 is the placeholder import-clearml-config writes; set the \
                 type's hourly price in USD for this resource's market (the budget and the cost metrics use it)",
            );
        }
    }
    for subnet in &section.subnets {
        if subnet.id.starts_with(SUBNET_PLACEHOLDER_PREFIX) {
            problems.add(
                format!("{key}.subnets"),
                format!("{:?}", subnet.id),
                format!(
                    "a placeholder written by import-clearml-config; set the id of the default subnet of {} \
                     (aws ec2 describe-subnets --filters Name=availability-zone,Values={} \
                     Name=default-for-az,Values=true)",
                    subnet.zone, subnet.zone
                ),
            );
        }
    }
    for price_key in section.hourly_price_usd.keys() {
        if !section.instance_types.contains(price_key) {
            problems.add(
                format!("{key}.hourly_price_usd.{}", toml_key(price_key)),
                "(set)",
                format!("{price_key} is not in instance_types; remove it or add the type"),
            );
        }
    }
    let instance_profile = match (
        &section.instance_profile_name,
        &section.instance_profile_arn,
    ) {
        (Some(name), None) => Some(InstanceProfile::Name(name.clone())),
        (None, Some(arn)) => Some(InstanceProfile::Arn(arn.clone())),
        (None, None) => None,
        (Some(_), Some(_)) => {
            problems.add(
                format!("{key}.instance_profile_arn"),
                "(set)",
                "set instance_profile_name or instance_profile_arn, not both",
            );
            None
        }
    };
    let user_data_template = section.user_data_template_file.as_ref().and_then(|path| {
        let resolved = resolve(path, base_dir);
        std::fs::read_to_string(&resolved)
            .map_err(|err| {
                problems.add(
                    format!("{key}.user_data_template_file"),
                    resolved.display(),
                    format!("cannot read the file ({err})"),
                )
            })
            .ok()
    });

    let resource = AwsResource {
        image_id: section.image_id.clone().unwrap_or_default(),
        instance_types: section.instance_types.clone(),
        subnets: section
            .subnets
            .iter()
            .map(|subnet| Subnet {
                id: subnet.id.clone(),
                zone: subnet.zone.clone(),
            })
            .collect(),
        market,
        spot_max_price: section.spot_max_price.clone(),
        security_group_ids: section.security_group_ids.clone(),
        key_name: section.key_name.clone(),
        instance_profile,
        volumes: section
            .volumes
            .iter()
            .map(|volume| EbsVolume {
                device_name: volume.device_name.clone(),
                size_gib: volume.size_gib,
                volume_type: volume.volume_type.clone(),
                snapshot_id: volume.snapshot_id.clone(),
                encrypted: volume.encrypted,
            })
            .collect(),
        user_data_template,
        user_data_vars: BTreeMap::new(),
        tags: section.tags.clone(),
        metadata_hop_limit: 2,
    };
    if section.image_id.is_none() {
        problems.add(
            format!("{key}.image_id"),
            "(missing)",
            "set the AMI id the instances boot from, for example \"ami-0abc1234\"",
        );
    } else if let Err(message) = resource.validate(name) {
        // The provider's own check names the key at the start of its message.
        let (field, rest) = message
            .split_once(' ')
            .unwrap_or((key.as_str(), message.as_str()));
        problems.add(field, "", rest.to_owned());
    }
    if problems.0.len() > before {
        return None;
    }

    let offerings = resource
        .offerings()
        .into_iter()
        .map(|(offering, _)| OfferingConfig {
            hourly_price_usd: section
                .hourly_price_usd
                .get(&offering.instance_type)
                .copied()
                .unwrap_or(0.0),
            id: offering.key(),
        })
        .collect();
    Some((resource, offerings))
}

fn check_local_resource(
    name: &str,
    section: &ResourceSection,
    problems: &mut Problems,
) -> Option<Vec<OfferingConfig>> {
    let key = format!("resources.{name}");
    let before = problems.0.len();
    let aws_keys = [
        ("image_id", section.image_id.is_some()),
        ("instance_types", !section.instance_types.is_empty()),
        ("subnets", !section.subnets.is_empty()),
        ("market", section.market.is_some()),
        ("spot_max_price", section.spot_max_price.is_some()),
        ("security_group_ids", !section.security_group_ids.is_empty()),
        ("key_name", section.key_name.is_some()),
        (
            "instance_profile_name",
            section.instance_profile_name.is_some(),
        ),
        (
            "instance_profile_arn",
            section.instance_profile_arn.is_some(),
        ),
        ("volumes", !section.volumes.is_empty()),
        (
            "user_data_template_file",
            section.user_data_template_file.is_some(),
        ),
    ];
    for (field, set) in aws_keys {
        if set {
            problems.add(
                format!("{key}.{field}"),
                "(set)",
                "applies to provider \"aws\" only; remove it or change the provider",
            );
        }
    }
    for price_key in section.hourly_price_usd.keys() {
        if price_key != LOCAL_PRICE_KEY {
            problems.add(
                format!("{key}.hourly_price_usd.{}", toml_key(price_key)),
                "(set)",
                format!("a local resource has one price, under the key {LOCAL_PRICE_KEY:?}"),
            );
        }
    }
    if problems.0.len() > before {
        return None;
    }
    let offering = crate::providers::Offering {
        instance_type: LOCAL_INSTANCE_TYPE.to_owned(),
        zone: LOCAL_ZONE.to_owned(),
        market: Market::OnDemand,
    };
    Some(vec![OfferingConfig {
        id: offering.key(),
        hourly_price_usd: section
            .hourly_price_usd
            .get(LOCAL_PRICE_KEY)
            .copied()
            .unwrap_or(0.0),
    }])
}

fn check_queues(
    file: &ConfigFile,
    resources: &BTreeMap<String, CheckedResource>,
    problems: &mut Problems,
) -> Vec<QueueConfig> {
    if file.queues.is_empty() {
        problems.add(
            "queues",
            "[]",
            "add at least one [[queues]] table with name, resources and max_instances",
        );
    }
    let mut names = BTreeSet::new();
    let mut queues = Vec::new();
    for (index, queue) in file.queues.iter().enumerate() {
        let key = format!("queues[{index}]");
        let before = problems.0.len();
        if queue.name.trim().is_empty() {
            problems.add(format!("{key}.name"), "\"\"", "set the ClearML queue name");
        } else if !names.insert(queue.name.as_str()) {
            problems.add(
                format!("{key}.name"),
                format!("{:?}", queue.name),
                "another queue has this name; each queue appears once",
            );
        }
        if queue.resources.is_empty() {
            problems.add(
                format!("{key}.resources"),
                "[]",
                "list at least one resource name in priority order",
            );
        }
        for resource in &queue.resources {
            if !file.resources.contains_key(resource) {
                let known: Vec<&str> = file.resources.keys().map(String::as_str).collect();
                problems.add(
                    format!("{key}.resources"),
                    format!("{resource:?}"),
                    format!("no such resource; defined resources: {known:?}"),
                );
            }
        }
        if queue.max_instances == 0 {
            problems.add(format!("{key}.max_instances"), 0, "must be at least 1");
        }
        if queue.min_instances > queue.max_instances {
            problems.add(
                format!("{key}.min_instances"),
                queue.min_instances,
                format!("must not exceed max_instances ({})", queue.max_instances),
            );
        }
        if queue.min_idle > queue.max_instances {
            problems.add(
                format!("{key}.min_idle"),
                queue.min_idle,
                format!("must not exceed max_instances ({})", queue.max_instances),
            );
        }
        if problems.0.len() > before {
            continue;
        }
        let queue_resources = queue
            .resources
            .iter()
            .filter_map(|name| resources.get(name))
            .map(|resource| resource.config.clone())
            .collect();
        queues.push(QueueConfig {
            name: queue.name.clone(),
            resources: queue_resources,
            max_instances: queue.max_instances,
            min_instances: queue.min_instances,
            min_idle: queue.min_idle,
        });
    }
    queues
}

fn build_aws(
    section: &AwsSection,
    file: &ConfigFile,
    resources: &BTreeMap<String, CheckedResource>,
    problems: &mut Problems,
) -> Option<AwsConfig> {
    if section.region.trim().is_empty() {
        problems.add(
            "aws.region",
            "\"\"",
            "set the AWS region, for example \"us-east-1\"",
        );
    }
    if let Some(url) = &section.endpoint_url
        && !is_http_url(url)
    {
        problems.add(
            "aws.endpoint_url",
            format!("{url:?}"),
            "must be an http:// or https:// URL; remove it to use the AWS endpoint of the region",
        );
    }
    let credentials = match (&section.access_key_id_env, &section.secret_access_key_env) {
        (None, None) => CredentialsSource::DefaultChain,
        (Some(access), Some(secret)) => CredentialsSource::Environment {
            access_key_id_var: access.clone(),
            secret_access_key_var: secret.clone(),
            session_token_var: section.session_token_env.clone(),
        },
        _ => {
            problems.add("aws.secret_access_key_env", "(one of the pair)", "set both access_key_id_env and secret_access_key_env, or neither for the default chain");
            CredentialsSource::DefaultChain
        }
    };

    let mut config = AwsConfig::new(&file.cluster.name, &section.region);
    config.endpoint_url = section.endpoint_url.clone();
    config.credentials = credentials;
    for (name, resource) in resources {
        if let Some(aws) = &resource.aws {
            config.resources.insert(name.clone(), aws.clone());
            for instance_type in &aws.instance_types {
                let price = file.resources[name]
                    .hourly_price_usd
                    .get(instance_type)
                    .copied()
                    .unwrap_or(0.0);
                config.prices.push(OfferingPrice {
                    instance_type: instance_type.clone(),
                    market: aws.market,
                    zone: None,
                    usd_per_hour: price,
                });
            }
        }
    }
    Some(config)
}

fn check_provider_sections(file: &ConfigFile, problems: &mut Problems) {
    for (name, resource) in &file.resources {
        let missing = match resource.provider.as_str() {
            "aws" if file.aws.is_none() => Some("[aws] with the region"),
            "local" if file.local.is_none() => Some("[local] with base_dir and program"),
            _ => None,
        };
        if let Some(section) = missing {
            problems.add(
                format!("resources.{name}.provider"),
                format!("{:?}", resource.provider),
                format!("this provider needs a {section} table"),
            );
        }
    }
}

/// Writes a key as TOML reads it: quoted when it is not a bare key, as `"g4dn.xlarge"` is not.
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// Start of the subnet ids that `import-clearml-config` writes when its input names a zone but no subnet.
pub const SUBNET_PLACEHOLDER_PREFIX: &str = "subnet-REPLACE-";

/// Returns whether the URL's host is in the `.invalid` top-level domain, which never resolves (RFC 6761).
fn is_placeholder_host(text: &str) -> bool {
    url::Url::parse(text)
        .ok()
        .and_then(|url| url.host_str().map(str::to_ascii_lowercase))
        .is_some_and(|host| host == "invalid" || host.ends_with(".invalid"))
}

fn is_http_url(text: &str) -> bool {
    match url::Url::parse(text) {
        Ok(url) => matches!(url.scheme(), "http" | "https") && url.host_str().is_some(),
        Err(_) => false,
    }
}

pub(super) fn resolve(path: &Path, base_dir: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}
