//! The coordinator's state stores: etcd (fenced on the leader's term) and the standalone JSON file.

use std::sync::Arc;
use std::time::Duration;

use fleet_coordinator::election::{ElectionConfig, Elector, Term};
use fleet_coordinator::etcd::{EtcdOptions, EtcdPool};
use fleet_coordinator::store::{
    BackoffRecord, Change, EtcdStateStore, Event, FileStateStore, InstanceRecord, InstanceState,
    LaunchIntent, MAX_EVENTS, QueueLimits, RuntimeOverrides, StateError, StateStore, StoreError,
    TerminationGrant,
};
use fleet_tests::etcd::EtcdCluster;
use fleet_tests::harness::{TestDir, wait_until};

const PREFIX: &str = "/fleet-test/store/";
const DEADLINE: Duration = Duration::from_secs(15);

async fn leader(pool: &Arc<EtcdPool>, replica: &str) -> (Elector, Term) {
    let mut config = ElectionConfig::new("fleet-test", "store", replica, "127.0.0.1:7443");
    config.lease_ttl = Duration::from_secs(2);
    let elector = Elector::spawn(pool.clone(), config);
    let role = elector.role();
    wait_until(DEADLINE, &format!("replica {replica} to lead"), || {
        role.borrow().term().is_some()
    })
    .await
    .unwrap();
    let term = role.borrow().term().cloned().unwrap();
    (elector, term)
}

fn event(sequence: u64) -> Event {
    Event {
        sequence,
        at_ms: 1_000 + sequence,
        kind: "instance.launched".to_owned(),
        queue: Some("gpu".to_owned()),
        resource: Some("gpu-spot".to_owned()),
        instance_id: Some(format!("i-{sequence}")),
        message: format!("event {sequence}"),
    }
}

/// Returns one change of every kind.
fn sample_changes() -> Vec<Change> {
    let mut record = InstanceRecord::new("intent-1", 0, "gpu", "gpu-spot", 1_000);
    record.transition(InstanceState::Launching, 1_500, "RunInstances sent");
    record.instance_id = Some("i-0abc".to_owned());
    record.offering = Some("g5.xlarge/us-east-1a/spot".to_owned());
    record.hourly_price_usd = 0.45;
    let mut overrides = RuntimeOverrides::default();
    overrides.paused_queues.insert("cpu".to_owned());
    overrides.queue_limits.insert(
        "gpu".to_owned(),
        QueueLimits {
            max_instances: Some(3),
            ..QueueLimits::default()
        },
    );
    vec![
        Change::PutInstance(record),
        Change::PutIntent(LaunchIntent {
            id: "intent-1".to_owned(),
            queue: "gpu".to_owned(),
            resource: "gpu-spot".to_owned(),
            count: 1,
            created_ms: 1_000,
            term: 7,
        }),
        Change::PutGrant(TerminationGrant {
            instance_id: "i-0old".to_owned(),
            granted_ms: 1_200,
            term: 7,
            reason: "idle for 300 s".to_owned(),
        }),
        Change::PutOverrides(overrides),
        Change::PutBackoff(BackoffRecord {
            offering: "g5.xlarge/us-east-1b/spot".to_owned(),
            failures: 2,
            until_ms: 400_000,
        }),
        Change::AppendEvent(event(1)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_round_trips_every_record() {
    let cluster = EtcdCluster::start("store-round-trip", 1).await.unwrap();
    let pool = Arc::new(
        EtcdPool::connect(&cluster.endpoints(), &EtcdOptions::default())
            .await
            .unwrap(),
    );
    let (elector, term) = leader(&pool, "a").await;
    let store = EtcdStateStore::new(pool.clone(), term, PREFIX);
    let changes = sample_changes();

    store.apply(&changes).await.unwrap();
    let loaded = store.load().await.unwrap();

    let mut expected = fleet_coordinator::store::State::default();
    expected.apply(&changes, MAX_EVENTS);
    assert_eq!(loaded, expected);
    assert_eq!(loaded.instances["intent-1/0"].history.len(), 1);

    store
        .apply(&[
            Change::DeleteIntent("intent-1".to_owned()),
            Change::DeleteGrant("i-0old".to_owned()),
        ])
        .await
        .unwrap();
    let loaded = store.load().await.unwrap();
    assert!(loaded.intents.is_empty());
    assert!(loaded.grants.is_empty());
    assert_eq!(loaded.instances.len(), 1, "the instance record stays");
    elector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_rejects_writes_of_ended_term() {
    let cluster = EtcdCluster::start("store-fence", 1).await.unwrap();
    let pool = Arc::new(
        EtcdPool::connect(&cluster.endpoints(), &EtcdOptions::default())
            .await
            .unwrap(),
    );
    let (first, old_term) = leader(&pool, "a").await;
    let stale = EtcdStateStore::new(pool.clone(), old_term.clone(), PREFIX);
    stale.apply(&[Change::AppendEvent(event(1))]).await.unwrap();

    first.shutdown().await;
    let (second, new_term) = leader(&pool, "b").await;
    let err = stale
        .apply(&[Change::AppendEvent(event(2))])
        .await
        .unwrap_err();

    assert!(
        matches!(err, StateError::Store(StoreError::Fenced { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&format!("term {}", old_term.revision)),
        "{err}"
    );
    let current = EtcdStateStore::new(pool.clone(), new_term, PREFIX);
    current
        .apply(&[Change::AppendEvent(event(2))])
        .await
        .unwrap();
    let sequences: Vec<u64> = current
        .load()
        .await
        .unwrap()
        .events
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(sequences, vec![1, 2], "the stale write left nothing behind");
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_event_log_keeps_newest() {
    let cluster = EtcdCluster::start("store-events", 1).await.unwrap();
    let pool = Arc::new(
        EtcdPool::connect(&cluster.endpoints(), &EtcdOptions::default())
            .await
            .unwrap(),
    );
    let (elector, term) = leader(&pool, "a").await;
    let store = EtcdStateStore::new(pool.clone(), term, PREFIX);
    let total = MAX_EVENTS as u64 + 25;

    let events: Vec<Change> = (1..=total)
        .map(|sequence| Change::AppendEvent(event(sequence)))
        .collect();
    for chunk in events.chunks(50) {
        store.apply(chunk).await.unwrap();
    }

    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.events.len(), MAX_EVENTS);
    assert_eq!(loaded.events.first().unwrap().sequence, 26);
    assert_eq!(loaded.events.last().unwrap().sequence, total);
    assert_eq!(loaded.next_event_sequence(), total + 1);
    elector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_rejects_oversized_apply() {
    let cluster = EtcdCluster::start("store-oversized", 1).await.unwrap();
    let pool = Arc::new(
        EtcdPool::connect(&cluster.endpoints(), &EtcdOptions::default())
            .await
            .unwrap(),
    );
    let (elector, term) = leader(&pool, "a").await;
    let store = EtcdStateStore::new(pool.clone(), term, PREFIX);
    let events: Vec<Change> = (1..=61)
        .map(|sequence| Change::AppendEvent(event(sequence)))
        .collect();

    let err = store.apply(&events).await.unwrap_err();

    assert!(
        matches!(err, StateError::TooManyChanges { count: 61 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("at most 60"), "{err}");
    elector.shutdown().await;
}

#[tokio::test]
async fn file_store_survives_restart() {
    let dir = TestDir::new("file-store").unwrap();
    let path = dir.join("state/fleet.json");
    let changes = sample_changes();

    let store = FileStateStore::new(&path);
    assert_eq!(
        store.load().await.unwrap(),
        Default::default(),
        "a missing file is an empty state"
    );
    store.apply(&changes).await.unwrap();
    drop(store);
    let reopened = FileStateStore::new(&path);
    let loaded = reopened.load().await.unwrap();

    let mut expected = fleet_coordinator::store::State::default();
    expected.apply(&changes, MAX_EVENTS);
    assert_eq!(loaded, expected);
    assert!(
        !dir.join("state/fleet.json.tmp").exists(),
        "the temporary file was renamed"
    );
}

#[tokio::test]
async fn corrupt_file_names_path() {
    let dir = TestDir::new("file-store-corrupt").unwrap();
    let path = dir.join("fleet.json");
    std::fs::write(&path, "{ not json").unwrap();

    let err = FileStateStore::new(&path).load().await.unwrap_err();

    assert!(matches!(err, StateError::CorruptRecord { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("fix or delete"), "{message}");
}
