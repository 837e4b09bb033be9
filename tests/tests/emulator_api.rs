//! The ClearML API emulator over HTTP: the server's envelope and error responses, authentication, FIFO queues
//! with an atomic `queues.get_next_task`, worker expiry on tokio's clock, the task status machine and injected
//! faults.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fleet_tests::emulator::{Emulator, EmulatorConfig, Fault};
use serde_json::{Value, json};

const ACCESS_KEY: &str = "emulator-test-access";
const SECRET_KEY: &str = "emulator-test-secret";

async fn start_emulator() -> Emulator {
    let config = EmulatorConfig {
        access_key: ACCESS_KEY.to_owned(),
        secret_key: SECRET_KEY.to_owned(),
        ..EmulatorConfig::default()
    };
    Emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("emulator starts on a free loopback port")
}

/// A minimal API client: logs in once and posts JSON bodies with the bearer token.
struct Api {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Api {
    async fn login(emulator: &Emulator) -> Api {
        let http = reqwest::Client::new();
        let url = emulator.url();
        let response = http
            .post(format!("{url}/auth.login"))
            .basic_auth(ACCESS_KEY, Some(SECRET_KEY))
            .send()
            .await
            .expect("auth.login request is sent");
        assert_eq!(
            response.status(),
            200,
            "auth.login with the configured keys succeeds"
        );
        let body: Value = response.json().await.expect("auth.login returns JSON");
        let token = body["data"]["token"]
            .as_str()
            .expect("auth.login returns data.token")
            .to_owned();
        Api { http, url, token }
    }

    /// Calls an endpoint and returns the HTTP status and the whole envelope.
    async fn call(&self, endpoint: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/{endpoint}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("request to {endpoint} failed: {e}"));
        let status = response.status().as_u16();
        let envelope = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{endpoint} returned no JSON: {e}"));
        (status, envelope)
    }

    /// Calls an endpoint that must succeed and returns its `data`.
    async fn data(&self, endpoint: &str, body: Value) -> Value {
        let (status, envelope) = self.call(endpoint, body).await;
        assert_eq!(
            status, 200,
            "{endpoint} failed: {}",
            envelope["meta"]["result_msg"]
        );
        envelope["data"].clone()
    }
}

fn meta(envelope: &Value) -> (u64, u64, &str) {
    let meta = &envelope["meta"];
    (
        meta["result_code"].as_u64().unwrap(),
        meta["result_subcode"].as_u64().unwrap(),
        meta["result_msg"].as_str().unwrap(),
    )
}

#[tokio::test]
async fn login_rejects_wrong_secret() {
    let emulator = start_emulator().await;
    let response = reqwest::Client::new()
        .post(format!("{}/auth.login", emulator.url()))
        .basic_auth(ACCESS_KEY, Some("wrong-secret"))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 401);
    let envelope: Value = response.json().await.unwrap();
    assert_eq!(
        meta(&envelope),
        (
            401,
            22,
            "unauthorized (invalid credentials) (failed to locate provided credentials)"
        )
    );
    assert_eq!(envelope["meta"]["endpoint"]["name"], "auth.login");
    emulator.shutdown().await;
}

#[tokio::test]
async fn login_token_is_jwt_with_api_version() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;

    let parts: Vec<&str> = api.token.split('.').collect();
    assert_eq!(
        parts.len(),
        3,
        "the token is a JWT with header, claims and signature"
    );
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["api_version"], "2.34");
    assert_eq!(claims["feature_set"], "basic");
    assert!(claims["exp"].as_i64().unwrap() > chrono::Utc::now().timestamp());
    assert!(claims["identity"]["company"].is_string());
    emulator.shutdown().await;
}

#[tokio::test]
async fn calls_without_valid_token_rejected() {
    let emulator = start_emulator().await;
    let http = reqwest::Client::new();
    let url = format!("{}/queues.get_all", emulator.url());

    let missing: Value = http
        .post(&url)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        meta(&missing),
        (401, 20, "unauthorized (missing credentials)")
    );

    let forged: Value = http
        .post(&url)
        .bearer_auth("a.b.c")
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (code, subcode, msg) = meta(&forged);
    assert_eq!((code, subcode), (401, 30));
    assert!(
        msg.starts_with("invalid token (invalid jwt token)"),
        "unexpected message {msg:?}"
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn unknown_endpoint_returns_404_and_is_recorded() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;

    let (status, envelope) = api.call("v2.20/queues.no_such_call", json!({})).await;
    assert_eq!(status, 404);
    assert_eq!(
        meta(&envelope),
        (
            404,
            0,
            "Unable to find endpoint for name queues.no_such_call and version 2.20"
        )
    );
    assert_eq!(
        emulator.unknown_calls(),
        vec!["queues.no_such_call (version 2.20)".to_owned()]
    );

    // queues.get_num_entries exists from API 2.15 on, so an older version does not find it.
    let (status, _) = api.call("v2.9/queues.get_num_entries", json!({})).await;
    assert_eq!(status, 404);
    emulator.shutdown().await;
}

#[tokio::test]
async fn envelope_has_server_meta_fields() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;

    let (_, envelope) = api.call("v2.23/queues.get_all", json!({})).await;
    let meta = &envelope["meta"];
    for key in [
        "id",
        "trx",
        "result_code",
        "result_subcode",
        "result_msg",
        "error_stack",
        "error_data",
    ] {
        assert!(meta.get(key).is_some(), "meta.{key} is missing from {meta}");
    }
    assert_eq!(
        meta["endpoint"],
        json!({ "name": "queues.get_all", "requested_version": "2.23", "actual_version": "2.4" })
    );
    assert_eq!(meta["result_msg"], "OK");
    assert_eq!(envelope["data"], json!({ "queues": [] }));
    emulator.shutdown().await;
}

#[tokio::test]
async fn queue_hands_out_tasks_in_fifo_order() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;
    let queue = emulator.create_queue("fifo");
    let tasks: Vec<String> = (0..3)
        .map(|i| emulator.create_task(&format!("task-{i}"), Some("fifo-project")))
        .collect();
    for task in &tasks {
        api.data("tasks.enqueue", json!({ "task": task, "queue": queue }))
            .await;
    }
    assert_eq!(emulator.queue_entries("fifo"), tasks);
    assert_eq!(
        api.data("queues.get_num_entries", json!({ "queue": queue }))
            .await["num"],
        3
    );

    for expected in &tasks {
        let data = api
            .data("queues.get_next_task", json!({ "queue": queue }))
            .await;
        assert_eq!(data["entry"]["task"], json!(expected));
    }
    let empty = api
        .data("queues.get_next_task", json!({ "queue": queue }))
        .await;
    assert_eq!(empty, json!({}), "an empty queue returns empty data");
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_next_task_hands_each_task_out_once() {
    const TASKS: usize = 60;
    const PULLERS: usize = 8;
    let emulator = start_emulator().await;
    let api = Arc::new(Api::login(&emulator).await);
    let queue = emulator.create_queue("contended");
    for i in 0..TASKS {
        let task = emulator.create_task(&format!("task-{i}"), None);
        api.data("tasks.enqueue", json!({ "task": task, "queue": queue }))
            .await;
    }

    let mut pullers = Vec::new();
    for _ in 0..PULLERS {
        let api = api.clone();
        let queue = queue.clone();
        pullers.push(tokio::spawn(async move {
            let mut pulled = Vec::new();
            loop {
                let data = api
                    .data("queues.get_next_task", json!({ "queue": queue }))
                    .await;
                match data["entry"]["task"].as_str() {
                    Some(task) => pulled.push(task.to_owned()),
                    None => return pulled,
                }
            }
        }));
    }
    let mut all = Vec::new();
    for puller in pullers {
        all.extend(puller.await.unwrap());
    }

    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), TASKS, "every task is handed out");
    assert_eq!(unique.len(), TASKS, "no task is handed out twice");
    assert!(emulator.queue_entries(&queue).is_empty());
    emulator.shutdown().await;
}

#[tokio::test]
async fn move_task_to_front_and_back() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;
    let queue = emulator.create_queue("reorder");
    let tasks: Vec<String> = (0..3)
        .map(|i| emulator.create_task(&format!("task-{i}"), None))
        .collect();
    for task in &tasks {
        api.data("queues.add_task", json!({ "task": task, "queue": queue }))
            .await;
    }

    let data = api
        .data(
            "queues.move_task_to_front",
            json!({ "task": tasks[2], "queue": queue }),
        )
        .await;
    assert_eq!(data["position"], 0);
    assert_eq!(
        emulator.queue_entries(&queue),
        vec![tasks[2].clone(), tasks[0].clone(), tasks[1].clone()]
    );

    let data = api
        .data(
            "queues.move_task_to_back",
            json!({ "task": tasks[2], "queue": queue }),
        )
        .await;
    assert_eq!(data["position"], 2);
    assert_eq!(emulator.queue_entries(&queue), tasks);

    let (status, envelope) = api
        .call(
            "queues.add_task",
            json!({ "task": tasks[0], "queue": queue }),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        meta(&envelope).1,
        706,
        "adding a task twice is task_already_queued"
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn worker_expires_after_registration_timeout() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;
    let queue = emulator.create_queue("expiry");
    api.data(
        "workers.register",
        json!({ "worker": "w-default", "queues": [queue] }),
    )
    .await;
    api.data(
        "workers.register",
        json!({ "worker": "w-short", "timeout": 30 }),
    )
    .await;
    assert_eq!(emulator.workers().len(), 2);

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(
        emulator.workers().len(),
        2,
        "both workers are alive before the shorter timeout"
    );

    tokio::time::advance(Duration::from_secs(2)).await;
    let ids: Vec<String> = emulator.workers().into_iter().map(|w| w.id).collect();
    assert_eq!(ids, vec!["w-default".to_owned()], "the 30 s worker expired");

    let (status, envelope) = api
        .call(
            "workers.status_report",
            json!({ "worker": "w-short", "timestamp": 1 }),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        meta(&envelope),
        (400, 1001, "invalid worker id: worker=w-short")
    );

    // A status report renews the registration for another full timeout.
    tokio::time::advance(Duration::from_secs(500)).await;
    api.data(
        "workers.status_report",
        json!({ "worker": "w-default", "timestamp": 1 }),
    )
    .await;
    tokio::time::advance(Duration::from_secs(500)).await;
    assert_eq!(
        emulator.workers().len(),
        1,
        "the report at 531 s keeps the worker alive until 1131 s"
    );
    tokio::time::advance(Duration::from_secs(101)).await;
    assert!(
        emulator.workers().is_empty(),
        "the default 600 s timeout ran out"
    );

    let data = api.data("workers.get_all", json!({})).await;
    assert_eq!(data["workers"], json!([]));
    emulator.shutdown().await;
}

#[tokio::test]
async fn worker_report_shows_running_task() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;
    let queue = emulator.create_queue("reports");
    let task = emulator.create_task("reported", Some("reports-project"));
    api.data(
        "workers.register",
        json!({ "worker": "w1", "queues": [queue] }),
    )
    .await;
    api.data(
        "workers.status_report",
        json!({ "worker": "w1", "timestamp": 1, "task": task, "queue": queue }),
    )
    .await;

    let workers = api.data("workers.get_all", json!({})).await;
    let worker = &workers["workers"][0];
    assert_eq!(worker["id"], "w1");
    assert_eq!(worker["task"]["id"], json!(task));
    assert_eq!(worker["task"]["name"], "reported");
    assert_eq!(worker["queues"][0]["name"], "reports");
    assert!(worker["last_activity_time"].is_string());
    assert!(worker["last_report_time"].is_string());
    assert_eq!(
        emulator.task(&task).unwrap().last_worker.as_deref(),
        Some("w1")
    );

    let (status, envelope) = api
        .call(
            "workers.unregister",
            json!({ "worker": "never-registered" }),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        meta(&envelope),
        (
            400,
            1004,
            "worker is not registered: worker=never-registered"
        )
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn task_status_machine_follows_server() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;
    let queue = emulator.create_queue("status");
    let task = emulator.create_task("lifecycle", None);

    let (status, envelope) = api.call("tasks.completed", json!({ "task": task })).await;
    assert_eq!(status, 400);
    assert_eq!(
        meta(&envelope),
        (
            400,
            110,
            "invalid task status (Invalid status change): current_status=created, new_status=completed"
        )
    );

    let data = api
        .data("tasks.enqueue", json!({ "task": task, "queue": queue }))
        .await;
    assert_eq!(data["queued"], 1);
    assert_eq!(data["fields"]["execution.queue"], json!(queue));
    let view = emulator.task(&task).unwrap();
    assert_eq!(view.status, "queued");
    assert_eq!(view.execution_queue.as_deref(), Some(queue.as_str()));

    api.data("queues.get_next_task", json!({ "queue": queue }))
        .await;
    // clearml-agent claims a pulled task this way before it reports `started`.
    let data = api
        .data(
            "tasks.dequeue",
            json!({ "task": task, "new_status": "in_progress" }),
        )
        .await;
    assert_eq!(data["updated"], 1);
    let data = api.data("tasks.started", json!({ "task": task })).await;
    assert_eq!(data["started"], 1);
    api.data(
        "tasks.completed",
        json!({ "task": task, "status_reason": "worker execution done" }),
    )
    .await;
    let view = emulator.task(&task).unwrap();
    assert_eq!(view.status, "completed");
    assert_eq!(view.status_reason, "worker execution done");

    let data = api.data("tasks.reset", json!({ "task": task })).await;
    assert_eq!(data["fields"]["status"], "created");
    assert_eq!(emulator.task(&task).unwrap().status_message, "reset");
    emulator.shutdown().await;
}

#[tokio::test]
async fn stop_of_queued_task_dequeues_it() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;
    let queue = emulator.create_queue("stops");
    let task = emulator.create_task("to-stop", None);
    api.data("tasks.enqueue", json!({ "task": task, "queue": queue }))
        .await;

    api.data("tasks.stop", json!({ "task": task })).await;
    let view = emulator.task(&task).unwrap();
    assert_eq!(view.status, "stopped");
    assert_eq!(view.status_message, "Stopped by Emulator User");
    assert!(emulator.queue_entries(&queue).is_empty());
    emulator.shutdown().await;
}

#[tokio::test]
async fn enqueue_by_queue_name_creates_queue() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;
    let task = emulator.create_task("by-name", None);

    api.data(
        "tasks.enqueue",
        json!({ "task": task, "queue_name": "made-on-demand" }),
    )
    .await;
    assert_eq!(emulator.queue_entries("made-on-demand"), vec![task.clone()]);

    let data = api
        .data(
            "queues.get_all",
            json!({ "name": "^made-on-demand$", "only_fields": ["id", "name"] }),
        )
        .await;
    assert_eq!(data["queues"].as_array().unwrap().len(), 1);
    assert!(
        data["queues"][0].get("entries").is_none(),
        "only_fields drops the other fields"
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn injected_faults_fire_the_given_times() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;
    let queue = emulator.create_queue("faults");

    emulator.inject_fault("queues.get_all", Fault::ServerError, 2);
    for _ in 0..2 {
        let (status, envelope) = api.call("queues.get_all", json!({})).await;
        assert_eq!(status, 500);
        assert_eq!(meta(&envelope), (500, 0, "general server error"));
    }
    let (status, _) = api.call("queues.get_all", json!({})).await;
    assert_eq!(status, 200, "the fault fired only twice");

    let task = emulator.create_task("dropped", None);
    api.data("queues.add_task", json!({ "task": task, "queue": queue }))
        .await;
    emulator.inject_fault(
        "queues.get_next_task",
        Fault::DropField("entry.task".into()),
        1,
    );
    let data = api
        .data("queues.get_next_task", json!({ "queue": queue }))
        .await;
    assert!(data["entry"].get("task").is_none(), "entry.task is dropped");
    assert!(
        data["entry"].get("added").is_some(),
        "the rest of entry stays"
    );

    emulator.inject_fault("queues.get_num_entries", Fault::MalformedJson, 1);
    let response = reqwest::Client::new()
        .post(format!("{}/queues.get_num_entries", emulator.url()))
        .bearer_auth(&api.token)
        .json(&json!({ "queue": queue }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(
        serde_json::from_str::<Value>(&text).is_err(),
        "body {text:?} is not JSON"
    );
    emulator.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn delay_fault_holds_the_response() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;
    emulator.inject_fault("queues.get_all", Fault::Delay(Duration::from_secs(30)), 1);

    let started = tokio::time::Instant::now();
    api.data("queues.get_all", json!({})).await;
    assert!(
        started.elapsed() >= Duration::from_secs(30),
        "the response waited for the injected delay"
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn binary_takes_keys_from_environment() {
    use fleet_tests::harness::{ChildProcess, TestDir, free_port, wait_until_async};

    let dir = TestDir::new("emulator-binary").unwrap();
    let port = free_port();
    let secret = "binary-secret-never-logged";
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_clearml-emulator"));
    command
        .args([
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--worker-timeout-secs",
            "30",
        ])
        .env("CLEARML_API_ACCESS_KEY", "binary-access")
        .env("CLEARML_API_SECRET_KEY", secret)
        .env("RUST_LOG", "debug");
    let mut emulator = ChildProcess::spawn("clearml-emulator", command, dir.path()).unwrap();

    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/auth.login");
    let login = || async {
        let response = http
            .post(&url)
            .basic_auth("binary-access", Some(secret))
            .send()
            .await;
        response.is_ok_and(|r| r.status() == 200)
    };
    if let Err(error) = wait_until_async(
        Duration::from_secs(30),
        "clearml-emulator to accept auth.login",
        login,
    )
    .await
    {
        panic!("{error}\n{}", emulator.log_tail(20));
    }

    emulator.kill();
    let logs = emulator.log_tail(1000);
    assert!(
        logs.contains("ClearML API emulator listening"),
        "the binary logs its start:\n{logs}"
    );
    assert!(
        !logs.contains(secret),
        "the secret key appears in the log:\n{logs}"
    );
}

#[tokio::test]
async fn missing_required_field_is_named() {
    let emulator = start_emulator().await;
    let api = Api::login(&emulator).await;

    let (status, envelope) = api.call("queues.get_next_task", json!({})).await;
    assert_eq!(status, 400);
    assert_eq!(
        meta(&envelope),
        (400, 11, "missing required fields: missing=(queue)")
    );
    assert_eq!(
        envelope["meta"]["error_data"],
        json!({ "missing": ["queue"] })
    );
    emulator.shutdown().await;
}

#[test]
fn config_debug_redacts_secret() {
    let config = EmulatorConfig {
        secret_key: "do-not-print".to_owned(),
        ..EmulatorConfig::default()
    };
    let printed = format!("{config:?}");
    assert!(!printed.contains("do-not-print"), "{printed}");
    assert!(printed.contains("fleet-test-access"), "{printed}");
}
