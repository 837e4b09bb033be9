//! The coordinator's own state: instance records, launch intents, termination grants, runtime overrides,
//! offering backoffs and a bounded event log.
//!
//! A cluster keeps it in etcd, where every change is fenced on the leader's term ([`EtcdStateStore`]). A
//! standalone coordinator keeps the same records in a local JSON file ([`FileStateStore`]).

mod fenced;
mod records;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use etcd_client::{GetOptions, TxnOp};
use tokio::sync::Mutex;

pub use fenced::{FencedStore, StoreError};
pub use records::{
    BackoffRecord, Change, Event, InstanceRecord, InstanceState, LaunchIntent, MAX_HISTORY,
    QueueDepths, QueueLimits, RuntimeOverrides, State, TerminationGrant, Transition,
};

use crate::auth::BootstrapRecord;
use crate::election::Term;
use crate::etcd::{EtcdError, EtcdPool};

/// Events kept in the log; older ones are deleted as new ones arrive.
pub const MAX_EVENTS: usize = 1_000;

/// Changes applied in one call at most, so one etcd transaction stays under etcd's default limit of 128
/// operations (each event may add a delete of the oldest one).
pub const MAX_CHANGES_PER_APPLY: usize = 60;

/// Errors of the state stores besides [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Store(#[from] StoreError),

    #[error(
        "{count} changes in one apply; split them into groups of at most {MAX_CHANGES_PER_APPLY}"
    )]
    TooManyChanges { count: usize },

    #[error("record {key} in the state store is not valid JSON ({reason}); fix or delete the key")]
    CorruptRecord { key: String, reason: String },

    #[error("cannot {action} state file {path}: {source}")]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<EtcdError> for StateError {
    fn from(err: EtcdError) -> Self {
        StateError::Store(StoreError::Etcd(err))
    }
}

/// Storage of the coordinator's records.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Reads every record, as a new leader does before it acts.
    async fn load(&self) -> Result<State, StateError>;

    /// Applies `changes` all or nothing. In etcd the call fails with [`StoreError::Fenced`] once the term
    /// has ended.
    async fn apply(&self, changes: &[Change]) -> Result<(), StateError>;
}

/// Records under `<key prefix>state/` in etcd, written under one term.
pub struct EtcdStateStore {
    fenced: FencedStore,
    pool: Arc<EtcdPool>,
    root: String,
}

impl EtcdStateStore {
    /// `key_prefix` is the cluster's root, such as `/clearml-fleet/prod/`.
    pub fn new(pool: Arc<EtcdPool>, term: Term, key_prefix: &str) -> Self {
        Self {
            fenced: FencedStore::new(pool.clone(), term),
            pool,
            root: format!("{}/state/", key_prefix.trim_end_matches('/')),
        }
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}/{id}", self.root)
    }

    fn event_key(&self, sequence: u64) -> String {
        self.key("events", &format!("{sequence:020}"))
    }

    fn operations(&self, changes: &[Change]) -> Vec<TxnOp> {
        let mut operations = Vec::with_capacity(changes.len() * 2);
        for change in changes {
            match change {
                Change::PutInstance(record) => {
                    operations.push(self.put("instances", &record.key, record))
                }
                Change::DeleteInstance(key) => {
                    operations.push(TxnOp::delete(self.key("instances", key), None))
                }
                Change::PutIntent(intent) => {
                    operations.push(self.put("intents", &intent.id, intent))
                }
                Change::DeleteIntent(id) => {
                    operations.push(TxnOp::delete(self.key("intents", id), None))
                }
                Change::PutGrant(grant) => {
                    operations.push(self.put("grants", &grant.instance_id, grant))
                }
                Change::DeleteGrant(id) => {
                    operations.push(TxnOp::delete(self.key("grants", id), None))
                }
                Change::PutOverrides(overrides) => {
                    operations.push(self.put("overrides", "current", overrides))
                }
                Change::PutBackoff(backoff) => {
                    operations.push(self.put("backoffs", &backoff.offering, backoff))
                }
                Change::DeleteBackoff(offering) => {
                    operations.push(TxnOp::delete(self.key("backoffs", offering), None));
                }
                Change::PutBootstrap(record) => {
                    operations.push(self.put("bootstraps", &record.intent_id, record))
                }
                Change::DeleteBootstrap(intent_id) => {
                    operations.push(TxnOp::delete(self.key("bootstraps", intent_id), None))
                }
                Change::PutQueueDepths(depths) => {
                    operations.push(self.put("queue_depths", "current", depths))
                }
                Change::AppendEvent(event) => {
                    let value = serde_json::to_vec(event).expect("records always serialize");
                    operations.push(TxnOp::put(self.event_key(event.sequence), value, None));
                    // Sequences are consecutive, so the event MAX_EVENTS back is the one to drop.
                    if let Some(oldest) = event.sequence.checked_sub(MAX_EVENTS as u64) {
                        operations.push(TxnOp::delete(self.event_key(oldest), None));
                    }
                }
            }
        }
        operations
    }

    fn put(&self, kind: &str, id: &str, value: &impl serde::Serialize) -> TxnOp {
        let bytes = serde_json::to_vec(value).expect("records always serialize");
        TxnOp::put(self.key(kind, id), bytes, None)
    }
}

#[async_trait]
impl StateStore for EtcdStateStore {
    async fn load(&self) -> Result<State, StateError> {
        load_from_etcd(&self.pool, &self.root).await
    }

    async fn apply(&self, changes: &[Change]) -> Result<(), StateError> {
        if changes.len() > MAX_CHANGES_PER_APPLY {
            return Err(StateError::TooManyChanges {
                count: changes.len(),
            });
        }
        if changes.is_empty() {
            return Ok(());
        }
        let operations = self.operations(changes);
        self.fenced
            .commit_all(
                &format!("{} state change(s) under {}", changes.len(), self.root),
                operations,
            )
            .await?;
        Ok(())
    }
}

/// Reads the records of the cluster rooted at `key_prefix` without a term, as a follower does to serve reads.
pub async fn read_etcd_state(pool: &EtcdPool, key_prefix: &str) -> Result<State, StateError> {
    load_from_etcd(
        pool,
        &format!("{}/state/", key_prefix.trim_end_matches('/')),
    )
    .await
}

async fn load_from_etcd(pool: &EtcdPool, root: &str) -> Result<State, StateError> {
    let root_owned = root.to_owned();
    let response = pool
        .run("load state", move |mut client| {
            let root = root_owned.clone();
            async move {
                client
                    .get(root, Some(GetOptions::new().with_prefix()))
                    .await
            }
        })
        .await?;

    let mut state = State::default();
    for kv in response.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let Some(rest) = key.strip_prefix(root) else {
            continue;
        };
        let (kind, _) = rest.split_once('/').unwrap_or((rest, ""));
        let corrupt = |err: serde_json::Error| StateError::CorruptRecord {
            key: key.clone(),
            reason: err.to_string(),
        };
        match kind {
            "instances" => {
                let record: InstanceRecord = serde_json::from_slice(kv.value()).map_err(corrupt)?;
                state.instances.insert(record.key.clone(), record);
            }
            "intents" => {
                let intent: LaunchIntent = serde_json::from_slice(kv.value()).map_err(corrupt)?;
                state.intents.insert(intent.id.clone(), intent);
            }
            "grants" => {
                let grant: TerminationGrant =
                    serde_json::from_slice(kv.value()).map_err(corrupt)?;
                state.grants.insert(grant.instance_id.clone(), grant);
            }
            "overrides" => state.overrides = serde_json::from_slice(kv.value()).map_err(corrupt)?,
            "queue_depths" => {
                state.queue_depths = serde_json::from_slice(kv.value()).map_err(corrupt)?
            }
            "backoffs" => {
                let backoff: BackoffRecord = serde_json::from_slice(kv.value()).map_err(corrupt)?;
                state.backoffs.insert(backoff.offering.clone(), backoff);
            }
            "bootstraps" => {
                let record: BootstrapRecord =
                    serde_json::from_slice(kv.value()).map_err(corrupt)?;
                state.bootstraps.insert(record.intent_id.clone(), record);
            }
            // Keys sort by zero-padded sequence, so events arrive oldest first.
            "events" => state
                .events
                .push(serde_json::from_slice(kv.value()).map_err(corrupt)?),
            _ => tracing::warn!(key = %key, "unknown key under the state prefix; ignored"),
        }
    }
    Ok(state)
}

/// Records in one JSON file, for a standalone coordinator. Each apply writes a new file and renames it over
/// the old one, so a crash leaves either the old or the new state, never a torn file.
///
/// NOTE: nothing stops two processes from using the same file; a standalone coordinator must run as a single
/// replica.
pub struct FileStateStore {
    path: PathBuf,
    state: Mutex<Option<State>>,
}

impl FileStateStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            state: Mutex::new(None),
        }
    }

    async fn read(&self) -> Result<State, StateError> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| StateError::CorruptRecord {
                key: self.path.display().to_string(),
                reason: err.to_string(),
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(StateError::File {
                action: "read",
                path: self.path.clone(),
                source,
            }),
        }
    }

    async fn write(&self, state: &State) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(state).expect("records always serialize");
        let temporary = temporary_path(&self.path);
        let file_error = |action, source| StateError::File {
            action,
            path: temporary.clone(),
            source,
        };

        if let Some(parent) = self.path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| file_error("create the directory of", source))?;
        }
        let mut file = tokio::fs::File::create(&temporary)
            .await
            .map_err(|source| file_error("create", source))?;
        tokio::io::AsyncWriteExt::write_all(&mut file, &bytes)
            .await
            .map_err(|source| file_error("write", source))?;
        file.sync_all()
            .await
            .map_err(|source| file_error("sync", source))?;
        tokio::fs::rename(&temporary, &self.path)
            .await
            .map_err(|source| StateError::File {
                action: "replace",
                path: self.path.clone(),
                source,
            })
    }
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|name| name.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

#[async_trait]
impl StateStore for FileStateStore {
    async fn load(&self) -> Result<State, StateError> {
        let mut cached = self.state.lock().await;
        let state = self.read().await?;
        *cached = Some(state.clone());
        Ok(state)
    }

    async fn apply(&self, changes: &[Change]) -> Result<(), StateError> {
        let mut cached = self.state.lock().await;
        let mut state = match cached.take() {
            Some(state) => state,
            None => self.read().await?,
        };
        let before = state.clone();
        state.apply(changes, MAX_EVENTS);
        match self.write(&state).await {
            Ok(()) => {
                *cached = Some(state);
                Ok(())
            }
            Err(err) => {
                *cached = Some(before);
                Err(err)
            }
        }
    }
}
