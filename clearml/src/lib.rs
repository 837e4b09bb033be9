//! Typed async client for the ClearML REST API.
