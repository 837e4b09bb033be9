//! What both autoscalers share in a comparison: one queue, its resources and limits, and the max idle time.

/// Whether an offering can be reclaimed by the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Market {
    Spot,
    OnDemand,
}

/// One resource of the simulated queue, with its single offering.
#[derive(Debug, Clone)]
pub struct SimResource {
    pub name: String,
    /// Offering id (instance type x zone x market).
    pub offering: String,
    pub market: Market,
    pub max_instances: u32,
    pub hourly_price_usd: f64,
}

/// The queue and limits both autoscalers run against.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub queue: String,
    /// Resources in priority order.
    pub resources: Vec<SimResource>,
    /// Seconds an agent stays idle before its instance is let go.
    pub max_idle_s: f64,
}

impl Scenario {
    /// Builds the default comparison: a GPU queue served by spot instances first, then on-demand ones.
    ///
    /// Prices are those of AWS g5.xlarge in us-east-1: 1.006 USD per hour on demand, and about 0.40 USD per hour
    /// on spot, an estimate because spot prices move.
    pub fn gpu_queue(max_spot: u32, max_on_demand: u32, max_idle_s: f64) -> Self {
        Self {
            queue: "gpu".to_string(),
            resources: vec![
                SimResource {
                    name: "gpu-spot".to_string(),
                    offering: "g5.xlarge/us-east-1a/spot".to_string(),
                    market: Market::Spot,
                    max_instances: max_spot,
                    hourly_price_usd: 0.40,
                },
                SimResource {
                    name: "gpu-on-demand".to_string(),
                    offering: "g5.xlarge/us-east-1a/on-demand".to_string(),
                    market: Market::OnDemand,
                    max_instances: max_on_demand,
                    hourly_price_usd: 1.006,
                },
            ],
            max_idle_s,
        }
    }

    /// Returns the index of the resource named `name`.
    pub fn resource_index(&self, name: &str) -> Option<usize> {
        self.resources
            .iter()
            .position(|resource| resource.name == name)
    }

    /// Returns the sum of the resources' maximums.
    pub fn total_max_instances(&self) -> u32 {
        self.resources
            .iter()
            .map(|resource| resource.max_instances)
            .sum()
    }
}
