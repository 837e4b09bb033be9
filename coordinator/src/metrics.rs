//! Prometheus metrics of one coordinator replica, rendered in the text exposition format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Every metric the coordinator exports: name, type, help.
const METRICS: &[(&str, &str, &str)] = &[
    (
        "fleet_coordinator_leader",
        "gauge",
        "1 while this replica is the leader, else 0.",
    ),
    (
        "fleet_coordinator_term",
        "gauge",
        "Term (leader key create revision) this replica leads under; 0 when it does not lead.",
    ),
    (
        "fleet_coordinator_leader_elections_total",
        "counter",
        "Times this replica became the leader.",
    ),
    (
        "fleet_queue_tasks_waiting",
        "gauge",
        "Tasks waiting in the queue at the last ClearML poll.",
    ),
    (
        "fleet_instances",
        "gauge",
        "Instances by queue and state, terminated ones left out.",
    ),
    (
        "fleet_hourly_spend_usd",
        "gauge",
        "Sum of the hourly prices of live instances, in USD.",
    ),
    (
        "fleet_policy_decisions_total",
        "counter",
        "Policy runs per queue.",
    ),
    (
        "fleet_launches_total",
        "counter",
        "Instances launched, by queue and resource.",
    ),
    (
        "fleet_launch_failures_total",
        "counter",
        "Launch calls that failed, by queue and resource.",
    ),
    (
        "fleet_terminations_total",
        "counter",
        "Instances whose termination the coordinator sent, by reason.",
    ),
    (
        "fleet_termination_requests_total",
        "counter",
        "Termination requests of agents, by outcome (granted, refused).",
    ),
    (
        "fleet_intents_replayed_total",
        "counter",
        "Open launch intents replayed with their client token.",
    ),
    (
        "fleet_orphans_terminated_total",
        "counter",
        "Cloud instances with this cluster's tags and no record, terminated by the reconciler.",
    ),
    (
        "fleet_clearml_polls_total",
        "counter",
        "ClearML polls, by outcome (ok, error).",
    ),
    (
        "fleet_clearml_observation_age_seconds",
        "gauge",
        "Age of the newest ClearML observation when it was last used.",
    ),
    (
        "fleet_state_write_errors_total",
        "counter",
        "State store writes that failed, fenced ones included.",
    ),
];

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<&'static str, BTreeMap<Labels, f64>>>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `by` to a counter.
    pub fn add(&self, name: &'static str, labels: &[(&'static str, &str)], by: f64) {
        let mut values = self.lock();
        *values
            .entry(name)
            .or_default()
            .entry(owned(labels))
            .or_insert(0.0) += by;
    }

    pub fn inc(&self, name: &'static str, labels: &[(&'static str, &str)]) {
        self.add(name, labels, 1.0);
    }

    pub fn set(&self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        self.lock()
            .entry(name)
            .or_default()
            .insert(owned(labels), value);
    }

    /// Replaces every series of a gauge, so label sets that disappeared (a state no instance is in any more)
    /// stop being reported.
    pub fn replace(&self, name: &'static str, series: Vec<(Labels, f64)>) {
        self.lock().insert(name, series.into_iter().collect());
    }

    /// Returns a counter's or gauge's value, 0 when it has never been set.
    pub fn get(&self, name: &'static str, labels: &[(&'static str, &str)]) -> f64 {
        self.lock()
            .get(name)
            .and_then(|series| series.get(&owned(labels)))
            .copied()
            .unwrap_or(0.0)
    }

    pub fn render(&self) -> String {
        let values = self.lock();
        let mut out = String::new();
        for (name, kind, help) in METRICS {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let Some(series) = values.get(name) else {
                if !METRICS_WITH_LABELS.contains(name) {
                    let _ = writeln!(out, "{name} 0");
                }
                continue;
            };
            for (labels, value) in series {
                let _ = writeln!(out, "{name}{} {value}", render_labels(labels));
            }
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, BTreeMap<Labels, f64>>> {
        self.values
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Metrics that only exist with labels, so no unlabelled zero is printed for them.
const METRICS_WITH_LABELS: &[&str] = &[
    "fleet_queue_tasks_waiting",
    "fleet_instances",
    "fleet_policy_decisions_total",
    "fleet_launches_total",
    "fleet_launch_failures_total",
    "fleet_terminations_total",
    "fleet_termination_requests_total",
    "fleet_clearml_polls_total",
];

fn owned(labels: &[(&'static str, &str)]) -> Labels {
    labels
        .iter()
        .map(|(key, value)| (*key, (*value).to_owned()))
        .collect()
}

fn render_labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(key, value)| {
            let escaped = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{key}=\"{escaped}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_help_type_and_escaped_labels() {
        let metrics = Metrics::new();
        metrics.inc(
            "fleet_launches_total",
            &[("queue", "gpu"), ("resource", "a\"b")],
        );
        metrics.inc(
            "fleet_launches_total",
            &[("queue", "gpu"), ("resource", "a\"b")],
        );
        metrics.set("fleet_coordinator_leader", &[], 1.0);

        let text = metrics.render();

        assert!(
            text.contains("# TYPE fleet_launches_total counter"),
            "{text}"
        );
        assert!(
            text.contains("fleet_launches_total{queue=\"gpu\",resource=\"a\\\"b\"} 2"),
            "{text}"
        );
        assert!(text.contains("fleet_coordinator_leader 1"), "{text}");
        assert!(text.contains("fleet_coordinator_term 0"), "{text}");
        assert!(!text.contains("fleet_instances 0"), "{text}");
    }

    #[test]
    fn replace_drops_vanished_series() {
        let metrics = Metrics::new();
        metrics.replace(
            "fleet_instances",
            vec![(vec![("state", "idle".to_owned())], 2.0)],
        );
        metrics.replace(
            "fleet_instances",
            vec![(vec![("state", "busy".to_owned())], 1.0)],
        );
        let text = metrics.render();
        assert!(!text.contains("idle"), "{text}");
        assert!(text.contains("fleet_instances{state=\"busy\"} 1"), "{text}");
    }
}
