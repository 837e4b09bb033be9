//! Fenced writes: every write is an etcd transaction that succeeds only while the writer's term is the
//! current one, so a deposed leader can never change state on stale authority.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::election::Term;
use crate::etcd::{EtcdError, EtcdPool};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "write to {key} rejected: term {term} has ended (its leader key is gone or belongs to a newer leader); this replica must stop acting"
    )]
    Fenced { key: String, term: i64 },

    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// Writes under the authority of one term.
#[derive(Clone)]
pub struct FencedStore {
    pool: Arc<EtcdPool>,
    term: Term,
}

impl FencedStore {
    pub fn new(pool: Arc<EtcdPool>, term: Term) -> Self {
        Self { pool, term }
    }

    pub fn term(&self) -> &Term {
        &self.term
    }

    /// Puts `value` at `key` if the term still holds.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.commit(key, vec![TxnOp::put(key, value, None)]).await
    }

    /// Deletes `key` if the term still holds.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.commit(key, vec![TxnOp::delete(key, None)]).await
    }

    /// Applies `operations` in one transaction if the term still holds; `description` names them in errors.
    /// etcd limits a transaction to 128 operations by default (`--max-txn-ops`).
    pub async fn commit_all(
        &self,
        description: &str,
        operations: Vec<TxnOp>,
    ) -> Result<(), StoreError> {
        self.commit(description, operations).await
    }

    /// Reads `key`. Reads are not fenced: a follower may serve them.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let owned = key.to_owned();
        let response = self
            .pool
            .run("get", move |mut client| {
                let key = owned.clone();
                async move { client.get(key, None).await }
            })
            .await?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Applies `operations` in a transaction guarded by the leader key's create revision. Repeating a
    /// transaction whose response was lost is safe, because puts and deletes are idempotent.
    async fn commit(&self, key: &str, operations: Vec<TxnOp>) -> Result<(), StoreError> {
        let leader_key = self.term.leader_key.clone();
        let revision = self.term.revision;
        let response = self
            .pool
            .run("fenced write", move |mut client| {
                let guard =
                    Compare::create_revision(leader_key.clone(), CompareOp::Equal, revision);
                let transaction = Txn::new().when([guard]).and_then(operations.clone());
                async move { client.txn(transaction).await }
            })
            .await?;

        if response.succeeded() {
            Ok(())
        } else {
            tracing::warn!(key, term = revision, "fenced write rejected: term ended");
            Err(StoreError::Fenced {
                key: key.to_owned(),
                term: revision,
            })
        }
    }
}
