//! Reads the ClearML side of the fleet: how many tasks wait in each queue and what each worker runs.
//!
//! One poll is two API calls however many queues and workers there are: `queues.get_all` and
//! `workers.get_all`. Each [`Observation`] carries the time it was taken, and [`Observation::is_fresh`] lets
//! the caller refuse to decide launches or terminations on data older than it accepts.

use std::collections::BTreeMap;
use std::time::Duration;

use clearml_api::queues::GetAllQueues;
use clearml_api::{Client, Error};

/// Fields requested from `queues.get_all`: the entries are all the fleet needs of a queue.
const QUEUE_FIELDS: [&str; 3] = ["id", "name", "entries"];

/// The result of one poll.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// When the poll started (the caller's clock), so the data is at least this old.
    pub taken_at: Duration,
    /// Waiting tasks by queue name, for the configured queues found on the server.
    pub waiting: BTreeMap<String, u32>,
    /// Queue id by name.
    pub queue_ids: BTreeMap<String, String>,
    /// Configured queues that the server does not have.
    pub missing_queues: Vec<String>,
    /// Running task by worker id; `None` for an idle worker.
    pub workers: BTreeMap<String, Option<String>>,
}

impl Observation {
    /// Returns the waiting tasks of `queue`, 0 for a queue the poll did not see.
    pub fn waiting(&self, queue: &str) -> u32 {
        self.waiting.get(queue).copied().unwrap_or(0)
    }

    /// Tells whether the observation is recent enough to decide on at `now`.
    pub fn is_fresh(&self, now: Duration, max_age: Duration) -> bool {
        now.saturating_sub(self.taken_at) <= max_age
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("polling ClearML queues failed: {0}")]
    Queues(#[source] Error),
    #[error("polling ClearML workers failed: {0}")]
    Workers(#[source] Error),
}

/// Polls the queues of one coordinator's configuration.
pub struct ClearmlPoller {
    client: Client,
    queues: Vec<String>,
    /// Workers silent for longer than this are left out (`workers.get_all`'s `last_seen`).
    worker_last_seen: Duration,
}

impl ClearmlPoller {
    pub fn new(client: Client, queues: Vec<String>, worker_last_seen: Duration) -> Self {
        Self {
            client,
            queues,
            worker_last_seen,
        }
    }

    /// Takes one observation; `now` is the caller's clock at the start of the poll.
    pub async fn poll(&self, now: Duration) -> Result<Observation, PollError> {
        let filter = GetAllQueues {
            only_fields: QUEUE_FIELDS.iter().map(|field| field.to_string()).collect(),
            ..GetAllQueues::default()
        };
        let queues = self
            .client
            .queues()
            .get_all(&filter)
            .await
            .map_err(PollError::Queues)?;
        let workers = self
            .client
            .workers()
            .get_all(Some(self.worker_last_seen.as_secs().max(1)))
            .await
            .map_err(PollError::Workers)?;

        let mut observation = Observation {
            taken_at: now,
            waiting: BTreeMap::new(),
            queue_ids: BTreeMap::new(),
            missing_queues: Vec::new(),
            workers: workers
                .into_iter()
                .map(|worker| (worker.id, worker.task.map(|task| task.id)))
                .collect(),
        };
        for name in &self.queues {
            match queues
                .iter()
                .find(|queue| queue.name.as_deref() == Some(name.as_str()))
            {
                Some(queue) => {
                    observation
                        .waiting
                        .insert(name.clone(), queue.entries.len() as u32);
                    observation.queue_ids.insert(name.clone(), queue.id.clone());
                }
                None => observation.missing_queues.push(name.clone()),
            }
        }
        if !observation.missing_queues.is_empty() {
            tracing::warn!(queues = ?observation.missing_queues, "configured queues not found on the ClearML server; create them or fix the config");
        }
        Ok(observation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_compares_age_with_limit() {
        let observation = Observation {
            taken_at: Duration::from_secs(100),
            waiting: BTreeMap::new(),
            queue_ids: BTreeMap::new(),
            missing_queues: Vec::new(),
            workers: BTreeMap::new(),
        };

        assert!(observation.is_fresh(Duration::from_secs(104), Duration::from_secs(4)));
        assert!(!observation.is_fresh(Duration::from_secs(105), Duration::from_secs(4)));
        assert!(
            observation.is_fresh(Duration::from_secs(90), Duration::from_secs(4)),
            "a clock step back is not staleness"
        );
        assert_eq!(observation.waiting("gpu"), 0);
    }
}
