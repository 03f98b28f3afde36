//! **window**: clean telemetry in; per (service, metric) event-time window aggregates out,
//! computed by DataFusion when the watermark passes a window's end plus grace. Records
//! later than that go to the late topic, never silently dropped.

pub mod aggregate;
pub mod config;
pub mod process;

#[cfg(test)]
mod tests;

pub use aggregate::{Aggregator, WindowAggregate};
pub use config::WindowConfig;
pub use process::{WindowCounts, WindowStage, AGGREGATES, LATE, REASONS};
