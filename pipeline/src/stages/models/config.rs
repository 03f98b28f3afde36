//! `[models]`: the anomaly detectors and the forecaster. One configuration serves every
//! service and every series; `ebb eval` reads the same table as `ebb run`.

use serde::{Deserialize, Serialize};

use super::detect::DetectorConfig;
use super::forecast::ForecastConfig;
use crate::config::ConfigError;

/// The models stage's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Consumer group. Default `ebb-models`.
    pub group_id: String,
    /// The signals a service's feature vector is built from, in order: each one window
    /// statistic of one metric. Default: requests (total over instances), CPU (mean),
    /// p95 latency, errors (total), as the demo's services report them.
    pub signals: Vec<SignalSpec>,
    /// Signals forecast (load). Default `requests_per_s` and `cpu`.
    pub forecast_signals: Vec<String>,
    /// Load is forecast once per this step, from the mean of the windows in it: forecasts
    /// every 10 s window would cost state (pending forecasts per horizon) for no decision
    /// anyone takes that often. Default 1m.
    #[serde(with = "humantime_serde")]
    pub forecast_step: std::time::Duration,
    /// A service's model state is snapshotted every this many windows. Default 30.
    pub snapshot_every: u64,
    /// The model version written into every output and snapshot. Snapshots of another
    /// version are not restored: bumping it (or pinning an old one) starts those models
    /// afresh rather than mixing states. Default 1.
    pub model_version: u32,
    /// `[models.detector]`: features, k-means, DBSCAN and their ensemble.
    pub detector: DetectorConfig,
    /// `[models.forecast]`: horizons, regression and prediction intervals.
    pub forecast: ForecastConfig,
}

/// One signal: a statistic of the windows of the metrics matching `metric`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalSpec {
    /// Signal name, used in outputs and explanations.
    pub name: String,
    /// Metric name or glob (`*`, `?`).
    pub metric: String,
    /// Which window statistic.
    pub statistic: Statistic,
}

/// A window statistic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    /// Mean of the samples.
    Mean,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Median.
    P50,
    /// 95th percentile.
    P95,
    /// 99th percentile.
    P99,
    /// Sum.
    Sum,
    /// Sample count.
    Count,
    /// Samples per second.
    Rate,
    /// Mean times reporting instances: a per-instance gauge summed over the service.
    Total,
}

impl Statistic {
    /// This statistic of a window aggregate.
    pub fn of(self, a: &crate::stages::window::WindowAggregate) -> f64 {
        match self {
            Statistic::Mean => a.mean,
            Statistic::Min => a.min,
            Statistic::Max => a.max,
            Statistic::P50 => a.p50,
            Statistic::P95 => a.p95,
            Statistic::P99 => a.p99,
            Statistic::Sum => a.sum,
            #[allow(clippy::cast_precision_loss)]
            Statistic::Count => a.count as f64,
            Statistic::Rate => a.rate,
            #[allow(clippy::cast_precision_loss)]
            Statistic::Total => a.mean * a.instances.max(1) as f64,
        }
    }
}

impl SignalSpec {
    /// True when `metric` is one of this signal's metrics.
    pub fn matches(&self, metric: &str) -> bool {
        crate::glob::glob_match(&self.metric, metric)
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        let signal = |name: &str, statistic| SignalSpec {
            name: name.into(),
            metric: name.into(),
            statistic,
        };
        Self {
            group_id: "ebb-models".into(),
            signals: vec![
                signal("requests_per_s", Statistic::Total),
                signal("cpu", Statistic::Mean),
                signal("latency_p95_ms", Statistic::P95),
                signal("errors_per_s", Statistic::Total),
            ],
            forecast_signals: vec!["requests_per_s".into(), "cpu".into()],
            forecast_step: std::time::Duration::from_secs(60),
            snapshot_every: 30,
            model_version: 1,
            detector: DetectorConfig::default(),
            forecast: ForecastConfig::default(),
        }
    }
}

impl ModelsConfig {
    /// Checks every range once, at start-up, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                why: why.into(),
            })
        };
        if self.group_id.trim().is_empty() {
            return bad("models.group_id", "must not be empty");
        }
        if self.signals.is_empty() || self.signals.len() > 16 {
            return bad("models.signals", "must list 1 to 16 signals");
        }
        for (i, s) in self.signals.iter().enumerate() {
            if s.name.is_empty() || self.signals[..i].iter().any(|o| o.name == s.name) {
                return bad("models.signals", "names must be non-empty and unique");
            }
        }
        for f in &self.forecast_signals {
            if !self.signals.iter().any(|s| &s.name == f) {
                return bad(
                    "models.forecast_signals",
                    "each must name one of models.signals",
                );
            }
        }
        if self.forecast_step.as_millis() < 1 || self.forecast_step.as_secs() > 3600 {
            return bad("models.forecast_step", "must be between 1 ms and 1 h");
        }
        if self.snapshot_every == 0 {
            return bad("models.snapshot_every", "must be at least 1");
        }
        self.detector.validate().map_err(|e| match e {
            super::detect::DetectorConfigError::Invalid { key, why } => ConfigError::Invalid {
                key: format!("models.detector.{key}"),
                why: why.into(),
            },
        })?;
        self.forecast.validate().map_err(|e| match e {
            super::forecast::ForecastConfigError::Invalid { key, why } => ConfigError::Invalid {
                key: format!("models.forecast.{key}"),
                why: why.into(),
            },
        })
    }
}
