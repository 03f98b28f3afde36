//! ebb's scalar functions as plain Rust, with no Arrow or Kafka in sight.
//!
//! One implementation of each function serves three callers: the pipeline's stages call
//! these directly, ebb's SQL registers them as DataFusion UDFs, and each is packaged as an
//! Arroyo UDF plugin. Keeping them here, free of any engine's types, is what lets all three
//! give byte-identical answers.

pub mod anonymize;
pub mod robust;
pub mod time;

pub use anonymize::{anonymize, truncate_ip, Anonymizer};
pub use robust::{rate, robust_z};
pub use time::{parse_timestamp, to_utc, to_utc_micros, EpochUnit, TimeError, TimestampInput};
