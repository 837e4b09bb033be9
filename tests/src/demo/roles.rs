//! The processes the demo starts from its own executable, so one `cargo run` builds everything: the standalone
//! coordinator, the node agent of each local instance, and a stand-in for clearml-agent when the real one is
//! not installed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clearml_api::{Client, ClientConfig, Secret};
use tokio::sync::{mpsc, watch};

use crate::fake_worker::{self, FakeWorkerConfig};

/// Runs `fleet-coordinator run --standalone` in this process.
pub fn coordinator(config: &Path, state_file: PathBuf) -> ExitCode {
    let config = match fleet_coordinator::config::load(
        config,
        &fleet_coordinator::config::ProcessEnvironment,
    ) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(1);
        }
    };
    let options = fleet_coordinator::server::RunOptions {
        standalone: true,
        state_file: Some(state_file),
    };
    match fleet_coordinator::server::run(config, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}

/// Runs `fleet-node-agent --config FILE` in this process.
pub fn node_agent(config: &Path) -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = match fleet_node_agent::config::Config::load(config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(78);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let (sender, receiver) = mpsc::channel(1);
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = sender.try_send(());
        });
        match fleet_node_agent::run::run(config, receiver).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(1))
            }
        }
    })
}

/// Stands in for `clearml-agent daemon --queue Q... --foreground`: reads the server and credentials from the
/// clearml.conf the node agent wrote (`CLEARML_CONFIG_FILE`) and runs the fake worker, which "runs" a task for
/// its `fleet/run_seconds` hyperparameter.
pub fn fake_clearml_agent(args: &[String]) -> ExitCode {
    let queues = queues_of(args);
    let config_file = std::env::var("CLEARML_CONFIG_FILE").unwrap_or_default();
    let worker_id = std::env::var("CLEARML_WORKER_ID").unwrap_or_default();
    let text = match std::fs::read_to_string(&config_file) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("error: cannot read CLEARML_CONFIG_FILE {config_file:?}: {err}");
            return ExitCode::from(2);
        }
    };
    let (Some(api), Some(access), Some(secret)) = (
        conf_value(&text, "api_server"),
        conf_value(&text, "access_key"),
        conf_value(&text, "secret_key"),
    ) else {
        eprintln!("error: {config_file} lacks api_server, access_key or secret_key");
        return ExitCode::from(2);
    };
    let client = match ClientConfig::new(&api, access, Secret::new(secret)).and_then(Client::new) {
        Ok(client) => client,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let config = FakeWorkerConfig {
        worker_id,
        queues,
        default_run_time: Duration::from_secs(5),
        poll_interval: Duration::from_millis(500),
        report_interval: Duration::from_secs(2),
        worker_timeout: Duration::from_secs(600),
        max_tasks: None,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = stop.send(true);
        });
        match fake_worker::run(client, config, stopped).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(1)
            }
        }
    })
}

/// Returns the queue names of clearml-agent's `daemon --queue A B --foreground [--docker IMAGE]` arguments.
fn queues_of(args: &[String]) -> Vec<String> {
    let mut queues = Vec::new();
    let mut after_queue = false;
    let mut skip_next = false;
    for arg in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        match arg.as_str() {
            "--queue" => after_queue = true,
            "--docker" => skip_next = true,
            flag if flag.starts_with("--") => after_queue = false,
            "daemon" => {}
            name if after_queue => queues.push(name.to_owned()),
            _ => {}
        }
    }
    queues
}

/// Reads `key: "value"` from the clearml.conf the node agent writes (values are JSON-quoted).
fn conf_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line
            .trim()
            .strip_prefix(key)?
            .trim_start()
            .strip_prefix(':')?;
        serde_json::from_str(rest.trim()).ok()
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_come_from_daemon_arguments() {
        let args: Vec<String> = [
            "daemon",
            "--queue",
            "a",
            "b",
            "--docker",
            "img",
            "--foreground",
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        assert_eq!(queues_of(&args), vec!["a".to_owned(), "b".to_owned()]);
    }

    #[test]
    fn conf_values_are_unquoted() {
        let text = "api {\n  api_server: \"http://127.0.0.1:1\"\n  credentials {\n    secret_key: \"s\\\"k\"\n  }\n}\n";
        assert_eq!(
            conf_value(text, "api_server").as_deref(),
            Some("http://127.0.0.1:1")
        );
        assert_eq!(conf_value(text, "secret_key").as_deref(), Some("s\"k"));
        assert_eq!(conf_value(text, "access_key"), None);
    }
}
