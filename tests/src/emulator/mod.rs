//! An emulator of the ClearML server REST API, faithful enough for the real `clearml` SDK and `clearml-agent`.
