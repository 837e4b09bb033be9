//! `fleet-coordinator check-config` on the shipped examples and on broken files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn check_config(file: &Path, secrets: bool) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fleet-coordinator"));
    command.arg("check-config").arg(file).env_clear();
    if secrets {
        command
            .env("CLEARML_API_ACCESS_KEY", "example-access")
            .env("CLEARML_API_SECRET_KEY", "example-secret")
            .env("FLEET_OPERATOR_TOKEN", "example-operator-token")
            .env("FLEET_VIEWER_TOKEN", "example-viewer-token")
            .env(
                "FLEET_BOOTSTRAP_KEY",
                "example-bootstrap-key-of-32-characters",
            );
    }
    command.output().expect("fleet-coordinator runs")
}

#[test]
fn every_example_passes_check_config() {
    let mut checked = 0;
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|extension| extension != "toml") {
            continue;
        }

        let output = check_config(&path, true);

        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{} failed check-config:\n{stderr}",
            path.display()
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("valid"), "{stdout}");
        checked += 1;
    }
    assert!(checked >= 2, "found only {checked} example(s)");
}

#[test]
fn missing_secrets_fail_with_variable_names() {
    let output = check_config(&examples_dir().join("aws.toml"), false);

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("CLEARML_API_SECRET_KEY"), "{stderr}");
    assert!(stderr.contains("FLEET_VIEWER_TOKEN"), "{stderr}");
}

#[test]
fn missing_file_fails_naming_path() {
    let output = check_config(Path::new("/nonexistent/fleet.toml"), true);

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read config file /nonexistent/fleet.toml"),
        "{stderr}"
    );
}

#[test]
fn invalid_value_fails_naming_key_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(examples_dir().join("local.toml"))
        .unwrap()
        .replace("max_idle_seconds = 120", "max_idle_seconds = 1");
    let path = dir.path().join("fleet.toml");
    std::fs::write(&path, text).unwrap();

    let output = check_config(&path, true);

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("defaults.max_idle_seconds = 1: must be between 10 and 86400 seconds"),
        "{stderr}"
    );
}
