//! `fleet-coordinator import-clearml-config`: converts the configuration of the ClearML SDK's AWS autoscaler
//! to this project's TOML and lists what it cannot carry over.
//!
//! The input is the file that `examples/services/aws-autoscaler/aws_autoscaler.py` of the clearml repository
//! (github.com/clearml/clearml) writes and reads: `hyper_params` and `configurations`, as read by
//! `clearml/automation/auto_scaler.py` (`ScalerConfig.from_config`), `clearml/automation/cloud_driver.py`
//! (`CloudDriver.from_config`) and `clearml/automation/aws_driver.py` (`AWSDriver.from_config`,
//! `spin_up_worker`). That file is YAML; JSON, which is a subset of YAML, is read as well.
//!
//! Secrets in the input (AWS keys, Git credentials, ClearML keys) are never copied and never printed: each
//! becomes a note that names the environment variable to set instead.

mod input;
mod render;

#[cfg(test)]
mod tests;

use std::fmt;

use crate::config::Problem;

/// Default of `--cluster`.
pub const DEFAULT_CLUSTER: &str = "clearml";

/// Options of one conversion.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// `cluster.name` of the output.
    pub cluster: String,
    /// Name of the input file, written into the output's header.
    pub source_name: String,
}

/// A converted configuration.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The TOML text, starting with the notes as comments.
    pub toml: String,
    pub notes: Vec<Note>,
}

/// Something the conversion dropped or changed; never contains a secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub kind: NoteKind,
    /// Dotted path of the input key, for example `hyper_params.git_pass`.
    pub key: String,
    /// The change, and the step to take instead.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    /// The setting has no equivalent in the output.
    NotCarriedOver,
    /// The setting was converted, but with a changed value or a placeholder that needs a look.
    Warning,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = match self.kind {
            NoteKind::NotCarriedOver => "not carried over",
            NoteKind::Warning => "warning",
        };
        write!(f, "{label}: {}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The input is not YAML (or JSON); the parser's message names the line and column, never the text.
    #[error(
        "{origin} is not valid YAML or JSON: {message}. Give the file that aws_autoscaler.py reads with \
         --config-file (aws_autoscaler.yaml), or the same settings as JSON"
    )]
    Syntax { origin: String, message: String },

    /// The `--cluster` option is not a valid cluster name.
    #[error(
        "invalid --cluster {value:?}: use 1 to 63 lowercase letters, digits, '-' or '_'; it names etcd keys and \
         cloud tags"
    )]
    Cluster { value: String },

    #[error("{origin} has {} invalid setting(s):\n{}", problems.len(), list(problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|problem| format!("  - {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Converts the YAML or JSON text of a ClearML AWS autoscaler configuration; `origin` names the input in
/// errors.
pub fn convert(
    text: &str,
    origin: &str,
    options: &ImportOptions,
) -> Result<Converted, ImportError> {
    let value: serde_json::Value =
        serde_norway::from_str(text).map_err(|err| ImportError::Syntax {
            origin: origin.to_owned(),
            message: err.to_string(),
        })?;

    if !input::is_cluster_name(&options.cluster) {
        return Err(ImportError::Cluster {
            value: options.cluster.clone(),
        });
    }
    let mut report = input::Report::default();
    let autoscaler = input::read(&value, &mut report);
    let (problems, notes) = report.finish();
    if !problems.is_empty() {
        return Err(ImportError::Invalid {
            origin: origin.to_owned(),
            problems,
        });
    }
    let Some(autoscaler) = autoscaler else {
        unreachable!("input::read returns None only after adding a problem");
    };

    let toml = render::render(&autoscaler, options, &notes);
    Ok(Converted { toml, notes })
}
