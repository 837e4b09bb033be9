//! The Rust ClearML client against the emulator: every typed field round-trips, and every bad input
//! gives a typed error that names the endpoint and the problem.

use std::time::Duration;

use clearml_api::queues::{CreateQueue, GetAllQueues};
use clearml_api::tasks::{EnqueueTask, GetAllTasks, StatusChange, TaskStatus};
use clearml_api::workers::{RegisterWorker, StatusReport};
use clearml_api::{Client, ClientConfig, Error, Retry, RetryPolicy};
use fleet_tests::emulator::{Emulator, EmulatorConfig, Fault};
use serde_json::json;

const ACCESS_KEY: &str = "client-test-access";
const SECRET_KEY: &str = "client-test-secret";
const WORKER_ID: &str = "fleet:gpu-spot:i-0abc";

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

fn client_for(emulator: &Emulator) -> Client {
    client_with(emulator, SECRET_KEY, |_| {})
}

fn client_with(
    emulator: &Emulator,
    secret_key: &str,
    adjust: impl FnOnce(&mut ClientConfig),
) -> Client {
    let mut config = ClientConfig::new(&emulator.url(), ACCESS_KEY, secret_key).unwrap();
    config.retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    };
    adjust(&mut config);
    Client::new(config).unwrap()
}

/// Creates a task through the real `tasks.create` endpoint, with every field the typed client reads.
async fn create_task(client: &Client, name: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Created {
        id: String,
    }
    let created: Created = client
        .call(
            "tasks.create",
            &json!({
                "name": name,
                "type": "training",
                "tags": ["fleet-test"],
                "container": {"image": "python:3.11-slim", "arguments": "--ipc=host"},
                "hyperparams": {
                    "fleet": {"run_seconds": {"section": "fleet", "name": "run_seconds", "value": "2.5", "type": "float", "description": "fake run time"}}
                }
            }),
            Retry::Never,
        )
        .await
        .expect("tasks.create succeeds");
    created.id
}

async fn enqueue(client: &Client, task_id: &str, queue_id: &str) {
    client
        .tasks()
        .enqueue(&EnqueueTask {
            task: task_id.to_owned(),
            queue: Some(queue_id.to_owned()),
            ..EnqueueTask::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn queues_round_trip() {
    let emulator = start_emulator().await;
    let client = client_for(&emulator);

    let queue_id = client
        .queues()
        .create(&CreateQueue {
            name: "gpu-a100".to_owned(),
            tags: vec!["team-vision".to_owned()],
            system_tags: vec![],
        })
        .await
        .unwrap();
    let first = create_task(&client, "first").await;
    let second = create_task(&client, "second").await;
    let third = create_task(&client, "third").await;
    for task in [&first, &second, &third] {
        assert!(client.queues().add_task(&queue_id, task).await.unwrap());
    }

    let queue = client.queues().get_by_id(&queue_id).await.unwrap();
    assert_eq!(queue.id, queue_id);
    assert_eq!(queue.name.as_deref(), Some("gpu-a100"));
    assert_eq!(queue.tags, vec!["team-vision".to_owned()]);
    assert!(queue.created.is_some(), "queue has a creation time");
    let entries: Vec<&str> = queue
        .entries
        .iter()
        .map(|entry| entry.task.as_str())
        .collect();
    assert_eq!(
        entries,
        vec![first.as_str(), second.as_str(), third.as_str()]
    );
    assert!(queue.entries.iter().all(|entry| entry.added.is_some()));

    let by_name = client
        .queues()
        .get_all(&GetAllQueues {
            name: Some("^gpu-a100$".to_owned()),
            ..GetAllQueues::default()
        })
        .await
        .unwrap();
    assert_eq!(by_name.len(), 1);
    assert_eq!(by_name[0].id, queue_id);
    assert_eq!(client.queues().get_num_entries(&queue_id).await.unwrap(), 3);

    let position = client
        .queues()
        .move_task_to_front(&queue_id, &third)
        .await
        .unwrap();
    assert_eq!(position, 0);
    assert!(
        client
            .queues()
            .remove_task(&queue_id, &second)
            .await
            .unwrap()
    );
    assert!(
        !client
            .queues()
            .remove_task(&queue_id, &second)
            .await
            .unwrap()
    );
    assert_eq!(
        emulator.queue_entries(&queue_id),
        vec![third.clone(), first.clone()]
    );

    let next = client
        .queues()
        .get_next_task(&queue_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.entry.task, third);
    let next = client
        .queues()
        .get_next_task(&queue_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.entry.task, first);
    assert_eq!(
        client.queues().get_next_task(&queue_id).await.unwrap(),
        None
    );
    assert_eq!(client.queues().get_num_entries(&queue_id).await.unwrap(), 0);

    emulator.shutdown().await;
}

#[tokio::test]
async fn tasks_round_trip_through_status_machine() {
    let emulator = start_emulator().await;
    let client = client_for(&emulator);
    let queue_id = emulator.create_queue("cpu");
    let task_id = create_task(&client, "train-resnet").await;

    let task = client.tasks().get_by_id(&task_id).await.unwrap();
    assert_eq!(task.id, task_id);
    assert_eq!(task.name.as_deref(), Some("train-resnet"));
    assert_eq!(task.status, Some(TaskStatus::Created));
    assert_eq!(task.task_type.as_deref(), Some("training"));
    assert_eq!(task.tags, vec!["fleet-test".to_owned()]);
    assert!(task.created.is_some());
    let container = task.container.as_ref().expect("container is set");
    assert_eq!(container.image.as_deref(), Some("python:3.11-slim"));
    assert_eq!(container.arguments.as_deref(), Some("--ipc=host"));
    assert_eq!(task.hyperparam("fleet", "run_seconds"), Some("2.5"));
    let item = &task.hyperparams["fleet"]["run_seconds"];
    assert_eq!(item.section.as_deref(), Some("fleet"));
    assert_eq!(item.name.as_deref(), Some("run_seconds"));
    assert_eq!(item.value_type.as_deref(), Some("float"));
    assert_eq!(item.description.as_deref(), Some("fake run time"));

    // created -> queued, with the status message kept.
    let enqueued = client
        .tasks()
        .enqueue(&EnqueueTask {
            task: task_id.clone(),
            queue: Some(queue_id.clone()),
            status_reason: Some("test".to_owned()),
            status_message: Some("enqueued by the client test".to_owned()),
            ..EnqueueTask::default()
        })
        .await
        .unwrap();
    assert_eq!(enqueued.queued, 1);
    let task = client.tasks().get_by_id(&task_id).await.unwrap();
    assert_eq!(task.status, Some(TaskStatus::Queued));
    assert_eq!(task.execution_queue(), Some(queue_id.as_str()));
    assert_eq!(
        task.status_message.as_deref(),
        Some("enqueued by the client test")
    );
    assert_eq!(emulator.queue_entries(&queue_id), vec![task_id.clone()]);

    // queued -> created through dequeue, which also empties the queue.
    let dequeued = client
        .tasks()
        .dequeue(&StatusChange::new(&task_id))
        .await
        .unwrap();
    assert_eq!(dequeued.dequeued, 1);
    assert!(emulator.queue_entries(&queue_id).is_empty());
    let task = client.tasks().get_by_id(&task_id).await.unwrap();
    assert_eq!(task.status, Some(TaskStatus::Created));

    // queued -> in_progress -> stopped, as a spot reclaim would leave it.
    enqueue(&client, &task_id, &queue_id).await;
    let next = client
        .queues()
        .get_next_task(&queue_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.entry.task, task_id);
    let started = client
        .tasks()
        .started(&StatusChange::new(&task_id).with_message("worker", "running"))
        .await
        .unwrap();
    assert_eq!(started.updated, 1);
    client.tasks().ping(&task_id).await.unwrap();
    let task = client.tasks().get_by_id(&task_id).await.unwrap();
    assert_eq!(task.status, Some(TaskStatus::InProgress));
    assert!(task.started.is_some());
    assert!(task.last_update.is_some());

    let stop = StatusChange::new(&task_id)
        .forced()
        .with_message("fleet", "spot reclaim");
    let stopped = client.tasks().stop(&stop).await.unwrap();
    assert_eq!(stopped.updated, 1);
    let task = client.tasks().get_by_id(&task_id).await.unwrap();
    assert_eq!(task.status, Some(TaskStatus::Stopped));
    assert_eq!(task.status_reason.as_deref(), Some("fleet"));
    let message = task.status_message.as_deref().unwrap_or_default();
    assert!(
        message.starts_with("Stopped by "),
        "the server writes its own message: {message}"
    );

    // stopped -> created through reset.
    let reset = client
        .tasks()
        .reset(&StatusChange::new(&task_id).forced())
        .await
        .unwrap();
    assert_eq!(reset.updated, 1);
    let task = client.tasks().get_by_id(&task_id).await.unwrap();
    assert_eq!(task.status, Some(TaskStatus::Created));

    // Enqueue by queue name, then run to completion.
    client
        .tasks()
        .enqueue(&EnqueueTask {
            task: task_id.clone(),
            queue_name: Some("cpu".to_owned()),
            ..EnqueueTask::default()
        })
        .await
        .unwrap();
    client
        .queues()
        .get_next_task(&queue_id)
        .await
        .unwrap()
        .unwrap();
    client
        .tasks()
        .started(&StatusChange::new(&task_id))
        .await
        .unwrap();
    client
        .tasks()
        .completed(&StatusChange::new(&task_id))
        .await
        .unwrap();
    let task = client.tasks().get_by_id(&task_id).await.unwrap();
    assert_eq!(task.status, Some(TaskStatus::Completed));
    assert!(task.completed.is_some());

    // A second task runs and fails.
    let other = create_task(&client, "evaluate").await;
    enqueue(&client, &other, &queue_id).await;
    client
        .queues()
        .get_next_task(&queue_id)
        .await
        .unwrap()
        .unwrap();
    client
        .tasks()
        .started(&StatusChange::new(&other))
        .await
        .unwrap();
    let failure = StatusChange::new(&other)
        .forced()
        .with_message("worker", "exit code 3");
    client.tasks().failed(&failure).await.unwrap();

    let completed = client
        .tasks()
        .get_all(&GetAllTasks {
            status: vec![TaskStatus::Completed],
            only_fields: vec!["id".to_owned(), "name".to_owned(), "status".to_owned()],
            ..GetAllTasks::default()
        })
        .await
        .unwrap();
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].id, task_id);
    assert_eq!(completed[0].name.as_deref(), Some("train-resnet"));
    let failed = client
        .tasks()
        .get_all(&GetAllTasks {
            id: vec![other.clone(), task_id.clone()],
            status: vec![TaskStatus::Failed],
            ..GetAllTasks::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].id, other);
    assert_eq!(failed[0].status_message.as_deref(), Some("exit code 3"));
    let page = client
        .tasks()
        .get_all(&GetAllTasks {
            page: Some(0),
            page_size: Some(1),
            ..GetAllTasks::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 1);

    emulator.shutdown().await;
}

#[tokio::test]
async fn workers_round_trip() {
    let emulator = start_emulator().await;
    let client = client_for(&emulator);
    let queue_id = emulator.create_queue("gpu");
    let task_id = create_task(&client, "busy-task").await;

    client
        .workers()
        .register(&RegisterWorker {
            worker: WORKER_ID.to_owned(),
            timeout: Some(120),
            queues: vec![queue_id.clone()],
            tags: vec!["fleet".to_owned()],
        })
        .await
        .unwrap();
    let workers = client.workers().get_all(None).await.unwrap();
    assert_eq!(workers.len(), 1);
    let worker = &workers[0];
    assert_eq!(worker.id, WORKER_ID);
    assert!(worker.register_time.is_some());
    assert!(worker.last_activity_time.is_some());
    assert_eq!(worker.tags, vec!["fleet".to_owned()]);
    assert_eq!(worker.queues.len(), 1);
    assert_eq!(worker.queues[0].id, queue_id);
    assert_eq!(worker.queues[0].name.as_deref(), Some("gpu"));
    assert!(worker.task.is_none(), "a new worker runs no task");

    client
        .workers()
        .status_report(&StatusReport {
            worker: WORKER_ID.to_owned(),
            task: Some(task_id.clone()),
            queue: Some(queue_id.clone()),
            queues: Some(vec![queue_id.clone()]),
            timestamp: chrono::Utc::now().timestamp_millis(),
            tags: vec![],
        })
        .await
        .unwrap();
    let workers = client.workers().get_all(Some(3600)).await.unwrap();
    let task = workers[0].task.as_ref().expect("the report set the task");
    assert_eq!(task.id, task_id);
    assert_eq!(task.name.as_deref(), Some("busy-task"));
    let queue = workers[0].queue.as_ref().expect("the report set the queue");
    assert_eq!(queue.id, queue_id);
    assert!(workers[0].last_report_time.is_some());

    client.workers().unregister(WORKER_ID).await.unwrap();
    assert!(client.workers().get_all(None).await.unwrap().is_empty());

    emulator.shutdown().await;
}

#[tokio::test]
async fn wrong_credentials_give_unauthorized_error() {
    let emulator = start_emulator().await;
    let client = client_with(&emulator, "not-the-secret", |_| {});

    let err = client
        .queues()
        .get_all(&GetAllQueues::default())
        .await
        .unwrap_err();

    assert!(err.is_unauthorized(), "{err}");
    assert_eq!(err.endpoint(), Some("auth.login"));
    let (code, subcode) = err.result_codes().unwrap();
    assert_eq!(code, 401);
    assert!(
        subcode > 0,
        "the server names the failure with a subcode: {err}"
    );
    let message = err.to_string();
    assert!(message.contains("auth.login"), "{message}");
    assert!(message.contains("HTTP 401"), "{message}");
    assert!(
        !message.contains("not-the-secret"),
        "the secret leaked: {message}"
    );

    emulator.shutdown().await;
}

#[tokio::test]
async fn malformed_json_gives_typed_error() {
    let emulator = start_emulator().await;
    let client = client_for(&emulator);
    client.login().await.unwrap();
    emulator.inject_fault("queues.get_all", Fault::MalformedJson, 1);

    let err = client
        .queues()
        .get_all(&GetAllQueues::default())
        .await
        .unwrap_err();

    assert!(matches!(err, Error::MalformedResponse { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("queues.get_all"), "{message}");
    assert!(message.contains("not a ClearML envelope"), "{message}");

    emulator.shutdown().await;
}

#[tokio::test]
async fn missing_field_names_the_field() {
    let emulator = start_emulator().await;
    let client = client_for(&emulator);
    let queue_id = emulator.create_queue("short");
    emulator.inject_fault(
        "queues.get_num_entries",
        Fault::DropField("num".to_owned()),
        1,
    );

    let err = client
        .queues()
        .get_num_entries(&queue_id)
        .await
        .unwrap_err();

    assert!(matches!(err, Error::MalformedResponse { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("queues.get_num_entries"), "{message}");
    assert!(message.contains("missing field `num`"), "{message}");

    emulator.shutdown().await;
}

#[tokio::test]
async fn server_error_is_retried_for_reads() {
    let emulator = start_emulator().await;
    let client = client_for(&emulator);
    let queue_id = emulator.create_queue("flaky");
    emulator.inject_fault("queues.get_num_entries", Fault::ServerError, 2);

    let waiting = client.queues().get_num_entries(&queue_id).await;

    assert_eq!(waiting.unwrap(), 0, "the third attempt succeeds");
    emulator.shutdown().await;
}

#[tokio::test]
async fn server_error_after_retries_is_typed() {
    let emulator = start_emulator().await;
    let client = client_for(&emulator);
    let queue_id = emulator.create_queue("down");
    emulator.inject_fault("queues.get_num_entries", Fault::ServerError, 3);

    let err = client
        .queues()
        .get_num_entries(&queue_id)
        .await
        .unwrap_err();

    assert!(
        matches!(
            err,
            Error::Api {
                http_status: 500,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(err.to_string().contains("queues.get_num_entries"), "{err}");
    emulator.shutdown().await;
}

#[tokio::test]
async fn get_next_task_is_never_retried() {
    let emulator = start_emulator().await;
    let client = client_for(&emulator);
    let queue_id = emulator.create_queue("once");
    let task_id = create_task(&client, "precious").await;
    client.queues().add_task(&queue_id, &task_id).await.unwrap();
    emulator.inject_fault("queues.get_next_task", Fault::ServerError, 1);

    let err = client.queues().get_next_task(&queue_id).await.unwrap_err();

    assert!(
        matches!(
            err,
            Error::Api {
                http_status: 500,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("queues.get_next_task"), "{err}");
    assert_eq!(
        emulator.queue_entries(&queue_id),
        vec![task_id.clone()],
        "the failed call took nothing and was not repeated"
    );
    let next = client
        .queues()
        .get_next_task(&queue_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.entry.task, task_id);
    emulator.shutdown().await;
}

#[tokio::test]
async fn slow_server_gives_timeout_error() {
    let emulator = start_emulator().await;
    let client = client_with(&emulator, SECRET_KEY, |config| {
        config.request_timeout = Duration::from_millis(300);
        config.retry.max_attempts = 1;
    });
    client.login().await.unwrap();
    emulator.inject_fault("workers.get_all", Fault::Delay(Duration::from_secs(30)), 1);

    let err = client.workers().get_all(None).await.unwrap_err();

    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("workers.get_all"), "{message}");
    assert!(message.contains("timed out after 300ms"), "{message}");
    emulator.shutdown().await;
}

#[tokio::test]
async fn unreachable_server_gives_connection_error() {
    let port = fleet_tests::harness::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut config = ClientConfig::new(&url, ACCESS_KEY, SECRET_KEY).unwrap();
    config.retry.max_attempts = 1;
    let client = Client::new(config).unwrap();

    let err = client.workers().get_all(None).await.unwrap_err();

    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("auth.login"), "{message}");
    assert!(message.contains("could not reach the server"), "{message}");
}

#[tokio::test]
async fn unknown_endpoint_gives_api_error() {
    let emulator = start_emulator().await;
    let client = client_for(&emulator);

    let err = client
        .call::<_, serde_json::Value>("queues.no_such_call", &json!({}), Retry::Safe)
        .await
        .unwrap_err();

    assert!(matches!(err, Error::Api { .. }), "{err:?}");
    assert!(err.to_string().contains("queues.no_such_call"), "{err}");
    let unknown = emulator.unknown_calls();
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(unknown[0].starts_with("queues.no_such_call"), "{unknown:?}");
    emulator.shutdown().await;
}

#[tokio::test]
async fn rejected_token_triggers_one_new_login() {
    // Each emulator signs tokens with its own random key, so a restarted server rejects the old token
    // with 401, as a clearml-server whose token expired does.
    let first = start_emulator().await;
    let addr = first.addr();
    let client = client_for(&first);
    client.login().await.unwrap();
    first.shutdown().await;
    let config = EmulatorConfig {
        access_key: ACCESS_KEY.to_owned(),
        secret_key: SECRET_KEY.to_owned(),
        ..EmulatorConfig::default()
    };
    let second = Emulator::start(addr, config)
        .await
        .expect("the port is free again");

    let workers = client.workers().get_all(None).await;

    assert!(
        workers.unwrap().is_empty(),
        "the call succeeds after a new login"
    );
    second.shutdown().await;
}
