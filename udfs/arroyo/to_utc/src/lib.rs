//! `to_utc(text, zone)`: any timestamp ebb's filter accepts, as microseconds since the epoch
//! in UTC (NULL when unreadable), for Arroyo pipelines.

use arroyo_udf_plugin::udf;

/// Microseconds since the epoch, UTC; naive local times are read in `zone`.
#[udf]
fn to_utc(text: &str, zone: &str) -> Option<i64> {
    ebb_udf_core::to_utc_micros(text, zone)
}
