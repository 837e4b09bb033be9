//! The simulated cloud: boot delays, billing, spot interruptions and capacity errors.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal};

use crate::sim::scenario::Market;

/// Behaviour of the simulated cloud. Times are in seconds.
#[derive(Debug, Clone)]
pub struct CloudConfig {
    /// Median time from the launch call to the `running` state; log-normal with `boot_sigma`.
    pub pending_median_s: f64,
    /// Median time from `running` to the agent's registration with the queue; log-normal with `boot_sigma`.
    pub agent_start_median_s: f64,
    /// Shape of both boot phases (the standard deviation of their logarithm).
    pub boot_sigma: f64,
    /// Share of instances whose agent never registers.
    pub boot_failure_rate: f64,
    /// Interruptions per spot instance-hour; 0 turns them off.
    pub spot_interruptions_per_hour: f64,
    /// Warning before a spot instance is reclaimed; EC2 gives 2 minutes.
    pub interruption_notice_s: f64,
    /// Probability that a launch call on a spot offering fails with a capacity error.
    pub capacity_error_rate: f64,
    /// Duration of one launch call (RunInstances) until it returns the instance ids.
    pub launch_call_s: f64,
    /// Time from a terminate call until billing stops.
    pub shutdown_s: f64,
    /// Minimum billed time per instance; EC2 bills Linux instances per second with a 60 s minimum.
    pub min_billed_s: f64,
    pub seed: u64,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            pending_median_s: 20.0,
            agent_start_median_s: 100.0,
            boot_sigma: 0.35,
            boot_failure_rate: 0.0,
            spot_interruptions_per_hour: 0.0,
            interruption_notice_s: 120.0,
            capacity_error_rate: 0.0,
            launch_call_s: 1.0,
            shutdown_s: 30.0,
            min_billed_s: 60.0,
            seed: 1,
        }
    }
}

/// How one launched instance will boot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Boot {
    /// Seconds from launch to the `running` state.
    pub pending_s: f64,
    /// Seconds from launch to the agent's registration; `None` when the agent never registers.
    pub registers_after_s: Option<f64>,
    /// Seconds from launch to a spot reclaim; `None` when the instance is never interrupted.
    pub reclaimed_after_s: Option<f64>,
}

/// A launch call that the cloud rejected for lack of capacity (InsufficientInstanceCapacity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityError;

/// Random draws of the simulated cloud.
///
/// Each kind of draw has its own random stream, so two autoscalers on the same trace see the same boot delay for
/// their n-th instance and the same outcome for their n-th launch call.
pub struct Cloud {
    pub config: CloudConfig,
    pending: LogNormal<f64>,
    agent_start: LogNormal<f64>,
    boot_rng: StdRng,
    capacity_rng: StdRng,
    interruption_rng: StdRng,
}

impl Cloud {
    pub fn new(config: CloudConfig) -> Self {
        let sigma = config.boot_sigma.max(0.0);
        let pending = LogNormal::new(config.pending_median_s.max(1e-3).ln(), sigma)
            .expect("boot sigma is finite and non-negative");
        let agent_start = LogNormal::new(config.agent_start_median_s.max(1e-3).ln(), sigma)
            .expect("boot sigma is finite and non-negative");
        Self {
            pending,
            agent_start,
            boot_rng: StdRng::seed_from_u64(config.seed ^ 0xb007),
            capacity_rng: StdRng::seed_from_u64(config.seed ^ 0xcafe),
            interruption_rng: StdRng::seed_from_u64(config.seed ^ 0x5b07),
            config,
        }
    }

    /// Decides whether a launch call on `market` fails for lack of capacity.
    pub fn launch_call(&mut self, market: Market) -> Result<(), CapacityError> {
        if market != Market::Spot || self.config.capacity_error_rate <= 0.0 {
            return Ok(());
        }
        if self.capacity_rng.random::<f64>() < self.config.capacity_error_rate {
            Err(CapacityError)
        } else {
            Ok(())
        }
    }

    /// Draws how one new instance of `market` boots and whether it is reclaimed.
    pub fn boot(&mut self, market: Market) -> Boot {
        let pending_s = self.pending.sample(&mut self.boot_rng);
        let agent_start_s = self.agent_start.sample(&mut self.boot_rng);
        let fails = self.boot_rng.random::<f64>() < self.config.boot_failure_rate;
        let registers_after_s = (!fails).then_some(pending_s + agent_start_s);

        let rate = self.config.spot_interruptions_per_hour / 3600.0;
        let reclaimed_after_s = (market == Market::Spot && rate > 0.0).then(|| {
            Exp::new(rate)
                .expect("the interruption rate is positive")
                .sample(&mut self.interruption_rng)
        });
        Boot {
            pending_s,
            registers_after_s,
            reclaimed_after_s,
        }
    }

    /// Returns the billed seconds of an instance that ran from `start` to `end`.
    pub fn billed_seconds(&self, start: f64, end: f64) -> f64 {
        (end - start).max(self.config.min_billed_s)
    }
}
