//! Test doubles around the node agent: a fake instance metadata service (IMDSv2) and a test coordinator that serves AgentService.
