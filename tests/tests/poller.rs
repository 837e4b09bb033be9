//! The ClearML poller against the emulator.

use std::time::Duration;

use clearml_api::workers::{RegisterWorker, StatusReport};
use clearml_api::{Client, ClientConfig, RetryPolicy};
use fleet_coordinator::poller::{ClearmlPoller, PollError};
use fleet_tests::emulator::{Emulator, EmulatorConfig, Fault};

async fn start() -> (Emulator, Client) {
    let config = EmulatorConfig::default();
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), config.clone())
        .await
        .unwrap();
    let mut client_config = ClientConfig::new(
        &emulator.url(),
        config.access_key.as_str(),
        config.secret_key.as_str(),
    )
    .unwrap();
    client_config.retry = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    (emulator, Client::new(client_config).unwrap())
}

#[tokio::test]
async fn poll_counts_waiting_tasks_and_worker_tasks() {
    let (emulator, client) = start().await;
    let gpu = emulator.create_queue("gpu");
    let cpu = emulator.create_queue("cpu");
    for name in ["a", "b", "c"] {
        let task = emulator.create_task(name, None);
        client.queues().add_task(&gpu, &task).await.unwrap();
    }
    let running = emulator.create_task("running", None);
    client
        .workers()
        .register(&RegisterWorker {
            worker: "fleet:gpu-spot:i-1".to_owned(),
            queues: vec![gpu.clone()],
            ..RegisterWorker::default()
        })
        .await
        .unwrap();
    client
        .workers()
        .status_report(&StatusReport {
            worker: "fleet:gpu-spot:i-1".to_owned(),
            task: Some(running.clone()),
            queue: Some(gpu.clone()),
            timestamp: chrono::Utc::now().timestamp_millis(),
            ..StatusReport::default()
        })
        .await
        .unwrap();
    let poller = ClearmlPoller::new(
        client.clone(),
        vec!["gpu".into(), "cpu".into(), "tpu".into()],
        Duration::from_secs(600),
    );

    let observation = poller.poll(Duration::from_secs(42)).await.unwrap();

    assert_eq!(observation.taken_at, Duration::from_secs(42));
    assert_eq!(observation.waiting("gpu"), 3);
    assert_eq!(observation.waiting("cpu"), 0);
    assert_eq!(observation.queue_ids["cpu"], cpu);
    assert_eq!(observation.missing_queues, vec!["tpu".to_owned()]);
    assert_eq!(observation.workers["fleet:gpu-spot:i-1"], Some(running));
    emulator.shutdown().await;
}

#[tokio::test]
async fn poll_fails_whole_when_workers_fail() {
    let (emulator, client) = start().await;
    emulator.create_queue("gpu");
    let poller = ClearmlPoller::new(client, vec!["gpu".into()], Duration::from_secs(600));
    emulator.inject_fault("workers.get_all", Fault::ServerError, 1);

    let err = poller.poll(Duration::ZERO).await.unwrap_err();

    assert!(matches!(err, PollError::Workers(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("polling ClearML workers failed"),
        "{message}"
    );
    assert!(message.contains("workers.get_all"), "{message}");
    emulator.shutdown().await;
}
