//! `robust_z(value, median, mad)`: ebb's outlier score, for Arroyo pipelines.

use arroyo_udf_plugin::udf;

/// `(value - median) / (1.4826 * mad)`; NULL without spread.
#[udf]
fn robust_z(value: f64, median: f64, mad: f64) -> Option<f64> {
    ebb_udf_core::robust_z(value, median, mad)
}
