//! ebb: forecast-driven autoscaling and anomaly detection as a staged Kafka pipeline.
//!
//! Telemetry flows `telemetry.raw` → **filter** → `telemetry.clean` → window → models →
//! decide → actuators. Each stage is a plain value implementing [`stage::Stage`]; the
//! [`runner`] wires any stage to Kafka, and `ebb demo` and replay drive the same values.

pub mod actuators;
pub mod bench;
pub mod bench_decide;
pub mod bench_models;
pub mod bench_replay;
pub mod bench_window;
pub mod clock;
pub mod codec;
pub mod config;
pub mod demo;
pub mod eval;
pub mod glob;
pub mod metrics;
pub mod record;
pub mod replay;
pub mod runner;
pub mod schemas;
pub mod sql;
pub mod stage;
pub mod stages;
pub mod topics;
pub mod wiring;
