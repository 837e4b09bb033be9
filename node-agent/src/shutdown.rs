//! The shutdown action: the command that powers the machine off, run at most once per agent process.

use std::sync::atomic::{AtomicBool, Ordering};

/// The configured command and whether it already ran.
pub struct ShutdownAction {
    command: Vec<String>,
    started: AtomicBool,
}

impl ShutdownAction {
    /// `command` is a program and its arguments, for example `["systemctl", "poweroff"]`; config validation
    /// guarantees the program is not empty.
    pub fn new(command: Vec<String>) -> ShutdownAction {
        ShutdownAction {
            command,
            started: AtomicBool::new(false),
        }
    }

    /// Runs the command and waits for it, unless it already ran; returns whether this call ran it.
    pub async fn run_once(&self) -> bool {
        if self.started.swap(true, Ordering::SeqCst) {
            tracing::debug!("shutdown action already ran");
            return false;
        }
        let Some((program, args)) = self.command.split_first() else {
            tracing::error!("shutdown command is empty; the machine stays up");
            return true;
        };
        tracing::info!(command = ?self.command, "running the shutdown action");
        match tokio::process::Command::new(program)
            .args(args)
            .status()
            .await
        {
            Ok(status) if status.success() => tracing::info!(%status, "shutdown action finished"),
            Ok(status) => {
                tracing::error!(command = ?self.command, %status, "shutdown action failed; power the machine off by hand or fix agent.shutdown_command")
            }
            Err(error) => {
                tracing::error!(command = ?self.command, %error, "failed to start the shutdown action; check agent.shutdown_command")
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn action_runs_once() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        let action = ShutdownAction::new(vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("echo ran >> {}", marker.display()),
        ]);

        assert!(action.run_once().await);
        assert!(!action.run_once().await);

        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "ran\n");
    }
}
