//! **decide**: forecasts, anomalies and window aggregates in; `scale` and `restart` commands
//! out, each with its policy, evidence and reason, under safety limits that come first.

pub mod config;
pub mod policy;
pub mod process;
pub mod table;

#[cfg(test)]
mod tests;

pub use config::DecideConfig;
pub use process::{Command, DecideCounts, DecideInputs, DecideStage, COMMANDS, REASONS, STATE};
