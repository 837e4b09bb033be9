//! A coordinator cluster for tests: a three-member etcd, the ClearML API emulator, moto behind the fault
//! proxy, and `fleet-coordinator run` replicas as child processes, all on loopback with free ports.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use clearml_api::{Client, ClientConfig};
use fleet_proto::v1::fleet_service_client::FleetServiceClient;
use serde::Deserialize;
use tonic::transport::Channel;

use crate::ec2::{CLUSTER, Ec2TestBed, IMAGE_ID};
use crate::emulator::{Emulator, EmulatorConfig};
use crate::etcd::EtcdCluster;
use crate::harness::{ChildProcess, PartitionProxy, TestDir, free_port, wait_until_async};

/// Queue every test cluster serves.
pub const QUEUE: &str = "cpu";
/// Resource of the queue, launched in moto.
pub const RESOURCE: &str = "cpu";
pub const OPERATOR_TOKEN: &str = "operator-token-for-tests";
pub const VIEWER_TOKEN: &str = "viewer-token-for-tests";
pub const BOOTSTRAP_KEY: &str = "bootstrap-key-for-tests-0123456789abcdef";

/// The user-data template of the test resource: what a node agent's cloud-init needs.
pub const USER_DATA_TEMPLATE: &str = r#"#!/bin/sh
# clearml-fleet node agent bootstrap
install -d -m 0700 /run/clearml-fleet
printf '%s' '{{bootstrap_token}}' > /run/clearml-fleet/bootstrap-token
cat > /etc/clearml-fleet/agent.toml <<'EOF'
[coordinator]
endpoints = {{coordinator_endpoints_toml}}
bootstrap_token_file = "/run/clearml-fleet/bootstrap-token"
EOF
# cluster={{cluster}} queue={{queue}} resource={{resource}} intent={{intent_id}}
systemctl start clearml-fleet-agent
"#;

/// Knobs of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub replicas: usize,
    pub lease_ttl_seconds: u64,
    pub poll_interval_seconds: u64,
    pub reconcile_interval_seconds: u64,
    pub orphan_grace_seconds: u64,
    pub max_instances: u32,
    pub max_launches_per_tick: u32,
    pub max_idle_seconds: u64,
    pub heartbeat_timeout_seconds: u64,
    /// `RUST_LOG` of the replicas.
    pub log_filter: String,
    /// TOML appended to every replica's configuration, for tables the harness does not write.
    pub extra_toml: String,
    /// Extra environment variables of the replicas, for the secrets `extra_toml` names.
    pub env: BTreeMap<String, String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            replicas: 3,
            lease_ttl_seconds: 5,
            poll_interval_seconds: 1,
            reconcile_interval_seconds: 2,
            orphan_grace_seconds: 10,
            max_instances: 20,
            max_launches_per_tick: 20,
            max_idle_seconds: 60,
            heartbeat_timeout_seconds: 120,
            log_filter: "info,fleet_coordinator=debug".to_owned(),
            extra_toml: String::new(),
            env: BTreeMap::new(),
        }
    }
}

/// The `/status` document of a replica.
#[derive(Debug, Clone, Deserialize)]
pub struct ReplicaStatus {
    pub replica_id: String,
    pub role: String,
    pub term: i64,
    pub leader_id: Option<String>,
    pub leader_address: Option<String>,
    pub leader_since_ms: u64,
    pub first_decision_ms: u64,
}

pub struct Replica {
    pub id: String,
    /// The replica reaches each etcd member through its own proxy, so a test can cut one replica off.
    pub etcd_links: Vec<PartitionProxy>,
    pub grpc: u16,
    pub http: u16,
    pub config: PathBuf,
    pub process: Option<ChildProcess>,
}

pub struct CoordinatorCluster {
    pub dir: TestDir,
    pub etcd: EtcdCluster,
    pub emulator: Emulator,
    pub ec2: Ec2TestBed,
    pub replicas: Vec<Replica>,
    pub clearml: Client,
    pub queue_id: String,
    /// Directory of the test-only failpoints (see `fleet_coordinator::failpoint`).
    pub failpoints: PathBuf,
    /// The `fleet-coordinator` binary the replicas run.
    binary: PathBuf,
    /// Extra environment variables of the replicas.
    env: BTreeMap<String, String>,
    http: reqwest::Client,
}

impl CoordinatorCluster {
    /// Starts everything; `binary` is the `fleet-coordinator` executable (`env!("CARGO_BIN_EXE_fleet-coordinator")`
    /// in the coordinator's tests).
    pub async fn start(
        test: &str,
        binary: impl Into<PathBuf>,
        options: ClusterOptions,
    ) -> anyhow::Result<CoordinatorCluster> {
        crate::node::init_test_logging();
        let dir = TestDir::new(test)?;
        let etcd = EtcdCluster::start(&format!("{test}-etcd"), 3).await?;
        let emulator = Emulator::start("127.0.0.1:0".parse()?, EmulatorConfig::default()).await?;
        let queue_id = emulator.create_queue(QUEUE);
        let ec2 = Ec2TestBed::start(&format!("{test}-ec2"), 2).await?;
        let defaults = EmulatorConfig::default();
        let clearml = Client::new(ClientConfig::new(
            &emulator.url(),
            defaults.access_key.clone(),
            defaults.secret_key.clone(),
        )?)?;
        let failpoints = dir.join("failpoints");
        std::fs::create_dir_all(&failpoints)?;
        std::fs::write(dir.join("user-data.tmpl"), USER_DATA_TEMPLATE)?;

        let ports: Vec<(u16, u16)> = (0..options.replicas)
            .map(|_| (free_port(), free_port()))
            .collect();
        let agent_endpoints: Vec<String> = ports
            .iter()
            .map(|(grpc, _)| format!("\"http://127.0.0.1:{grpc}\""))
            .collect();
        let mut replicas = Vec::new();
        for (index, (grpc, http)) in ports.iter().enumerate() {
            let id = format!("coordinator-{index}");
            let mut etcd_links = Vec::new();
            for endpoint in etcd.endpoints() {
                let member: std::net::SocketAddr =
                    endpoint.trim_start_matches("http://").parse()?;
                etcd_links.push(PartitionProxy::start(member).await?);
            }
            let linked: Vec<String> = etcd_links
                .iter()
                .map(|link| format!("http://{}", link.addr()))
                .collect();
            let text = config_text(
                &id,
                *grpc,
                *http,
                &agent_endpoints,
                &linked,
                &emulator.url(),
                &ec2,
                &dir,
                &options,
            );
            let config = dir.join(format!("{id}.toml"));
            std::fs::write(&config, text)?;
            replicas.push(Replica {
                id,
                etcd_links,
                grpc: *grpc,
                http: *http,
                config,
                process: None,
            });
        }
        let mut cluster = CoordinatorCluster {
            dir,
            etcd,
            emulator,
            ec2,
            replicas,
            clearml,
            queue_id,
            failpoints,
            binary: binary.into(),
            env: options.env.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
        };
        for index in 0..options.replicas {
            cluster.spawn(index, &options.log_filter)?;
        }
        for index in 0..options.replicas {
            cluster
                .wait_for_http(index, Duration::from_secs(30))
                .await?;
        }
        Ok(cluster)
    }

    /// Waits until replica `index` responds to `/healthz`, so tests that ask a follower for its status do not
    /// race the replica's start-up.
    pub async fn wait_for_http(&self, index: usize, timeout: Duration) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/healthz", self.replicas[index].http);
        let result = wait_until_async(
            timeout,
            &format!("replica {index} to answer /healthz"),
            || async {
                self.http
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|response| response.status().is_success())
            },
        )
        .await;
        if let Err(err) = result {
            anyhow::bail!("{err}\n{}", self.logs(30));
        }
        Ok(())
    }

    /// Starts replica `index` (again).
    pub fn spawn(&mut self, index: usize, log_filter: &str) -> anyhow::Result<()> {
        let binary = self.binary.clone();
        let replica = &mut self.replicas[index];
        let mut command = Command::new(&binary);
        let defaults = EmulatorConfig::default();
        command
            .arg("run")
            .arg("--config")
            .arg(&replica.config)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", log_filter)
            .env("CLEARML_API_ACCESS_KEY", &defaults.access_key)
            .env("CLEARML_API_SECRET_KEY", &defaults.secret_key)
            .env("FLEET_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("FLEET_VIEWER_TOKEN", VIEWER_TOKEN)
            .env("FLEET_BOOTSTRAP_KEY", BOOTSTRAP_KEY)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("FLEET_FAILPOINT_DIR", &self.failpoints)
            .envs(&self.env);
        let process = ChildProcess::spawn(&replica.id, command, self.dir.path())?;
        replica.process = Some(process);
        Ok(())
    }

    /// Cuts replica `index` off from every etcd member (`true`) or reconnects it (`false`).
    pub fn cut_from_etcd(&self, index: usize, cut: bool) {
        for link in &self.replicas[index].etcd_links {
            link.set_cut(cut);
        }
    }

    /// SIGKILLs replica `index`, as a crash would end it.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut process) = self.replicas[index].process.take() {
            process.kill();
        }
    }

    /// Sends SIGSTOP or SIGCONT to replica `index`.
    pub fn signal(&self, index: usize, signal: libc::c_int) {
        if let Some(process) = &self.replicas[index].process {
            // SAFETY: kill(2) with a pid this test started.
            unsafe {
                libc::kill(process.pid() as libc::pid_t, signal);
            }
        }
    }

    pub fn is_running(&mut self, index: usize) -> bool {
        self.replicas[index]
            .process
            .as_mut()
            .is_some_and(|process| process.exit_status().is_none())
    }

    pub fn log_tail(&self, index: usize, lines: usize) -> String {
        self.replicas[index]
            .process
            .as_ref()
            .map(|process| process.log_tail(lines))
            .unwrap_or_default()
    }

    /// Returns every replica's log tail, for assertion messages.
    pub fn logs(&self, lines: usize) -> String {
        (0..self.replicas.len())
            .map(|index| {
                format!(
                    "--- {} ---\n{}",
                    self.replicas[index].id,
                    self.log_tail(index, lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn status(&self, index: usize) -> Option<ReplicaStatus> {
        let url = format!("http://127.0.0.1:{}/status", self.replicas[index].http);
        self.http.get(url).send().await.ok()?.json().await.ok()
    }

    /// Returns the running replica that reports itself leader.
    pub async fn leader(&mut self) -> Option<usize> {
        for index in 0..self.replicas.len() {
            if !self.is_running(index) {
                continue;
            }
            if let Some(status) = self.status(index).await
                && status.role == "leader"
            {
                return Some(index);
            }
        }
        None
    }

    pub async fn wait_for_leader(&mut self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(index) = self.leader().await {
                return Ok(index);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("no leader within {timeout:?}\n{}", self.logs(30));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates `count` tasks and enqueues them in the test queue through the ClearML API.
    pub async fn enqueue_tasks(&self, count: usize) -> anyhow::Result<Vec<String>> {
        Ok(self
            .emulator
            .enqueue_new_tasks(&self.clearml, &self.queue_id, count)
            .await?)
    }

    /// Instances of this cluster that moto reports in a state other than terminated, by id, with their
    /// tags.
    pub async fn live_instances(
        &self,
    ) -> anyhow::Result<BTreeMap<String, BTreeMap<String, String>>> {
        let mut live = BTreeMap::new();
        let mut pages = self
            .ec2
            .direct
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:fleet:cluster")
                    .values(CLUSTER)
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            for reservation in page?.reservations() {
                for instance in reservation.instances() {
                    let state = instance
                        .state()
                        .and_then(|state| state.name())
                        .map(|name| name.as_str().to_owned())
                        .unwrap_or_default();
                    if state == "terminated" || state == "shutting-down" {
                        continue;
                    }
                    let tags = instance
                        .tags()
                        .iter()
                        .filter_map(|tag| Some((tag.key()?.to_owned(), tag.value()?.to_owned())))
                        .collect();
                    live.insert(instance.instance_id().unwrap_or_default().to_owned(), tags);
                }
            }
        }
        Ok(live)
    }

    /// Returns the user data an instance was launched with, decoded, as cloud-init on it would read it.
    pub async fn user_data(&self, instance_id: &str) -> anyhow::Result<String> {
        use base64::Engine;
        let attribute = self
            .ec2
            .direct
            .describe_instance_attribute()
            .instance_id(instance_id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await?;
        let encoded = attribute
            .user_data()
            .and_then(|value| value.value())
            .ok_or_else(|| anyhow::anyhow!("instance {instance_id} has no user data"))?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded)?;
        Ok(String::from_utf8(bytes)?)
    }

    /// Waits until moto reports `count` live instances of this cluster.
    pub async fn wait_for_instances(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let result = wait_until_async(
            timeout,
            &format!("{count} live instances in moto"),
            || async {
                self.live_instances()
                    .await
                    .is_ok_and(|live| live.len() == count)
            },
        )
        .await;
        if result.is_err() {
            let live = self
                .live_instances()
                .await
                .map(|live| live.len())
                .unwrap_or(0);
            anyhow::bail!(
                "expected {count} live instances, moto has {live}\n{}",
                self.logs(40)
            );
        }
        Ok(())
    }

    /// Arms a failpoint: the next replica that reaches it aborts.
    pub fn arm_failpoint(&self, name: &str) -> anyhow::Result<()> {
        std::fs::write(self.failpoints.join(name), b"")?;
        Ok(())
    }

    pub fn failpoint_armed(&self, name: &str) -> bool {
        self.failpoints.join(name).exists()
    }

    /// Connects a FleetService client to replica `index`.
    pub async fn fleet_client(&self, index: usize) -> anyhow::Result<FleetServiceClient<Channel>> {
        let channel =
            Channel::from_shared(format!("http://127.0.0.1:{}", self.replicas[index].grpc))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5))
                .connect()
                .await?;
        Ok(FleetServiceClient::new(channel))
    }

    /// Returns the event log of replica `index` as (kind, message) pairs, oldest first.
    pub async fn events(&self, index: usize) -> anyhow::Result<Vec<(String, String)>> {
        let mut request = tonic::Request::new(fleet_proto::v1::WatchEventsRequest {
            after_sequence: 0,
            follow: false,
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {VIEWER_TOKEN}").parse()?);
        let mut stream = self
            .fleet_client(index)
            .await?
            .watch_events(request)
            .await?
            .into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.message().await? {
            events.push((event.kind, event.message));
        }
        Ok(events)
    }
}

#[allow(clippy::too_many_arguments)]
fn config_text(
    id: &str,
    grpc: u16,
    http: u16,
    agent_endpoints: &[String],
    etcd: &[String],
    clearml: &str,
    ec2: &Ec2TestBed,
    dir: &TestDir,
    options: &ClusterOptions,
) -> String {
    let quoted = |items: &[String]| {
        items
            .iter()
            .map(|item| format!("\"{item}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let subnets = ec2
        .subnets
        .iter()
        .map(|subnet| format!("{{ id = \"{}\", zone = \"{}\" }}", subnet.id, subnet.zone))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"[cluster]
name = "{CLUSTER}"
replica_id = "{id}"
advertise_address = "127.0.0.1:{grpc}"

[etcd]
endpoints = [{etcd}]
prefix = "fleet-test"
lease_ttl_seconds = {ttl}
request_timeout_ms = 1000

[clearml]
api_server = "{clearml}"
poll_interval_seconds = {poll}

[defaults]
max_idle_seconds = {max_idle}
heartbeat_timeout_seconds = {heartbeat_timeout}
launch_timeout_seconds = 60
reconcile_interval_seconds = {reconcile}
orphan_grace_seconds = {grace}
max_launches_per_tick = {per_tick}

[budget]
max_instances = {max}

[api]
grpc_listen = "127.0.0.1:{grpc}"
http_listen = "127.0.0.1:{http}"
bootstrap_key_env = "FLEET_BOOTSTRAP_KEY"
agent_endpoints = [{agents}]

[[api.tokens]]
name = "ops"
role = "operator"
token_env = "FLEET_OPERATOR_TOKEN"

[[api.tokens]]
name = "dashboard"
role = "viewer"
token_env = "FLEET_VIEWER_TOKEN"

[aws]
region = "us-east-1"
endpoint_url = "{ec2}"
access_key_id_env = "AWS_ACCESS_KEY_ID"
secret_access_key_env = "AWS_SECRET_ACCESS_KEY"

[resources.{RESOURCE}]
provider = "aws"
max_instances = {max}
image_id = "{IMAGE_ID}"
instance_types = ["m5.large", "c5.large"]
subnets = [{subnets}]
user_data_template_file = "{template}"
hourly_price_usd = {{ "m5.large" = 0.096, "c5.large" = 0.085 }}

[[queues]]
name = "{QUEUE}"
resources = ["{RESOURCE}"]
max_instances = {max}

{extra}
"#,
        etcd = quoted(etcd),
        ttl = options.lease_ttl_seconds,
        poll = options.poll_interval_seconds,
        reconcile = options.reconcile_interval_seconds,
        grace = options.orphan_grace_seconds,
        per_tick = options.max_launches_per_tick,
        max_idle = options.max_idle_seconds,
        heartbeat_timeout = options.heartbeat_timeout_seconds,
        max = options.max_instances,
        agents = agent_endpoints.join(", "),
        ec2 = ec2.proxy.endpoint(),
        template = dir.join("user-data.tmpl").display(),
        extra = options.extra_toml,
    )
}
