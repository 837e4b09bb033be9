//! Conversions between the records and the gRPC messages.

use fleet_proto::v1;

use crate::store::{Event, InstanceRecord, InstanceState};

pub fn state_to_proto(state: InstanceState) -> v1::InstanceState {
    match state {
        InstanceState::Requested => v1::InstanceState::Requested,
        InstanceState::Launching => v1::InstanceState::Launching,
        InstanceState::Booting => v1::InstanceState::Booting,
        InstanceState::Idle => v1::InstanceState::Idle,
        InstanceState::Busy => v1::InstanceState::Busy,
        InstanceState::Draining => v1::InstanceState::Draining,
        InstanceState::Terminating => v1::InstanceState::Terminating,
        InstanceState::Terminated => v1::InstanceState::Terminated,
    }
}

pub fn state_from_proto(state: v1::InstanceState) -> Option<InstanceState> {
    Some(match state {
        v1::InstanceState::Unspecified => return None,
        v1::InstanceState::Requested => InstanceState::Requested,
        v1::InstanceState::Launching => InstanceState::Launching,
        v1::InstanceState::Booting => InstanceState::Booting,
        v1::InstanceState::Idle => InstanceState::Idle,
        v1::InstanceState::Busy => InstanceState::Busy,
        v1::InstanceState::Draining => InstanceState::Draining,
        v1::InstanceState::Terminating => InstanceState::Terminating,
        v1::InstanceState::Terminated => InstanceState::Terminated,
    })
}

pub fn instance(record: &InstanceRecord) -> v1::Instance {
    let offering = record.offering.as_deref().unwrap_or_default();
    let mut parts = offering.split('/');
    let instance_type = parts.next().unwrap_or_default().to_owned();
    let zone = parts.next().unwrap_or_default().to_owned();
    let market = parts.next().unwrap_or_default().to_owned();
    let launched_ms = record
        .history
        .iter()
        .find(|step| step.to == InstanceState::Booting)
        .map_or(0, |step| step.at_ms as i64);
    let idle_since_ms = if record.state == InstanceState::Idle {
        record.state_since_ms as i64
    } else {
        0
    };
    v1::Instance {
        instance_id: record.instance_id.clone().unwrap_or_default(),
        intent_id: record.intent_id.clone(),
        queue: record.queue.clone(),
        resource: record.resource.clone(),
        state: state_to_proto(record.state) as i32,
        instance_type,
        zone,
        market,
        hourly_price_usd: record.hourly_price_usd,
        launched_unix_ms: launched_ms,
        idle_since_unix_ms: idle_since_ms,
        task_id: record.task_id.clone().unwrap_or_default(),
        worker_id: record.worker_id.clone().unwrap_or_default(),
    }
}

pub fn event(event: &Event) -> v1::Event {
    v1::Event {
        sequence: event.sequence,
        unix_ms: event.at_ms as i64,
        kind: event.kind.clone(),
        queue: event.queue.clone().unwrap_or_default(),
        resource: event.resource.clone().unwrap_or_default(),
        instance_id: event.instance_id.clone().unwrap_or_default(),
        message: event.message.clone(),
    }
}
