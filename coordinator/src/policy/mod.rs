//! The scaling policy: pure decisions from a snapshot of the fleet and the time.
