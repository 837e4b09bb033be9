//! The local provider: each instance is a child process of this coordinator, with its own id and directory.
//!
//! It serves tests, the demo and a single large on-premises machine. Each instance's directory contains
//! `instance.json` (process id, process start time, tags, launch time), so a provider started again on the
//! same `base_dir`, after a coordinator restart, finds the instances that still run and reports the others
//! as terminated. With `stop_on_drop`, dropping the provider kills every process group it knows instead.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, broadcast};

use crate::providers::{
    Clock, CloudProvider, Instance, InstanceState, LaunchOutcome, LaunchRequest, Market, Offering,
    ProviderError, ProviderEvent, TAG_INTENT, TagFilter, TerminateOutcome, instance_tags,
};

/// Instance type and zone that local instances report.
pub const LOCAL_INSTANCE_TYPE: &str = "process";
pub const LOCAL_ZONE: &str = "local";

/// Configuration of the local provider.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub cluster: String,
    /// Directory under which each instance gets `<instance id>/` as its working directory and log location.
    pub base_dir: PathBuf,
    /// Program started for each instance.
    ///
    /// NOTE: `fleet-node-agent` takes its instance id from IMDS, which a local process lacks, so the tests run
    /// `fake-clearml-worker` or a shell command here. The agent needs to read `FLEET_INSTANCE_ID` before it
    /// can run as a local instance.
    pub program: PathBuf,
    /// Arguments; `{instance_id}` and `{dir}` are replaced with the instance's id and directory.
    pub args: Vec<String>,
    /// Extra environment variables for every instance, besides the `FLEET_*` variables set per instance.
    pub env: BTreeMap<String, String>,
    /// Time between SIGTERM and SIGKILL when an instance is terminated.
    pub terminate_grace: Duration,
    /// How long a terminated instance stays visible to describe, like EC2 keeps terminated instances for a while.
    pub terminated_retention: Duration,
    pub usd_per_hour: Option<f64>,
    /// Template of the node agent's config, written to `<instance dir>/agent.toml` (mode 0600) before the
    /// program starts, as cloud-init writes it from user-data on a cloud instance. Its `{{name}}` placeholders:
    /// `instance_id`, `dir`, `cluster`, `queue`, `resource`, `intent_id` and the launch's boot values.
    pub agent_config_template: Option<String>,
    /// Kill every instance when the provider is dropped. Off in a coordinator, so a restart keeps the
    /// instances and their tasks.
    pub stop_on_drop: bool,
}

impl LocalConfig {
    pub fn new(cluster: &str, base_dir: PathBuf, program: PathBuf) -> Self {
        Self {
            cluster: cluster.to_owned(),
            base_dir,
            program,
            args: Vec::new(),
            env: BTreeMap::new(),
            terminate_grace: Duration::from_secs(10),
            terminated_retention: Duration::from_secs(3600),
            usd_per_hour: None,
            agent_config_template: None,
            stop_on_drop: true,
        }
    }
}

struct LocalInstance {
    /// The child handle; `None` for an instance found in `base_dir` that an earlier provider started.
    child: Option<Child>,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat`), which sets a reused pid
    /// apart from the instance's process.
    start_ticks: Option<u64>,
    /// Process group id, equal to the child's pid because it leads its own group.
    pgid: Option<i32>,
    tags: BTreeMap<String, String>,
    launch_time: SystemTime,
    state: InstanceState,
    /// Time (since the Unix epoch) the instance was seen exited or terminated.
    ended_at: Option<Duration>,
}

impl LocalInstance {
    fn view(&self, id: &str) -> Instance {
        Instance {
            id: id.to_owned(),
            state: self.state,
            launch_time: Some(self.launch_time),
            tags: self.tags.clone(),
            market: Market::OnDemand,
            zone: Some(LOCAL_ZONE.to_owned()),
            instance_type: Some(LOCAL_INSTANCE_TYPE.to_owned()),
        }
    }

    /// Marks the instance terminated if its process exited on its own or was killed from outside.
    fn refresh(&mut self, id: &str, now: Duration) {
        if self.state != InstanceState::Running {
            return;
        }
        let Some(child) = self.child.as_mut() else {
            if !self.process_alive() {
                tracing::info!(
                    instance_id = id,
                    "local instance process is gone, instance terminated"
                );
                self.state = InstanceState::Terminated;
                self.ended_at = Some(now);
            }
            return;
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                tracing::info!(instance_id = id, %status, "local instance process exited, instance terminated");
                self.state = InstanceState::Terminated;
                self.ended_at = Some(now);
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(instance_id = id, %error, "failed to check local instance process, assuming it runs");
            }
        }
    }

    /// Tells whether the instance's process still runs, for an instance without a child handle.
    fn process_alive(&self) -> bool {
        let Some(pid) = self.pgid else {
            return false;
        };
        match (process_start_ticks(pid), self.start_ticks) {
            (Some(now), Some(recorded)) => now == recorded,
            _ => false,
        }
    }

    /// Waits until the process has exited, at most until `deadline`; false when it still runs then.
    async fn wait_exit(&mut self, deadline: tokio::time::Instant) -> bool {
        if let Some(child) = self.child.as_mut() {
            return tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_ok();
        }
        while self.process_alive() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

/// Contents of `instance.json` in an instance's directory.
#[derive(serde::Serialize, serde::Deserialize)]
struct InstanceFile {
    pid: i32,
    start_ticks: Option<u64>,
    tags: BTreeMap<String, String>,
    launch_time_ms: u64,
}

const INSTANCE_FILE: &str = "instance.json";

/// Returns the start time of process `pid` in clock ticks since boot, field 22 of `/proc/<pid>/stat`, or `None`
/// when the process does not exist.
fn process_start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces, so count fields after its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let state = after_name.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[derive(Default)]
struct State {
    instances: BTreeMap<String, LocalInstance>,
    /// Instance ids launched per client token.
    tokens: HashMap<String, Vec<String>>,
}

/// The local-process provider.
pub struct LocalProvider {
    config: LocalConfig,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    events: broadcast::Sender<ProviderEvent>,
}

impl LocalProvider {
    pub fn new(config: LocalConfig, clock: Arc<dyn Clock>) -> Self {
        let (events, _) = broadcast::channel(16);
        let mut state = State::default();
        let now = clock.now();
        // A repeated launch finds these by their intent tag, so they need no client-token entry.
        for (id, instance) in find_instances(&config.base_dir, now) {
            state.instances.insert(id, instance);
        }
        Self {
            config,
            clock,
            state: Mutex::new(state),
            events,
        }
    }

    /// Returns the directory of instance `id`.
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.config.base_dir.join(id)
    }

    fn spawn(
        &self,
        id: &str,
        tags: &BTreeMap<String, String>,
        boot_values: &BTreeMap<String, clearml_api::Secret>,
    ) -> Result<LocalInstance, ProviderError> {
        let dir = self.instance_dir(id);
        let dir_error = |source| ProviderError::InstanceDir {
            instance_id: id.to_owned(),
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(dir_error)?;
        if let Some(template) = &self.config.agent_config_template {
            self.write_agent_config(id, &dir, template, tags, boot_values)?;
        }
        let stdout = std::fs::File::create(dir.join("stdout.log")).map_err(dir_error)?;
        let stderr = std::fs::File::create(dir.join("stderr.log")).map_err(dir_error)?;

        let dir_text = dir.to_string_lossy();
        let args = self
            .config
            .args
            .iter()
            .map(|arg| arg.replace("{instance_id}", id).replace("{dir}", &dir_text));
        let mut command = Command::new(&self.config.program);
        command
            .args(args)
            .envs(&self.config.env)
            .env("FLEET_INSTANCE_ID", id)
            .env("FLEET_INSTANCE_DIR", &dir)
            .env("FLEET_CLUSTER", &self.config.cluster)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        for (key, variable) in [
            (crate::providers::TAG_QUEUE, "FLEET_QUEUE"),
            (crate::providers::TAG_RESOURCE, "FLEET_RESOURCE"),
            (TAG_INTENT, "FLEET_INTENT_ID"),
        ] {
            if let Some(value) = tags.get(key) {
                command.env(variable, value);
            }
        }
        for (name, value) in boot_values {
            command.env(
                format!("FLEET_{}", name.to_ascii_uppercase()),
                value.expose(),
            );
        }

        let child = command.spawn().map_err(|source| ProviderError::Spawn {
            instance_id: id.to_owned(),
            program: self.config.program.display().to_string(),
            source,
        })?;
        let pgid = child.id().and_then(|pid| i32::try_from(pid).ok());
        let start_ticks = pgid.and_then(process_start_ticks);
        let launch_time = SystemTime::now();
        if let Some(pid) = pgid {
            let file = InstanceFile {
                pid,
                start_ticks,
                tags: tags.clone(),
                launch_time_ms: launch_time
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_millis() as u64),
            };
            let text = serde_json::to_vec_pretty(&file).expect("instance files always serialize");
            std::fs::write(dir.join(INSTANCE_FILE), text).map_err(dir_error)?;
        }
        Ok(LocalInstance {
            child: Some(child),
            start_ticks,
            pgid,
            tags: tags.clone(),
            launch_time,
            state: InstanceState::Running,
            ended_at: None,
        })
    }

    /// Renders the agent config template into the instance's directory, readable by its owner only because it
    /// contains the bootstrap token.
    fn write_agent_config(
        &self,
        id: &str,
        dir: &std::path::Path,
        template: &str,
        tags: &BTreeMap<String, String>,
        boot_values: &BTreeMap<String, clearml_api::Secret>,
    ) -> Result<(), ProviderError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;

        let mut vars: BTreeMap<String, String> = boot_values
            .iter()
            .map(|(name, value)| (name.clone(), value.expose().to_owned()))
            .collect();
        vars.insert("instance_id".to_owned(), id.to_owned());
        vars.insert("dir".to_owned(), dir.display().to_string());
        vars.insert("cluster".to_owned(), self.config.cluster.clone());
        for (tag, name) in [
            (crate::providers::TAG_QUEUE, "queue"),
            (crate::providers::TAG_RESOURCE, "resource"),
            (TAG_INTENT, "intent_id"),
        ] {
            if let Some(value) = tags.get(tag) {
                vars.insert(name.to_owned(), value.clone());
            }
        }
        let text =
            crate::providers::aws::user_data::render_text(template, &vars).map_err(|reason| {
                ProviderError::UserData {
                    resource: tags
                        .get(crate::providers::TAG_RESOURCE)
                        .cloned()
                        .unwrap_or_default(),
                    reason: format!("agent config template: {reason}"),
                }
            })?;
        let path = dir.join("agent.toml");
        let dir_error = |source| ProviderError::InstanceDir {
            instance_id: id.to_owned(),
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(dir_error)?;
        file.write_all(text.as_bytes()).map_err(dir_error)
    }

    fn forget_old_terminated(&self, state: &mut State, now: Duration) {
        let retention = self.config.terminated_retention;
        state.instances.retain(|_, instance| {
            instance
                .ended_at
                .is_none_or(|ended| now.saturating_sub(ended) < retention)
        });
    }
}

/// Reads the `instance.json` of every instance directory under `base_dir`: instances whose process still runs
/// are running, the others terminated as of `now`.
fn find_instances(base_dir: &std::path::Path, now: Duration) -> Vec<(String, LocalInstance)> {
    let Ok(entries) = std::fs::read_dir(base_dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path().join(INSTANCE_FILE);
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let file: InstanceFile = match serde_json::from_slice(&text) {
            Ok(file) => file,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "unreadable local instance file; instance ignored");
                continue;
            }
        };
        let id = entry.file_name().to_string_lossy().into_owned();
        let mut instance = LocalInstance {
            child: None,
            start_ticks: file.start_ticks,
            pgid: Some(file.pid),
            tags: file.tags,
            launch_time: std::time::UNIX_EPOCH + Duration::from_millis(file.launch_time_ms),
            state: InstanceState::Running,
            ended_at: None,
        };
        if !instance.process_alive() {
            instance.state = InstanceState::Terminated;
            instance.ended_at = Some(now);
        }
        tracing::info!(instance_id = %id, pid = file.pid, state = ?instance.state, "local instance found from an earlier run");
        found.push((id, instance));
    }
    found
}

/// Sends `signal` to the process group `pgid`.
fn signal_group(pgid: i32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid addresses the process group.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

#[async_trait]
impl CloudProvider for LocalProvider {
    fn name(&self) -> &str {
        "local"
    }

    async fn launch(
        &self,
        request: &LaunchRequest,
        count: u32,
        client_token: &str,
    ) -> Result<LaunchOutcome, ProviderError> {
        let now = self.clock.now();
        let mut state = self.state.lock().await;

        let known_ids: Vec<String> = match state.tokens.get(client_token) {
            Some(ids) => ids.clone(),
            None => state
                .instances
                .iter()
                .filter(|(_, instance)| instance.tags.get(TAG_INTENT) == Some(&request.intent_id))
                .map(|(id, _)| id.clone())
                .collect(),
        };
        if !known_ids.is_empty() {
            let mut instances = Vec::with_capacity(known_ids.len());
            for id in &known_ids {
                if let Some(instance) = state.instances.get_mut(id) {
                    instance.refresh(id, now);
                    instances.push(instance.view(id));
                }
            }
            tracing::info!(intent_id = %request.intent_id, client_token, instance_ids = ?known_ids, "intent already launched, nothing new launched");
            return Ok(LaunchOutcome {
                instances,
                already_launched: true,
                ..LaunchOutcome::default()
            });
        }

        let tags = instance_tags(&self.config.cluster, request, &BTreeMap::new());
        let mut outcome = LaunchOutcome::default();
        for _ in 0..count {
            let id = format!("local-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            let instance = match self.spawn(&id, &tags, &request.boot_values) {
                Ok(instance) => instance,
                Err(error) if outcome.instances.is_empty() => return Err(error),
                Err(error) => {
                    outcome.stopped_by = Some(error);
                    break;
                }
            };
            tracing::info!(
                instance_id = %id,
                pid = instance.pgid,
                queue = %request.queue,
                resource = %request.resource,
                intent_id = %request.intent_id,
                client_token,
                "local instance launched"
            );
            outcome.instances.push(instance.view(&id));
            state.instances.insert(id.clone(), instance);
            state
                .tokens
                .entry(client_token.to_owned())
                .or_default()
                .push(id);
        }
        Ok(outcome)
    }

    async fn terminate(&self, ids: &[String]) -> Result<TerminateOutcome, ProviderError> {
        let now = self.clock.now();
        let mut state = self.state.lock().await;
        let mut outcome = TerminateOutcome::default();

        let mut stopping = Vec::new();
        for id in ids {
            let Some(instance) = state.instances.get_mut(id) else {
                tracing::info!(instance_id = %id, "local instance to terminate does not exist, already gone");
                outcome.not_found.push(id.clone());
                continue;
            };
            instance.refresh(id, now);
            if instance.state == InstanceState::Running
                && let Some(pgid) = instance.pgid
            {
                signal_group(pgid, libc::SIGTERM);
                stopping.push(id.clone());
            }
            tracing::info!(instance_id = %id, "local instance termination requested");
            outcome.terminating.push(id.clone());
        }

        let deadline = tokio::time::Instant::now() + self.config.terminate_grace;
        for id in &stopping {
            let Some(instance) = state.instances.get_mut(id) else {
                continue;
            };
            if !instance.wait_exit(deadline).await {
                tracing::warn!(instance_id = %id, grace_s = self.config.terminate_grace.as_secs(), "local instance ignored SIGTERM, killing it");
            }
            // SIGKILL also reaches processes the instance left behind in its group.
            if let Some(pgid) = instance.pgid {
                signal_group(pgid, libc::SIGKILL);
            }
            if let Some(child) = instance.child.as_mut()
                && let Err(error) = child.wait().await
            {
                tracing::warn!(instance_id = %id, %error, "failed to reap local instance process");
            }
            instance.state = InstanceState::Terminated;
            instance.ended_at = Some(now);
        }
        Ok(outcome)
    }

    async fn describe(&self, filter: &TagFilter) -> Result<Vec<Instance>, ProviderError> {
        let now = self.clock.now();
        let mut state = self.state.lock().await;
        self.forget_old_terminated(&mut state, now);

        let mut instances = Vec::new();
        for (id, instance) in state.instances.iter_mut() {
            instance.refresh(id, now);
            if filter.matches(&instance.tags) {
                instances.push(instance.view(id));
            }
        }
        Ok(instances)
    }

    fn hourly_price(&self, offering: &Offering) -> Option<f64> {
        (offering.instance_type == LOCAL_INSTANCE_TYPE)
            .then_some(self.config.usd_per_hour)
            .flatten()
    }

    fn subscribe(&self) -> broadcast::Receiver<ProviderEvent> {
        self.events.subscribe()
    }
}

impl Drop for LocalProvider {
    fn drop(&mut self) {
        if !self.config.stop_on_drop {
            return;
        }
        let state = self.state.get_mut();
        for instance in state.instances.values_mut() {
            if instance.state == InstanceState::Running
                && let Some(pgid) = instance.pgid
            {
                signal_group(pgid, libc::SIGKILL);
                // Reaping needs the runtime, so a killed child is left to tokio's orphan queue.
                if let Some(child) = instance.child.as_mut()
                    && let Err(error) = child.start_kill()
                {
                    tracing::debug!(%error, "local instance process already gone on provider drop");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::SystemClock;

    fn provider(dir: &std::path::Path, script: &str) -> LocalProvider {
        let mut config = LocalConfig::new("test", dir.to_path_buf(), PathBuf::from("/bin/sh"));
        // `sh -c SCRIPT NAME ARGS...` sets $0 to NAME, so the placeholders arrive as $1 and $2.
        config.args = vec![
            "-c".into(),
            script.into(),
            "instance".into(),
            "{instance_id}".into(),
            "{dir}".into(),
        ];
        config.terminate_grace = Duration::from_secs(5);
        LocalProvider::new(config, Arc::new(SystemClock))
    }

    fn request(intent: &str) -> LaunchRequest {
        LaunchRequest {
            queue: "default".into(),
            resource: "cpu".into(),
            intent_id: intent.into(),
            tags: BTreeMap::new(),
            boot_values: BTreeMap::new(),
        }
    }

    async fn state_of(provider: &LocalProvider, id: &str) -> Option<InstanceState> {
        let instances = provider
            .describe(&TagFilter::cluster("test"))
            .await
            .unwrap();
        instances
            .into_iter()
            .find(|instance| instance.id == id)
            .map(|instance| instance.state)
    }

    async fn wait_for_state(provider: &LocalProvider, id: &str, expected: InstanceState) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while state_of(provider, id).await != Some(expected) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance {id} did not reach {expected:?} within 10 s"
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn launch_starts_processes_with_placeholders_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let script = r#"echo "$1 $2 $FLEET_QUEUE $FLEET_INTENT_ID" > "$2/args"; exec sleep 600"#;
        let provider = provider(dir.path(), script);

        let outcome = provider
            .launch(&request("intent-1"), 2, "intent-1")
            .await
            .unwrap();

        assert_eq!(outcome.instances.len(), 2);
        assert!(!outcome.already_launched);
        for instance in &outcome.instances {
            let args_file = provider.instance_dir(&instance.id).join("args");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let mut written = String::new();
            while !written.ends_with('\n') {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} not written",
                    args_file.display()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
                written = std::fs::read_to_string(&args_file).unwrap_or_default();
            }
            let expected = format!(
                "{} {} default intent-1\n",
                instance.id,
                provider.instance_dir(&instance.id).display()
            );
            assert_eq!(written, expected);
            assert_eq!(instance.state, InstanceState::Running);
            assert_eq!(instance.tag(TAG_INTENT), Some("intent-1"));
        }
    }

    #[tokio::test]
    async fn same_client_token_returns_same_instances() {
        let dir = tempfile::tempdir().unwrap();
        let provider = provider(dir.path(), "exec sleep 600");

        let first = provider
            .launch(&request("intent-2"), 2, "intent-2")
            .await
            .unwrap();
        let second = provider
            .launch(&request("intent-2"), 2, "intent-2")
            .await
            .unwrap();

        let ids = |outcome: &LaunchOutcome| {
            let mut ids: Vec<String> = outcome.instances.iter().map(|i| i.id.clone()).collect();
            ids.sort();
            ids
        };
        assert_eq!(ids(&first), ids(&second));
        assert!(second.already_launched);
        let all = provider
            .describe(&TagFilter::cluster("test"))
            .await
            .unwrap();
        assert_eq!(all.len(), 2);
    }

    #[tokio::test]
    async fn terminate_stops_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let provider = provider(dir.path(), "exec sleep 600");
        let outcome = provider
            .launch(&request("intent-3"), 1, "intent-3")
            .await
            .unwrap();
        let id = outcome.instances[0].id.clone();

        let terminated = provider
            .terminate(&[id.clone(), "local-unknown".to_owned()])
            .await
            .unwrap();

        assert_eq!(terminated.terminating, std::slice::from_ref(&id));
        assert_eq!(terminated.not_found, ["local-unknown"]);
        assert_eq!(
            state_of(&provider, &id).await,
            Some(InstanceState::Terminated)
        );
    }

    #[tokio::test]
    async fn terminate_kills_a_process_that_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut provider = provider(dir.path(), "trap '' TERM; while :; do sleep 1; done");
        provider.config.terminate_grace = Duration::from_millis(300);
        let outcome = provider
            .launch(&request("intent-4"), 1, "intent-4")
            .await
            .unwrap();
        let id = outcome.instances[0].id.clone();

        provider.terminate(std::slice::from_ref(&id)).await.unwrap();

        assert_eq!(
            state_of(&provider, &id).await,
            Some(InstanceState::Terminated)
        );
    }

    #[tokio::test]
    async fn exited_process_shows_as_terminated() {
        let dir = tempfile::tempdir().unwrap();
        let provider = provider(dir.path(), "exit 0");
        let outcome = provider
            .launch(&request("intent-5"), 1, "intent-5")
            .await
            .unwrap();

        wait_for_state(
            &provider,
            &outcome.instances[0].id,
            InstanceState::Terminated,
        )
        .await;
    }

    #[tokio::test]
    async fn killed_process_shows_as_terminated() {
        let dir = tempfile::tempdir().unwrap();
        let provider = provider(dir.path(), "exec sleep 600");
        let outcome = provider
            .launch(&request("intent-6"), 1, "intent-6")
            .await
            .unwrap();
        let id = outcome.instances[0].id.clone();
        let pgid = provider.state.lock().await.instances[&id].pgid.unwrap();

        signal_group(pgid, libc::SIGKILL);

        wait_for_state(&provider, &id, InstanceState::Terminated).await;
    }

    #[tokio::test]
    async fn new_provider_finds_running_instances() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = provider(dir.path(), "exec sleep 600");
        first.config.stop_on_drop = false;
        let outcome = first
            .launch(&request("intent-7"), 2, "intent-7")
            .await
            .unwrap();
        let ids: Vec<String> = outcome.instances.iter().map(|i| i.id.clone()).collect();
        let dead_pgid = first.state.lock().await.instances[&ids[1]].pgid.unwrap();
        drop(first);
        signal_group(dead_pgid, libc::SIGKILL);
        // The killed process is reaped by no one until this test process ends, so wait for it to be a zombie.
        let zombie = tokio::time::Instant::now() + Duration::from_secs(5);
        while process_start_ticks(dead_pgid).is_some() && tokio::time::Instant::now() < zombie {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let second = provider(dir.path(), "exec sleep 600");

        assert_eq!(
            state_of(&second, &ids[0]).await,
            Some(InstanceState::Running)
        );
        assert_eq!(
            state_of(&second, &ids[1]).await,
            Some(InstanceState::Terminated)
        );
        let again = second
            .launch(&request("intent-7"), 2, "intent-7")
            .await
            .unwrap();
        assert!(
            again.already_launched,
            "a replayed launch finds the instances"
        );
        let terminated = second.terminate(&ids[..1]).await.unwrap();
        assert_eq!(terminated.terminating, vec![ids[0].clone()]);
        assert_eq!(
            state_of(&second, &ids[0]).await,
            Some(InstanceState::Terminated)
        );
    }

    #[tokio::test]
    async fn agent_config_is_rendered_before_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut provider = provider(
            dir.path(),
            "cat \"$2/agent.toml\" > \"$2/seen\"; exec sleep 600",
        );
        provider.config.agent_config_template = Some(
            "id = \"{{instance_id}}\"\ntoken = \"{{bootstrap_token}}\"\nqueue = \"{{queue}}\"\n"
                .to_owned(),
        );
        let mut launch = request("intent-8");
        launch.boot_values.insert(
            "bootstrap_token".to_owned(),
            clearml_api::Secret::new("token-8"),
        );

        let outcome = provider.launch(&launch, 1, "intent-8").await.unwrap();

        let id = &outcome.instances[0].id;
        let path = provider.instance_dir(id).join("agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!("id = \"{id}\"\ntoken = \"token-8\"\nqueue = \"default\"\n")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        provider.config.agent_config_template = Some("{{no_such_value}}".to_owned());
        let err = provider
            .launch(&request("intent-9"), 1, "intent-9")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no_such_value"), "{err}");
    }

    #[test]
    fn start_ticks_of_missing_process_are_none() {
        assert!(process_start_ticks(std::process::id() as i32).is_some());
        assert!(process_start_ticks(i32::MAX).is_none());
    }

    #[tokio::test]
    async fn describe_filters_by_tag() {
        let dir = tempfile::tempdir().unwrap();
        let provider = provider(dir.path(), "exec sleep 600");
        let mut gpu = request("intent-7");
        gpu.queue = "gpu".into();
        provider.launch(&gpu, 1, "intent-7").await.unwrap();
        provider
            .launch(&request("intent-8"), 1, "intent-8")
            .await
            .unwrap();

        let filter = TagFilter::cluster("test").with(crate::providers::TAG_QUEUE, "gpu");
        let found = provider.describe(&filter).await.unwrap();

        assert_eq!(found.len(), 1);
        assert_eq!(found[0].tag(crate::providers::TAG_QUEUE), Some("gpu"));
    }
}
