//! gRPC definitions shared by the coordinator, the node agent and `fleetctl`.
//!
//! NOTE: the `fleet/v1` services (FleetService, AgentService, NodeAgent) are not defined yet, so this
//! crate exports nothing. Nothing in the workspace depends on it until they are.
