//! Metrics of one run and their JSON and table forms.

use serde::Serialize;

use crate::sim::engine::Outcome;
use crate::sim::scenario::Scenario;

/// Cost and wait of one autoscaler on one trace.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub trace: String,
    pub policy: String,
    pub tasks: usize,
    /// Billed instance-hours, with the per-instance minimum.
    pub instance_hours: f64,
    pub cost_usd: f64,
    pub p50_wait_s: f64,
    pub p95_wait_s: f64,
    pub max_wait_s: f64,
    /// Instances launched.
    pub launches: u64,
    /// Maximum of instances billed at the same time.
    pub peak_instances: usize,
    /// Tasks killed with their instance and never re-enqueued, or unfinished at the safety horizon.
    pub tasks_lost: usize,
    /// Sum of the tasks' run times: the lower bound on instance-hours.
    pub runtime_hours: f64,
    pub capacity_errors: u64,
    pub spot_interruptions: u64,
    pub tasks_requeued: u64,
}

impl Report {
    /// Computes the metrics of `outcome`.
    pub fn new(trace: &str, policy: &str, scenario: &Scenario, outcome: &Outcome) -> Self {
        let mut instance_hours = 0.0;
        let mut cost_usd = 0.0;
        let mut edges = Vec::with_capacity(2 * outcome.instances.len());
        for instance in &outcome.instances {
            let end = instance.billing_end.unwrap_or(instance.launched_at);
            let hours = (end - instance.launched_at).max(outcome.min_billed_s) / 3600.0;
            instance_hours += hours;
            cost_usd += hours * scenario.resources[instance.resource].hourly_price_usd;
            edges.push((instance.launched_at, 1i64));
            edges.push((end, -1i64));
        }

        // Ends sort before starts at the same time, so back-to-back instances do not count as overlapping.
        edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut current = 0i64;
        let mut peak = 0i64;
        for (_, change) in edges {
            current += change;
            peak = peak.max(current);
        }

        let mut waits = outcome.waits_s.clone();
        waits.sort_by(f64::total_cmp);
        Self {
            trace: trace.to_string(),
            policy: policy.to_string(),
            tasks: outcome.tasks,
            instance_hours,
            cost_usd,
            p50_wait_s: percentile(&waits, 0.50),
            p95_wait_s: percentile(&waits, 0.95),
            max_wait_s: waits.last().copied().unwrap_or(0.0),
            launches: outcome.counters.launches,
            peak_instances: peak as usize,
            tasks_lost: outcome.tasks_lost,
            runtime_hours: outcome.runtime_s / 3600.0,
            capacity_errors: outcome.counters.capacity_errors,
            spot_interruptions: outcome.counters.interruptions,
            tasks_requeued: outcome.counters.tasks_requeued,
        }
    }
}

/// Returns the nearest-rank percentile of sorted values, 0 for none.
pub fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Formats reports as a table with one row per (trace, policy) and, for traces with both policies, the ratios of
/// fleet to ClearML.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<12} {:<8} {:>6} {:>11} {:>10} {:>9} {:>9} {:>9} {:>8} {:>5} {:>5} {:>10}\n",
        "trace",
        "policy",
        "tasks",
        "inst-hours",
        "cost-usd",
        "p50-wait",
        "p95-wait",
        "max-wait",
        "launches",
        "peak",
        "lost",
        "run-hours"
    ));
    for report in reports {
        out.push_str(&format!(
            "{:<12} {:<8} {:>6} {:>11.1} {:>10.2} {:>8.0}s {:>8.0}s {:>8.0}s {:>8} {:>5} {:>5} {:>10.1}\n",
            report.trace,
            report.policy,
            report.tasks,
            report.instance_hours,
            report.cost_usd,
            report.p50_wait_s,
            report.p95_wait_s,
            report.max_wait_s,
            report.launches,
            report.peak_instances,
            report.tasks_lost,
            report.runtime_hours,
        ));
        let clearml = reports
            .iter()
            .find(|other| other.trace == report.trace && other.policy == "clearml");
        if let (Some(clearml), "fleet") = (clearml, report.policy.as_str()) {
            out.push_str(&format!(
                "{:<12} {:<8} fleet/clearml: p95 wait {:.2}, instance-hours {:.3}, cost {:.3}\n",
                "",
                "",
                ratio(report.p95_wait_s, clearml.p95_wait_s),
                ratio(report.instance_hours, clearml.instance_hours),
                ratio(report.cost_usd, clearml.cost_usd),
            ));
        }
    }
    out
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 {
        f64::NAN
    } else {
        numerator / denominator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_nearest_rank() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), 10.0);
        assert_eq!(percentile(&values, 0.95), 19.0);
        assert_eq!(percentile(&values, 1.0), 20.0);
        assert_eq!(percentile(&[], 0.95), 0.0);
    }
}
