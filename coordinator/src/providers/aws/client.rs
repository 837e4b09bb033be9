//! Builds the EC2 client: region, credentials, endpoint, timeouts, and no SDK retries.

use std::path::Path;

use aws_config::BehaviorVersion;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{Credentials, Region};

use super::config::{AwsConfig, CredentialsSource};
use crate::providers::ProviderError;

/// Builds an EC2 client for `config`.
///
/// The SDK's own retries are disabled for every call: EC2 returns InsufficientInstanceCapacity as HTTP 500, which
/// the SDK would retry three times before the provider could move to the next offering. The provider classifies
/// and retries errors itself (see `AwsProvider::call`).
pub async fn build_client(config: &AwsConfig) -> Result<aws_sdk_ec2::Client, ProviderError> {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(config.connect_timeout)
        .operation_attempt_timeout(config.attempt_timeout)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(config.region.clone()))
        .retry_config(RetryConfig::disabled())
        .timeout_config(timeouts);

    if let Some(endpoint) = &config.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }

    loader = match &config.credentials {
        CredentialsSource::Environment {
            access_key_id_var,
            secret_access_key_var,
            session_token_var,
        } => loader.credentials_provider(credentials_from_env(
            access_key_id_var,
            secret_access_key_var,
            session_token_var.as_deref(),
        )?),
        CredentialsSource::Files {
            access_key_id_file,
            secret_access_key_file,
            session_token_file,
        } => loader.credentials_provider(credentials_from_files(
            access_key_id_file,
            secret_access_key_file,
            session_token_file.as_deref(),
        )?),
        CredentialsSource::DefaultChain if config.endpoint_url.is_some() => {
            // Off AWS the instance metadata service does not exist and the full default chain would spend
            // seconds probing it, so only the environment and the profile files are consulted.
            let chain = CredentialsProviderChain::first_try(
                "Environment",
                aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
            )
            .or_else(
                "Profile",
                aws_config::profile::ProfileFileCredentialsProvider::builder().build(),
            );
            loader.credentials_provider(chain)
        }
        CredentialsSource::DefaultChain => loader,
    };

    let shared = loader.load().await;
    Ok(aws_sdk_ec2::Client::new(&shared))
}

/// Reads static credentials from the named environment variables; the error names the variable, never a value.
fn credentials_from_env(
    access_key_id_var: &str,
    secret_access_key_var: &str,
    session_token_var: Option<&str>,
) -> Result<Credentials, ProviderError> {
    let read = |name: &str| {
        std::env::var(name).map_err(|_| ProviderError::InvalidConfig {
            provider: "aws".to_owned(),
            reason: format!(
                "environment variable {name} is not set or not UTF-8; set it or use the default credentials chain"
            ),
        })
    };
    let access_key_id = read(access_key_id_var)?;
    let secret_access_key = read(secret_access_key_var)?;
    let session_token = session_token_var.map(read).transpose()?;
    Ok(Credentials::new(
        access_key_id,
        secret_access_key,
        session_token,
        None,
        "fleet-environment",
    ))
}

/// Reads static credentials from files; the error names the file, never its content.
fn credentials_from_files(
    access_key_id_file: &Path,
    secret_access_key_file: &Path,
    session_token_file: Option<&Path>,
) -> Result<Credentials, ProviderError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|text| text.trim().to_owned())
            .map_err(|error| ProviderError::InvalidConfig {
                provider: "aws".to_owned(),
                reason: format!(
                    "failed to read credentials file {}: {error}; check the path and its permissions",
                    path.display()
                ),
            })
    };
    let access_key_id = read(access_key_id_file)?;
    let secret_access_key = read(secret_access_key_file)?;
    let session_token = session_token_file.map(read).transpose()?;
    Ok(Credentials::new(
        access_key_id,
        secret_access_key,
        session_token,
        None,
        "fleet-files",
    ))
}
