//! `rate(count, seconds)`: events per second over a window, for Arroyo pipelines.

use arroyo_udf_plugin::udf;

/// `count / seconds`; NULL for an empty duration.
#[udf]
fn rate(count: f64, seconds: f64) -> Option<f64> {
    ebb_udf_core::rate(count, seconds)
}
