//! Leader election over etcd: one replica of a cluster leads, the others wait.
//!
//! Each replica grants a lease, keeps it alive every TTL/3, and campaigns on the election key with the
//! etcd election API. The winner's term is the create revision of its leader key, which grows with every
//! new leader, so state writes can be fenced on it (see [`crate::store`]).
//!
//! A leader steps down on its own before its lease can expire: it counts as leader only until
//! `time the last successful keep-alive was sent + granted TTL - safety margin`. A keep-alive that fails on
//! one member is retried on the next at once, so the loss of one etcd member changes nothing, while a
//! replica cut off from the quorum stops leading before any other replica can be elected.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, LeaderKey};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::etcd::{EtcdError, EtcdPool};

/// Settings of one replica's campaign.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// The election name, `/<prefix>/<cluster>/leader`.
    pub election_key: String,
    /// This replica's id, unique in the cluster.
    pub replica_id: String,
    /// The gRPC address followers return to clients that must write to the leader.
    pub advertise_address: String,
    /// Lease TTL; etcd rounds it to whole seconds.
    pub lease_ttl: Duration,
}

impl ElectionConfig {
    pub fn new(prefix: &str, cluster: &str, replica_id: &str, advertise_address: &str) -> Self {
        Self {
            election_key: format!("/{}/{}/leader", prefix.trim_matches('/'), cluster),
            replica_id: replica_id.to_owned(),
            advertise_address: advertise_address.to_owned(),
            lease_ttl: Duration::from_secs(5),
        }
    }

    fn ttl_seconds(&self) -> i64 {
        self.lease_ttl.as_secs().max(1) as i64
    }

    /// Part of the TTL the leader gives up, so it stops before the lease can expire on the etcd side even
    /// with clock drift between the two.
    fn safety_margin(&self) -> Duration {
        (self.lease_ttl / 5).max(Duration::from_millis(200))
    }
}

/// The role of a replica: only a leader may act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Follower,
    Leader(Term),
}

impl Role {
    pub fn term(&self) -> Option<&Term> {
        match self {
            Role::Leader(term) => Some(term),
            Role::Follower => None,
        }
    }
}

/// The authority of one leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// Create revision of the leader key; larger for every later leader.
    pub revision: i64,
    /// The leader key in etcd (`<election key>/<lease id in hex>`); it exists exactly while this term lasts.
    pub leader_key: Vec<u8>,
    pub lease_id: i64,
}

/// The value a leader publishes on its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    pub replica_id: String,
    pub address: String,
}

/// The reason a term ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Loss {
    /// No keep-alive succeeded before the leadership deadline.
    KeepAliveDeadline,
    /// etcd reported the lease gone (TTL 0).
    LeaseExpired,
    /// The leader key no longer has this term's revision.
    KeyLost,
    Shutdown,
}

/// A running campaign; [`Elector::shutdown`] resigns and releases the lease.
pub struct Elector {
    role: watch::Receiver<Role>,
    deadline: watch::Receiver<Option<Instant>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Elector {
    /// Starts campaigning. The returned elector's [`Elector::role`] changes to `Leader` when this replica
    /// wins and back to `Follower` the moment it can no longer be sure it leads.
    pub fn spawn(pool: Arc<EtcdPool>, config: ElectionConfig) -> Elector {
        let (role_sender, role) = watch::channel(Role::Follower);
        let (deadline_sender, deadline) = watch::channel(None);
        let (stop, stop_receiver) = watch::channel(false);
        let task = tokio::spawn(campaign_loop(
            pool,
            config,
            role_sender,
            deadline_sender,
            stop_receiver,
        ));
        Elector {
            role,
            deadline,
            stop,
            task,
        }
    }

    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Returns the instant until which the current term may act, `None` while this replica does not lead. It moves
    /// forward with every keep-alive. Checking it besides the role guards against a process that was paused
    /// (SIGSTOP, a long GC-like stall) and runs again before its election task has noticed the lost lease.
    pub fn deadline(&self) -> watch::Receiver<Option<Instant>> {
        self.deadline.clone()
    }

    /// Resigns (if leading), revokes the lease and waits for the campaign task to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(err) = self.task.await {
            warn!(error = %err, "election task ended abnormally");
        }
    }

    /// Stops the campaign without resigning or revoking, as a killed process would leave it: the lease
    /// stays until its TTL runs out.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Returns the current leader of `election_key`, or `None` while there is none.
pub async fn current_leader(
    pool: &EtcdPool,
    election_key: &str,
) -> Result<Option<LeaderInfo>, EtcdError> {
    let key = election_key.to_owned();
    let response = pool
        .run("get leader", move |mut client| {
            let key = key.clone();
            async move { client.leader(key).await }
        })
        .await;
    let response = match response {
        Ok(response) => response,
        // The election service returns "no leader" as an error status.
        Err(EtcdError::Rejected { source, .. }) if source.to_string().contains("no leader") => {
            return Ok(None);
        }
        Err(err) => return Err(err),
    };
    Ok(response
        .kv()
        .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
}

async fn campaign_loop(
    pool: Arc<EtcdPool>,
    config: ElectionConfig,
    role: watch::Sender<Role>,
    deadline: watch::Sender<Option<Instant>>,
    mut stop: watch::Receiver<bool>,
) {
    let value = serde_json::to_vec(&LeaderInfo {
        replica_id: config.replica_id.clone(),
        address: config.advertise_address.clone(),
    })
    .expect("LeaderInfo always serializes");
    let mut retry_delay = Duration::from_millis(200);

    while !*stop.borrow() {
        let lease = match grant_lease(&pool, &config).await {
            Ok(lease) => lease,
            Err(err) => {
                warn!(replica = %config.replica_id, error = %err, retry_ms = retry_delay.as_millis() as u64, "cannot grant an etcd lease; retrying");
                wait_or_stop(&mut stop, retry_delay).await;
                retry_delay = (retry_delay * 2).min(config.lease_ttl);
                continue;
            }
        };
        retry_delay = Duration::from_millis(200);

        let loss = run_term(&pool, &config, &value, lease, &role, &deadline, &mut stop).await;
        deadline.send_replace(None);
        role.send_replace(Role::Follower);
        if loss != Loss::Shutdown {
            warn!(replica = %config.replica_id, lease_id = lease.id, reason = ?loss, "campaign session ended; campaigning again");
        }
        release(&pool, &config, lease.id).await;
    }
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    /// The leader may act until this instant; it moves forward with every successful keep-alive.
    valid_until: Instant,
}

async fn grant_lease(pool: &EtcdPool, config: &ElectionConfig) -> Result<Lease, EtcdError> {
    let ttl = config.ttl_seconds();
    let requested_at = Instant::now();
    let response = pool
        .run("lease grant", move |mut client| async move {
            client.lease_grant(ttl, None).await
        })
        .await?;
    let granted = Duration::from_secs(response.ttl().max(0) as u64);
    Ok(Lease {
        id: response.id(),
        valid_until: requested_at + granted.saturating_sub(config.safety_margin()),
    })
}

/// Campaigns with `lease` and, once elected, leads until the lease or the key is lost or `stop` is set.
async fn run_term(
    pool: &EtcdPool,
    config: &ElectionConfig,
    value: &[u8],
    lease: Lease,
    role: &watch::Sender<Role>,
    deadline_out: &watch::Sender<Option<Instant>>,
    stop: &mut watch::Receiver<bool>,
) -> Loss {
    let (valid_until_sender, mut valid_until) = watch::channel(lease.valid_until);
    let keeper = keep_alive_loop(pool, config, lease.id, valid_until_sender);
    tokio::pin!(keeper);

    let leader = tokio::select! {
        loss = &mut keeper => return loss,
        _ = stopped(stop) => return Loss::Shutdown,
        leader = campaign(pool, config, value, lease.id) => leader,
    };
    let term = Term {
        revision: leader.rev(),
        leader_key: leader.key().to_vec(),
        lease_id: lease.id,
    };

    // Only a lease that is still valid may start a term: the campaign may have waited past a lost
    // keep-alive.
    if Instant::now() >= *valid_until.borrow() {
        return Loss::KeepAliveDeadline;
    }
    info!(replica = %config.replica_id, term = term.revision, lease_id = lease.id, "elected leader");
    deadline_out.send_replace(Some(*valid_until.borrow()));
    role.send_replace(Role::Leader(term.clone()));

    let loss = loop {
        let deadline = *valid_until.borrow_and_update();
        deadline_out.send_replace(Some(deadline));
        tokio::select! {
            loss = &mut keeper => break loss,
            _ = tokio::time::sleep_until(deadline) => break Loss::KeepAliveDeadline,
            _ = valid_until.changed() => {
                if !leader_key_holds(pool, &term).await {
                    break Loss::KeyLost;
                }
            }
            _ = stopped(stop) => break Loss::Shutdown,
        }
    };

    // Step down before anything else, so the actors stop at once.
    deadline_out.send_replace(None);
    role.send_replace(Role::Follower);
    if loss == Loss::Shutdown {
        resign(pool, &leader).await;
        info!(replica = %config.replica_id, term = term.revision, "resigned leadership");
    } else {
        warn!(replica = %config.replica_id, term = term.revision, reason = ?loss, "lost leadership; stopped acting");
    }
    loss
}

/// Campaigns until elected, moving to another member when the one serving the campaign fails. A repeated
/// campaign with the same lease reuses the same candidate key, so retrying does not queue twice.
async fn campaign(
    pool: &EtcdPool,
    config: &ElectionConfig,
    value: &[u8],
    lease_id: i64,
) -> LeaderKey {
    loop {
        let (endpoint, mut client) = pool.preferred_client();
        let attempt = client
            .campaign(config.election_key.as_str(), value.to_vec(), lease_id)
            .await;
        match attempt.map(|mut response| response.take_leader()) {
            Ok(Some(leader)) => return leader,
            Ok(None) => {
                warn!(replica = %config.replica_id, endpoint, "campaign returned no leader key; retrying");
            }
            Err(err) => {
                warn!(replica = %config.replica_id, endpoint, error = %err, "campaign failed; retrying on the next member");
                pool.skip_preferred();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Renews the lease every TTL/3 and moves `valid_until` forward after each success. Returns when the
/// lease cannot be renewed before `valid_until` or etcd reports it expired.
async fn keep_alive_loop(
    pool: &EtcdPool,
    config: &ElectionConfig,
    lease_id: i64,
    valid_until: watch::Sender<Instant>,
) -> Loss {
    let interval = config.lease_ttl / 3;
    let margin = config.safety_margin();
    let mut next_renewal = Instant::now() + interval;

    loop {
        tokio::time::sleep_until(next_renewal).await;
        let deadline = *valid_until.borrow();
        let sent_at = Instant::now();
        if sent_at >= deadline {
            return Loss::KeepAliveDeadline;
        }

        match tokio::time::timeout_at(deadline, keep_alive_once(pool, lease_id)).await {
            Ok(Ok(ttl)) if ttl > 0 => {
                let granted = Duration::from_secs(ttl as u64);
                valid_until.send_replace(sent_at + granted.saturating_sub(margin));
                next_renewal = sent_at + interval;
            }
            Ok(Ok(_)) => return Loss::LeaseExpired,
            Ok(Err(err)) => {
                // Every member failed this round; try again soon while the lease may still be valid.
                warn!(replica = %config.replica_id, lease_id, error = %err, "lease keep-alive failed; retrying");
                next_renewal = Instant::now() + Duration::from_millis(100);
            }
            Err(_) => return Loss::KeepAliveDeadline,
        }
    }
}

async fn keep_alive_once(pool: &EtcdPool, lease_id: i64) -> Result<i64, EtcdError> {
    pool.run("lease keep-alive", move |mut client: Client| async move {
        let (mut keeper, mut responses) = client.lease_keep_alive(lease_id).await?;
        keeper.keep_alive().await?;
        match responses.message().await? {
            Some(response) => Ok(response.ttl()),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "keep-alive stream closed without a response".to_owned(),
            )),
        }
    })
    .await
}

/// Checks that the leader key still exists with this term's create revision.
async fn leader_key_holds(pool: &EtcdPool, term: &Term) -> bool {
    let key = term.leader_key.clone();
    let response = pool
        .run("check leader key", move |mut client| {
            let key = key.clone();
            async move { client.get(key, None).await }
        })
        .await;
    match response {
        Ok(response) => response
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == term.revision),
        // An unreachable etcd is handled by the keep-alive deadline, not here.
        Err(_) => true,
    }
}

async fn resign(pool: &EtcdPool, leader: &LeaderKey) {
    let leader = leader.clone();
    let result = pool
        .run("resign", move |mut client| {
            let options = etcd_client::ResignOptions::new().with_leader(leader.clone());
            async move { client.resign(Some(options)).await }
        })
        .await;
    if let Err(err) = result {
        warn!(error = %err, "resign failed; the lease revocation or its TTL ends the term");
    }
}

async fn release(pool: &EtcdPool, config: &ElectionConfig, lease_id: i64) {
    let result = pool
        .run("lease revoke", move |mut client| async move {
            client.lease_revoke(lease_id).await
        })
        .await;
    if let Err(err) = result {
        warn!(replica = %config.replica_id, lease_id, error = %err, "lease revoke failed; it expires after its TTL");
    }
}

async fn wait_or_stop(stop: &mut watch::Receiver<bool>, delay: Duration) {
    let _ = tokio::time::timeout(delay, stopped(stop)).await;
}

/// Resolves once `stop` is set. The sender lives in the [`Elector`], so a dropped sender also means stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
