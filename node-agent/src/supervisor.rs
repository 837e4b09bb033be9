//! Runs clearml-agent as a child in its own process group, restarts it with backoff, and reports a crash loop.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::ClearmlAgentConfig;
use crate::logs::LogBuffer;

/// Called after clearml-agent exited on its own and before it is restarted, for example to requeue the task
/// it was running.
pub type ExitHook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The program, arguments and environment of clearml-agent.
#[derive(Clone)]
pub struct ChildSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Environment on top of the agent's own, minus the variables listed in [`SCRUBBED_ENV`].
    pub env: BTreeMap<String, String>,
    pub work_dir: PathBuf,
    /// Shell script run once with `sh -c` before the first start; empty for none.
    pub init_script: String,
}

/// Variables removed from clearml-agent's environment. The API variables would override clearml.conf and send
/// clearml-agent past the gate. With a non-zero `RANK` or `SLURM_PROCID`, clearml-agent 3.0.3 skips
/// `tasks.started` (`_get_node_rank` in `clearml_agent/commands/worker.py`), and the gate would take a task that
/// ran for one whose poll response was lost and requeue it.
pub const SCRUBBED_ENV: &[&str] = &[
    "CLEARML_API_HOST",
    "CLEARML_API_ACCESS_KEY",
    "CLEARML_API_SECRET_KEY",
    "TRAINS_API_HOST",
    "TRAINS_API_ACCESS_KEY",
    "TRAINS_API_SECRET_KEY",
    "RANK",
    "SLURM_PROCID",
];

/// The supervisor's state for heartbeats, Status and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildStatus {
    /// Process id of the running clearml-agent; `None` between runs.
    pub pid: Option<u32>,
    /// Restarts after an exit that the agent did not ask for.
    pub restarts: u32,
    /// True while the exits within the crash-loop window reach the configured count.
    pub crash_loop: bool,
    /// True once [`Supervisor::stop`] was called.
    pub stopped: bool,
}

pub struct Supervisor {
    status: watch::Receiver<ChildStatus>,
    stop: watch::Sender<bool>,
    run_loop: Mutex<Option<JoinHandle<()>>>,
}

impl Supervisor {
    /// Starts clearml-agent and keeps it running until [`Supervisor::stop`].
    pub fn start(
        spec: ChildSpec,
        config: ClearmlAgentConfig,
        logs: Arc<LogBuffer>,
        on_exit: ExitHook,
    ) -> Supervisor {
        let (status_sender, status) = watch::channel(ChildStatus::default());
        let (stop, stop_receiver) = watch::channel(false);
        let run = RunLoop {
            spec,
            config,
            logs,
            on_exit,
            status: status_sender,
            stop: stop_receiver,
            exits: VecDeque::new(),
        };
        let run_loop = tokio::spawn(run.run());
        Supervisor {
            status,
            stop,
            run_loop: Mutex::new(Some(run_loop)),
        }
    }

    pub fn status(&self) -> ChildStatus {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<ChildStatus> {
        self.status.clone()
    }

    /// Stops clearml-agent: SIGTERM to its process group, then SIGKILL after the stop timeout. Idempotent.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let run_loop = self
            .run_loop
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(run_loop) = run_loop
            && let Err(error) = run_loop.await
        {
            tracing::error!(%error, "clearml-agent supervisor task failed");
        }
    }
}

struct RunLoop {
    spec: ChildSpec,
    config: ClearmlAgentConfig,
    logs: Arc<LogBuffer>,
    on_exit: ExitHook,
    status: watch::Sender<ChildStatus>,
    stop: watch::Receiver<bool>,
    /// Times of the recent unrequested exits, for crash-loop detection.
    exits: VecDeque<Instant>,
}

impl RunLoop {
    async fn run(mut self) {
        self.run_init_script().await;

        let mut backoff = self.config.restart_backoff_initial;
        loop {
            if *self.stop.borrow() {
                break;
            }
            let started = Instant::now();
            let outcome = self.run_once().await;
            if outcome == RunOutcome::Stopped {
                break;
            }

            (self.on_exit)().await;
            if started.elapsed() >= self.config.crash_loop_window {
                backoff = self.config.restart_backoff_initial;
            }
            self.record_exit();

            tracing::warn!(
                delay_ms = backoff.as_millis() as u64,
                restarts = self.status.borrow().restarts,
                "restarting clearml-agent after backoff"
            );
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
            backoff = (backoff * 2).min(self.config.restart_backoff_max);
            self.status.send_modify(|status| status.restarts += 1);
        }
        self.status.send_modify(|status| {
            status.pid = None;
            status.stopped = true;
        });
    }

    /// Runs clearml-agent once, until it exits or a stop is requested.
    async fn run_once(&mut self) -> RunOutcome {
        let mut child = match self.spawn() {
            Ok(child) => child,
            Err(error) => {
                tracing::error!(program = %self.spec.program.display(), %error, "failed to start clearml-agent; check clearml_agent.program");
                return RunOutcome::Exited;
            }
        };
        let pid = child.id();
        tracing::info!(pid, "clearml-agent started");
        self.status.send_modify(|status| status.pid = pid);
        self.forward_output(&mut child);

        let stable_after = tokio::time::sleep(self.config.crash_loop_window);
        tokio::pin!(stable_after);
        let mut stop = self.stop.clone();
        let outcome = loop {
            let in_crash_loop = self.status.borrow().crash_loop;
            tokio::select! {
                exit = child.wait() => {
                    match exit {
                        Ok(status) => tracing::warn!(pid, %status, "clearml-agent exited"),
                        Err(error) => tracing::error!(pid, %error, "failed to wait for clearml-agent"),
                    }
                    break RunOutcome::Exited;
                }
                _ = &mut stable_after, if in_crash_loop => {
                    tracing::info!(pid, "clearml-agent ran for the crash-loop window; healthy again");
                    self.exits.clear();
                    self.status.send_modify(|status| status.crash_loop = false);
                }
                requested = stop.wait_for(|stop| *stop) => {
                    drop(requested);
                    break RunOutcome::Stopped;
                }
            }
        };
        if outcome == RunOutcome::Stopped {
            self.terminate(&mut child, pid).await;
        }

        // Task processes that clearml-agent started may outlive it; none may keep running a task that the gate no longer tracks.
        if let Some(pid) = pid {
            signal_group(pid, libc::SIGKILL);
        }
        self.status.send_modify(|status| status.pid = None);
        outcome
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let mut command = Command::new(&self.spec.program);
        command
            .args(&self.spec.args)
            .current_dir(&self.spec.work_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for name in SCRUBBED_ENV {
            command.env_remove(name);
        }
        command.envs(&self.spec.env);
        command.spawn()
    }

    fn forward_output(&self, child: &mut Child) {
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(forward_lines(stdout, "stdout", self.logs.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward_lines(stderr, "stderr", self.logs.clone()));
        }
    }

    /// Sends SIGTERM to the group, waits the stop timeout, then SIGKILLs it.
    async fn terminate(&self, child: &mut Child, pid: Option<u32>) {
        let Some(pid) = pid else {
            return;
        };
        tracing::info!(
            pid,
            timeout_ms = self.config.stop_timeout.as_millis() as u64,
            "stopping clearml-agent"
        );
        signal_group(pid, libc::SIGTERM);
        match tokio::time::timeout(self.config.stop_timeout, child.wait()).await {
            Ok(Ok(status)) => tracing::info!(pid, %status, "clearml-agent stopped"),
            Ok(Err(error)) => tracing::warn!(pid, %error, "failed to wait for clearml-agent"),
            Err(_) => {
                tracing::warn!(
                    pid,
                    "clearml-agent ignored SIGTERM; killing its process group"
                );
                signal_group(pid, libc::SIGKILL);
                let _ = child.wait().await;
            }
        }
    }

    fn record_exit(&mut self) {
        let now = Instant::now();
        self.exits.push_back(now);
        while self
            .exits
            .front()
            .is_some_and(|&exit| now.duration_since(exit) > self.config.crash_loop_window)
        {
            self.exits.pop_front();
        }
        let crash_loop = self.exits.len() >= self.config.crash_loop_restarts as usize;
        if crash_loop && !self.status.borrow().crash_loop {
            tracing::error!(
                exits = self.exits.len(),
                window_s = self.config.crash_loop_window.as_secs(),
                "clearml-agent is in a crash loop"
            );
        }
        self.status
            .send_modify(|status| status.crash_loop = crash_loop);
    }

    async fn run_init_script(&self) {
        if self.spec.init_script.trim().is_empty() {
            return;
        }
        tracing::info!("running the init script before clearml-agent starts");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(&self.spec.init_script)
            .current_dir(&self.spec.work_dir)
            .envs(&self.spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                tracing::error!(%error, "failed to start the init script with sh");
                return;
            }
        };
        self.forward_output(&mut child);
        match child.wait().await {
            Ok(status) if status.success() => tracing::info!("init script finished"),
            Ok(status) => {
                tracing::error!(%status, "init script failed; starting clearml-agent anyway")
            }
            Err(error) => tracing::error!(%error, "failed to wait for the init script"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunOutcome {
    Exited,
    Stopped,
}

async fn forward_lines(stream: impl AsyncRead + Unpin, name: &'static str, logs: Arc<LogBuffer>) {
    let mut lines = BufReader::new(stream).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => logs.push(name, &line),
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(stream = name, %error, "stopped reading clearml-agent output");
                break;
            }
        }
    }
}

/// Sends `signal` to the process group that `pid` leads (`process_group(0)` made them equal).
fn signal_group(pid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid addresses the process group.
    unsafe {
        libc::kill(-pgid, signal);
    }
}
