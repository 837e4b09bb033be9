//! Leader election and fenced writes against a real three-member etcd cluster on loopback.

use std::sync::Arc;
use std::time::Duration;

use fleet_coordinator::election::{ElectionConfig, Elector, Role, Term, current_leader};
use fleet_coordinator::etcd::{EtcdOptions, EtcdPool};
use fleet_coordinator::store::{FencedStore, StoreError};
use fleet_tests::etcd::EtcdCluster;
use fleet_tests::harness::{wait_until, wait_until_async};
use tokio::sync::watch;
use tokio::time::Instant;

/// Lease TTL for these tests; short, so failover and expiry tests finish quickly.
const TTL: Duration = Duration::from_secs(2);
const ELECTION_DEADLINE: Duration = Duration::from_secs(15);

async fn pool(endpoints: &[String]) -> Arc<EtcdPool> {
    let options = EtcdOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_millis(500),
    };
    Arc::new(EtcdPool::connect(endpoints, &options).await.unwrap())
}

fn config(test: &str, replica: &str) -> ElectionConfig {
    let mut config = ElectionConfig::new("fleet-test", test, replica, &format!("{replica}:7443"));
    config.lease_ttl = TTL;
    config
}

fn term_of(role: &watch::Receiver<Role>) -> Option<Term> {
    role.borrow().term().cloned()
}

/// Waits until exactly one of `roles` leads and returns its index and term.
async fn wait_for_single_leader(roles: &[watch::Receiver<Role>], what: &str) -> (usize, Term) {
    wait_until(ELECTION_DEADLINE, what, || {
        roles.iter().filter(|role| term_of(role).is_some()).count() == 1
    })
    .await
    .unwrap();
    let index = roles
        .iter()
        .position(|role| term_of(role).is_some())
        .unwrap();
    (index, term_of(&roles[index]).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_elects_exactly_one_leader() {
    let cluster = EtcdCluster::start("one-leader", 3).await.unwrap();
    let pool = pool(&cluster.endpoints()).await;
    let electors: Vec<Elector> = ["a", "b", "c"]
        .iter()
        .map(|replica| Elector::spawn(pool.clone(), config("one-leader", replica)))
        .collect();
    let roles: Vec<_> = electors.iter().map(Elector::role).collect();

    let (index, term) = wait_for_single_leader(&roles, "one of three replicas to lead").await;

    assert!(term.revision > 0);
    let leader = current_leader(&pool, &config("one-leader", "x").election_key)
        .await
        .unwrap()
        .expect("etcd names the leader");
    assert_eq!(leader.replica_id, ["a", "b", "c"][index]);
    assert_eq!(leader.address, format!("{}:7443", ["a", "b", "c"][index]));
    for elector in electors {
        elector.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_is_replaced_within_ttl() {
    let cluster = EtcdCluster::start("failover", 3).await.unwrap();
    let pool = pool(&cluster.endpoints()).await;
    let mut electors: Vec<Option<Elector>> = ["a", "b", "c"]
        .iter()
        .map(|replica| Some(Elector::spawn(pool.clone(), config("failover", replica))))
        .collect();
    let roles: Vec<_> = electors
        .iter()
        .map(|e| e.as_ref().unwrap().role())
        .collect();
    let (old_index, old_term) = wait_for_single_leader(&roles, "a first leader").await;

    // abort() leaves the lease in etcd, as a SIGKILLed process does, so the new leader must wait for it
    // to expire.
    let killed_at = Instant::now();
    electors[old_index].take().unwrap().abort();
    let survivors: Vec<_> = (0..3).filter(|index| *index != old_index).collect();
    wait_until(ELECTION_DEADLINE, "a surviving replica to lead", || {
        survivors
            .iter()
            .any(|index| term_of(&roles[*index]).is_some())
    })
    .await
    .unwrap();
    let failover = killed_at.elapsed();

    let new_index = *survivors
        .iter()
        .find(|index| term_of(&roles[**index]).is_some())
        .unwrap();
    let new_term = term_of(&roles[new_index]).unwrap();
    assert!(
        new_term.revision > old_term.revision,
        "terms grow: {old_term:?} -> {new_term:?}"
    );
    assert!(
        failover <= TTL + Duration::from_secs(2),
        "failover took {failover:?}"
    );
    eprintln!("failover after SIGKILL-like abort: {failover:?} with TTL {TTL:?}");
    for elector in electors.into_iter().flatten() {
        elector.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_leader_steps_down_before_successor() {
    let cluster = EtcdCluster::start("cut-off", 3).await.unwrap();
    let endpoints = cluster.endpoints();
    // Replica a reaches etcd only through member 0; b and c only through members 1 and 2.
    let pool_a = pool(&endpoints[..1]).await;
    let pool_bc = pool(&endpoints[1..]).await;
    let elector_a = Elector::spawn(pool_a.clone(), config("cut-off", "a"));
    let mut role_a = elector_a.role();
    wait_until(ELECTION_DEADLINE, "replica a to lead alone", || {
        term_of(&role_a).is_some()
    })
    .await
    .unwrap();
    let old_term = term_of(&role_a).unwrap();
    let elector_b = Elector::spawn(pool_bc.clone(), config("cut-off", "b"));
    let elector_c = Elector::spawn(pool_bc.clone(), config("cut-off", "c"));
    let roles_bc = [elector_b.role(), elector_c.role()];

    cluster.pause(0);
    let paused_at = Instant::now();
    role_a
        .wait_for(|role| *role == Role::Follower)
        .await
        .unwrap();
    let stepped_down = paused_at.elapsed();
    let (_, new_term) = wait_for_single_leader(&roles_bc, "b or c to lead").await;
    let successor = paused_at.elapsed();

    assert!(
        stepped_down < TTL,
        "a stepped down after {stepped_down:?}, not before its lease could expire"
    );
    assert!(
        stepped_down < successor,
        "a stopped ({stepped_down:?}) before the successor started ({successor:?})"
    );
    assert!(new_term.revision > old_term.revision);
    eprintln!(
        "cut-off leader stepped down after {stepped_down:?}; successor elected after {successor:?}"
    );

    cluster.resume(0);
    let stale = FencedStore::new(pool_a.clone(), old_term.clone());
    let write = wait_until_async(ELECTION_DEADLINE, "member 0 to answer again", || {
        let stale = stale.clone();
        async move {
            !matches!(
                stale
                    .put("/fleet-test/cut-off/state/x", b"stale".to_vec())
                    .await,
                Err(StoreError::Etcd(_))
            )
        }
    })
    .await;
    write.unwrap();
    let err = stale
        .put("/fleet-test/cut-off/state/x", b"stale".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("term {}", old_term.revision)),
        "{err}"
    );
    let current = FencedStore::new(pool_bc.clone(), new_term);
    current
        .put("/fleet-test/cut-off/state/x", b"fresh".to_vec())
        .await
        .unwrap();
    assert_eq!(
        current.get("/fleet-test/cut-off/state/x").await.unwrap(),
        Some(b"fresh".to_vec())
    );

    for elector in [elector_a, elector_b, elector_c] {
        elector.shutdown().await;
    }
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lost_member_changes_nothing() {
    let mut cluster = EtcdCluster::start("lose-one", 3).await.unwrap();
    let pool = pool(&cluster.endpoints()).await;
    let elector = Elector::spawn(pool.clone(), config("lose-one", "a"));
    let mut role = elector.role();
    wait_until(ELECTION_DEADLINE, "replica a to lead", || {
        term_of(&role).is_some()
    })
    .await
    .unwrap();
    let term = term_of(&role).unwrap();
    role.borrow_and_update();

    // Kill the member the pool prefers, so the next keep-alives meet a dead member first.
    let (preferred, _) = pool.preferred_client();
    let index = cluster
        .endpoints()
        .iter()
        .position(|e| *e == preferred)
        .unwrap();
    cluster.kill(index);

    // The leader must hold its term through several lease periods. This is an observation window,
    // not a synchronisation: no change may happen in it.
    let window = tokio::time::timeout(TTL * 3, role.changed()).await;
    assert!(
        window.is_err(),
        "the role changed after one member died: {:?}",
        role.borrow()
    );
    assert_eq!(term_of(&role), Some(term.clone()));
    let store = FencedStore::new(pool.clone(), term);
    store
        .put("/fleet-test/lose-one/state/x", b"ok".to_vec())
        .await
        .unwrap();

    elector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_quorum_stops_the_leader() {
    let mut cluster = EtcdCluster::start("quorum", 3).await.unwrap();
    let pool = pool(&cluster.endpoints()).await;
    let elector = Elector::spawn(pool.clone(), config("quorum", "a"));
    let mut role = elector.role();
    wait_until(ELECTION_DEADLINE, "replica a to lead", || {
        term_of(&role).is_some()
    })
    .await
    .unwrap();
    let old_term = term_of(&role).unwrap();

    cluster.kill(1);
    cluster.kill(2);
    let lost_at = Instant::now();
    role.wait_for(|role| *role == Role::Follower).await.unwrap();
    let stepped_down = lost_at.elapsed();
    // etcd renews leases on the raft leader without consensus, so a raft leader left alone keeps
    // renewing until check-quorum deposes it one election timeout (500 ms here) later. The replica must
    // stop within the TTL after that last renewal.
    assert!(
        stepped_down < TTL + Duration::from_millis(500),
        "the leader kept acting {stepped_down:?} without a quorum"
    );

    let store = FencedStore::new(pool.clone(), old_term.clone());
    let err = store
        .put("/fleet-test/quorum/state/x", b"no".to_vec())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Etcd(_)),
        "no write without a quorum: {err:?}"
    );

    cluster.restart(1).await.unwrap();
    cluster.restart(2).await.unwrap();
    wait_until(
        ELECTION_DEADLINE,
        "a leader once the quorum is back",
        || term_of(&role).is_some(),
    )
    .await
    .unwrap();
    assert!(term_of(&role).unwrap().revision > old_term.revision);
    elector.shutdown().await;
}
