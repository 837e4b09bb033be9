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
    assert!(message.contains("no coordinator responded"), "{message}");
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
