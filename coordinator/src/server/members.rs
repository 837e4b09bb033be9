//! Cluster membership: each replica keeps `<prefix>/members/<replica id>` alive with its own lease, so
//! GetClusterStatus can list every live replica and its address.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{GetOptions, PutOptions};

use super::{Node, StateSource};
use crate::etcd::EtcdPool;

/// TTL of a member key; a replica that stops renewing disappears from the list after this long.
const MEMBER_TTL_SECONDS: i64 = 10;

/// Keeps this replica's member key alive until the task is aborted.
pub async fn announce(
    pool: Arc<EtcdPool>,
    key_prefix: String,
    replica_id: String,
    address: String,
) {
    let key = member_key(&key_prefix, &replica_id);
    loop {
        let lease = pool
            .run("grant member lease", |mut client| async move {
                client.lease_grant(MEMBER_TTL_SECONDS, None).await
            })
            .await;
        let Ok(lease) = lease else {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        };
        let lease_id = lease.id();
        let put = pool
            .run("announce member", |mut client| {
                let key = key.clone();
                let address = address.clone();
                async move {
                    client
                        .put(key, address, Some(PutOptions::new().with_lease(lease_id)))
                        .await
                }
            })
            .await;
        if put.is_err() {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        loop {
            tokio::time::sleep(Duration::from_secs((MEMBER_TTL_SECONDS / 3) as u64)).await;
            let renewed = pool
                .run("renew member lease", |mut client| async move {
                    let (mut keeper, mut responses) = client.lease_keep_alive(lease_id).await?;
                    keeper.keep_alive().await?;
                    responses.message().await
                })
                .await;
            match renewed {
                Ok(Some(response)) if response.ttl() > 0 => {}
                // The lease expired (etcd was unreachable for a while): announce again with a new one.
                _ => break,
            }
        }
    }
}

/// Live replicas and their addresses, by replica id.
pub async fn list(node: &Node) -> Vec<(String, String)> {
    let StateSource::Etcd {
        pool, key_prefix, ..
    } = &node.source
    else {
        return vec![(node.replica_id.clone(), node.advertise_address.clone())];
    };
    let prefix = member_key(key_prefix, "");
    let read = pool.run("list members", |mut client| {
        let prefix = prefix.clone();
        async move {
            client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
        }
    });
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(Ok(response)) => response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let replica = key.strip_prefix(&prefix)?.to_owned();
                Some((replica, String::from_utf8_lossy(kv.value()).into_owned()))
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn member_key(key_prefix: &str, replica_id: &str) -> String {
    format!("{}/members/{replica_id}", key_prefix.trim_end_matches('/'))
}
