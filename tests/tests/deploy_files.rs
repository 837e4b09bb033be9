//! The deploy files, checked with the tools this machine has. yamllint reads the YAML and shellcheck the
//! rendered user data. The node agent's parser loads the agent.toml that the user data writes, Packer checks
//! the AMI template's syntax, and the Grafana dashboard may query only metrics that the binaries export.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fleet_coordinator::providers::aws::user_data;

/// Bootstrap token rendered into the sample user data.
const BOOTSTRAP_TOKEN: &str = "v1.5f0c9a2e.c2lnbmF0dXJl";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// Runs a checking tool. A missing tool fails the test with the package to install.
fn run(
    program: &str,
    package: &str,
    args: &[&str],
    configure: impl FnOnce(&mut Command),
) -> Output {
    let mut command = Command::new(program);
    command.args(args).current_dir(repo_root());
    configure(&mut command);
    command.output().unwrap_or_else(|err| {
        panic!("failed to run {program} ({err}); install the Debian package {package}, as scripts/test.sh does")
    })
}

fn report(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn yaml_files_pass_yamllint() {
    let output = run(
        "yamllint",
        "yamllint",
        &["--strict", "-c", "deploy/.yamllint", "deploy/"],
        |_| {},
    );

    assert!(output.status.success(), "{}", report(&output));
}

/// Renders the cloud-init template with the values a launch gives it.
fn rendered_user_data() -> String {
    let template =
        std::fs::read_to_string(repo_root().join("deploy/cloud-init/node-agent-user-data.sh.tmpl"))
            .unwrap();
    let vars: BTreeMap<String, String> = [
        ("cluster", "ml-prod"),
        ("queue", "gpu"),
        ("resource", "gpu-spot"),
        ("intent_id", "5f0c9a2e-7d1b-4c3e-9f6a-0b1c2d3e4f50"),
        ("bootstrap_token", BOOTSTRAP_TOKEN),
        (
            "coordinator_endpoints",
            "https://10.0.0.5:7443,https://10.0.0.6:7443",
        ),
        (
            "coordinator_endpoints_toml",
            "[\"https://10.0.0.5:7443\", \"https://10.0.0.6:7443\"]",
        ),
        ("worker_prefix", "fleet"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    user_data::render_text(&template, &vars).expect("every placeholder of the template has a value")
}

#[test]
fn user_data_passes_shellcheck() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("user-data.sh");
    std::fs::write(&script, rendered_user_data()).unwrap();

    let output = run(
        "shellcheck",
        "shellcheck",
        &["-s", "sh", script.to_str().unwrap()],
        |_| {},
    );

    assert!(output.status.success(), "{}", report(&output));
}

#[test]
fn user_data_writes_valid_agent_config() {
    let script = rendered_user_data();
    let start = script
        .find("<<'EOF'\n")
        .expect("the user data writes agent.toml with a quoted here-document")
        + "<<'EOF'\n".len();
    let end = start
        + script[start..]
            .find("\nEOF\n")
            .expect("the here-document ends");
    // The files the config names exist on the instance: the token from the lines above, the CA from the AMI.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("bootstrap-token");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&token_file, format!("{BOOTSTRAP_TOKEN}\n")).unwrap();
    std::fs::write(&ca_file, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let text = script[start..end]
        .replace(
            "/run/clearml-fleet/bootstrap-token",
            token_file.to_str().unwrap(),
        )
        .replace("/etc/clearml-fleet/ca.pem", ca_file.to_str().unwrap());

    let config =
        fleet_node_agent::config::Config::parse(&text, Path::new("/etc/clearml-fleet/agent.toml"))
            .unwrap_or_else(|err| panic!("{err}\n{text}"));

    let endpoints: Vec<&str> = config
        .coordinator
        .endpoints
        .iter()
        .map(|url| url.as_str())
        .collect();
    assert_eq!(
        endpoints,
        ["https://10.0.0.5:7443/", "https://10.0.0.6:7443/"]
    );
    assert_eq!(config.coordinator.bootstrap_token.expose(), BOOTSTRAP_TOKEN);
}

/// Returns the template without its `packer { ... }` block.
fn without_packer_block(template: &str) -> String {
    let start = template
        .find("packer {")
        .expect("the template pins Packer and its plugins");
    let mut depth = 0;
    for (offset, c) in template[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    let end = start + offset + 1;
                    return format!("{}{}", &template[..start], &template[end..]);
                }
            }
            _ => {}
        }
    }
    panic!("the packer block never closes");
}

#[test]
fn packer_template_passes_syntax_check() {
    // NOTE: Debian's Packer (1.6.6) predates the `required_plugins` block, so the check runs on a copy without
    // the `packer { ... }` block, and only with -syntax-only: 1.6.6's built-in amazon-ebs builder lacks
    // arguments of the current amazon plugin (imds_support, metadata_options). Packer 1.7 or newer with the
    // plugin validates the file as it is (docs/deploy.md).
    let template =
        std::fs::read_to_string(repo_root().join("deploy/packer/node-agent.pkr.hcl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("node-agent.pkr.hcl");
    std::fs::write(&copy, without_packer_block(&template)).unwrap();

    let output = run(
        "packer",
        "packer",
        &["validate", "-syntax-only", copy.to_str().unwrap()],
        |command| {
            // No update check against HashiCorp's servers, and no state in the user's home.
            command
                .env("CHECKPOINT_DISABLE", "1")
                .env("PACKER_CONFIG_DIR", dir.path())
                .env("PACKER_CACHE_DIR", dir.path().join("cache"));
        },
    );

    assert!(output.status.success(), "{}", report(&output));
}

#[test]
fn dashboard_uses_exported_metrics() {
    let root = repo_root();
    let dashboard =
        std::fs::read_to_string(root.join("deploy/grafana/clearml-fleet-dashboard.json")).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(
        parsed["panels"]
            .as_array()
            .is_some_and(|panels| !panels.is_empty()),
        "the dashboard has no panels"
    );
    let coordinator = std::fs::read_to_string(root.join("coordinator/src/metrics.rs")).unwrap();
    // The node agent writes most names as `fleet_node_agent_{name}`, listing each without the prefix.
    let node_agent = std::fs::read_to_string(root.join("node-agent/src/metrics.rs")).unwrap();
    let exported = |name: &str| match name.strip_prefix("fleet_node_agent_") {
        Some(short) => node_agent.contains(&format!("\"{short}\"")) || node_agent.contains(name),
        None => coordinator.contains(&format!("\"{name}\"")),
    };

    let names = regex::Regex::new(r"fleet_[a-z_]+").unwrap();
    let mut unknown: Vec<&str> = names
        .find_iter(&dashboard)
        .map(|found| found.as_str())
        // Prometheus adds these suffixes to histograms and summaries.
        .map(|name| {
            name.trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
        })
        .filter(|name| !exported(name))
        .collect();
    unknown.sort_unstable();
    unknown.dedup();

    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics no binary exports: {unknown:?}"
    );
}
