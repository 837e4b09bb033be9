//! Responses as tables for people and as JSON for scripts.
//!
//! The JSON mirrors the proto messages: the field names of `fleet.proto`, instance states as the API's
//! lower-case words, times as Unix milliseconds, and `null` for limits that are not set.

use fleet_proto::v1;
use serde_json::{Value, json};

use crate::cli::state_word;
use crate::table::{Table, format_unix_ms};

pub fn status_json(status: &v1::ClusterStatus) -> Value {
    json!({
        "cluster": status.cluster,
        "leader_id": status.leader_id,
        "leader_address": status.leader_address,
        "term": status.term,
        "members": status.members.iter().map(|member| json!({
            "replica_id": member.replica_id,
            "address": member.address,
            "leader": member.leader,
        })).collect::<Vec<_>>(),
        "replica_id": status.replica_id,
        "hourly_spend_usd": status.hourly_spend_usd,
        "hourly_budget_usd": status.hourly_budget_usd,
    })
}

pub fn status_table(status: &v1::ClusterStatus, endpoint: &str) -> String {
    let leader = if status.leader_id.is_empty() {
        "none elected".to_owned()
    } else {
        format!("{} at {}", status.leader_id, status.leader_address)
    };
    let term = if status.term == 0 {
        "-".to_owned()
    } else {
        status.term.to_string()
    };
    let budget = if status.hourly_budget_usd > 0.0 {
        format!("{:.2} USD/h", status.hourly_budget_usd)
    } else {
        "none".to_owned()
    };

    let fields = [
        ("cluster", status.cluster.clone()),
        ("replica", format!("{} ({endpoint})", status.replica_id)),
        ("leader", leader),
        ("term", term),
        (
            "hourly spend",
            format!("{:.2} USD/h", status.hourly_spend_usd),
        ),
        ("hourly budget", budget),
    ];
    let width = fields.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut text = String::new();
    for (name, value) in fields {
        text.push_str(&format!("{name:<width$}  {value}\n"));
    }

    text.push('\n');
    if status.members.is_empty() {
        text.push_str("members: none listed\n");
        return text;
    }
    let mut members = Table::new(&["MEMBER", "ADDRESS", "LEADER"]);
    for member in &status.members {
        members.push(vec![
            member.replica_id.clone(),
            member.address.clone(),
            if member.leader { "yes" } else { "no" }.to_owned(),
        ]);
    }
    text.push_str(&members.render());
    text
}

pub fn queue_json(queue: &v1::QueueStatus) -> Value {
    let limits = queue.limits.unwrap_or_default();
    json!({
        "name": queue.name,
        "tasks_waiting": queue.tasks_waiting,
        "tasks_waiting_observed_ms": queue.tasks_waiting_observed_ms,
        "instances": queue.instances,
        "desired": queue.desired,
        "paused": queue.paused,
        "limits": {
            "min_instances": limits.min_instances,
            "max_instances": limits.max_instances,
            "min_idle": limits.min_idle,
            "max_idle_seconds": limits.max_idle_seconds,
        },
    })
}

pub fn queues_json(queues: &[v1::QueueStatus]) -> Value {
    json!({ "queues": queues.iter().map(queue_json).collect::<Vec<_>>() })
}

pub fn queues_table(queues: &[v1::QueueStatus]) -> String {
    let mut table = Table::new(&[
        "QUEUE",
        "WAITING",
        "DESIRED",
        "INSTANCES",
        "PAUSED",
        "MIN",
        "MAX",
        "MIN-IDLE",
        "MAX-IDLE-S",
    ])
    .right_align(&["WAITING", "DESIRED", "MIN", "MAX", "MIN-IDLE", "MAX-IDLE-S"]);
    for queue in queues {
        let limits = queue.limits.unwrap_or_default();
        let mut counts: Vec<_> = queue.instances.iter().collect();
        counts.sort();
        let instances = counts
            .iter()
            .map(|(state, count)| format!("{state}={count}"))
            .collect::<Vec<_>>()
            .join(",");
        let optional =
            |value: Option<u32>| value.map(|value| value.to_string()).unwrap_or_default();
        table.push(vec![
            queue.name.clone(),
            // No poll yet: an unknown count, not zero.
            if queue.tasks_waiting_observed_ms == 0 {
                "-".to_owned()
            } else {
                queue.tasks_waiting.to_string()
            },
            queue.desired.to_string(),
            instances,
            if queue.paused { "yes" } else { "no" }.to_owned(),
            optional(limits.min_instances),
            optional(limits.max_instances),
            optional(limits.min_idle),
            optional(limits.max_idle_seconds),
        ]);
    }
    if table.is_empty() {
        return "no queues configured\n".to_owned();
    }
    table.render()
}

pub fn instance_json(instance: &v1::Instance) -> Value {
    json!({
        "instance_id": instance.instance_id,
        "intent_id": instance.intent_id,
        "queue": instance.queue,
        "resource": instance.resource,
        "state": state_word(instance.state),
        "instance_type": instance.instance_type,
        "zone": instance.zone,
        "market": instance.market,
        "hourly_price_usd": instance.hourly_price_usd,
        "launched_unix_ms": instance.launched_unix_ms,
        "idle_since_unix_ms": instance.idle_since_unix_ms,
        "task_id": instance.task_id,
        "worker_id": instance.worker_id,
    })
}

pub fn instances_json(instances: &[v1::Instance]) -> Value {
    json!({ "instances": instances.iter().map(instance_json).collect::<Vec<_>>() })
}

pub fn instances_table(instances: &[v1::Instance]) -> String {
    let mut table = Table::new(&[
        "INSTANCE", "QUEUE", "RESOURCE", "STATE", "TYPE", "ZONE", "MARKET", "USD/H", "LAUNCHED",
        "TASK",
    ])
    .right_align(&["USD/H"]);
    for instance in instances {
        // Before the cloud returns an id, the record key (the intent id) is what drain and terminate take.
        let id = if instance.instance_id.is_empty() {
            format!("({})", instance.intent_id)
        } else {
            instance.instance_id.clone()
        };
        table.push(vec![
            id,
            instance.queue.clone(),
            instance.resource.clone(),
            state_word(instance.state),
            instance.instance_type.clone(),
            instance.zone.clone(),
            instance.market.clone(),
            format!("{:.3}", instance.hourly_price_usd),
            format_unix_ms(instance.launched_unix_ms),
            instance.task_id.clone(),
        ]);
    }
    if table.is_empty() {
        return "no instances match\n".to_owned();
    }
    table.render()
}

pub fn event_json(event: &v1::Event) -> Value {
    json!({
        "sequence": event.sequence,
        "unix_ms": event.unix_ms,
        "kind": event.kind,
        "queue": event.queue,
        "resource": event.resource,
        "instance_id": event.instance_id,
        "message": event.message,
    })
}

/// Columns of the event table. The minimum widths keep followed events aligned, which are printed one at a time:
/// an EC2 instance id has 19 characters (`i-` and 17 hex digits), a local one 18.
pub fn events_table() -> Table {
    Table::new(&[
        "SEQ", "TIME", "KIND", "QUEUE", "RESOURCE", "INSTANCE", "MESSAGE",
    ])
    .right_align(&["SEQ"])
    .min_widths(&[5, 20, 20, 8, 8, 19])
}

pub fn event_cells(event: &v1::Event) -> Vec<String> {
    vec![
        event.sequence.to_string(),
        format_unix_ms(event.unix_ms),
        event.kind.clone(),
        event.queue.clone(),
        event.resource.clone(),
        event.instance_id.clone(),
        event.message.clone(),
    ]
}

pub fn action_json(action: &v1::PlannedAction) -> Value {
    json!({
        "kind": action.kind,
        "queue": action.queue,
        "resource": action.resource,
        "count": action.count,
        "instance_id": action.instance_id,
        "reason": action.reason,
    })
}

pub fn dry_run_table(queue: &str, actions: &[v1::PlannedAction]) -> String {
    if actions.is_empty() {
        return format!("no actions: the policy would do nothing for queue {queue} now\n");
    }
    let mut table = Table::new(&["ACTION", "QUEUE", "RESOURCE", "COUNT", "INSTANCE", "REASON"])
        .right_align(&["COUNT"]);
    for action in actions {
        table.push(vec![
            action.kind.clone(),
            action.queue.clone(),
            action.resource.clone(),
            action.count.to_string(),
            action.instance_id.clone(),
            action.reason.clone(),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_waiting_count_shows_dash() {
        let unknown = v1::QueueStatus {
            name: "gpu".to_owned(),
            ..v1::QueueStatus::default()
        };
        let known = v1::QueueStatus {
            name: "cpu".to_owned(),
            tasks_waiting: 0,
            tasks_waiting_observed_ms: 1_700_000_000_000,
            ..v1::QueueStatus::default()
        };

        let table = queues_table(&[unknown, known]);

        let rows: Vec<Vec<&str>> = table
            .lines()
            .skip(1)
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0][..2], ["gpu", "-"], "{table}");
        assert_eq!(rows[1][..2], ["cpu", "0"], "{table}");
    }

    #[test]
    fn followed_events_align_with_instance_ids() {
        let table = events_table();
        let event = |instance_id: &str| v1::Event {
            sequence: 7,
            unix_ms: 1_700_000_000_000,
            kind: "instance.state".to_owned(),
            queue: "gpu".to_owned(),
            resource: "gpu-spot".to_owned(),
            instance_id: instance_id.to_owned(),
            message: "MESSAGE-TEXT".to_owned(),
        };

        let lines: Vec<String> = ["", "i-0123456789abcdef0", "local-46bb39a24c43"]
            .into_iter()
            .map(|id| table.format_row(&event_cells(&event(id))))
            .collect();

        let columns: Vec<usize> = lines
            .iter()
            .map(|line| line.find("MESSAGE-TEXT").unwrap())
            .collect();
        assert_eq!(columns[0], columns[1], "{lines:#?}");
        assert_eq!(columns[0], columns[2], "{lines:#?}");
    }
}
