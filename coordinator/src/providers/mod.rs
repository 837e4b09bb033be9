//! Cloud providers: where instances come from (AWS EC2, local processes), behind one trait.
//!
//! A provider launches instances for a resource, terminates them, and describes the instances of a cluster by
//! tag. It classifies cloud errors itself. A capacity error backs off one offering, and the launch moves on to
//! the next offering in the same call. Throttling and transient errors are retried under a token bucket shared
//! by all queues. A configuration error disables the resource until its configuration changes.

pub mod aws;
pub mod backoff;
pub mod clock;
pub mod error;
pub mod local;
pub mod throttle;

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;

pub use backoff::OfferingBackoffs;
pub use clock::{Clock, SystemClock};
pub use error::{ErrorClass, Misconfiguration, ProviderError};
pub use throttle::{RetryPolicy, SharedTokenBucket, TokenBucket};

/// Tag key of the cluster that owns an instance.
pub const TAG_CLUSTER: &str = "fleet:cluster";
/// Tag key of the queue an instance serves.
pub const TAG_QUEUE: &str = "fleet:queue";
/// Tag key of the resource (the configured instance template) an instance was launched from.
pub const TAG_RESOURCE: &str = "fleet:resource";
/// Tag key of the launch intent that created an instance; a replayed intent finds its instances by this tag.
pub const TAG_INTENT: &str = "fleet:intent-id";

/// Purchase option of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Market {
    OnDemand,
    Spot,
}

impl Market {
    pub fn as_str(self) -> &'static str {
        match self {
            Market::OnDemand => "on-demand",
            Market::Spot => "spot",
        }
    }
}

impl fmt::Display for Market {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A unit of cloud capacity that fails and recovers on its own: instance type x zone x market.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Offering {
    pub instance_type: String,
    pub zone: String,
    pub market: Market,
}

impl Offering {
    /// Returns the key under which the offering's backoff is stored, for example `m5.large/us-east-1a/spot`.
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Offering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.instance_type, self.zone, self.market)
    }
}

/// Lifecycle state of an instance as the cloud reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceState {
    Pending,
    Running,
    ShuttingDown,
    Stopping,
    Stopped,
    Terminated,
}

impl InstanceState {
    /// Tells whether the instance is gone or going, so it no longer counts as capacity.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            InstanceState::ShuttingDown | InstanceState::Terminated
        )
    }
}

/// An instance as a provider describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: String,
    pub state: InstanceState,
    pub launch_time: Option<SystemTime>,
    pub tags: BTreeMap<String, String>,
    pub market: Market,
    /// Availability zone, or `local` for local processes.
    pub zone: Option<String>,
    pub instance_type: Option<String>,
}

impl Instance {
    /// Returns the value of the tag `key`, if the instance has it.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// Launch request: the resource, the queue it serves, the intent that requested it and extra tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    pub queue: String,
    /// Name of a resource configured in the provider.
    pub resource: String,
    /// Id of the stored launch intent, written to the instance's `fleet:intent-id` tag.
    pub intent_id: String,
    /// Tags added to the instance and its volumes besides the fleet tags and the resource's own tags.
    pub tags: BTreeMap<String, String>,
    /// Values the instance needs at boot, such as its bootstrap token and the coordinator endpoints: the
    /// `{{name}}` placeholders of an AWS user-data template, or `FLEET_<NAME>` variables of a local process.
    /// Kept as secrets so no log line shows them.
    pub boot_values: BTreeMap<String, clearml_api::Secret>,
}

/// Instances selected by tags: an instance matches when it has every listed tag with the listed value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagFilter {
    pub tags: BTreeMap<String, String>,
}

impl TagFilter {
    /// Selects the instances of one cluster.
    pub fn cluster(cluster: &str) -> Self {
        TagFilter::default().with(TAG_CLUSTER, cluster)
    }

    /// Adds the condition that tag `key` equals `value`.
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.tags.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Tells whether `tags` satisfy every condition.
    pub fn matches(&self, tags: &BTreeMap<String, String>) -> bool {
        self.tags
            .iter()
            .all(|(key, value)| tags.get(key) == Some(value))
    }
}

/// A capacity error that put an offering in backoff during a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityFailure {
    pub offering: Offering,
    pub code: String,
    pub message: String,
}

/// Result of one launch call.
#[derive(Debug, Default)]
pub struct LaunchOutcome {
    /// Instances launched by this call, or found for the intent when it had launched before.
    pub instances: Vec<Instance>,
    /// True when the instances were found by the intent tag or the client token, so nothing new was launched.
    pub already_launched: bool,
    /// Offerings that failed with a capacity error in this call, in the order they were tried.
    pub capacity_failures: Vec<CapacityFailure>,
    /// Offerings skipped because they were in backoff.
    pub skipped_in_backoff: Vec<Offering>,
    /// The error that stopped the call after some instances were already launched; the instances are still
    /// returned because they exist and cost money.
    pub stopped_by: Option<ProviderError>,
}

/// Result of one terminate call.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TerminateOutcome {
    /// Instances whose termination the cloud accepted.
    pub terminating: Vec<String>,
    /// Instances the cloud does not know; they are already gone.
    pub not_found: Vec<String>,
}

/// Something a provider did on its own that operators should see in the event log.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderEvent {
    /// An offering failed with a capacity error and is skipped until `until` (time since the Unix epoch).
    OfferingBackedOff {
        offering: Offering,
        code: String,
        message: String,
        failures: u32,
        until: std::time::Duration,
    },
    /// A resource was disabled by a configuration error; it stays disabled until its configuration changes.
    ResourceDisabled(Misconfiguration),
    /// A disabled resource was enabled again because its configuration changed.
    ResourceEnabled { resource: String },
}

/// A source of instances.
#[async_trait]
pub trait CloudProvider: Send + Sync {
    /// Name of the provider in logs and events, for example `aws` or `local`.
    fn name(&self) -> &str;

    /// Launches up to `count` instances of `request.resource`.
    ///
    /// `client_token` makes the call idempotent: a repeated call with the same token returns the instances of
    /// the first call instead of launching new ones. Before launching, the provider looks for instances tagged
    /// with `request.intent_id`.
    async fn launch(
        &self,
        request: &LaunchRequest,
        count: u32,
        client_token: &str,
    ) -> Result<LaunchOutcome, ProviderError>;

    /// Terminates the instances `ids`. Instances that no longer exist are reported, not treated as errors.
    async fn terminate(&self, ids: &[String]) -> Result<TerminateOutcome, ProviderError>;

    /// Describes every instance whose tags match `filter`, including terminated ones the cloud still reports.
    async fn describe(&self, filter: &TagFilter) -> Result<Vec<Instance>, ProviderError>;

    /// Returns the hourly price of an offering in US dollars, if known.
    fn hourly_price(&self, offering: &Offering) -> Option<f64>;

    /// Subscribes to the provider's events (offering backoffs, disabled resources).
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ProviderEvent>;
}

/// Builds the tags every instance of a request carries: the resource's tags, then the request's tags, then the
/// fleet tags, which win over both.
pub fn instance_tags(
    cluster: &str,
    request: &LaunchRequest,
    resource_tags: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut tags = resource_tags.clone();
    tags.extend(request.tags.clone());
    tags.insert(TAG_CLUSTER.to_owned(), cluster.to_owned());
    tags.insert(TAG_QUEUE.to_owned(), request.queue.clone());
    tags.insert(TAG_RESOURCE.to_owned(), request.resource.clone());
    tags.insert(TAG_INTENT.to_owned(), request.intent_id.clone());
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_tags_override_user_tags() {
        let request = LaunchRequest {
            queue: "gpu".into(),
            resource: "a10".into(),
            intent_id: "intent-1".into(),
            tags: BTreeMap::from([
                ("team".to_owned(), "vision".to_owned()),
                (TAG_QUEUE.to_owned(), "spoofed".to_owned()),
            ]),
            boot_values: BTreeMap::new(),
        };
        let resource_tags = BTreeMap::from([("Name".to_owned(), "fleet-gpu".to_owned())]);

        let tags = instance_tags("prod", &request, &resource_tags);

        assert_eq!(tags.get(TAG_QUEUE).map(String::as_str), Some("gpu"));
        assert_eq!(tags.get(TAG_CLUSTER).map(String::as_str), Some("prod"));
        assert_eq!(tags.get(TAG_INTENT).map(String::as_str), Some("intent-1"));
        assert_eq!(tags.get("team").map(String::as_str), Some("vision"));
        assert_eq!(tags.get("Name").map(String::as_str), Some("fleet-gpu"));
    }

    #[test]
    fn tag_filter_requires_every_tag() {
        let filter = TagFilter::cluster("prod").with(TAG_QUEUE, "gpu");
        let both = BTreeMap::from([
            (TAG_CLUSTER.to_owned(), "prod".to_owned()),
            (TAG_QUEUE.to_owned(), "gpu".to_owned()),
        ]);
        let cluster_only = BTreeMap::from([(TAG_CLUSTER.to_owned(), "prod".to_owned())]);

        assert!(filter.matches(&both));
        assert!(!filter.matches(&cluster_only));
    }

    #[test]
    fn offering_key_names_type_zone_and_market() {
        let offering = Offering {
            instance_type: "m5.large".into(),
            zone: "us-east-1a".into(),
            market: Market::Spot,
        };
        assert_eq!(offering.key(), "m5.large/us-east-1a/spot");
    }
}
