//! An etcd cluster on loopback for tests: one to five members of the real `etcd` binary, each with its own
//! free client and peer ports and data directory, and controls to kill, pause and resume one member.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::{ChildProcess, HarnessError, TestDir, free_port};

/// Time a new cluster gets to elect a raft leader and report healthy on `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts to start a new cluster, each on fresh ports. A free port is released before etcd binds it, so another
/// process can take it in between. The member then exits, and the cluster starts again.
const START_ATTEMPTS: usize = 3;

/// Raft timing for tests: loopback round trips take microseconds, so short intervals make failover fast
/// without spurious elections (etcd wants the election timeout at least 5 x the heartbeat).
const HEARTBEAT_INTERVAL_MS: u32 = 50;
const ELECTION_TIMEOUT_MS: u32 = 500;

/// A running etcd cluster. Dropping it kills every member.
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    initial_cluster: String,
    dir: TestDir,
}

struct EtcdMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    process: Option<ChildProcess>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one of them reports healthy.
    pub async fn start(test: &str, size: usize) -> Result<EtcdCluster, HarnessError> {
        assert!(
            (1..=5).contains(&size),
            "an etcd test cluster has 1 to 5 members, not {size}"
        );
        let mut attempt = 1;
        loop {
            match Self::start_once(test, size).await {
                Err(HarnessError::Exited { name, log, .. }) if attempt < START_ATTEMPTS => {
                    tracing::warn!(member = %name, attempt, log = %log, "etcd member exited at start; starting the cluster again on fresh ports");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(test: &str, size: usize) -> Result<EtcdCluster, HarnessError> {
        let dir = TestDir::new(&format!("etcd-{test}"))?;
        let members: Vec<EtcdMember> = (0..size)
            .map(|index| {
                let name = format!("member{index}");
                EtcdMember {
                    data_dir: dir.join(format!("{name}.data")),
                    name,
                    client_port: free_port(),
                    peer_port: free_port(),
                    process: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|member| format!("{}=http://127.0.0.1:{}", member.name, member.peer_port))
            .collect::<Vec<_>>()
            .join(",");

        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            dir,
        };
        for index in 0..size {
            cluster.spawn_member(index)?;
        }
        for index in 0..size {
            cluster.wait_healthy(index, START_TIMEOUT).await?;
        }
        Ok(cluster)
    }

    /// Client URLs of every member, including stopped ones.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|index| self.endpoint(index))
            .collect()
    }

    pub fn endpoint(&self, index: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[index].client_port)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Kills member `index` with SIGKILL; its data directory stays, so [`EtcdCluster::restart`] rejoins it.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut process) = self.members[index].process.take() {
            process.kill();
        }
    }

    /// Starts a killed member again with its old data and waits until it is healthy.
    pub async fn restart(&mut self, index: usize) -> Result<(), HarnessError> {
        self.kill(index);
        self.spawn_member(index)?;
        self.wait_healthy(index, START_TIMEOUT).await
    }

    /// Freezes member `index` with SIGSTOP: its sockets stay open but it responds to nothing, as a hung or
    /// partitioned member does.
    pub fn pause(&self, index: usize) {
        self.signal(index, libc::SIGSTOP);
    }

    /// Thaws a member frozen by [`EtcdCluster::pause`].
    pub fn resume(&self, index: usize) {
        self.signal(index, libc::SIGCONT);
    }

    /// Returns the last lines of a member's log, for failure messages.
    pub fn log_tail(&self, index: usize, max_lines: usize) -> String {
        self.members[index]
            .process
            .as_ref()
            .map(|process| process.log_tail(max_lines))
            .unwrap_or_default()
    }

    fn signal(&self, index: usize, signal: libc::c_int) {
        let Some(process) = &self.members[index].process else {
            return;
        };
        let Ok(pid) = libc::pid_t::try_from(process.pid()) else {
            return;
        };
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    fn spawn_member(&mut self, index: usize) -> Result<(), HarnessError> {
        let member = &self.members[index];
        let client_url = format!("http://127.0.0.1:{}", member.client_port);
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let state = if member.data_dir.exists() {
            "existing"
        } else {
            "new"
        };

        let mut command = Command::new("etcd");
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "fleet-test"])
            .args(["--heartbeat-interval", &HEARTBEAT_INTERVAL_MS.to_string()])
            .args(["--election-timeout", &ELECTION_TIMEOUT_MS.to_string()])
            .args(["--log-level", "warn"])
            // A member without a peer must not try to reach anything but loopback.
            .env_remove("ETCD_DISCOVERY")
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
        let process = ChildProcess::spawn(&member.name, command, self.dir.path())?;
        self.members[index].process = Some(process);
        Ok(())
    }

    /// Waits until member `index` reports healthy. Fails at once, with its log, if the member exits.
    async fn wait_healthy(&mut self, index: usize, timeout: Duration) -> Result<(), HarnessError> {
        let url = format!("{}/health", self.endpoint(index));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .no_proxy()
            .build()
            .expect("a plain HTTP client always builds");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let member = &mut self.members[index];
            if let Some(process) = member.process.as_mut()
                && let Some(status) = process.exit_status()
            {
                return Err(HarnessError::Exited {
                    name: format!("etcd {}", member.name),
                    status: status.to_string(),
                    log: process.log_tail(20),
                });
            }
            if let Ok(response) = http.get(&url).send().await
                && let Ok(body) = response.text().await
                && body.contains("\"health\":\"true\"")
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "etcd {} at {url} to report healthy; its last log lines:\n{}",
                        self.members[index].name,
                        self.log_tail(index, 20)
                    ),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
