//! The AWS EC2 provider, through aws-sdk-ec2.
//!
//! One provider serves one account and region. All its calls share one token bucket, so the queues of a cluster
//! cannot together exceed the configured request rate, and all of them retry throttling with jittered delays.

mod call;
mod client;
pub mod config;
mod request;
pub mod user_data;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::broadcast;

pub use call::ApiFailure;
pub use config::{
    AwsConfig, AwsResource, CredentialsSource, EbsVolume, InstanceProfile, OfferingPrice, Subnet,
};

use crate::providers::error::{ErrorClass, Misconfiguration};
use crate::providers::{
    CapacityFailure, Clock, CloudProvider, Instance, LaunchOutcome, LaunchRequest, Offering,
    OfferingBackoffs, ProviderError, ProviderEvent, SharedTokenBucket, TAG_INTENT, TagFilter,
    TerminateOutcome, instance_tags,
};
use request::RunInstancesInput;

/// Maximum client token length EC2 accepts.
const MAX_CLIENT_TOKEN_LEN: usize = 64;
/// Characters reserved for the offering suffix of derived client tokens (`-999`).
const TOKEN_SUFFIX_LEN: usize = 4;
/// Events buffered for slow subscribers before the oldest are dropped.
const EVENT_BUFFER: usize = 256;

/// A resource stopped by a configuration error, with the configuration that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisabledResource {
    pub detail: Misconfiguration,
    /// The configuration in force when the error happened; a different configuration enables the resource.
    pub config: AwsResource,
}

struct State {
    resources: BTreeMap<String, AwsResource>,
    backoffs: OfferingBackoffs,
    disabled: BTreeMap<String, DisabledResource>,
}

/// The AWS EC2 provider.
pub struct AwsProvider {
    config: AwsConfig,
    client: aws_sdk_ec2::Client,
    clock: Arc<dyn Clock>,
    bucket: SharedTokenBucket,
    state: Mutex<State>,
    events: broadcast::Sender<ProviderEvent>,
}

impl AwsProvider {
    /// Validates `config` and builds the EC2 client. No network call is made.
    pub async fn new(config: AwsConfig, clock: Arc<dyn Clock>) -> Result<Self, ProviderError> {
        config
            .validate()
            .map_err(|reason| ProviderError::InvalidConfig {
                provider: "aws".to_owned(),
                reason,
            })?;
        let client = client::build_client(&config).await?;
        let bucket =
            SharedTokenBucket::new(config.bucket_capacity, config.bucket_refill_per_second);
        let state = State {
            resources: config.resources.clone(),
            backoffs: OfferingBackoffs::new(config.backoff),
            disabled: BTreeMap::new(),
        };
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        tracing::info!(
            region = %config.region,
            endpoint = config.endpoint_url.as_deref().unwrap_or("default"),
            resources = config.resources.len(),
            "AWS provider configured"
        );
        Ok(Self {
            config,
            client,
            clock,
            bucket,
            state: Mutex::new(state),
            events,
        })
    }

    /// Returns a copy of the offering backoffs, for persisting.
    pub fn backoffs(&self) -> OfferingBackoffs {
        self.lock().backoffs.clone()
    }

    /// Replaces the offering backoffs, for example with persisted ones after an election.
    pub fn restore_backoffs(&self, backoffs: OfferingBackoffs) {
        self.lock().backoffs = backoffs;
    }

    /// Returns the resources disabled by configuration errors.
    pub fn disabled_resources(&self) -> BTreeMap<String, DisabledResource> {
        self.lock().disabled.clone()
    }

    /// Sets the configuration of resource `name`. A disabled resource whose configuration changed is enabled.
    pub fn update_resource(&self, name: &str, resource: AwsResource) -> Result<(), ProviderError> {
        resource
            .validate(name)
            .map_err(|reason| ProviderError::InvalidConfig {
                provider: "aws".to_owned(),
                reason,
            })?;
        let mut state = self.lock();
        let enabled = state
            .disabled
            .get(name)
            .is_some_and(|disabled| disabled.config != resource);
        if enabled {
            state.disabled.remove(name);
            tracing::info!(
                resource = name,
                "resource configuration changed, resource enabled again"
            );
            self.emit(ProviderEvent::ResourceEnabled {
                resource: name.to_owned(),
            });
        }
        state.resources.insert(name.to_owned(), resource);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn emit(&self, event: ProviderEvent) {
        // Sending fails only when there are no subscribers, so no one waits for the event.
        let _ = self.events.send(event);
    }

    /// Returns the resource's configuration, or the error that explains why it cannot launch.
    fn launchable_resource(&self, name: &str) -> Result<AwsResource, ProviderError> {
        let state = self.lock();
        if let Some(disabled) = state.disabled.get(name) {
            return Err(ProviderError::ResourceDisabled {
                detail: Box::new(disabled.detail.clone()),
            });
        }
        state
            .resources
            .get(name)
            .cloned()
            .ok_or_else(|| ProviderError::UnknownResource {
                provider: "aws".to_owned(),
                resource: name.to_owned(),
            })
    }

    async fn describe_pages(&self, filter: &TagFilter) -> Result<Vec<Instance>, ProviderError> {
        let filters = request::tag_filters(filter);
        let mut instances = Vec::new();
        let mut next_token: Option<String> = None;
        let mut pages = 0u32;

        loop {
            let page = call::with_retries(
                "DescribeInstances",
                &self.bucket,
                &self.config.retry,
                || async {
                    self.client
                        .describe_instances()
                        .set_filters(Some(filters.clone()))
                        .max_results(self.config.describe_page_size)
                        .set_next_token(next_token.clone())
                        .send()
                        .await
                        .map_err(ApiFailure::from)
                },
            )
            .await;
            let page = page
                .map_err(|(failure, attempts)| failure.into_error("DescribeInstances", attempts))?;
            pages += 1;

            for reservation in page.reservations() {
                instances.extend(
                    reservation
                        .instances()
                        .iter()
                        .filter_map(request::instance_from_ec2),
                );
            }
            next_token = page
                .next_token()
                .filter(|token| !token.is_empty())
                .map(str::to_owned);
            if next_token.is_none() {
                break;
            }
        }

        tracing::debug!(pages, instances = instances.len(), "described instances");
        Ok(instances)
    }

    async fn run_on_offerings(
        &self,
        request: &LaunchRequest,
        resource: &AwsResource,
        count: u32,
        client_token: &str,
    ) -> Result<LaunchOutcome, ProviderError> {
        let tags = instance_tags(&self.config.cluster, request, &resource.tags);
        let user_data = self.render_user_data(request, resource)?;
        let now = self.clock.now();
        let mut outcome = LaunchOutcome::default();
        let mut remaining = count;

        for (index, (offering, subnet)) in resource.offerings().into_iter().enumerate() {
            let key = offering.key();
            if let Some(backoff) = self.lock().backoffs.active(&key, now) {
                tracing::debug!(offering = %key, until_s = backoff.until.as_secs(), "offering in backoff, skipped");
                outcome.skipped_in_backoff.push(offering);
                continue;
            }

            let token = offering_client_token(client_token, index);
            let input = RunInstancesInput {
                resource,
                offering: &offering,
                subnet,
                count: remaining,
                client_token: &token,
                tags: &tags,
                user_data: user_data.as_deref(),
            };
            let result =
                call::with_retries("RunInstances", &self.bucket, &self.config.retry, || async {
                    request::run_instances(&self.client, &input)
                        .send()
                        .await
                        .map_err(ApiFailure::from)
                })
                .await;

            match result {
                Ok(output) => {
                    let launched: Vec<Instance> = output
                        .instances()
                        .iter()
                        .filter_map(request::instance_from_ec2)
                        .collect();
                    self.lock().backoffs.record_success(&key);
                    for instance in &launched {
                        tracing::info!(
                            instance_id = %instance.id,
                            offering = %key,
                            queue = %request.queue,
                            resource = %request.resource,
                            intent_id = %request.intent_id,
                            client_token = %token,
                            "instance launched"
                        );
                    }
                    remaining = remaining.saturating_sub(launched.len() as u32);
                    outcome.instances.extend(launched);
                    if remaining == 0 {
                        break;
                    }
                }
                Err((failure, attempts)) => match failure.class() {
                    ErrorClass::Capacity => {
                        self.back_off(&offering, &failure, now);
                        outcome.capacity_failures.push(CapacityFailure {
                            offering,
                            code: failure.code_or_kind().to_owned(),
                            message: failure.message,
                        });
                    }
                    ErrorClass::Configuration => {
                        let error = self.disable(&request.resource, resource, subnet, &failure);
                        return stop(outcome, error);
                    }
                    _ => {
                        let error = failure.into_error("RunInstances", attempts);
                        tracing::error!(resource = %request.resource, intent_id = %request.intent_id, %error, "launch failed");
                        return stop(outcome, error);
                    }
                },
            }
        }

        if outcome.instances.is_empty() && outcome.capacity_failures.is_empty() {
            // Every offering was skipped: tell the caller when the first one becomes available again.
            let state = self.lock();
            let keys: Vec<String> = outcome
                .skipped_in_backoff
                .iter()
                .map(Offering::key)
                .collect();
            let retry_at = state
                .backoffs
                .earliest_end(keys.iter().map(String::as_str), now);
            if let Some(retry_at) = retry_at {
                return Err(ProviderError::NoCapacity {
                    resource: request.resource.clone(),
                    retry_after: retry_at.saturating_sub(now),
                });
            }
        }
        Ok(outcome)
    }

    fn render_user_data(
        &self,
        request: &LaunchRequest,
        resource: &AwsResource,
    ) -> Result<Option<String>, ProviderError> {
        let Some(template) = &resource.user_data_template else {
            return Ok(None);
        };
        let mut vars = resource.user_data_vars.clone();
        for (name, value) in &request.boot_values {
            vars.insert(name.clone(), value.expose().to_owned());
        }
        vars.insert("cluster".to_owned(), self.config.cluster.clone());
        vars.insert("queue".to_owned(), request.queue.clone());
        vars.insert("resource".to_owned(), request.resource.clone());
        vars.insert("intent_id".to_owned(), request.intent_id.clone());
        user_data::render(template, &vars)
            .map(Some)
            .map_err(|reason| ProviderError::UserData {
                resource: request.resource.clone(),
                reason,
            })
    }

    fn back_off(&self, offering: &Offering, failure: &ApiFailure, now: std::time::Duration) {
        let backoff = self
            .lock()
            .backoffs
            .record_capacity_error(&offering.key(), now);
        tracing::warn!(
            offering = %offering,
            code = failure.code_or_kind(),
            message = %failure.message,
            failures = backoff.failures,
            backoff_s = backoff.until.saturating_sub(now).as_secs(),
            "capacity error, offering backed off, trying the next offering"
        );
        self.emit(ProviderEvent::OfferingBackedOff {
            offering: offering.clone(),
            code: failure.code_or_kind().to_owned(),
            message: failure.message.clone(),
            failures: backoff.failures,
            until: backoff.until,
        });
    }

    fn disable(
        &self,
        name: &str,
        resource: &AwsResource,
        subnet: &Subnet,
        failure: &ApiFailure,
    ) -> ProviderError {
        let code = failure.code_or_kind().to_owned();
        let (parameter, value) = misconfigured_parameter(&code, &failure.message, resource, subnet);
        let detail = Misconfiguration {
            resource: name.to_owned(),
            parameter,
            value,
            code,
            message: failure.message.clone(),
        };
        tracing::error!(
            resource = name,
            parameter = %detail.parameter,
            value = %detail.value,
            code = %detail.code,
            message = %detail.message,
            "configuration error, resource disabled until its configuration changes"
        );
        self.lock().disabled.insert(
            name.to_owned(),
            DisabledResource {
                detail: detail.clone(),
                config: resource.clone(),
            },
        );
        self.emit(ProviderEvent::ResourceDisabled(detail.clone()));
        ProviderError::Configuration {
            action: "RunInstances",
            detail: Box::new(detail),
        }
    }

    async fn terminate_batch(
        &self,
        batch: &[String],
        outcome: &mut TerminateOutcome,
    ) -> Result<(), ProviderError> {
        let mut ids: Vec<String> = batch.to_vec();
        while !ids.is_empty() {
            let result = call::with_retries(
                "TerminateInstances",
                &self.bucket,
                &self.config.retry,
                || async {
                    self.client
                        .terminate_instances()
                        .set_instance_ids(Some(ids.clone()))
                        .send()
                        .await
                        .map_err(ApiFailure::from)
                },
            )
            .await;
            match result {
                Ok(output) => {
                    for change in output.terminating_instances() {
                        if let Some(id) = change.instance_id() {
                            tracing::info!(instance_id = id, "instance termination requested");
                            outcome.terminating.push(id.to_owned());
                        }
                    }
                    return Ok(());
                }
                Err((failure, _))
                    if failure.code.as_deref() == Some("InvalidInstanceID.NotFound") =>
                {
                    // EC2 rejects the whole call when one id is unknown; drop the named ids and send the rest.
                    let missing = request::instance_ids_in_message(&failure.message);
                    let before = ids.len();
                    ids.retain(|id| !missing.contains(id));
                    if ids.len() == before {
                        return Err(failure.into_error("TerminateInstances", 1));
                    }
                    for id in missing.into_iter().filter(|id| batch.contains(id)) {
                        tracing::info!(instance_id = %id, "instance to terminate does not exist, already gone");
                        outcome.not_found.push(id);
                    }
                }
                Err((failure, attempts)) => {
                    return Err(failure.into_error("TerminateInstances", attempts));
                }
            }
        }
        Ok(())
    }
}

/// Returns the outcome when some instances already launched (they exist and must be tracked), else the error.
fn stop(mut outcome: LaunchOutcome, error: ProviderError) -> Result<LaunchOutcome, ProviderError> {
    if outcome.instances.is_empty() {
        return Err(error);
    }
    outcome.stopped_by = Some(error);
    Ok(outcome)
}

/// Returns the client token of the `index`-th offering of a launch.
///
/// Each offering's RunInstances call needs its own token, because EC2 rejects a token reused with other
/// parameters (IdempotentParameterMismatch). The first offering uses the caller's token unchanged; the others
/// append their index, so a replayed launch sends the same token to the same offering.
pub fn offering_client_token(client_token: &str, index: usize) -> String {
    if index == 0 {
        client_token.to_owned()
    } else {
        format!("{client_token}-{index}")
    }
}

fn validate_client_token(token: &str) -> Result<(), ProviderError> {
    let limit = MAX_CLIENT_TOKEN_LEN - TOKEN_SUFFIX_LEN;
    let reason = if token.is_empty() {
        Some("it is empty; use the launch intent id".to_owned())
    } else if !token.is_ascii() {
        Some("EC2 accepts only ASCII characters".to_owned())
    } else if token.len() > limit {
        Some(format!(
            "it has {} characters and at most {limit} fit, because EC2 accepts {MAX_CLIENT_TOKEN_LEN} and the \
             provider appends an offering suffix",
            token.len()
        ))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ProviderError::InvalidClientToken {
            token: token.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Names the configuration key and value a configuration error points at.
fn misconfigured_parameter(
    code: &str,
    message: &str,
    resource: &AwsResource,
    subnet: &Subnet,
) -> (String, String) {
    let (parameter, value) = if code.starts_with("InvalidAMIID.") {
        ("image_id", resource.image_id.clone())
    } else if code.starts_with("InvalidSubnetID.") {
        ("subnets", subnet.id.clone())
    } else if code == "InvalidGroup.NotFound" {
        ("security_group_ids", resource.security_group_ids.join(","))
    } else if code == "InvalidKeyPair.NotFound" {
        ("key_name", resource.key_name.clone().unwrap_or_default())
    } else if code == "UnauthorizedOperation" {
        (
            "credentials",
            "the IAM policy lacks ec2:RunInstances or ec2:CreateTags".to_owned(),
        )
    } else {
        // InvalidParameterValue messages name the parameter: "Value (x) for parameter y is invalid. ...".
        let parameter = message
            .split_once("for parameter ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .map(|name| name.trim_end_matches(['.', ',', ':']).to_owned());
        return match parameter {
            Some(parameter) => (parameter, message.to_owned()),
            None => ("request parameters".to_owned(), message.to_owned()),
        };
    };
    (parameter.to_owned(), value)
}

#[async_trait]
impl CloudProvider for AwsProvider {
    fn name(&self) -> &str {
        "aws"
    }

    async fn launch(
        &self,
        request: &LaunchRequest,
        count: u32,
        client_token: &str,
    ) -> Result<LaunchOutcome, ProviderError> {
        validate_client_token(client_token)?;
        let resource = self.launchable_resource(&request.resource)?;
        if count == 0 {
            return Ok(LaunchOutcome::default());
        }

        // A replayed intent may have launched before a crash: its instances carry the intent tag. EC2's
        // describe results can lag a launch by seconds, which the client token then covers.
        let filter = TagFilter::cluster(&self.config.cluster).with(TAG_INTENT, &request.intent_id);
        let existing = self.describe_pages(&filter).await?;
        if !existing.is_empty() {
            let ids: Vec<&str> = existing
                .iter()
                .map(|instance| instance.id.as_str())
                .collect();
            tracing::info!(intent_id = %request.intent_id, instance_ids = ?ids, "intent already launched, nothing new launched");
            return Ok(LaunchOutcome {
                instances: existing,
                already_launched: true,
                ..LaunchOutcome::default()
            });
        }

        self.run_on_offerings(request, &resource, count, client_token)
            .await
    }

    async fn terminate(&self, ids: &[String]) -> Result<TerminateOutcome, ProviderError> {
        let mut outcome = TerminateOutcome::default();
        for batch in ids.chunks(self.config.terminate_batch_size) {
            self.terminate_batch(batch, &mut outcome).await?;
        }
        Ok(outcome)
    }

    async fn describe(&self, filter: &TagFilter) -> Result<Vec<Instance>, ProviderError> {
        self.describe_pages(filter).await
    }

    fn hourly_price(&self, offering: &Offering) -> Option<f64> {
        self.config.hourly_price(offering)
    }

    fn subscribe(&self) -> broadcast::Receiver<ProviderEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Market;

    fn resource() -> AwsResource {
        AwsResource {
            image_id: "ami-0123".into(),
            instance_types: vec!["m5.large".into(), "m5a.large".into()],
            subnets: vec![
                Subnet {
                    id: "subnet-a".into(),
                    zone: "us-east-1a".into(),
                },
                Subnet {
                    id: "subnet-b".into(),
                    zone: "us-east-1b".into(),
                },
            ],
            market: Market::Spot,
            spot_max_price: None,
            security_group_ids: vec!["sg-1".into(), "sg-2".into()],
            key_name: Some("ops".into()),
            instance_profile: None,
            volumes: Vec::new(),
            user_data_template: None,
            user_data_vars: BTreeMap::new(),
            tags: BTreeMap::new(),
            metadata_hop_limit: 2,
        }
    }

    #[test]
    fn offerings_try_every_zone_before_the_next_type() {
        let resource = resource();
        let keys: Vec<String> = resource
            .offerings()
            .iter()
            .map(|(offering, _)| offering.key())
            .collect();
        assert_eq!(
            keys,
            [
                "m5.large/us-east-1a/spot",
                "m5.large/us-east-1b/spot",
                "m5a.large/us-east-1a/spot",
                "m5a.large/us-east-1b/spot",
            ]
        );
    }

    #[test]
    fn offering_tokens_are_distinct_and_stable() {
        assert_eq!(offering_client_token("intent-7", 0), "intent-7");
        assert_eq!(offering_client_token("intent-7", 3), "intent-7-3");
    }

    #[test]
    fn client_token_limits_are_enforced() {
        assert!(validate_client_token("intent-7").is_ok());
        assert!(validate_client_token("").is_err());
        assert!(validate_client_token("intent-é").is_err());
        assert!(validate_client_token(&"x".repeat(60)).is_ok());
        assert!(validate_client_token(&"x".repeat(61)).is_err());
    }

    #[test]
    fn configuration_errors_name_the_parameter() {
        let resource = resource();
        let subnet = &resource.subnets[1];
        let cases = [
            ("InvalidAMIID.NotFound", "", "image_id", "ami-0123"),
            ("InvalidSubnetID.NotFound", "", "subnets", "subnet-b"),
            (
                "InvalidGroup.NotFound",
                "",
                "security_group_ids",
                "sg-1,sg-2",
            ),
            ("InvalidKeyPair.NotFound", "", "key_name", "ops"),
        ];
        for (code, message, parameter, value) in cases {
            let named = misconfigured_parameter(code, message, &resource, subnet);
            assert_eq!(
                named,
                (parameter.to_owned(), value.to_owned()),
                "code {code}"
            );
        }
    }

    #[test]
    fn invalid_parameter_value_names_parameter() {
        let resource = resource();
        let message = "Value (m5.huge) for parameter instanceType is invalid.";
        let (parameter, value) = misconfigured_parameter(
            "InvalidParameterValue",
            message,
            &resource,
            &resource.subnets[0],
        );
        assert_eq!(parameter, "instanceType");
        assert_eq!(value, message);
    }

    #[test]
    fn configured_zone_price_wins_over_any_zone_price() {
        let mut config = AwsConfig::new("prod", "us-east-1");
        config.prices = vec![
            OfferingPrice {
                instance_type: "m5.large".into(),
                market: Market::OnDemand,
                zone: None,
                usd_per_hour: 0.096,
            },
            OfferingPrice {
                instance_type: "m5.large".into(),
                market: Market::OnDemand,
                zone: Some("us-east-1b".into()),
                usd_per_hour: 0.1,
            },
        ];
        let offering = |zone: &str| Offering {
            instance_type: "m5.large".into(),
            zone: zone.into(),
            market: Market::OnDemand,
        };

        assert_eq!(config.hourly_price(&offering("us-east-1a")), Some(0.096));
        assert_eq!(config.hourly_price(&offering("us-east-1b")), Some(0.1));
        assert_eq!(
            config.hourly_price(&Offering {
                market: Market::Spot,
                ..offering("us-east-1a")
            }),
            None
        );
    }
}
