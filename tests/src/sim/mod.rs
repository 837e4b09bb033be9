//! A discrete-event simulator that replays job traces through the fleet policy and a model of the ClearML autoscaler.
//!
//! Both autoscalers run on the same trace, the same simulated cloud (boot delays, per-second billing, optional
//! spot interruptions and capacity errors), the same resource limits and the same max idle time. The model's
//! assumptions are in `docs/simulator.md`.

pub mod clearml_model;
pub mod cloud;
pub mod engine;
pub mod fleet_model;
pub mod report;
pub mod scenario;
pub mod trace;

pub use clearml_model::{ClearmlModel, ClearmlSettings};
pub use cloud::{Cloud, CloudConfig};
pub use engine::{Autoscaler, Outcome, run};
pub use fleet_model::{FleetModel, FleetSettings};
pub use report::Report;
pub use scenario::{Market, Scenario, SimResource};
pub use trace::{TaskSpec, Trace, TraceError, TraceOptions, TraceSource};

/// Which autoscalers a comparison runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyChoice {
    Fleet,
    Clearml,
    Both,
}

/// Everything a comparison needs besides the trace.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub scenario: Scenario,
    pub cloud: CloudConfig,
    pub fleet: FleetSettings,
    pub clearml: ClearmlSettings,
}

impl Comparison {
    /// Runs the chosen autoscalers on `trace`, each with a fresh cloud seeded alike, and returns their reports.
    pub fn run(&self, trace: &Trace, choice: PolicyChoice) -> Vec<Report> {
        let mut reports = Vec::new();
        if matches!(choice, PolicyChoice::Fleet | PolicyChoice::Both) {
            let mut fleet = FleetModel::new(&self.scenario, &self.fleet);
            reports.push(self.run_one(trace, &mut fleet));
        }
        if matches!(choice, PolicyChoice::Clearml | PolicyChoice::Both) {
            let mut clearml = ClearmlModel::new(self.clearml.clone());
            reports.push(self.run_one(trace, &mut clearml));
        }
        reports
    }

    fn run_one(&self, trace: &Trace, autoscaler: &mut dyn Autoscaler) -> Report {
        let cloud = Cloud::new(self.cloud.clone());
        let outcome = run(trace, self.scenario.clone(), cloud, autoscaler);
        Report::new(&trace.name, autoscaler.name(), &self.scenario, &outcome)
    }
}
