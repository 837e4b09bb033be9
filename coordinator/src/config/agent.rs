//! Checks of the `[agent]` table and each resource's `docker_image`: the settings node agents get at
//! registration besides their queue and the ClearML access. The extra clearml.conf text, the init script, the
//! Git password and the task environment may contain credentials, so they are kept as secrets and never logged.

use std::collections::BTreeMap;
use std::path::Path;

use clearml_api::Secret;

use super::Environment;
use super::file::{AgentSection, ConfigFile};
use super::validate::{Problems, read_secret_env, read_secret_file, resolve};

/// Largest extra clearml.conf text or init script, so a wrong path (a log file, a binary) fails the check
/// instead of swelling every registration.
const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Variables the node agent sets for clearml-agent itself; `agent.task_env` cannot override them.
const RESERVED_ENV: [&str; 4] = [
    "HOME",
    "CLEARML_CONFIG_FILE",
    "CLEARML_WORKER_ID",
    "PYTHONUNBUFFERED",
];

/// Checked `[agent]` settings.
#[derive(Debug, Clone, Default)]
pub struct AgentSettings {
    /// Default docker image; empty runs tasks in clearml-agent's virtualenv mode.
    pub docker_image: String,
    /// Per-resource images in place of `docker_image`.
    pub resource_docker_images: BTreeMap<String, String>,
    pub extra_clearml_conf: Option<Secret>,
    pub init_script: Option<Secret>,
    pub git: Option<GitAccess>,
    /// Variable name to value, for clearml-agent and its tasks.
    pub task_env: BTreeMap<String, Secret>,
}

impl AgentSettings {
    /// Returns the docker image for the agents of `resource`, empty for none.
    pub fn docker_image_for(&self, resource: &str) -> &str {
        self.resource_docker_images
            .get(resource)
            .unwrap_or(&self.docker_image)
    }
}

/// Git credentials for the tasks' private repositories.
#[derive(Debug, Clone)]
pub struct GitAccess {
    pub user: String,
    pub password: Secret,
}

pub(super) fn check_agent(
    file: &ConfigFile,
    base_dir: &Path,
    env: &dyn Environment,
    problems: &mut Problems,
) -> AgentSettings {
    let section = &file.agent;
    let mut settings = AgentSettings::default();
    if let Some(image) = &section.docker_image {
        check_image("agent.docker_image", image, problems);
        settings.docker_image = image.trim().to_owned();
    }
    for (name, resource) in &file.resources {
        if let Some(image) = &resource.docker_image {
            check_image(&format!("resources.{name}.docker_image"), image, problems);
            settings
                .resource_docker_images
                .insert(name.clone(), image.trim().to_owned());
        }
    }
    settings.extra_clearml_conf = read_text(
        "agent.extra_clearml_conf",
        section.extra_clearml_conf.as_deref(),
        section.extra_clearml_conf_file.as_deref(),
        base_dir,
        problems,
    );
    settings.init_script = read_text(
        "agent.init_script",
        section.init_script.as_deref(),
        section.init_script_file.as_deref(),
        base_dir,
        problems,
    );
    settings.git = check_git(section, base_dir, env, problems);
    settings.task_env = check_task_env(section, env, problems);
    settings
}

fn check_image(key: &str, image: &str, problems: &mut Problems) {
    let image = image.trim();
    let valid = !image.is_empty()
        && image.len() <= 255
        && image
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\' | '`' | '$'));
    if !valid {
        problems.add(
            key,
            format!("{image:?}"),
            "must be a docker image reference without spaces or quotes, for example \
             nvidia/cuda:12.4.1-runtime-ubuntu22.04; remove the key to run tasks without docker",
        );
    }
}

/// Reads an inline text (`key`) or the file of `key_file`; at most one of them may be set.
fn read_text(
    key: &str,
    inline: Option<&str>,
    file: Option<&Path>,
    base_dir: &Path,
    problems: &mut Problems,
) -> Option<Secret> {
    let text = match (inline, file) {
        (None, None) => return None,
        (Some(_), Some(_)) => {
            problems.add(
                format!("{key}_file"),
                "(set)",
                format!("set {key} or {key}_file, not both"),
            );
            return None;
        }
        (Some(text), None) => text.to_owned(),
        (None, Some(path)) => {
            let resolved = resolve(path, base_dir);
            match std::fs::read_to_string(&resolved) {
                Ok(text) => text,
                Err(err) => {
                    problems.add(
                        format!("{key}_file"),
                        resolved.display(),
                        format!("cannot read the file ({err}); check the path and its permissions"),
                    );
                    return None;
                }
            }
        }
    };
    if text.trim().is_empty() {
        problems.add(
            key,
            "(empty)",
            "the text is empty; remove the key or write the text",
        );
        return None;
    }
    if text.len() > MAX_TEXT_BYTES {
        problems.add(
            key,
            format!("({} bytes)", text.len()),
            format!(
                "must be at most {MAX_TEXT_BYTES} bytes, because every registration carries it; put larger \
                 files on the image"
            ),
        );
        return None;
    }
    Some(Secret::new(text))
}

fn check_git(
    section: &AgentSection,
    base_dir: &Path,
    env: &dyn Environment,
    problems: &mut Problems,
) -> Option<GitAccess> {
    let password = match (&section.git_password_env, &section.git_password_file) {
        (None, None) => None,
        (Some(_), Some(_)) => {
            problems.add(
                "agent.git_password_file",
                "(set)",
                "set agent.git_password_env or agent.git_password_file, not both",
            );
            return None;
        }
        (Some(var), None) => Some(read_secret_env(
            "agent.git_password_env",
            var,
            env,
            problems,
        )?),
        (None, Some(path)) => Some(read_secret_file(
            "agent.git_password_file",
            path,
            base_dir,
            problems,
        )?),
    };
    let user = section
        .git_user
        .as_deref()
        .map(str::trim)
        .filter(|user| !user.is_empty());
    match (user, password) {
        (None, None) => None,
        (Some(user), Some(password)) => Some(GitAccess {
            user: user.to_owned(),
            password,
        }),
        (Some(_), None) => {
            problems.add(
                "agent.git_password_env",
                "(missing)",
                "agent.git_user needs a password or token: set agent.git_password_env or \
                 agent.git_password_file",
            );
            None
        }
        (None, Some(_)) => {
            problems.add(
                "agent.git_user",
                format!("{:?}", section.git_user.as_deref().unwrap_or("")),
                "the Git password needs a user name; set agent.git_user",
            );
            None
        }
    }
}

fn check_task_env(
    section: &AgentSection,
    env: &dyn Environment,
    problems: &mut Problems,
) -> BTreeMap<String, Secret> {
    let mut values = BTreeMap::new();
    for (name, var) in &section.task_env {
        let key = format!("agent.task_env.{name}");
        if !is_env_name(name) {
            problems.add(
                &key,
                format!("{var:?}"),
                format!(
                    "{name:?} is not a variable name; use letters, digits and '_', not starting with a digit"
                ),
            );
            continue;
        }
        if RESERVED_ENV.contains(&name.as_str()) {
            problems.add(
                &key,
                format!("{var:?}"),
                format!("the node agent sets {name} for clearml-agent itself; remove it"),
            );
            continue;
        }
        match env.var(var) {
            Some(value) if !value.trim().is_empty() => {
                values.insert(name.clone(), Secret::new(value.trim()));
            }
            _ => problems.add(
                &key,
                format!("{var:?}"),
                format!(
                    "environment variable {var} is not set or empty; export the value the tasks get as {name}"
                ),
            ),
        }
    }
    values
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
