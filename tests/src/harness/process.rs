//! A child process guard that kills the child's whole process group on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use super::HarnessError;

/// A running child process in its own process group, with stdout and stderr written to log files.
///
/// Dropping the guard sends SIGKILL to the whole group and reaps the child, so the child and anything it
/// started (clearml-agent runs each task in a subprocess) die even when the test panics.
pub struct ChildProcess {
    name: String,
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl ChildProcess {
    /// Spawns `command` in a new process group, logging to `log_dir/NAME.stdout.log` and `log_dir/NAME.stderr.log`.
    pub fn spawn(
        name: &str,
        mut command: Command,
        log_dir: &Path,
    ) -> Result<ChildProcess, HarnessError> {
        use std::os::unix::process::CommandExt;

        let stdout_path = log_dir.join(format!("{name}.stdout.log"));
        let stderr_path = log_dir.join(format!("{name}.stderr.log"));
        let stdout = create_log(&stdout_path)?;
        let stderr = create_log(&stderr_path)?;

        command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        let child = command.spawn().map_err(|source| HarnessError::Spawn {
            name: name.to_owned(),
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        tracing::info!(process = name, pid = child.id(), "child process started");

        Ok(ChildProcess {
            name: name.to_owned(),
            child,
            stdout_path,
            stderr_path,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the exit status if the child has exited, without blocking.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Returns the last `max_lines` lines of the child's stdout and stderr, for failure messages.
    pub fn log_tail(&self, max_lines: usize) -> String {
        let mut tail = String::new();
        for (stream, path) in [("stdout", &self.stdout_path), ("stderr", &self.stderr_path)] {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            tail.push_str(&format!(
                "--- {} {stream} ({}) ---\n",
                self.name,
                path.display()
            ));
            for line in &lines[start..] {
                tail.push_str(line);
                tail.push('\n');
            }
        }
        tail
    }

    /// Sends SIGTERM to the child alone, so it can shut down cleanly and stop its own children.
    pub fn terminate(&self) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        tracing::info!(process = %self.name, pid, "sending SIGTERM");
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }

    /// Kills the process group with SIGKILL and reaps the child.
    pub fn kill(&mut self) {
        if self.exit_status().is_none() {
            tracing::info!(process = %self.name, pid = self.child.id(), "killing child process group");
        }
        kill_group(self.child.id());
        if let Err(error) = self.child.wait() {
            tracing::warn!(process = %self.name, %error, "failed to reap child process");
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends SIGKILL to the process group led by `pid`, which `process_group(0)` made equal to the child's pid.
///
/// The group is killed even after its leader exited, because grandchildren may still be running in it.
fn kill_group(pid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions. A negative pid addresses the process group.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

fn create_log(path: &Path) -> Result<File, HarnessError> {
    File::create(path).map_err(|source| HarnessError::LogFile {
        path: path.to_path_buf(),
        source,
    })
}
