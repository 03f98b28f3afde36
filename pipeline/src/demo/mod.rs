//! `ebb demo`: the whole pipeline in one process on librdkafka's mock cluster.

use serde::Deserialize;

use crate::config::ConfigError;

/// `[demo]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Seed of the synthetic telemetry. Default 42.
    pub seed: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self { seed: 42 }
    }
}

impl DemoConfig {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
