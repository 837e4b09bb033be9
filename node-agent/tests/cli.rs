//! The `fleet-node-agent` binary's startup failures: each gives a message that names the cause and its own exit
//! code, and none turns into a retry loop that never ends.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use fleet_node_agent::run::exit_code;
use fleet_tests::node::{AgentOptions, BOOTSTRAP_TOKEN, NodeTestBed};

fn run_agent(config: &std::path::Path) -> (Output, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_fleet-node-agent"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .expect("fleet-node-agent starts");
    (output, started.elapsed())
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_token_exits_with_its_own_code() {
    let bed = NodeTestBed::start("cli_bad_token", AgentOptions::default()).await;
    let config = bed.write_config("not-the-issued-token");

    let (output, took) = tokio::task::spawn_blocking(move || run_agent(&config))
        .await
        .unwrap();

    let message = stderr(&output);
    assert_eq!(
        output.status.code(),
        Some(exit_code::TOKEN_REJECTED),
        "{message}"
    );
    assert!(
        message.contains("rejected the bootstrap token"),
        "{message}"
    );
    assert!(message.contains(&bed.instance_id), "{message}");
    assert!(
        !message.contains("not-the-issued-token"),
        "the token never appears in the output: {message}"
    );
    assert!(
        took < Duration::from_secs(4),
        "no retry loop: took {took:?}"
    );
    assert!(bed.coordinator.registrations().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_coordinator_exits_after_timeout() {
    let mut bed = NodeTestBed::start("cli_unreachable", AgentOptions::default()).await;
    bed.coordinator.stop().await;
    let config = bed.write_config(BOOTSTRAP_TOKEN);

    let (output, took) = tokio::task::spawn_blocking(move || run_agent(&config))
        .await
        .unwrap();

    let message = stderr(&output);
    assert_eq!(
        output.status.code(),
        Some(exit_code::COORDINATOR_UNREACHABLE),
        "{message}"
    );
    assert!(message.contains("no coordinator accepted it"), "{message}");
    assert!(message.contains(&bed.coordinator.url()), "{message}");
    assert!(
        took < Duration::from_secs(15),
        "bounded by registration_timeout_seconds: {took:?}"
    );
}

#[test]
fn malformed_config_exits_with_config_code() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("not toml", "[coordinator\nendpoints = 3", "invalid TOML"),
        (
            "missing token",
            "[coordinator]\nendpoints = [\"http://127.0.0.1:1\"]\nallow_plaintext_loopback = true\n",
            "coordinator.bootstrap_token",
        ),
        (
            "plain http to a remote host",
            "[coordinator]\nendpoints = [\"http://10.1.2.3:7443\"]\nbootstrap_token = \"t\"\n",
            "use https",
        ),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();

        let (output, _) = run_agent(&path);

        let message = stderr(&output);
        assert_eq!(
            output.status.code(),
            Some(exit_code::CONFIG),
            "{name}: {message}"
        );
        assert!(message.contains(expected), "{name}: {message}");
    }

    let (output, _) = run_agent(&dir.path().join("missing.toml"));
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(exit_code::CONFIG), "{message}");
    assert!(
        message.contains("failed to read the config file"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_registration_exits_at_once() {
    let mut bed = NodeTestBed::start("cli_sigterm_startup", AgentOptions::default()).await;
    bed.coordinator.stop().await;
    let config = bed.write_config(BOOTSTRAP_TOKEN);
    // A long registration timeout, so only the signal can end the startup within the test's deadline.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "registration_timeout_seconds = 5",
        "registration_timeout_seconds = 300",
    );
    assert!(
        text.contains("registration_timeout_seconds = 300"),
        "the test bed's config changed: {text}"
    );
    std::fs::write(&config, text).unwrap();
    let log_path = bed.dir.join("cli-sigterm.stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-node-agent"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("fleet-node-agent starts");

    // The signal handlers are installed before the instance id is read, so after this line SIGTERM is
    // handled and does not kill the process outright.
    let registering = fleet_tests::harness::wait_until(
        Duration::from_secs(20),
        "the agent to start registering",
        || {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("instance id read from the metadata service")
        },
    )
    .await;
    if let Err(error) = registering {
        let _ = child.kill();
        panic!(
            "{error}\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    let signalled = Instant::now();
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    let exited = fleet_tests::harness::wait_until(
        Duration::from_secs(10),
        "the agent to exit after SIGTERM",
        || matches!(child.try_wait(), Ok(Some(_))),
    )
    .await;
    let took = signalled.elapsed();
    if exited.is_err() {
        let _ = child.kill();
    }

    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    exited.unwrap_or_else(|error| panic!("{error}\n{log}"));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(exit_code::OK), "{log}");
    assert!(
        log.contains("stop signal received before registration finished"),
        "{log}"
    );
    assert!(
        took < Duration::from_secs(3),
        "exit took {took:?} after SIGTERM"
    );
}
