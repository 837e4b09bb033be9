//! Configuration of the AWS provider: account, region, resources and prices.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::policy::BackoffSchedule;
use crate::providers::throttle::RetryPolicy;
use crate::providers::{Market, Offering};

/// Source of the provider's AWS credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialsSource {
    /// The SDK's default chain: environment, profile files, web identity, container and instance metadata.
    /// With `endpoint_url` set the chain stops before the metadata services, so nothing probes off-cloud.
    DefaultChain,
    /// The access key, secret key and optional session token are read from these environment variables.
    Environment {
        access_key_id_var: String,
        secret_access_key_var: String,
        session_token_var: Option<String>,
    },
    /// The access key, secret key and optional session token are read from these files (for example mounted
    /// Kubernetes secrets). Surrounding whitespace is ignored.
    Files {
        access_key_id_file: std::path::PathBuf,
        secret_access_key_file: std::path::PathBuf,
        session_token_file: Option<std::path::PathBuf>,
    },
}

/// A subnet launches may use, with its availability zone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subnet {
    pub id: String,
    pub zone: String,
}

/// An EBS volume attached at launch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EbsVolume {
    /// Device name, for example `/dev/xvda` for the root volume of Amazon Linux.
    pub device_name: String,
    pub size_gib: i32,
    /// EBS volume type, for example `gp3`.
    pub volume_type: String,
    pub snapshot_id: Option<String>,
    pub encrypted: bool,
}

/// The IAM instance profile, by name or by ARN.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum InstanceProfile {
    Name(String),
    Arn(String),
}

/// One resource: the template from which the provider launches instances.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AwsResource {
    pub image_id: String,
    /// Instance types in the order they are tried.
    pub instance_types: Vec<String>,
    /// Subnets in the order they are tried for each instance type.
    pub subnets: Vec<Subnet>,
    pub market: Market,
    /// Maximum spot price in US dollars per hour, as EC2 takes it (for example `"0.12"`); `None` means the
    /// on-demand price.
    pub spot_max_price: Option<String>,
    pub security_group_ids: Vec<String>,
    pub key_name: Option<String>,
    pub instance_profile: Option<InstanceProfile>,
    pub volumes: Vec<EbsVolume>,
    /// User-data template with `{{name}}` placeholders, see `user_data::render`.
    pub user_data_template: Option<String>,
    /// Values of the template's placeholders besides the built-in `cluster`, `queue`, `resource`, `intent_id`.
    pub user_data_vars: BTreeMap<String, String>,
    /// Tags on the instances and volumes besides the fleet tags.
    pub tags: BTreeMap<String, String>,
    /// IMDSv2 hop limit; 2 lets containers on the instance reach the metadata service through the docker bridge.
    pub metadata_hop_limit: i32,
}

impl AwsResource {
    /// Returns the offerings in the order launches try them: each instance type over every subnet, then the next
    /// type. A capacity error usually concerns one type in one zone, so the preferred type in another zone comes
    /// before a less preferred type.
    pub fn offerings(&self) -> Vec<(Offering, &Subnet)> {
        let mut offerings = Vec::with_capacity(self.instance_types.len() * self.subnets.len());
        for instance_type in &self.instance_types {
            for subnet in &self.subnets {
                let offering = Offering {
                    instance_type: instance_type.clone(),
                    zone: subnet.zone.clone(),
                    market: self.market,
                };
                offerings.push((offering, subnet));
            }
        }
        offerings
    }

    /// Checks what EC2 would reject for every launch, so a typo fails at start and not at the first launch.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        if self.image_id.trim().is_empty() {
            return Err(format!(
                "resources.{name}.image_id is empty; set the AMI id, for example ami-0abc..."
            ));
        }
        if self.instance_types.is_empty() {
            return Err(format!(
                "resources.{name}.instance_types is empty; list at least one instance type, for example [\"m5.large\"]"
            ));
        }
        if self.subnets.is_empty() {
            return Err(format!(
                "resources.{name}.subnets is empty; list at least one subnet with its availability zone"
            ));
        }
        let offerings = self.instance_types.len() * self.subnets.len();
        if offerings > 999 {
            return Err(format!(
                "resources.{name} has {offerings} offerings (instance types x subnets); at most 999 fit the \
                 client token suffix"
            ));
        }
        if self.spot_max_price.is_some() && self.market != Market::Spot {
            return Err(format!(
                "resources.{name}.spot_max_price is set but the market is on-demand; remove it or use the spot market"
            ));
        }
        if !(1..=64).contains(&self.metadata_hop_limit) {
            return Err(format!(
                "resources.{name}.metadata_hop_limit is {}; EC2 accepts 1 to 64",
                self.metadata_hop_limit
            ));
        }
        Ok(())
    }
}

/// Hourly price of an instance type in a market, optionally for one zone only.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferingPrice {
    pub instance_type: String,
    pub market: Market,
    /// `None` applies the price to every zone without a zone-specific price.
    pub zone: Option<String>,
    pub usd_per_hour: f64,
}

/// Configuration of one AWS account and region.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// Cluster name, written to every instance's `fleet:cluster` tag.
    pub cluster: String,
    pub region: String,
    /// Endpoint of an EC2-compatible API (tests, other clouds); `None` means the region's AWS endpoint.
    pub endpoint_url: Option<String>,
    pub credentials: CredentialsSource,
    pub resources: BTreeMap<String, AwsResource>,
    pub prices: Vec<OfferingPrice>,
    /// Token bucket in front of all calls of this account.
    pub bucket_capacity: u32,
    pub bucket_refill_per_second: f64,
    pub retry: RetryPolicy,
    pub backoff: BackoffSchedule,
    /// Instances per DescribeInstances page; EC2 accepts 5 to 1000.
    pub describe_page_size: i32,
    /// Instance ids per TerminateInstances call; EC2 accepts up to 1000 and recommends smaller batches.
    pub terminate_batch_size: usize,
    /// Time limit of one HTTP attempt, after which the call counts as transient failure.
    pub attempt_timeout: Duration,
    pub connect_timeout: Duration,
}

impl AwsConfig {
    /// Creates a configuration with the defaults for everything but the account, region and resources.
    pub fn new(cluster: &str, region: &str) -> Self {
        Self {
            cluster: cluster.to_owned(),
            region: region.to_owned(),
            endpoint_url: None,
            credentials: CredentialsSource::DefaultChain,
            resources: BTreeMap::new(),
            prices: Vec::new(),
            // EC2 documents a request bucket of 100 tokens refilled at 20 per second for non-mutating actions
            // such as DescribeHosts. These defaults stay well below it, so other tools keep some room.
            bucket_capacity: 50,
            bucket_refill_per_second: 5.0,
            retry: RetryPolicy::default(),
            backoff: BackoffSchedule::default(),
            describe_page_size: 1000,
            terminate_batch_size: 500,
            attempt_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Checks the whole configuration and names the first invalid key.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster.is_empty() {
            return Err("cluster is empty; set a cluster name".to_owned());
        }
        if self.region.is_empty() {
            return Err("region is empty; set an AWS region, for example us-east-1".to_owned());
        }
        if !(5..=1000).contains(&self.describe_page_size) {
            return Err(format!(
                "describe_page_size is {}; EC2 accepts 5 to 1000",
                self.describe_page_size
            ));
        }
        if !(1..=1000).contains(&self.terminate_batch_size) {
            return Err(format!(
                "terminate_batch_size is {}; EC2 accepts 1 to 1000 instance ids per call",
                self.terminate_batch_size
            ));
        }
        if self.bucket_capacity == 0 || self.bucket_refill_per_second <= 0.0 {
            return Err("bucket_capacity and bucket_refill_per_second must be positive".to_owned());
        }
        if self.retry.max_attempts == 0 {
            return Err("retry.max_attempts is 0; set at least 1".to_owned());
        }
        for (name, resource) in &self.resources {
            resource.validate(name)?;
        }
        Ok(())
    }

    /// Returns the configured hourly price of `offering`: a price for its zone first, then one for any zone.
    pub fn hourly_price(&self, offering: &Offering) -> Option<f64> {
        let candidates = self.prices.iter().filter(|price| {
            price.instance_type == offering.instance_type && price.market == offering.market
        });
        let mut any_zone = None;
        for price in candidates {
            match &price.zone {
                Some(zone) if *zone == offering.zone => return Some(price.usd_per_hour),
                Some(_) => {}
                None => any_zone = Some(price.usd_per_hour),
            }
        }
        any_zone
    }
}
