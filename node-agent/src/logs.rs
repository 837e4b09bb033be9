//! clearml-agent's output: the last lines in memory for TailLogs, a broadcast for followers, and the agent's
//! own log through tracing. Known secrets are masked before a line is stored or logged.

use std::collections::VecDeque;
use std::sync::Mutex;

use fleet_proto::v1::LogLine;
use tokio::sync::broadcast;

/// Lines kept for TailLogs.
const CAPACITY: usize = 2_000;

pub struct LogBuffer {
    lines: Mutex<VecDeque<LogLine>>,
    sender: broadcast::Sender<LogLine>,
    /// Values replaced by `***` in every line, for example the ClearML secret key.
    secrets: Mutex<Vec<String>>,
}

impl Default for LogBuffer {
    fn default() -> Self {
        LogBuffer::new()
    }
}

impl LogBuffer {
    pub fn new() -> LogBuffer {
        let (sender, _) = broadcast::channel(256);
        LogBuffer {
            lines: Mutex::new(VecDeque::with_capacity(CAPACITY)),
            sender,
            secrets: Mutex::new(Vec::new()),
        }
    }

    /// Adds values to mask; empty and very short values are ignored because masking them would garble text.
    pub fn add_secrets(&self, values: impl IntoIterator<Item = String>) {
        let mut secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        secrets.extend(values.into_iter().filter(|value| value.len() >= 4));
    }

    /// Stores one line of `stream` ("stdout" or "stderr") and logs it.
    pub fn push(&self, stream: &'static str, line: &str) {
        let line = self.mask(line);
        tracing::info!(target: "clearml_agent", stream, "{line}");
        let entry = LogLine {
            unix_ms: crate::unix_ms_now(),
            stream: stream.to_owned(),
            line,
        };
        {
            let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            if lines.len() == CAPACITY {
                lines.pop_front();
            }
            lines.push_back(entry.clone());
        }
        let _ = self.sender.send(entry);
    }

    /// Returns the last `count` lines, oldest first.
    pub fn tail(&self, count: usize) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let start = lines.len().saturating_sub(count);
        lines.iter().skip(start).cloned().collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LogLine> {
        self.sender.subscribe()
    }

    fn mask(&self, line: &str) -> String {
        let secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        let mut masked = line.to_owned();
        for secret in secrets.iter() {
            if masked.contains(secret.as_str()) {
                masked = masked.replace(secret.as_str(), "***");
            }
        }
        masked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_tail_is_bounded() {
        let buffer = LogBuffer::new();
        buffer.add_secrets(["hunter22".to_owned(), String::new()]);
        buffer.push("stdout", "secret_key = hunter22");
        buffer.push("stderr", "second");

        let tail = buffer.tail(1);
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].line, "second");
        assert_eq!(buffer.tail(10)[0].line, "secret_key = ***");
    }
}
