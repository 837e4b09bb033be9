//! A standalone coordinator for tests that run `fleetctl` against it: a ClearML API emulator with the queue
//! `default`, local-process instances, a viewer and an operator token. Adapted from `standalone.rs`.

use std::process::Command;
use std::time::Duration;

use fleet_tests::emulator::{Emulator, EmulatorConfig};
use fleet_tests::harness::{ChildProcess, LocalInstances, TestDir, free_port, wait_until_async};

pub const COORDINATOR: &str = env!("CARGO_BIN_EXE_fleet-coordinator");
pub const FLEETCTL: &str = env!("CARGO_BIN_EXE_fleetctl");
pub const VIEWER_TOKEN: &str = "fleetctl-test-viewer-token";
pub const OPERATOR_TOKEN: &str = "fleetctl-test-operator-token";

/// Time limit of one `fleetctl` run, after which the test kills it.
const FLEETCTL_LIMIT: Duration = Duration::from_secs(30);

/// Fields drop in declaration order: the reaper must run before the test directory is deleted.
pub struct Standalone {
    _reaper: LocalInstances,
    pub dir: TestDir,
    pub grpc: u16,
    http: u16,
    emulator: Emulator,
    queue_id: String,
    process: ChildProcess,
}

impl Standalone {
    /// Starts the emulator and the coordinator and waits until the coordinator is ready.
    pub async fn start(test: &str) -> Standalone {
        fleet_tests::node::init_test_logging();
        let dir = TestDir::new(test).unwrap();
        let reaper = LocalInstances::new(dir.join("instances"));
        let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
            .await
            .unwrap();
        let queue_id = emulator.create_queue("default");
        let (grpc, http) = (free_port(), free_port());
        let instances = dir.join("instances");
        let text = format!(
            r#"[cluster]
name = "fleetctl-test"

[clearml]
api_server = "{clearml}"
poll_interval_seconds = 1

[defaults]
reconcile_interval_seconds = 1
orphan_grace_seconds = 5

[budget]
max_instances = 10
hourly_usd = 5.0

[api]
grpc_listen = "127.0.0.1:{grpc}"
http_listen = "127.0.0.1:{http}"

[[api.tokens]]
name = "viewer"
role = "viewer"
token_env = "FLEET_VIEWER_TOKEN"

[[api.tokens]]
name = "operator"
role = "operator"
token_env = "FLEET_OPERATOR_TOKEN"

[local]
base_dir = "{instances}"
program = "/bin/sh"
args = ["-c", "exec sleep 600", "{{dir}}"]

[resources.box]
provider = "local"
max_instances = 10
hourly_price_usd = {{ local = 0.25 }}

[[queues]]
name = "default"
resources = ["box"]
max_instances = 10
"#,
            clearml = emulator.url(),
            instances = instances.display(),
        );
        let config = dir.join("coordinator.toml");
        std::fs::write(&config, text).unwrap();

        let defaults = EmulatorConfig::default();
        let mut command = Command::new(COORDINATOR);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--standalone")
            .arg("--state-file")
            .arg(dir.join("state.json"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,fleet_coordinator=debug")
            .env("CLEARML_API_ACCESS_KEY", &defaults.access_key)
            .env("CLEARML_API_SECRET_KEY", &defaults.secret_key)
            .env("FLEET_VIEWER_TOKEN", VIEWER_TOKEN)
            .env("FLEET_OPERATOR_TOKEN", OPERATOR_TOKEN);
        let process = ChildProcess::spawn("coordinator", command, dir.path()).unwrap();
        let standalone = Standalone {
            _reaper: reaper,
            dir,
            grpc,
            http,
            emulator,
            queue_id,
            process,
        };
        standalone.wait_ready().await;
        standalone
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    pub fn log(&self) -> String {
        self.process.log_tail(40)
    }

    async fn wait_ready(&self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.http);
        let ready = wait_until_async(
            Duration::from_secs(20),
            "the coordinator is ready",
            || async {
                reqwest::get(&url)
                    .await
                    .is_ok_and(|response| response.status().as_u16() == 200)
            },
        )
        .await;
        assert!(ready.is_ok(), "not ready\n{}", self.log());
    }

    /// Creates `count` tasks and enqueues them on the queue `default`.
    pub async fn enqueue(&self, count: usize) {
        let client = self.emulator.client().unwrap();
        self.emulator
            .enqueue_new_tasks(&client, &self.queue_id, count)
            .await
            .unwrap();
    }

    /// Runs `fleetctl --endpoint <this coordinator> ARGS` with `token` in FLEET_TOKEN.
    pub async fn fleetctl(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut full = vec!["--endpoint".to_owned(), self.endpoint()];
        full.extend(args.iter().map(|arg| arg.to_string()));
        run_fleetctl(token, &full).await
    }

    /// Waits until `fleetctl instances -o json` lists `count` instances that all have a cloud id, and
    /// returns their ids.
    pub async fn wait_for_instances(&self, count: usize) -> Vec<String> {
        let last_listed = std::sync::Mutex::new(Vec::new());
        let listed = wait_until_async(
            Duration::from_secs(30),
            "fleetctl lists the launched instances",
            || async {
                let output = self
                    .fleetctl(Some(VIEWER_TOKEN), &["instances", "-o", "json"])
                    .await;
                let Ok(json) = serde_json::from_str::<serde_json::Value>(&output.stdout) else {
                    return false;
                };
                let found: Vec<String> = json["instances"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|instance| instance["instance_id"].as_str())
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned)
                    .collect();
                let complete = found.len() == count;
                *last_listed.lock().unwrap() = found;
                complete
            },
        )
        .await;
        let mut ids = last_listed.into_inner().unwrap();
        assert!(listed.is_ok(), "found {ids:?}\n{}", self.log());
        ids.sort();
        ids
    }
}

/// The result of one `fleetctl` run.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `fleetctl ARGS` with a clean environment and `token` in FLEET_TOKEN.
pub async fn run_fleetctl(token: Option<&str>, args: &[String]) -> Output {
    let mut command = tokio::process::Command::new(FLEETCTL);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .kill_on_drop(true);
    if let Some(token) = token {
        command.env("FLEET_TOKEN", token);
    }
    let output = tokio::time::timeout(FLEETCTL_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("fleetctl {args:?} ran longer than {FLEETCTL_LIMIT:?}"))
        .expect("fleetctl starts");
    Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
