//! **filter**: raw telemetry in; clean telemetry (anonymised, UTC, plausible) out, and every
//! rejected record to the dead-letter topic with its reason. Count in = out + rejected.

pub mod config;
pub mod outliers;
pub mod process;

#[cfg(test)]
mod tests;

pub use config::FilterConfig;
pub use process::{FilterStage, CLEAN, REASONS};
