//! Typed async client for the ClearML REST API, shared by the coordinator and the node agent.
//!
//! Each call is a POST of a JSON request to `/v{api_version}/{service}.{action}`; the server wraps every
//! response in an envelope whose `meta` carries `result_code`, `result_subcode` and `result_msg`. The
//! [`Client`] logs in with the access and secret key (HTTP Basic), sends the returned token on later
//! calls, logs in again once when the token is rejected, and retries transient failures only for calls
//! that are safe to repeat.
//!
//! ```no_run
//! # async fn run() -> Result<(), clearml_api::Error> {
//! let config = clearml_api::ClientConfig::new("http://127.0.0.1:8008", "ACCESS", "SECRET")?;
//! let client = clearml_api::Client::new(config)?;
//! let waiting = client.queues().get_num_entries("queue-id").await?;
//! # let _ = waiting; Ok(()) }
//! ```

mod client;
mod config;
mod envelope;
mod error;
pub mod queues;
mod secret;
pub mod tasks;
pub mod workers;

pub use client::{Client, Retry};
pub use config::{ClientConfig, DEFAULT_API_VERSION, RetryPolicy};
pub use envelope::Meta;
pub use error::Error;
pub use secret::Secret;
