//! The EC2 API for tests: moto's server, and a fault proxy in front of it for the errors moto cannot produce.
//!
//! `Ec2TestBed` starts both, creates a VPC with one subnet per zone, and builds AWS providers that talk to the
//! proxy with dummy credentials, so no test ever reaches a real AWS endpoint or probes instance metadata.

mod moto;
mod proxy;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use fleet_coordinator::providers::aws::{
    AwsConfig, AwsProvider, AwsResource, CredentialsSource, Subnet,
};
use fleet_coordinator::providers::{Market, RetryPolicy, SystemClock};

pub use moto::MotoServer;
pub use proxy::{Fault, FaultProxy, FaultRule, ProxyError, ec2_error_body, ec2_status};

use crate::harness::TestDir;

/// Region of every test bed; moto accepts any region, and its zones are `REGION` + a, b, c.
pub const REGION: &str = "us-east-1";
/// Cluster name that test providers write to the `fleet:cluster` tag.
pub const CLUSTER: &str = "test-cluster";
/// An AMI id; moto 5.2.5 does not validate AMIs, so any well-formed id launches.
pub const IMAGE_ID: &str = "ami-12c6146b";

/// moto, the fault proxy in front of it, and a VPC with one subnet per zone.
pub struct Ec2TestBed {
    pub dir: TestDir,
    pub moto: MotoServer,
    pub proxy: FaultProxy,
    /// An EC2 client that talks to moto directly, for setup and checks that must not count as provider calls.
    pub direct: aws_sdk_ec2::Client,
    pub subnets: Vec<Subnet>,
}

impl Ec2TestBed {
    /// Starts moto and the proxy and creates subnets in `zone_count` zones.
    pub async fn start(test: &str, zone_count: usize) -> anyhow::Result<Ec2TestBed> {
        let dir = TestDir::new(test)?;
        let moto = MotoServer::start(&dir).await?;
        let proxy = FaultProxy::start(&moto.endpoint()).await?;
        let direct = sdk_client(&moto.endpoint());
        let subnets = create_subnets(&direct, zone_count).await?;
        write_dummy_credentials(&dir)?;
        Ok(Ec2TestBed {
            dir,
            moto,
            proxy,
            direct,
            subnets,
        })
    }

    /// Returns a provider configuration that reaches moto through the proxy, with fast retries for tests.
    pub fn config(&self, resources: BTreeMap<String, AwsResource>) -> AwsConfig {
        let mut config = AwsConfig::new(CLUSTER, REGION);
        config.endpoint_url = Some(self.proxy.endpoint());
        config.credentials = CredentialsSource::Files {
            access_key_id_file: self.dir.join("access-key-id"),
            secret_access_key_file: self.dir.join("secret-access-key"),
            session_token_file: None,
        };
        config.resources = resources;
        config.retry = RetryPolicy {
            base: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            max_attempts: 6,
        };
        config.bucket_capacity = 1000;
        config.bucket_refill_per_second = 1000.0;
        config
    }

    /// Builds a provider for `config`.
    pub async fn provider(&self, config: AwsConfig) -> anyhow::Result<AwsProvider> {
        Ok(AwsProvider::new(config, Arc::new(SystemClock)).await?)
    }

    /// Returns an on-demand resource over every subnet of the test bed with the given instance types.
    pub fn resource(&self, instance_types: &[&str]) -> AwsResource {
        AwsResource {
            image_id: IMAGE_ID.to_owned(),
            instance_types: instance_types
                .iter()
                .map(|kind| (*kind).to_owned())
                .collect(),
            subnets: self.subnets.clone(),
            market: Market::OnDemand,
            spot_max_price: None,
            security_group_ids: Vec::new(),
            key_name: None,
            instance_profile: None,
            volumes: Vec::new(),
            user_data_template: None,
            user_data_vars: BTreeMap::new(),
            tags: BTreeMap::new(),
            metadata_hop_limit: 2,
        }
    }
}

/// Builds an SDK client for `endpoint` with dummy credentials, a fixed region and no retries.
pub fn sdk_client(endpoint: &str) -> aws_sdk_ec2::Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

/// Creates a VPC and one /20 subnet in each of the first `zone_count` zones of `REGION`.
///
/// A /20 has about 4,000 addresses, enough for the benchmark's fleet in one subnet. When a subnet runs out,
/// moto 5.2.5 fails RunInstances with an HTML 500 page instead of EC2's InsufficientFreeAddressesInSubnet.
pub async fn create_subnets(
    client: &aws_sdk_ec2::Client,
    zone_count: usize,
) -> anyhow::Result<Vec<Subnet>> {
    let vpc = client.create_vpc().cidr_block("10.0.0.0/16").send().await?;
    let vpc_id = vpc
        .vpc()
        .and_then(|vpc| vpc.vpc_id())
        .ok_or_else(|| anyhow::anyhow!("CreateVpc returned no VPC id"))?
        .to_owned();

    let mut subnets = Vec::with_capacity(zone_count);
    for (index, zone_letter) in ['a', 'b', 'c', 'd']
        .into_iter()
        .take(zone_count)
        .enumerate()
    {
        let zone = format!("{REGION}{zone_letter}");
        let subnet = client
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(format!("10.0.{}.0/20", index * 16))
            .availability_zone(&zone)
            .send()
            .await?;
        let id = subnet
            .subnet()
            .and_then(|subnet| subnet.subnet_id())
            .ok_or_else(|| anyhow::anyhow!("CreateSubnet in {zone} returned no subnet id"))?
            .to_owned();
        subnets.push(Subnet { id, zone });
    }
    Ok(subnets)
}

/// Writes the dummy credentials moto accepts into the test directory.
fn write_dummy_credentials(dir: &TestDir) -> std::io::Result<()> {
    std::fs::write(dir.join("access-key-id"), "testing")?;
    std::fs::write(dir.join("secret-access-key"), "testing")?;
    Ok(())
}
