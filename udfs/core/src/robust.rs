//! Robust statistics helpers shared by the filter's outlier test and SQL.

/// Consistency constant that makes the MAD estimate the standard deviation of normal data.
pub const MAD_TO_SIGMA: f64 = 1.4826;

/// Robust z-score of `value` against a median and a median absolute deviation:
/// `(value - median) / (1.4826 * mad)`. `None` when the spread is zero or any input is not
/// finite, because no finite score can be given then.
pub fn robust_z(value: f64, median: f64, mad: f64) -> Option<f64> {
    if !(value.is_finite() && median.is_finite() && mad.is_finite()) || mad <= 0.0 {
        return None;
    }
    Some((value - median) / (MAD_TO_SIGMA * mad))
}

/// Events per second: `count / seconds`; `None` for a non-positive or non-finite duration.
pub fn rate(count: f64, seconds: f64) -> Option<f64> {
    if !(count.is_finite() && seconds.is_finite()) || seconds <= 0.0 {
        return None;
    }
    Some(count / seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robust_z_scales_by_mad() {
        assert_eq!(robust_z(10.0, 10.0, 1.0), Some(0.0));
        let z = robust_z(12.9652, 10.0, 2.0).unwrap_or(f64::NAN);
        assert!((z - 1.0).abs() < 1e-9, "{z}");
        assert!(robust_z(8.0, 10.0, 1.0).unwrap_or(0.0) < 0.0);
    }

    #[test]
    fn robust_z_has_no_answer_without_spread_or_with_non_finite_input() {
        assert_eq!(robust_z(1.0, 1.0, 0.0), None);
        assert_eq!(robust_z(f64::NAN, 1.0, 1.0), None);
        assert_eq!(robust_z(1.0, f64::INFINITY, 1.0), None);
    }

    #[test]
    fn rate_divides_and_refuses_empty_durations() {
        assert_eq!(rate(50.0, 10.0), Some(5.0));
        assert_eq!(rate(50.0, 0.0), None);
        assert_eq!(rate(50.0, -1.0), None);
    }
}
