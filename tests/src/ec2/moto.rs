//! moto's EC2 server, started from the test venv on a free loopback port.

use std::process::Command;
use std::time::Duration;

use crate::harness::{ChildProcess, HarnessError, TestDir, free_port, venv_bin, wait_until_async};

/// Time moto's server gets to respond to its first request. It imports all of moto at start, which takes seconds.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `moto_server`, killed when dropped.
pub struct MotoServer {
    process: ChildProcess,
    port: u16,
    http: reqwest::Client,
}

impl MotoServer {
    /// Starts `moto_server -H 127.0.0.1 -p PORT` with its logs in `dir` and waits until it responds.
    pub async fn start(dir: &TestDir) -> Result<MotoServer, HarnessError> {
        let port = free_port();
        let mut command = Command::new(venv_bin("moto_server"));
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let process = ChildProcess::spawn("moto_server", command, dir.path())?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("a reqwest client with a timeout builds");
        let server = MotoServer {
            process,
            port,
            http,
        };

        let reset_url = format!("{}/moto-api/reset", server.endpoint());
        wait_until_async(
            STARTUP_TIMEOUT,
            "moto_server to answer on /moto-api/reset",
            || {
                let request = server.http.post(&reset_url).send();
                async move {
                    request
                        .await
                        .is_ok_and(|response| response.status().is_success())
                }
            },
        )
        .await
        .inspect_err(|_| eprintln!("{}", server.process.log_tail(20)))?;
        tracing::info!(port, "moto_server ready");
        Ok(server)
    }

    /// Returns the endpoint URL, for example `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Deletes every resource moto holds.
    pub async fn reset(&self) -> Result<(), reqwest::Error> {
        self.http
            .post(format!("{}/moto-api/reset", self.endpoint()))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Returns the last lines of moto's logs, for failure messages.
    pub fn log_tail(&self, max_lines: usize) -> String {
        self.process.log_tail(max_lines)
    }
}
