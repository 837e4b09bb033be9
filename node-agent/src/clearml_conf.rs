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
    if !git.user.is_empty() {
        text.push_str(&format!("  git_user: {}\n", quote(&git.user)));
        text.push_str(&format!("  git_pass: {}\n", quote(&git.password)));
    }
    text.push_str("}\n");
    text
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
    fn conf_file_is_private() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "http://127.0.0.1:1", &AgentConfig::default()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
