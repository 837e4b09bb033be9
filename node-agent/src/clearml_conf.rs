//! The clearml.conf that clearml-agent reads: its API server is the gate, its credentials come from the
//! registration, and the file is readable by its owner only.

use std::io::Write;
use std::path::{Path, PathBuf};

use fleet_proto::v1::AgentConfig;

/// Errors of writing clearml.conf.
#[derive(Debug, thiserror::Error)]
#[error(
    "failed to write clearml-agent's config {path}: {source}; check that agent.state_dir is writable"
)]
pub struct WriteConfError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Writes `<dir>/clearml.conf` with mode 0600 and returns its path.
pub fn write(dir: &Path, gate_url: &str, config: &AgentConfig) -> Result<PathBuf, WriteConfError> {
    let path = dir.join("clearml.conf");
    let text = render(gate_url, config);
    write_private(&path, &text).map_err(|source| WriteConfError {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Renders the file. Strings are JSON-quoted, which HOCON accepts, so no value can break the syntax.
fn render(gate_url: &str, config: &AgentConfig) -> String {
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    let clearml = config.clearml.clone().unwrap_or_default();
    let git = config.git.clone().unwrap_or_default();

    let mut text = String::new();
    text.push_str("# Written by fleet-node-agent. clearml-agent reaches the ClearML API through the agent's gate.\n");
    // The coordinator's extra text comes first: in HOCON a later value of the same key wins, so the gate's
    // address, the credentials and the worker id below override whatever the extra text sets for them.
    if !config.extra_clearml_conf.is_empty() {
        text.push_str("\n# extra_clearml_conf from the coordinator\n");
        text.push_str(&config.extra_clearml_conf);
        text.push_str("\n\n# Set by fleet-node-agent\n");
    }
    text.push_str("api {\n");
    text.push_str(&format!("  api_server: {}\n", quote(gate_url)));
    text.push_str(&format!("  web_server: {}\n", quote(&clearml.web_server)));
    text.push_str(&format!(
        "  files_server: {}\n",
        quote(&clearml.files_server)
    ));
    text.push_str("  credentials {\n");
    text.push_str(&format!("    access_key: {}\n", quote(&clearml.access_key)));
    text.push_str(&format!("    secret_key: {}\n", quote(&clearml.secret_key)));
    text.push_str("  }\n}\n");
    text.push_str("agent {\n");
    text.push_str(&format!("  worker_id: {}\n", quote(&config.worker_id)));
    if tasks_need_host_network(gate_url, config) && !extra_text_sets_docker_arguments(config) {
        // NOTE: untested here (no Docker engine on the test machines). A task container on docker's default
        // bridge network cannot reach the gate on the host's loopback address; host networking can.
        text.push_str("  extra_docker_arguments: [\"--network=host\"]\n");
    }
    if !git.user.is_empty() {
        text.push_str(&format!("  git_user: {}\n", quote(&git.user)));
        text.push_str(&format!("  git_pass: {}\n", quote(&git.password)));
    }
    text.push_str("}\n");
    text
}

/// Returns whether the task containers need the host's network: clearml-agent runs tasks in docker while the
/// gate listens on a loopback address.
fn tasks_need_host_network(gate_url: &str, config: &AgentConfig) -> bool {
    let loopback = url::Url::parse(gate_url)
        .ok()
        .and_then(|url| url.host_str().map(str::to_owned))
        .is_some_and(|host| host == "localhost" || host.starts_with("127.") || host == "[::1]");
    !config.docker_image.is_empty() && loopback
}

/// Returns whether the coordinator's extra clearml.conf text sets `extra_docker_arguments`. The node agent then
/// leaves them alone, because its own later value would replace the operator's list.
fn extra_text_sets_docker_arguments(config: &AgentConfig) -> bool {
    config.extra_clearml_conf.contains("extra_docker_arguments")
}

/// Returns a warning when the task containers may not reach the gate: docker mode with a loopback gate, and
/// docker arguments from the coordinator's extra text, which the node agent leaves alone.
pub fn docker_network_warning(gate_url: &str, config: &AgentConfig) -> Option<String> {
    (tasks_need_host_network(gate_url, config) && extra_text_sets_docker_arguments(config)).then(|| {
        format!(
            "tasks run in docker and the gate listens on {gate_url}, but the coordinator's extra clearml.conf \
             sets agent.extra_docker_arguments, so the node agent does not add --network=host; include it \
             there, or set agent.gate_listen to an address the containers reach"
        )
    })
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;

    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use fleet_proto::v1::ClearmlAccess;

    use super::*;

    #[test]
    fn conf_points_at_gate_and_quotes_values() {
        let config = AgentConfig {
            worker_id: "fleet:cpu:i-1".to_owned(),
            clearml: Some(ClearmlAccess {
                api_server: "http://upstream:8008".to_owned(),
                access_key: "AK".to_owned(),
                secret_key: "S\"K".to_owned(),
                ..ClearmlAccess::default()
            }),
            ..AgentConfig::default()
        };

        let text = render("http://127.0.0.1:4000", &config);

        assert!(
            text.contains("api_server: \"http://127.0.0.1:4000\""),
            "{text}"
        );
        assert!(!text.contains("upstream:8008"), "{text}");
        assert!(text.contains("secret_key: \"S\\\"K\""), "{text}");
        assert!(text.contains("worker_id: \"fleet:cpu:i-1\""), "{text}");
    }

    #[test]
    fn extra_text_cannot_override_gate() {
        let config = AgentConfig {
            worker_id: "fleet:cpu:i-1".to_owned(),
            extra_clearml_conf:
                "api.api_server: \"http://elsewhere:8008\"\nsdk.aws.s3.region: \"eu-west-1\""
                    .to_owned(),
            ..AgentConfig::default()
        };

        let text = render("http://127.0.0.1:4000", &config);

        let extra = text.find("http://elsewhere:8008").unwrap();
        let gate = text.find("api_server: \"http://127.0.0.1:4000\"").unwrap();
        assert!(extra < gate, "{text}");
        assert!(text.contains("sdk.aws.s3.region"), "{text}");
    }

    #[test]
    fn docker_mode_uses_host_network_for_loopback_gate() {
        let mut config = AgentConfig {
            docker_image: "nvidia/cuda:12.4.1-runtime-ubuntu22.04".to_owned(),
            ..AgentConfig::default()
        };

        let loopback = render("http://127.0.0.1:4000", &config);
        let bridge = render("http://172.17.0.1:4000", &config);
        config.extra_clearml_conf = "agent.extra_docker_arguments: [\"--ipc=host\"]".to_owned();
        let operator_set = render("http://127.0.0.1:4000", &config);

        assert!(
            loopback.contains("extra_docker_arguments: [\"--network=host\"]"),
            "{loopback}"
        );
        assert!(!bridge.contains("--network=host"), "{bridge}");
        assert!(!operator_set.contains("--network=host"), "{operator_set}");
        assert!(docker_network_warning("http://127.0.0.1:4000", &config).is_some());
    }

    #[test]
    fn virtualenv_mode_keeps_docker_arguments_unset() {
        let text = render("http://127.0.0.1:4000", &AgentConfig::default());

        assert!(!text.contains("extra_docker_arguments"), "{text}");
    }

    #[test]
    fn conf_file_is_private() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "http://127.0.0.1:1", &AgentConfig::default()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
