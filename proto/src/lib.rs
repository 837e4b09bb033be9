//! gRPC definitions shared by the coordinator, the node agent and `fleetctl`.
//!
//! - `AgentService`: node agents call the coordinator leader (register, heartbeat, termination requests).
//! - `NodeAgent`: the coordinator and operators call one node agent (status, drain, shutdown, logs).
//! - `FleetService`: operators and tools call the coordinator cluster.

pub mod v1 {
    tonic::include_proto!("fleet.v1");
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1;

    #[test]
    fn register_response_round_trips() {
        let response = v1::RegisterResponse {
            session_token: "session".to_owned(),
            config: Some(v1::AgentConfig {
                worker_id: "fleet:gpu-spot:i-0abc".to_owned(),
                queues: vec!["gpu".to_owned(), "default".to_owned()],
                timeouts: Some(v1::AgentTimeouts {
                    max_idle_seconds: 300,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };

        let decoded = v1::RegisterResponse::decode(response.encode_to_vec().as_slice()).unwrap();

        assert_eq!(decoded, response);
    }

    #[test]
    fn service_names_are_versioned() {
        use tonic::server::NamedService;
        use v1::agent_service_server::AgentServiceServer;
        use v1::fleet_service_server::FleetServiceServer;
        use v1::node_agent_server::NodeAgentServer;

        assert_eq!(
            <AgentServiceServer<()> as NamedService>::NAME,
            "fleet.v1.AgentService"
        );
        assert_eq!(
            <FleetServiceServer<()> as NamedService>::NAME,
            "fleet.v1.FleetService"
        );
        assert_eq!(
            <NodeAgentServer<()> as NamedService>::NAME,
            "fleet.v1.NodeAgent"
        );
    }
}
