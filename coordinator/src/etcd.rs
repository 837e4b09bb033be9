//! A connection to an etcd cluster that moves to another member when one fails.
//!
//! etcd-client balances one channel over a static endpoint list, and keeps sending part of the requests to a
//! dead member. This pool keeps one client per member instead, and sends each request to the member that
//! responded last, moving on to the next member on `Unavailable`, a deadline or a transport error.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tracing::{debug, warn};

/// Errors of etcd calls.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error(
        "no etcd endpoints configured; set etcd.endpoints, for example [\"http://127.0.0.1:2379\"]"
    )]
    NoEndpoints,

    #[error(
        "cannot create an etcd client for {endpoint}: {source}; check that it is a URL such as http://127.0.0.1:2379"
    )]
    Connect {
        endpoint: String,
        #[source]
        source: etcd_client::Error,
    },

    #[error("etcd {operation} failed on every member ({endpoints}); last error: {last_error}")]
    Unavailable {
        operation: String,
        endpoints: String,
        last_error: String,
    },

    #[error("etcd {operation} failed: {source}")]
    Rejected {
        operation: String,
        #[source]
        source: etcd_client::Error,
    },
}

/// Settings of the etcd connection.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub connect_timeout: Duration,
    /// Limit on one request to one member; the pool then tries the next member.
    pub request_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
        }
    }
}

/// One client per etcd member.
pub struct EtcdPool {
    members: Vec<Member>,
    /// Index of the member that responded last.
    preferred: AtomicUsize,
    request_timeout: Duration,
}

struct Member {
    endpoint: String,
    client: Client,
}

impl EtcdPool {
    /// Creates a client per endpoint. Connections are made lazily, so a member that is down now does not
    /// stop the start.
    pub async fn connect(endpoints: &[String], options: &EtcdOptions) -> Result<Self, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }

        let mut members = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            // require_leader makes a member without a raft leader (one cut off from the quorum) fail the
            // request at once instead of serving stale data, so the pool moves to a member that has one.
            let connect_options = ConnectOptions::new()
                .with_connect_timeout(options.connect_timeout)
                .with_timeout(options.request_timeout)
                .with_keep_alive(Duration::from_secs(2), options.request_timeout)
                .with_require_leader(true);
            let client = Client::connect([endpoint.as_str()], Some(connect_options))
                .await
                .map_err(|source| EtcdError::Connect {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            members.push(Member {
                endpoint: endpoint.clone(),
                client,
            });
        }

        Ok(Self {
            members,
            preferred: AtomicUsize::new(0),
            request_timeout: options.request_timeout,
        })
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| member.endpoint.clone())
            .collect()
    }

    /// Runs `request` on one member after another, starting with the one that responded last, until one
    /// responds or every member failed with an error that another member might not have.
    pub async fn run<T, F, Fut>(&self, operation: &str, request: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let count = self.members.len();
        let first = self.preferred.load(Ordering::Relaxed) % count;
        let mut last_error = String::new();

        for offset in 0..count {
            let index = (first + offset) % count;
            let member = &self.members[index];
            let attempt =
                tokio::time::timeout(self.request_timeout, request(member.client.clone()));
            match attempt.await {
                Ok(Ok(value)) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(value);
                }
                Ok(Err(err)) if !is_member_failure(&err) => {
                    return Err(EtcdError::Rejected {
                        operation: operation.to_owned(),
                        source: err,
                    });
                }
                Ok(Err(err)) => {
                    debug!(operation, endpoint = %member.endpoint, error = %err, "etcd member failed, trying the next");
                    last_error = format!("{}: {err}", member.endpoint);
                }
                Err(_) => {
                    debug!(operation, endpoint = %member.endpoint, "etcd member timed out, trying the next");
                    last_error = format!(
                        "{}: no answer within {:?}",
                        member.endpoint, self.request_timeout
                    );
                }
            }
        }

        warn!(operation, last_error = %last_error, "etcd request failed on every member");
        Err(EtcdError::Unavailable {
            operation: operation.to_owned(),
            endpoints: self.endpoints().join(", "),
            last_error,
        })
    }

    /// Returns a client of the member that responded last, for long-running calls such as a campaign.
    pub fn preferred_client(&self) -> (String, Client) {
        let index = self.preferred.load(Ordering::Relaxed) % self.members.len();
        let member = &self.members[index];
        (member.endpoint.clone(), member.client.clone())
    }

    /// Makes the next request start at the member after the preferred one, after a long-running call on it
    /// failed.
    pub fn skip_preferred(&self) {
        self.preferred.fetch_add(1, Ordering::Relaxed);
    }
}

/// Returns true for failures of the member or the connection, which another member may not have.
fn is_member_failure(err: &etcd_client::Error) -> bool {
    use tonic::Code;
    match err {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
        ),
        etcd_client::Error::LeaseKeepAliveError(_) | etcd_client::Error::ElectError(_) => true,
        _ => false,
    }
}
