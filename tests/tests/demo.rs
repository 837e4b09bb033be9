//! `fleet-demo --exit-when-idle --json` runs a burst to the end: every task completes, and no instance runs
//! at the end.

use std::process::Command;
use std::time::Duration;

use fleet_tests::harness::{ChildProcess, TestDir, wait_until};

fn run_demo(test: &str, extra: &[&str]) -> serde_json::Value {
    let dir = TestDir::new(test).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_fleet-demo"));
    command
        .args([
            "--exit-when-idle",
            "--json",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--timeout-seconds",
            "240",
        ])
        .args(extra);
    let mut demo = ChildProcess::spawn("fleet-demo", command, dir.path()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let finished = runtime.block_on(wait_until(
        Duration::from_secs(300),
        "fleet-demo exits",
        || demo.exit_status().is_some(),
    ));
    assert!(finished.is_ok(), "{}", demo.log_tail(40));
    let status = demo.exit_status().unwrap();
    let stdout = std::fs::read_to_string(dir.join("fleet-demo.stdout.log")).unwrap();
    assert!(
        status.success(),
        "exit {status}\n{stdout}\n{}",
        demo.log_tail(40)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|err| panic!("the summary is not JSON ({err}): {stdout}"))
}

#[test]
fn demo_with_stand_in_scales_to_zero() {
    let summary = run_demo(
        "demo-stand-in",
        &["--fake-worker", "--tasks", "6", "--task-seconds", "1..3"],
    );

    assert_eq!(summary["tasks_completed"], 6, "{summary}");
    assert_eq!(summary["tasks_lost"], 0, "{summary}");
    assert_eq!(summary["instances_running_at_end"], 0, "{summary}");
    assert_eq!(summary["worker"], "stand-in", "{summary}");
    let launched = summary["instances_launched"].as_u64().unwrap();
    assert!((1..=6).contains(&launched), "{summary}");
}

#[test]
fn demo_with_real_clearml_agent_completes_tasks() {
    let summary = run_demo(
        "demo-real-agent",
        &["--tasks", "3", "--task-seconds", "1..2"],
    );

    assert_eq!(summary["worker"], "clearml-agent", "{summary}");
    assert_eq!(summary["tasks_completed"], 3, "{summary}");
    assert_eq!(summary["tasks_lost"], 0, "{summary}");
    assert_eq!(summary["instances_running_at_end"], 0, "{summary}");
}

#[test]
fn demo_rejects_bad_flags() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["--tasks", "0"],
            "--tasks 0: the burst needs at least one task",
        ),
        (
            &["--task-seconds", "9..3"],
            "the minimum is above the maximum; use MIN..MAX",
        ),
        (
            &["--task-seconds", "soon"],
            "\"soon\" is not a number of seconds",
        ),
    ];
    for (args, message) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_fleet-demo"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}
