//! The EC2 API for tests: moto's server, and a fault proxy in front of it for the errors moto cannot produce.
