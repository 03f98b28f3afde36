//! Forecast error on a recorded series: ebb's forecaster run online over the rows (each
//! forecast made before its target is seen), against the "last value" and "same time
//! yesterday" forecasts, on exactly the same targets.

use serde::Serialize;

use super::series::Series;
use crate::stages::models::forecast::{ForecastConfig, Forecaster};

const DAY_MS: i64 = 86_400_000;

/// Errors of one horizon.
#[derive(Debug, Clone, Serialize)]
pub struct HorizonError {
    /// The horizon as configured ("5m").
    pub horizon: String,
    /// The horizon forecast: the asked one rounded to whole sampling steps (at least one).
    pub effective_seconds: f64,
    /// Forecasts scored (targets with a row at the target time and a day before it).
    pub n: u64,
    /// Mean absolute error of ebb's published forecast.
    pub mae: f64,
    /// Mean absolute percentage error (rows whose actual value is zero left out).
    pub mape: f64,
    /// MAE of the last-value forecast.
    pub mae_last: f64,
    /// MAE of the same-time-yesterday forecast.
    pub mae_yesterday: f64,
    /// 1 - mae / mae_last: above zero means ebb is better. NaN (null) when nothing was
    /// scored or the last value was never wrong; so are the MAEs when `n` is 0.
    pub skill_vs_last: f64,
    /// 1 - mae / mae_yesterday.
    pub skill_vs_yesterday: f64,
    /// Share of actual values inside the published prediction interval.
    pub interval_coverage: f64,
}

/// The figures of one file.
#[derive(Debug, Clone, Serialize)]
pub struct ForecastScore {
    /// Rows read.
    pub rows: usize,
    /// Rows skipped as gaps (a time or value cell with no value).
    pub missing_values: u64,
    /// Median sampling step, seconds.
    pub step_seconds: f64,
    /// Per horizon, in the configured order.
    pub horizons: Vec<HorizonError>,
}

/// A horizon's label: "1m", "90s", "1h".
pub fn horizon_label(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[derive(Default)]
struct Acc {
    n: u64,
    abs: f64,
    pct: f64,
    pct_n: u64,
    last: f64,
    yesterday: f64,
    covered: u64,
}

/// The first row at or after `t` if it is within `slack` of it.
fn row_at(series: &Series, t: i64, slack: i64) -> Option<usize> {
    let j = series.times.partition_point(|&x| x < t);
    (j < series.len() && series.times[j] - t <= slack).then_some(j)
}

/// Runs the forecaster over `series` and scores every horizon.
pub fn evaluate(series: &Series, cfg: &ForecastConfig) -> ForecastScore {
    let step = series.step_ms().max(1);
    // A target counts when a row lands within half a step of it: sampling jitter is
    // tolerated, gaps are not filled.
    let slack = step / 2;
    // Horizons shorter than the sampling step are forecast one step ahead.
    let stepped = ForecastConfig {
        horizons: cfg
            .horizons
            .iter()
            .map(|h| {
                let steps = ((h.as_millis() as f64 / step as f64).round() as u64).max(1);
                std::time::Duration::from_millis(steps * step as u64)
            })
            .collect(),
        ..cfg.clone()
    };
    let labels: Vec<String> = cfg.horizons.iter().map(|h| horizon_label(*h)).collect();
    let mut model = Forecaster::new(&stepped);
    let mut acc: Vec<Acc> = stepped.horizons.iter().map(|_| Acc::default()).collect();
    for i in 0..series.len() {
        let (t, y) = (series.times[i], series.values[i]);
        let predictions = model.update(t, y, &stepped);
        for (p, a) in predictions.iter().zip(acc.iter_mut()) {
            let Some(j) = row_at(series, p.target_ms, slack).filter(|&j| j > i) else {
                continue;
            };
            let Some(k) = row_at(series, series.times[j] - DAY_MS, slack) else {
                continue;
            };
            let actual = series.values[j];
            a.n += 1;
            a.abs += (p.value - actual).abs();
            if actual != 0.0 {
                a.pct += ((p.value - actual) / actual).abs();
                a.pct_n += 1;
            }
            a.last += (y - actual).abs();
            a.yesterday += (series.values[k] - actual).abs();
            if p.lower <= actual && actual <= p.upper {
                a.covered += 1;
            }
        }
    }
    // Undefined figures are NaN (null in JSON), never a 0 that reads as "as good as naive":
    // no target scored (a series shorter than a day and the horizon), or a naive forecast
    // that was never wrong (a constant series).
    let skill = |mae: f64, base: f64| {
        if base > 0.0 {
            1.0 - mae / base
        } else {
            f64::NAN
        }
    };
    let horizons = labels
        .into_iter()
        .zip(&stepped.horizons)
        .zip(acc)
        .map(|((label, h), a)| {
            let n = if a.n > 0 { a.n as f64 } else { f64::NAN };
            let (mae, last, yesterday) = (a.abs / n, a.last / n, a.yesterday / n);
            HorizonError {
                horizon: label,
                effective_seconds: h.as_secs_f64(),
                n: a.n,
                mae,
                mape: if a.pct_n > 0 {
                    a.pct / a.pct_n as f64
                } else {
                    f64::NAN
                },
                mae_last: last,
                mae_yesterday: yesterday,
                skill_vs_last: skill(mae, last),
                skill_vs_yesterday: skill(mae, yesterday),
                interval_coverage: a.covered as f64 / n,
            }
        })
        .collect();
    ForecastScore {
        rows: series.len(),
        missing_values: series.missing,
        step_seconds: step as f64 / 1000.0,
        horizons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daily(minutes: usize) -> Series {
        Series::synthetic(
            (0..minutes)
                .map(|i| 100.0 + 40.0 * (i as f64 * std::f64::consts::TAU / 1440.0).sin())
                .collect(),
        )
    }

    #[test]
    fn a_series_shorter_than_a_day_scores_nothing_and_claims_no_skill() {
        let score = evaluate(&daily(600), &ForecastConfig::default());
        assert!(!score.horizons.is_empty());
        for h in &score.horizons {
            assert_eq!(h.n, 0, "{h:?}");
            assert!(
                h.skill_vs_last.is_nan() && h.skill_vs_yesterday.is_nan(),
                "{h:?}"
            );
            assert!(h.mae.is_nan(), "{h:?}");
        }
        let three_days = evaluate(&daily(3 * 1440), &ForecastConfig::default());
        for h in &three_days.horizons {
            assert!(h.n > 0 && h.skill_vs_last.is_finite(), "{h:?}");
        }
    }
}
