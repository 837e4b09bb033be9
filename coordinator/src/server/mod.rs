//! One coordinator replica: the election, the fleet while it leads, and the gRPC and HTTP servers it runs
//! whether it leads or not.

mod agent_api;
mod convert;
mod fleet_api;
mod http;
mod members;
mod run;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;

use crate::auth::ApiAuth;
use crate::config::Config;
use crate::election::{Role, current_leader};
use crate::etcd::EtcdPool;
use crate::fleet::FleetHandle;
use crate::keys::AgentKeys;
use crate::metrics::Metrics;
use crate::store::{FileStateStore, State, StateStore, read_etcd_state};

pub use agent_api::AgentApi;
pub use fleet_api::FleetApi;
pub use run::{RunError, RunOptions, run};

/// Metadata key that carries the leader's address on a write refused by a follower.
pub const LEADER_METADATA: &str = "fleet-leader";

/// Time limit for the etcd reads a follower makes to serve a call.
const FOLLOWER_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// Source of the records for a replica that does not lead.
pub enum StateSource {
    Etcd {
        pool: Arc<EtcdPool>,
        key_prefix: String,
        election_key: String,
    },
    File(Arc<FileStateStore>),
}

/// State that the servers of one replica share.
pub struct Node {
    pub config: Arc<Config>,
    pub replica_id: String,
    pub advertise_address: String,
    pub role: watch::Receiver<Role>,
    fleet: RwLock<Option<FleetHandle>>,
    pub auth: ApiAuth,
    pub keys: AgentKeys,
    pub metrics: Arc<Metrics>,
    pub source: StateSource,
}

impl Node {
    pub fn new(
        config: Arc<Config>,
        advertise_address: String,
        role: watch::Receiver<Role>,
        keys: AgentKeys,
        metrics: Arc<Metrics>,
        source: StateSource,
    ) -> Self {
        Self {
            auth: ApiAuth::new(&config.api.tokens),
            replica_id: config.replica_id.clone(),
            config,
            advertise_address,
            role,
            fleet: RwLock::new(None),
            keys,
            metrics,
            source,
        }
    }

    pub fn set_fleet(&self, fleet: Option<FleetHandle>) {
        *self
            .fleet
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = fleet;
    }

    /// Returns the running fleet while this replica leads.
    pub fn fleet(&self) -> Option<FleetHandle> {
        let fleet = self
            .fleet
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()?;
        fleet.core.may_act().ok()?;
        Some(fleet)
    }

    /// Returns the running fleet, or FAILED_PRECONDITION with the leader's address for a write sent to a follower.
    pub async fn require_leader(&self) -> Result<FleetHandle, Status> {
        if let Some(fleet) = self.fleet() {
            return Ok(fleet);
        }
        let leader = self.leader().await;
        let message = match &leader {
            Some((id, address)) => format!(
                "replica {} is not the leader; send writes to the leader {id} at {address}",
                self.replica_id
            ),
            None => format!(
                "replica {} is not the leader and no leader is elected now; retry in a few seconds",
                self.replica_id
            ),
        };
        let mut status = Status::failed_precondition(message);
        if let Some((_, address)) = leader
            && let Ok(value) = address.parse()
        {
            status.metadata_mut().insert(LEADER_METADATA, value);
        }
        Err(status)
    }

    /// Looks up the current leader's replica id and address, if one is elected.
    pub async fn leader(&self) -> Option<(String, String)> {
        self.leader_within(FOLLOWER_READ_TIMEOUT).await
    }

    /// [`Node::leader`] with a limit on the etcd lookup, `None` when it takes longer.
    pub async fn leader_within(&self, limit: Duration) -> Option<(String, String)> {
        if self.fleet().is_some() {
            return Some((self.replica_id.clone(), self.advertise_address.clone()));
        }
        match &self.source {
            StateSource::Etcd {
                pool, election_key, ..
            } => {
                let lookup = current_leader(pool, election_key);
                match tokio::time::timeout(limit, lookup).await {
                    Ok(Ok(Some(info))) => Some((info.replica_id, info.address)),
                    _ => None,
                }
            }
            StateSource::File(_) => None,
        }
    }

    /// Reads the records: the leader's own, or from etcd on a follower.
    pub async fn read_state(&self) -> Result<State, Status> {
        if let Some(fleet) = self.fleet() {
            return Ok(fleet.core.registry.lock().await.state().clone());
        }
        let read = async {
            match &self.source {
                StateSource::Etcd {
                    pool, key_prefix, ..
                } => read_etcd_state(pool, key_prefix).await,
                StateSource::File(store) => store.load().await,
            }
        };
        match tokio::time::timeout(FOLLOWER_READ_TIMEOUT, read).await {
            Ok(Ok(state)) => Ok(state),
            Ok(Err(err)) => Err(Status::unavailable(format!(
                "cannot read the cluster state: {err}; retry, or ask another replica"
            ))),
            Err(_) => Err(Status::unavailable(format!(
                "reading the cluster state took longer than {} s; etcd may have lost quorum",
                FOLLOWER_READ_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Returns the term this replica leads under, or 0.
    pub fn term(&self) -> i64 {
        self.role.borrow().term().map_or(0, |term| term.revision)
    }
}
