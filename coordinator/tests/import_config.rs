//! `fleet-coordinator import-clearml-config` on a ClearML autoscaler configuration, followed by `check-config`
//! on its output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Secret values in the fixture, which must appear neither in the output nor on stderr.
const FIXTURE_SECRETS: [&str; 3] = [
    "fixture-git-token-4f1d0c9a7e",
    "AKIAFIXTUREKEY000001",
    "fixture-aws-secret-8b2e6f0d13",
];

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clearml_aws_autoscaler.json")
}

fn coordinator(args: &[&std::ffi::OsStr]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fleet-coordinator"));
    command.args(args).env_clear();
    command
}

fn import(input: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["import-clearml-config".as_ref(), input.as_os_str()];
    args.extend(extra.iter().map(|arg| std::ffi::OsStr::new(*arg)));
    coordinator(&args).output().expect("fleet-coordinator runs")
}

fn check_config(file: &Path) -> Output {
    coordinator(&["check-config".as_ref(), file.as_os_str()])
        .env("CLEARML_API_ACCESS_KEY", "example-access")
        .env("CLEARML_API_SECRET_KEY", "example-secret")
        .env("FLEET_GIT_PASSWORD", "example-git-token")
        .output()
        .expect("fleet-coordinator runs")
}

#[test]
fn imported_fixture_passes_check_config_once_placeholders_are_set() {
    let dir = tempfile::tempdir().unwrap();
    let output_path = dir.path().join("fleet.toml");

    let output = import(&fixture(), &["-o", output_path.to_str().unwrap()]);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: configurations.extra_vm_bash_script: became agent.init_script"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: hyper_params.default_docker_image: became agent.docker_image"),
        "{stderr}"
    );
    assert!(
        stderr.contains("not carried over: hyper_params.git_pass"),
        "{stderr}"
    );

    // The placeholders the importer writes for what its input lacks fail the check, each named.
    let checked = check_config(&output_path);
    let check_stderr = String::from_utf8_lossy(&checked.stderr);
    assert_eq!(checked.status.code(), Some(1), "{check_stderr}");
    for needle in [
        "clearml.api_server = \"https://clearml-api-server.invalid\": the .invalid domain never resolves",
        "resources.aws4gpu.hourly_price_usd.\"g4dn.4xlarge\" = 0: an EC2 instance is never free",
        "resources.cpu-large.hourly_price_usd.\"m5.large\" = 0",
        "resources.aws4gpu.subnets = \"subnet-REPLACE-default-for-us-east-1b\": a placeholder",
    ] {
        assert!(check_stderr.contains(needle), "{needle}\n{check_stderr}");
    }

    // With the values an operator fills in, the same file is valid.
    let toml = std::fs::read_to_string(&output_path)
        .unwrap()
        .replace("https://clearml-api-server.invalid", "https://api.clear.ml")
        .replace("\"g4dn.4xlarge\" = 0.0", "\"g4dn.4xlarge\" = 1.204")
        .replace("\"m5.large\" = 0.0", "\"m5.large\" = 0.096")
        .replace(
            "subnet-REPLACE-default-for-us-east-1b",
            "subnet-0bbbbbbbbbbbbbbbb",
        );
    std::fs::write(&output_path, toml).unwrap();
    let checked = check_config(&output_path);
    let check_stderr = String::from_utf8_lossy(&checked.stderr);
    assert_eq!(checked.status.code(), Some(0), "{check_stderr}");
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(
        stdout.contains("valid (cluster clearml, 2 queue(s), 3 queue resource(s)"),
        "{stdout}"
    );
}

#[test]
fn import_writes_stdout_without_output_option() {
    let output = import(&fixture(), &["--cluster", "ml-prod"]);

    assert_eq!(output.status.code(), Some(0));
    let toml = String::from_utf8_lossy(&output.stdout);
    assert!(toml.contains("[cluster]\nname = \"ml-prod\""), "{toml}");
    assert!(toml.contains("[resources.aws4gpu_spot]"), "{toml}");
    assert!(toml.contains("# Not carried over:"), "{toml}");
}

#[test]
fn secrets_stay_out_of_output_and_stderr() {
    let output = import(&fixture(), &[]);

    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for secret in FIXTURE_SECRETS {
        assert!(!stdout.contains(secret), "{secret} on stdout");
        assert!(!stderr.contains(secret), "{secret} on stderr");
    }
    assert!(stderr.contains("AWS_SECRET_ACCESS_KEY"), "{stderr}");
}

#[test]
fn malformed_input_fails_naming_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture())
        .unwrap()
        .replace("\"is_spot\": false", "\"is_spot\": \"no\"");
    let input = dir.path().join("autoscaler.json");
    std::fs::write(&input, text).unwrap();
    let output_path = dir.path().join("fleet.toml");

    let output = import(&input, &["-o", output_path.to_str().unwrap()]);

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "configurations.resource_configurations.aws4gpu.is_spot = \"no\": must be true or false"
        ),
        "{stderr}"
    );
    assert!(!output_path.exists());
    for secret in FIXTURE_SECRETS {
        assert!(!stderr.contains(secret), "{secret} on stderr");
    }
}

#[test]
fn yaml_file_converts() {
    let dir = tempfile::tempdir().unwrap();
    let output_path = dir.path().join("fleet.toml");
    let input =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clearml_aws_autoscaler.yaml");

    let output = import(&input, &["-o", output_path.to_str().unwrap()]);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let toml = std::fs::read_to_string(&output_path).unwrap();
    assert!(toml.contains("[resources.aws4gpu_spot]"), "{toml}");
    for secret in FIXTURE_SECRETS {
        assert!(!stderr.contains(secret), "{secret} on stderr");
        assert!(!toml.contains(secret), "{secret} in the output");
    }
}

#[test]
fn malformed_yaml_fails_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("aws_autoscaler.yaml");
    std::fs::write(
        &input,
        "hyper_params:\n  cloud_credentials_secret: \"yaml-secret-31c9\n",
    )
    .unwrap();

    let output = import(&input, &[]);

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not valid YAML or JSON"), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(!stderr.contains("yaml-secret-31c9"), "{stderr}");
}

#[test]
fn missing_input_fails_naming_path() {
    let output = import(Path::new("/nonexistent/aws_autoscaler.json"), &[]);

    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read /nonexistent/aws_autoscaler.json"),
        "{stderr}"
    );
}
