//! The whole product on real parts. Three etcd members, three coordinators and the EC2 API on moto run, and
//! the real `clearml` SDK enqueues tasks into the ClearML API emulator. For every instance moto reports, a
//! `fleet-node-agent` boots from the user-data the coordinator wrote and runs the real clearml-agent. The
//! tasks run, the leader is SIGKILLed midway, and the idle machines shut themselves down through the shutdown
//! action, which terminates the instance in moto as EC2's shutdown behaviour `terminate` does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_node_agent::config::Config as AgentConfig;
use fleet_tests::cluster::{ClusterOptions, CoordinatorCluster, QUEUE};
use fleet_tests::emulator::EmulatorConfig;
use fleet_tests::harness::{ChildProcess, TestDir, venv_bin, wait_until};
use fleet_tests::node::FakeImds;
use serde_json::json;
use tokio::sync::mpsc;

const BINARY: &str = env!("CARGO_BIN_EXE_fleet-coordinator");
/// File the coordinator's init script writes into clearml-agent's home, and the value it writes.
const INIT_SCRIPT_OUTPUT: &str = "init-script-ran";
const TASK_ENV_VALUE: &str = "task-env-reached-the-node";
const TASKS: usize = 4;
/// The line `tests/python/hello_task.py` prints once per run.
const TASK_MARKER: &str = "fleet-conformance-task-ran";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python")
}

/// A booted instance: its fake metadata service and the node agent running in this process.
struct Node {
    _imds: FakeImds,
    task: tokio::task::JoinHandle<()>,
    _sigterm: mpsc::Sender<()>,
}

/// Extracts the agent config and the bootstrap token from the user data, as cloud-init would.
fn read_user_data(user_data: &str) -> (String, String) {
    let token = user_data
        .lines()
        .find_map(|line| {
            line.strip_prefix("printf '%s' '")
                .and_then(|rest| rest.split('\'').next())
        })
        .expect("the user data writes the bootstrap token")
        .to_owned();
    let start = user_data
        .find("<<'EOF'\n")
        .expect("the user data writes agent.toml")
        + "<<'EOF'\n".len();
    let end = start + user_data[start..].find("\nEOF").expect("the heredoc ends");
    (user_data[start..end].to_owned(), token)
}

/// Renders the agent config as the image would hold it: the coordinator part from the user data, the rest
/// (metadata service, state directory, shutdown action, clearml-agent) from the machine.
fn agent_config(
    coordinator_part: &str,
    token_file: &Path,
    imds: &str,
    state_dir: &Path,
    shutdown_marker: &Path,
) -> String {
    let coordinator_part = coordinator_part.replace(
        "bootstrap_token_file = \"/run/clearml-fleet/bootstrap-token\"",
        &format!(
            "bootstrap_token_file = {}\nallow_plaintext_loopback = true\nregistration_timeout_seconds = 60\nrequest_timeout_seconds = 3",
            json!(token_file.display().to_string())
        ),
    );
    format!(
        r#"{coordinator_part}

[imds]
endpoint = "{imds}"
notice_poll_interval_ms = 500

[agent]
state_dir = {state_dir}
gate_listen = "127.0.0.1:0"
grpc_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
shutdown_command = ["sh", "-c", {shutdown}]
check_interval_ms = 200

[clearml_agent]
program = {program}
restart_backoff_initial_ms = 500
restart_backoff_max_ms = 2000
stop_timeout_seconds = 5

[clearml_agent.env]
CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL = "1"
CLEARML_AGENT_SKIP_PIP_VENV_INSTALL = {python}
CLEARML_AGENT_QUEUE_POLL_FREQ_SEC = "0.5"
"#,
        state_dir = json!(state_dir.display().to_string()),
        shutdown = json!(format!("echo shutdown >> '{}'", shutdown_marker.display())),
        program = json!(venv_bin("clearml-agent").display().to_string()),
        python = json!(venv_bin("python").display().to_string()),
    )
}

/// Writes a clearml.conf for the SDK that points at the emulator.
fn sdk_config(dir: &TestDir, url: &str) -> PathBuf {
    let keys = EmulatorConfig::default();
    let text = format!(
        "api {{\n  api_server: \"{url}\"\n  web_server: \"{url}\"\n  files_server: \"{url}\"\n  credentials {{\n    access_key: \"{}\"\n    secret_key: \"{}\"\n  }}\n}}\n",
        keys.access_key, keys.secret_key
    );
    let path = dir.join("sdk-clearml.conf");
    std::fs::write(&path, text).unwrap();
    path
}

/// Creates and enqueues one task with the real clearml SDK; returns its id.
async fn enqueue_with_sdk(dir: &TestDir, conf: &Path, name: &str) -> String {
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut command = Command::new(venv_bin("python"));
    command
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/local/bin:/usr/bin:/bin", venv_bin("").display()),
        )
        .env("HOME", dir.path())
        .env("TMPDIR", &tmp)
        .env("LANG", "C.UTF-8")
        .env("CLEARML_CONFIG_FILE", conf)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .current_dir(dir.path())
        .arg(python_dir().join("enqueue_task.py"))
        .args(["--project", "fleet-e2e", "--name", name, "--queue", QUEUE])
        .arg("--script")
        .arg(python_dir().join("hello_task.py"));
    let mut sdk = ChildProcess::spawn(&format!("sdk-{name}"), command, dir.path()).unwrap();
    let exited = wait_until(
        Duration::from_secs(90),
        "the clearml SDK enqueues a task",
        || sdk.exit_status().is_some(),
    )
    .await;
    assert!(exited.is_ok(), "{}", sdk.log_tail(30));
    assert!(sdk.exit_status().unwrap().success(), "{}", sdk.log_tail(30));
    let stdout = std::fs::read_to_string(dir.join(format!("sdk-{name}.stdout.log"))).unwrap();
    stdout.lines().last().unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_runs_tasks_once_and_scales_to_zero() {
    let started = Instant::now();
    let options = ClusterOptions {
        max_idle_seconds: 10,
        heartbeat_timeout_seconds: 10,
        orphan_grace_seconds: 60,
        max_instances: 4,
        // The [agent] table travels through the registration: the init script writes the task variable,
        // whose value the coordinator read from its own environment.
        extra_toml: format!(
            "[agent]\ninit_script = '''\nprintf '%s' \"$FLEET_E2E_MARK\" > {INIT_SCRIPT_OUTPUT}\n'''\n\
             task_env = {{ FLEET_E2E_MARK = \"FLEET_E2E_TASK_MARK\" }}\n"
        ),
        env: BTreeMap::from([("FLEET_E2E_TASK_MARK".to_owned(), TASK_ENV_VALUE.to_owned())]),
        ..ClusterOptions::default()
    };
    let mut cluster = CoordinatorCluster::start("e2e", BINARY, options)
        .await
        .unwrap();
    let first_leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .unwrap();
    let dir = TestDir::new("e2e-nodes").unwrap();
    let conf = sdk_config(&dir, &cluster.emulator.url());

    let mut tasks = Vec::new();
    for index in 0..TASKS {
        tasks.push(enqueue_with_sdk(&dir, &conf, &format!("e2e-task-{index}")).await);
    }

    // Boot a node agent for every instance moto reports, from its user data; a shutdown marker terminates
    // the instance in moto.
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let shutdowns: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let mut launched: BTreeSet<String> = BTreeSet::new();
    // When the harness first and last saw each instance live in moto, for the instance-seconds.
    let mut lifetimes: BTreeMap<String, (Instant, Option<Instant>)> = BTreeMap::new();
    // Wall-clock milliseconds of the kill, comparable with the replicas' `first_decision_ms`.
    let mut killed_leader_at: Option<u64> = None;
    let mut failover = None;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        assert!(
            Instant::now() < deadline,
            "the fleet did not finish in time: tasks {:?}\n{}",
            tasks
                .iter()
                .map(|id| cluster.emulator.task(id).map(|task| task.status))
                .collect::<Vec<_>>(),
            cluster.logs(40)
        );
        let live = cluster.live_instances().await.unwrap();
        for (id, (_, ended)) in lifetimes.iter_mut() {
            if ended.is_none() && !live.contains_key(id) {
                *ended = Some(Instant::now());
            }
        }
        for id in live.keys() {
            if !launched.insert(id.clone()) {
                continue;
            }
            lifetimes.insert(id.clone(), (Instant::now(), None));
            let user_data = cluster.user_data(id).await.unwrap();
            let (coordinator_part, token) = read_user_data(&user_data);
            let node_dir = dir.join(id);
            std::fs::create_dir_all(&node_dir).unwrap();
            let token_file = node_dir.join("bootstrap-token");
            std::fs::write(&token_file, &token).unwrap();
            let marker = node_dir.join("shutdown-marker");
            let imds = FakeImds::start(id).await;
            let text = agent_config(
                &coordinator_part,
                &token_file,
                &imds.url(),
                &node_dir.join("state"),
                &marker,
            );
            let config = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap();
            let (sigterm, receiver) = mpsc::channel(1);
            let instance = id.clone();
            let ec2 = cluster.ec2.direct.clone();
            let shutdowns = shutdowns.clone();
            let task = tokio::spawn(async move {
                let exit = fleet_node_agent::run::run(config, receiver).await;
                tracing::info!(instance = %instance, ?exit, "node agent ended");
                if marker.exists() {
                    // The shutdown action ran: the machine powers off and EC2 terminates it.
                    ec2.terminate_instances()
                        .instance_ids(&instance)
                        .send()
                        .await
                        .unwrap();
                    shutdowns.lock().unwrap().insert(instance);
                }
            });
            nodes.insert(
                id.clone(),
                Node {
                    _imds: imds,
                    task,
                    _sigterm: sigterm,
                },
            );
        }

        let completed = tasks
            .iter()
            .filter(|id| {
                cluster
                    .emulator
                    .task(id)
                    .is_some_and(|task| task.status == "completed")
            })
            .count();
        // SIGKILL the leader once the first task has completed, while the others still run or wait.
        if killed_leader_at.is_none() && completed >= 1 {
            let leader = cluster.leader().await.unwrap_or(first_leader);
            cluster.kill(leader);
            killed_leader_at = Some(now_ms());
            println!(
                "leader {} killed after {completed} completed task(s)",
                cluster.replicas[leader].id
            );
        }
        if let (Some(killed_ms), None) = (killed_leader_at, failover)
            && let Some(index) = cluster.leader().await
            && let Some(status) = cluster.status(index).await
            && status.first_decision_ms > 0
        {
            failover = Some(Duration::from_millis(
                status.first_decision_ms.saturating_sub(killed_ms),
            ));
        }
        if completed == TASKS && live.is_empty() && failover.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every task ran exactly once and completed.
    for id in &tasks {
        let task = cluster.emulator.task(id).unwrap();
        assert_eq!(task.status, "completed", "task {id}");
        let runs = cluster
            .emulator
            .task_log(id)
            .iter()
            .filter(|line| line.contains(TASK_MARKER))
            .count();
        assert_eq!(runs, 1, "task {id} ran {runs} times");
    }
    // Every node agent ran the coordinator's init script with the coordinator's task variable.
    for id in &launched {
        let output = dir.join(id).join("state/home").join(INIT_SCRIPT_OUTPUT);
        let written = std::fs::read_to_string(&output)
            .unwrap_or_else(|err| panic!("{}: {err}", output.display()));
        assert_eq!(written, TASK_ENV_VALUE, "instance {id}");
    }
    // No instance left running, and no launch beyond one instance per task.
    assert!(cluster.live_instances().await.unwrap().is_empty());
    assert!(
        launched.len() <= TASKS,
        "{} instances launched for {TASKS} tasks: {launched:?}",
        launched.len()
    );
    let shut_down = shutdowns.lock().unwrap().len();
    for (_, node) in nodes {
        let _ = tokio::time::timeout(Duration::from_secs(10), node.task).await;
    }
    let instance_seconds: f64 = lifetimes
        .values()
        .map(|(booted, ended)| {
            ended
                .unwrap_or_else(Instant::now)
                .duration_since(*booted)
                .as_secs_f64()
        })
        .sum();
    println!(
        "summary: tasks {TASKS} completed once each, instances launched {}, shut down by their agent \
         {shut_down}, instance-seconds {instance_seconds:.0}, failover {:.2} s, wall {:.1} s",
        launched.len(),
        failover.unwrap().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
