//! Builds the RunInstances, DescribeInstances and TerminateInstances requests and converts their results.

use std::collections::BTreeMap;
use std::time::SystemTime;

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceLifecycleType, InstanceMarketOptionsRequest,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceStateName, InstanceType,
    MarketType, ResourceType, ShutdownBehavior, SpotInstanceType, SpotMarketOptions, Tag,
    TagSpecification, VolumeType,
};

use super::config::{AwsResource, InstanceProfile, Subnet};
use crate::providers::{Instance, InstanceState, Market, Offering, TagFilter};

/// Everything one RunInstances call needs besides the client.
pub struct RunInstancesInput<'a> {
    pub resource: &'a AwsResource,
    pub offering: &'a Offering,
    pub subnet: &'a Subnet,
    pub count: u32,
    pub client_token: &'a str,
    pub tags: &'a BTreeMap<String, String>,
    pub user_data: Option<&'a str>,
}

/// Builds a RunInstances call: one offering, up to `count` instances, at least one.
pub fn run_instances(
    client: &aws_sdk_ec2::Client,
    input: &RunInstancesInput<'_>,
) -> aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder {
    let resource = input.resource;
    let count = i32::try_from(input.count).unwrap_or(i32::MAX);
    let mut call = client
        .run_instances()
        .image_id(&resource.image_id)
        .instance_type(InstanceType::from(input.offering.instance_type.as_str()))
        .subnet_id(&input.subnet.id)
        .min_count(1)
        .max_count(count)
        .client_token(input.client_token)
        .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_tokens(HttpTokensState::Required)
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .http_put_response_hop_limit(resource.metadata_hop_limit)
                .build(),
        )
        .tag_specifications(tag_specification(ResourceType::Instance, input.tags))
        .set_block_device_mappings(block_device_mappings(resource));

    if !resource.volumes.is_empty() {
        call = call.tag_specifications(tag_specification(ResourceType::Volume, input.tags));
    }
    if !resource.security_group_ids.is_empty() {
        call = call.set_security_group_ids(Some(resource.security_group_ids.clone()));
    }
    if let Some(key_name) = &resource.key_name {
        call = call.key_name(key_name);
    }
    if let Some(profile) = &resource.instance_profile {
        let specification = match profile {
            InstanceProfile::Name(name) => IamInstanceProfileSpecification::builder().name(name),
            InstanceProfile::Arn(arn) => IamInstanceProfileSpecification::builder().arn(arn),
        };
        call = call.iam_instance_profile(specification.build());
    }
    if input.offering.market == Market::Spot {
        call = call.instance_market_options(spot_options(resource.spot_max_price.as_deref()));
    }
    if let Some(user_data) = input.user_data {
        call = call.user_data(user_data);
    }
    call
}

fn tag_specification(
    resource_type: ResourceType,
    tags: &BTreeMap<String, String>,
) -> TagSpecification {
    let tags = tags
        .iter()
        .map(|(key, value)| Tag::builder().key(key).value(value).build())
        .collect();
    TagSpecification::builder()
        .resource_type(resource_type)
        .set_tags(Some(tags))
        .build()
}

fn block_device_mappings(resource: &AwsResource) -> Option<Vec<BlockDeviceMapping>> {
    if resource.volumes.is_empty() {
        return None;
    }
    let mappings = resource
        .volumes
        .iter()
        .map(|volume| {
            let ebs = EbsBlockDevice::builder()
                .volume_size(volume.size_gib)
                .volume_type(VolumeType::from(volume.volume_type.as_str()))
                .set_snapshot_id(volume.snapshot_id.clone())
                .encrypted(volume.encrypted)
                .delete_on_termination(true)
                .build();
            BlockDeviceMapping::builder()
                .device_name(&volume.device_name)
                .ebs(ebs)
                .build()
        })
        .collect();
    Some(mappings)
}

/// One-time spot request that terminates the instance on interruption, so a lost spot instance never lingers
/// as a stopped volume bill.
fn spot_options(max_price: Option<&str>) -> InstanceMarketOptionsRequest {
    let spot = SpotMarketOptions::builder()
        .spot_instance_type(SpotInstanceType::OneTime)
        .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
        .set_max_price(max_price.map(str::to_owned))
        .build();
    InstanceMarketOptionsRequest::builder()
        .market_type(MarketType::Spot)
        .spot_options(spot)
        .build()
}

/// Converts a tag filter into DescribeInstances filters (`tag:KEY` = VALUE).
pub fn tag_filters(filter: &TagFilter) -> Vec<Filter> {
    filter
        .tags
        .iter()
        .map(|(key, value)| {
            Filter::builder()
                .name(format!("tag:{key}"))
                .values(value)
                .build()
        })
        .collect()
}

/// Converts an EC2 instance into the provider's view of it.
pub fn instance_from_ec2(instance: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    let id = instance.instance_id()?.to_owned();
    let state = instance
        .state()
        .and_then(|state| state.name())
        .map_or(InstanceState::Pending, state_from_ec2);
    let launch_time = instance
        .launch_time()
        .and_then(|time| SystemTime::try_from(*time).ok());
    let tags = instance
        .tags()
        .iter()
        .filter_map(|tag| {
            Some((
                tag.key()?.to_owned(),
                tag.value().unwrap_or_default().to_owned(),
            ))
        })
        .collect();
    let market = match instance.instance_lifecycle() {
        Some(InstanceLifecycleType::Spot) => Market::Spot,
        _ => Market::OnDemand,
    };
    let zone = instance
        .placement()
        .and_then(|placement| placement.availability_zone())
        .map(str::to_owned);
    let instance_type = instance
        .instance_type()
        .map(|kind| kind.as_str().to_owned());

    Some(Instance {
        id,
        state,
        launch_time,
        tags,
        market,
        zone,
        instance_type,
    })
}

fn state_from_ec2(name: &InstanceStateName) -> InstanceState {
    match name {
        InstanceStateName::Pending => InstanceState::Pending,
        InstanceStateName::Running => InstanceState::Running,
        InstanceStateName::ShuttingDown => InstanceState::ShuttingDown,
        InstanceStateName::Stopping => InstanceState::Stopping,
        InstanceStateName::Stopped => InstanceState::Stopped,
        InstanceStateName::Terminated => InstanceState::Terminated,
        // A state added to EC2 after this SDK version; pending keeps the instance counted until it settles.
        _ => InstanceState::Pending,
    }
}

/// Returns the instance ids an `InvalidInstanceID.NotFound` message names, for example
/// "The instance IDs 'i-1, i-2' do not exist".
pub fn instance_ids_in_message(message: &str) -> Vec<String> {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("i-") && word.len() > 2)
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_message_yields_instance_ids() {
        let ids = instance_ids_in_message("The instance IDs 'i-0abc, i-0def' do not exist");
        assert_eq!(ids, ["i-0abc", "i-0def"]);
    }

    #[test]
    fn tag_filter_becomes_tag_prefixed_filters() {
        let filters = tag_filters(&TagFilter::cluster("prod"));
        assert_eq!(filters.len(), 1);
        assert_eq!(filters[0].name(), Some("tag:fleet:cluster"));
        assert_eq!(filters[0].values(), ["prod"]);
    }
}
