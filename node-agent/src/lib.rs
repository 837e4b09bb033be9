//! The clearml-fleet node agent, which runs on every instance beside `clearml-agent`.
//!
//! NOTE: the supervisor, the API gate and the termination protocol are not built yet, so the crate exports
//! nothing so far.
