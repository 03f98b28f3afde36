//! `ebb replay --file`: backtests ebb's scaling policy on a recorded load series against a
//! reactive HPA-style baseline, static peak provisioning and an oracle, on the cluster
//! simulator of `ebb-replay`, and writes the report.
//!
//! ebb's policy here is the decide stage's own [`policy::scale`] fed by the models stage's
//! own [`Forecaster`], window by window, exactly as `ebb run` feeds them: the forecast made
//! at the window's end, at the horizon that covers the replicas' start-up. The HPA baseline
//! is the same scale function with no forecast (its reactive rule) and the HPA's default
//! behaviour: tolerance 0.1, no scale-up stabilization, five minutes down, no step limit.
//! Event-time driven and free of randomness and wall-clock reads, a replay of the same
//! input and config writes the same bytes.

pub mod chain;
pub mod topic;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ebb_replay::policies::{self, Oracle, Policy, Static};
use ebb_replay::report::{AnomalyScore, InputInfo, PolicyResult, Verdict};
use ebb_replay::{plot, Cluster, ClusterModel, Report};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};
use crate::eval::series::{read_series, ReadMode, Series, SeriesError};
use crate::stages::decide::config::{ScaleConfig, ServiceLimits};
use crate::stages::decide::policy::{self, Observation, ScaleState, StoredForecast};
use crate::stages::models::forecast::{ForecastConfig, Forecaster};
use crate::stages::window::aggregate::ms_to_rfc3339;

/// `[replay]`: the simulated service a recorded load is replayed against. The defaults are
/// printed in every report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Requests per second one replica serves at 100%. Unset (the default), it is derived
    /// from the load: the 99th percentile needs `peak_replicas` replicas at 100%.
    pub capacity_per_replica: Option<f64>,
    /// See `capacity_per_replica`. Default 20.
    pub peak_replicas: u32,
    /// From asking for a replica to it serving. Default 60s.
    #[serde(with = "humantime_serde")]
    pub startup: Duration,
    /// p95 latency of an idle replica. Default 50 ms.
    pub base_latency_ms: f64,
    /// The latency objective on p95. Default 250 ms (met up to 80% utilization).
    pub slo_ms: f64,
    /// Queued requests older than this are dropped. Default 30s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Samples are averaged into windows of at least this long (the decision interval);
    /// coarser data keeps its own step. Default 1m.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            capacity_per_replica: None,
            peak_replicas: 20,
            startup: Duration::from_secs(60),
            base_latency_ms: 50.0,
            slo_ms: 250.0,
            timeout: Duration::from_secs(30),
            window: Duration::from_secs(60),
        }
    }
}

impl ReplayConfig {
    /// Checks values serde cannot, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| {
            Err(ConfigError::Invalid {
                key: format!("replay.{key}"),
                why: why.into(),
            })
        };
        if self
            .capacity_per_replica
            .is_some_and(|c| !(c.is_finite() && c > 0.0))
        {
            return bad("capacity_per_replica", "must be a positive number");
        }
        if self.peak_replicas == 0 {
            return bad("peak_replicas", "must be at least 1");
        }
        if self.base_latency_ms.is_nan() || self.base_latency_ms <= 0.0 {
            return bad("base_latency_ms", "must be positive");
        }
        if self.slo_ms.is_nan() || self.slo_ms <= self.base_latency_ms {
            return bad("slo_ms", "must exceed base_latency_ms");
        }
        if self.window.is_zero() {
            return bad("window", "must be positive");
        }
        Ok(())
    }
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The input could not be read.
    #[error(transparent)]
    Series(#[from] SeriesError),
    /// The report could not be written.
    #[error(transparent)]
    Report(#[from] ebb_replay::report::ReportError),
    /// The report folder could not be made.
    #[error("{0}: {1}")]
    Dir(PathBuf, std::io::Error),
}

/// One file replay.
#[derive(Debug, Clone)]
pub struct FileJob {
    /// The CSV, JSON lines or Parquet file.
    pub file: PathBuf,
    /// Its time column.
    pub time_column: String,
    /// Its value column (one service's request rate).
    pub value_column: String,
    /// Where the report goes.
    pub report: PathBuf,
}

/// Windows of a series: (start ms, mean value), one per window with samples, in order. A
/// negative value is a request rate of zero.
fn windows(series: &Series, window_ms: i64) -> Vec<(i64, f64)> {
    let mut out: Vec<(i64, f64, u32)> = Vec::new();
    let mut rows: Vec<(i64, f64)> = series
        .times
        .iter()
        .copied()
        .zip(series.values.iter().map(|v| v.max(0.0)))
        .collect();
    // Files are usually in time order; a stable sort keeps equal times as written.
    rows.sort_by_key(|r| r.0);
    for (t, v) in rows {
        let start = t.div_euclid(window_ms) * window_ms;
        match out.last_mut() {
            Some((s, sum, n)) if *s == start => {
                *sum += v;
                *n += 1;
            }
            _ => out.push((start, v, 1)),
        }
    }
    out.into_iter()
        .map(|(s, sum, n)| (s, sum / f64::from(n)))
        .collect()
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// What the window ending at `t_ms` shows the scale rule of a simulated service.
fn observation(
    t_ms: i64,
    window_ms: i64,
    load: f64,
    cluster: &Cluster,
    forecast: Option<policy::ForecastView>,
) -> Observation {
    Observation {
        window_start: t_ms - window_ms,
        window_end: t_ms,
        load: Some(load),
        replicas: cluster.ready().max(1),
        utilization: None,
        forecast,
        anomaly_open: false,
    }
}

/// ebb's policy: the models' forecaster and decide's scale rule, one window at a time.
struct Ebb {
    forecaster: Forecaster,
    forecast_cfg: ForecastConfig,
    scale: ScaleConfig,
    limits: ServiceLimits,
    state: ScaleState,
    last: Option<StoredForecast>,
    window_ms: i64,
    decisions: ebb_replay::Decisions,
}

impl Policy for Ebb {
    fn decide(&mut self, _: usize, t_ms: i64, load: f64, cluster: &Cluster) -> Option<u32> {
        let startup_ms = i64::try_from(self.scale.startup_time.as_millis()).unwrap_or(i64::MAX);
        // As the models stage: the window's load updates the forecaster at the window's end,
        // and decide waits for that forecast.
        let predictions = self.forecaster.update(t_ms, load, &self.forecast_cfg);
        if !predictions.is_empty() {
            let status = self.forecaster.status();
            self.last = Some(StoredForecast::new(t_ms, status, &predictions));
        }
        // As decide: far enough ahead to reach the next decision's replicas serving.
        let forecast = self
            .last
            .as_ref()
            .and_then(|f| f.view(t_ms, startup_ms + self.window_ms));
        let obs = observation(t_ms, self.window_ms, load, cluster, forecast);
        let d = &mut self.decisions;
        d.windows += 1;
        let basis = policy::forecast_basis(&self.scale, &obs, self.limits.capacity_per_replica);
        *d.basis.entry(basis.to_string()).or_default() += 1;
        let decision = policy::scale(&mut self.state, &self.scale, &self.limits, &obs)?;
        *d.actions
            .entry(decision.policy.as_str().to_string())
            .or_default() += 1;
        for limit in &decision.limits {
            *d.limited_by.entry((*limit).to_string()).or_default() += 1;
        }
        Some(decision.target)
    }
}

/// The HPA baseline: decide's reactive rule with the HPA's default behaviour.
struct Hpa {
    scale: ScaleConfig,
    limits: ServiceLimits,
    state: ScaleState,
    window_ms: i64,
}

impl Policy for Hpa {
    fn decide(&mut self, _: usize, t_ms: i64, load: f64, cluster: &Cluster) -> Option<u32> {
        let obs = observation(t_ms, self.window_ms, load, cluster, None);
        policy::scale(&mut self.state, &self.scale, &self.limits, &obs).map(|d| d.target)
    }
}

/// Forecast horizons for windows of `window_ms`: the configured ones rounded up to whole
/// windows, plus the one a decision needs (a window and the start-up delay ahead).
fn horizons(cfg: &ForecastConfig, window_ms: i64, startup_ms: i64) -> Vec<Duration> {
    let round = |ms: i64| ((ms.max(1) + window_ms - 1) / window_ms) * window_ms;
    let mut h: Vec<i64> = cfg
        .horizons
        .iter()
        .map(|d| round(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
        .chain([round(window_ms + startup_ms)])
        .collect();
    h.sort_unstable();
    h.dedup();
    h.into_iter()
        .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
        .collect()
}

/// The result of one replay, before it is written.
pub struct Outcome {
    /// The report.
    pub report: Report,
    /// Each policy's simulation, in report order.
    pub runs: Vec<(&'static str, Cluster)>,
}

/// Replays `series` under `config`: every policy on the same windows.
pub fn replay_series(
    config: &Config,
    series: &Series,
    input: InputInfo,
    config_file: &str,
    labels: &[(i64, i64)],
) -> Outcome {
    let rc = &config.replay;
    let step_ms = series.step_ms().max(1);
    let window_ms = step_ms.max(i64::try_from(rc.window.as_millis()).unwrap_or(60_000));
    let ws = windows(series, window_ms);
    let times: Vec<i64> = ws.iter().map(|w| w.0).collect();
    let loads: Vec<f64> = ws.iter().map(|w| w.1).collect();
    let (capacity, capacity_source) = match rc.capacity_per_replica {
        Some(c) => (c, "from config".to_string()),
        None => {
            let p99 = percentile(&loads, 0.99);
            let c = if p99 > 0.0 {
                p99 / f64::from(rc.peak_replicas)
            } else {
                1.0
            };
            (
                c,
                format!(
                    "derived: the load's 99th percentile needs {} replicas at 100%",
                    rc.peak_replicas
                ),
            )
        }
    };
    let model = ClusterModel {
        capacity_per_replica: capacity,
        startup_s: rc.startup.as_secs_f64(),
        base_latency_ms: rc.base_latency_ms,
        slo_ms: rc.slo_ms,
        timeout_s: rc.timeout.as_secs_f64(),
    };
    let mut scale = config.decide.scale.clone();
    scale.startup_time = rc.startup;
    let target = scale.target_utilization;
    let limits = ServiceLimits {
        shadow: false,
        capacity_per_replica: Some(capacity),
        min_replicas: scale.min_replicas,
        max_replicas: scale.max_replicas,
    };
    let initial = policies::replicas_for(loads.first().copied().unwrap_or(0.0), &model, target)
        .clamp(limits.min_replicas, limits.max_replicas);
    let startup_ms = i64::try_from(rc.startup.as_millis()).unwrap_or(i64::MAX);
    let mut forecast_cfg = config.models.forecast.clone();
    forecast_cfg.horizons = horizons(&forecast_cfg, window_ms, startup_ms);
    let mut ebb = Ebb {
        forecaster: Forecaster::new(&forecast_cfg),
        forecast_cfg,
        scale: scale.clone(),
        limits,
        state: ScaleState::default(),
        last: None,
        window_ms,
        decisions: ebb_replay::Decisions::default(),
    };
    let mut hpa = Hpa {
        scale: scale.hpa_baseline(),
        limits,
        state: ScaleState::default(),
        window_ms,
    };
    let mut oracle = Oracle::new(&loads, &model, window_ms);
    let oracle_initial = oracle.initial();
    let static_n = policies::static_replicas(&loads, &model, target);
    let runs: Vec<(&'static str, Cluster)> = vec![
        (
            "ebb",
            policies::run(&mut ebb, &times, &loads, window_ms, &model, initial),
        ),
        (
            "hpa",
            policies::run(&mut hpa, &times, &loads, window_ms, &model, initial),
        ),
        (
            "static",
            policies::run(&mut Static, &times, &loads, window_ms, &model, static_n),
        ),
        (
            "oracle",
            policies::run(
                &mut oracle,
                &times,
                &loads,
                window_ms,
                &model,
                oracle_initial,
            ),
        ),
    ];
    let policies: std::collections::BTreeMap<String, PolicyResult> = runs
        .iter()
        .map(|(name, c)| ((*name).to_string(), PolicyResult::from_totals(&c.totals())))
        .collect();
    let verdict = Verdict::of(&policies["ebb"], &policies["hpa"]);
    let anomalies = (!labels.is_empty()).then(|| score_anomalies(config, series, labels));
    let minutes = runs.first().map_or(0.0, |(_, c)| c.totals().minutes);
    let negative = || {
        series
            .times
            .iter()
            .zip(&series.values)
            .filter(|(_, v)| **v < 0.0)
    };
    let report = Report {
        input: InputInfo {
            minutes: (minutes * 1000.0).round() / 1000.0,
            negative_values: negative().count() as u64,
            first_negative_at: negative().next().map(|(t, _)| ms_to_rfc3339(*t)),
            ..input
        },
        cluster: model,
        capacity_source,
        target_utilization: target,
        policies,
        verdict,
        anomalies,
        ebb_decisions: ebb.decisions,
        config_file: config_file.to_string(),
    };
    Outcome { report, runs }
}

/// Runs the anomaly detectors over the series as the models stage would (online) and scores
/// their alerts against the labelled windows.
fn score_anomalies(config: &Config, series: &Series, labels: &[(i64, i64)]) -> AnomalyScore {
    let scores = crate::eval::anomaly_scores(&series.values, &config.models.detector);
    let alert = config.models.detector.alert_score;
    let detections: Vec<i64> = series
        .times
        .iter()
        .zip(&scores)
        .filter(|(_, s)| **s >= alert)
        .map(|(t, _)| *t)
        .collect();
    let inside = |t: i64| labels.iter().any(|(a, b)| (*a..=*b).contains(&t));
    let true_positives = detections.iter().filter(|t| inside(**t)).count();
    let mut delays = Vec::new();
    let mut detected = 0;
    for (a, b) in labels {
        if let Some(first) = detections.iter().find(|t| (*a..=*b).contains(*t)) {
            detected += 1;
            delays.push((first - a) as f64 / 60_000.0);
        }
    }
    let ratio = |a: usize, b: usize| if b > 0 { a as f64 / b as f64 } else { 0.0 };
    AnomalyScore {
        windows: labels.len(),
        detected,
        detections: detections.len(),
        true_positives,
        recall: ratio(detected, labels.len()),
        precision: ratio(true_positives, detections.len()),
        mean_detection_delay_minutes: (!delays.is_empty())
            .then(|| delays.iter().sum::<f64>() / delays.len() as f64),
    }
}

/// Labelled anomaly windows for `file` when it sits in a NAB-style `data/<category>/` folder
/// with `combined_windows.json` beside `data/` (or beside the category folders).
pub fn nab_labels(file: &Path) -> Vec<(i64, i64)> {
    let Some(category) = file.parent() else {
        return Vec::new();
    };
    let Some(root) = category.parent() else {
        return Vec::new();
    };
    let key = match (category.file_name(), file.file_name()) {
        (Some(c), Some(f)) => format!("{}/{}", c.to_string_lossy(), f.to_string_lossy()),
        _ => return Vec::new(),
    };
    let candidates = [
        root.join("combined_windows.json"),
        root.join("../labels/combined_windows.json"),
    ];
    for path in candidates {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(map) =
            serde_json::from_str::<std::collections::BTreeMap<String, Vec<Vec<String>>>>(&text)
        else {
            continue;
        };
        return map
            .get(&key)
            .map(|ws| {
                ws.iter()
                    .filter_map(|w| {
                        let a = crate::eval::series::parse_time(w.first()?).ok()?;
                        let b = crate::eval::series::parse_time(w.get(1)?).ok()?;
                        Some((a, b))
                    })
                    .collect()
            })
            .unwrap_or_default();
    }
    Vec::new()
}

/// Replays a CSV file and writes `report.json`, `report.md`, the plots and the config used
/// into the job's report folder.
pub fn replay_file(
    config: &Config,
    config_toml: &str,
    job: &FileJob,
) -> Result<Report, ReplayError> {
    let series = read_series(
        &job.file,
        &job.time_column,
        &job.value_column,
        ReadMode::Gaps,
    )?;
    std::fs::create_dir_all(&job.report).map_err(|e| ReplayError::Dir(job.report.clone(), e))?;
    let config_path = job.report.join("ebb.toml");
    std::fs::write(&config_path, config_toml)
        .map_err(|e| ReplayError::Dir(config_path.clone(), e))?;
    let step_ms = series.step_ms();
    let input = InputInfo {
        file: job.file.display().to_string(),
        time_column: job.time_column.clone(),
        value_column: job.value_column.clone(),
        rows: series.len(),
        missing_values: series.missing,
        first_missing_line: series.first_missing,
        // Counted by replay_series, which reads them as zero.
        negative_values: 0,
        first_negative_at: None,
        step_seconds: step_ms as f64 / 1000.0,
        from: series
            .times
            .iter()
            .min()
            .map(|t| ms_to_rfc3339(*t))
            .unwrap_or_default(),
        until: series
            .times
            .iter()
            .max()
            .map(|t| ms_to_rfc3339(*t))
            .unwrap_or_default(),
        minutes: 0.0,
    };
    let labels = nab_labels(&job.file);
    let outcome = replay_series(config, &series, input, "ebb.toml", &labels);
    outcome.report.write(&job.report)?;
    let runs: Vec<(&str, &[ebb_replay::Step])> =
        outcome.runs.iter().map(|(n, c)| (*n, c.steps())).collect();
    plot::load_vs_capacity(
        &job.report.join("load.svg"),
        &runs,
        outcome.report.cluster.capacity_per_replica,
        "requests/s",
        &labels,
    )?;
    plot::replicas(&job.report.join("replicas.svg"), &runs)?;
    Ok(outcome.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_average_samples_and_keep_coarse_steps() {
        let s = Series::synthetic(vec![1.0, 3.0, 5.0]);
        assert_eq!(
            windows(&s, 60_000),
            vec![(0, 1.0), (60_000, 3.0), (120_000, 5.0)]
        );
        assert_eq!(windows(&s, 120_000), vec![(0, 2.0), (120_000, 5.0)]);
    }

    #[test]
    fn a_decision_gets_a_horizon_reaching_past_its_window_and_startup() {
        let h = horizons(&ForecastConfig::default(), 300_000, 60_000);
        let ms: Vec<u128> = h.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![300_000, 600_000, 900_000]);
    }

    fn replay(values: Vec<f64>) -> Report {
        let series = Series::synthetic(values);
        let input = InputInfo {
            file: "synthetic".into(),
            time_column: "t".into(),
            value_column: "v".into(),
            rows: series.len(),
            step_seconds: 60.0,
            from: String::new(),
            until: String::new(),
            minutes: 0.0,
            ..InputInfo::default()
        };
        replay_series(&Config::default(), &series, input, "ebb.toml", &[]).report
    }

    #[test]
    fn negative_request_rates_are_counted_and_replayed_as_zero() {
        let rate =
            |i: usize| 40.0 + 30.0 * ((i % 180) as f64 / 180.0 * std::f64::consts::TAU).sin();
        let with: Vec<f64> = (0..2000)
            .map(|i| if i % 50 == 7 { -25.0 } else { rate(i) })
            .collect();
        let zeros: Vec<f64> = with.iter().map(|v| v.max(0.0)).collect();
        let (a, b) = (replay(with), replay(zeros));
        assert_eq!(a.policies, b.policies);
        assert_eq!(a.input.negative_values, 40);
        assert_eq!(
            a.input.first_negative_at.as_deref(),
            Some("1970-01-01T00:07:00.000Z")
        );
        assert_eq!(
            (b.input.negative_values, b.input.first_negative_at),
            (0, None)
        );
        assert!(a
            .markdown()
            .contains("40 rows held a negative request rate"));
        let json = serde_json::to_value(&a).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json["input"]["negative_values"], 40);
    }

    #[test]
    fn the_same_input_gives_the_same_report_bytes() {
        let load: Vec<f64> = (0..3000)
            .map(|i| 500.0 + 300.0 * (i as f64 * std::f64::consts::TAU / 1440.0).sin())
            .collect();
        let a = serde_json::to_string(&replay(load.clone())).unwrap_or_default();
        let b = serde_json::to_string(&replay(load)).unwrap_or_default();
        assert!(!a.is_empty());
        assert_eq!(a, b);
    }

    #[test]
    fn the_report_says_what_each_of_ebbs_decisions_rested_on() {
        // A day and a half of a daily cycle: the forecaster warms up first, then leads.
        let load: Vec<f64> = (0..2160)
            .map(|i| 600.0 + 400.0 * (i as f64 * std::f64::consts::TAU / 1440.0).sin())
            .collect();
        let r = replay(load.clone());
        let d = &r.ebb_decisions;
        assert_eq!(d.windows, load.len() as u64);
        assert_eq!(d.basis.values().sum::<u64>(), d.windows);
        assert!(d.basis.get("warming_up").is_some_and(|n| *n > 0), "{d:?}");
        assert!(
            d.basis.get("forecast").is_some_and(|n| *n > d.windows / 2),
            "{d:?}"
        );
        assert_eq!(
            d.actions.values().sum::<u64>(),
            r.policies["ebb"].scale_actions,
            "{d:?}"
        );
        assert!(d.actions.contains_key("forecast"), "{d:?}");
        let md = r.markdown();
        assert!(
            md.contains("windows (") && md.contains("rested on the forecast"),
            "{md}"
        );
    }

    #[test]
    fn on_a_step_no_forecast_saw_coming_ebb_breaks_the_slo_no_longer_than_hpa() {
        // Two days of a daily cycle, then load triples for an hour: nothing in the history
        // announces it, so ebb can only meet it as fast as the reactive rule does.
        let load: Vec<f64> = (0..3 * 1440)
            .map(|i| {
                let day = i as f64 * std::f64::consts::TAU / 1440.0;
                let step = if (2900..2960).contains(&i) {
                    200.0
                } else {
                    0.0
                };
                100.0 + 60.0 * day.sin() + 3.0 * (i as f64 * 1.7).sin() + step
            })
            .collect();
        let r = replay(load);
        let hpa = &r.policies["hpa"];
        assert!(
            hpa.sla_violation_minutes > 0.0,
            "the step must hurt: {hpa:?}"
        );
        assert_no_worse_than_hpa(&r);
    }

    /// ebb breaks the SLO for no more minutes than the HPA, at no more replica-minutes.
    fn assert_no_worse_than_hpa(r: &Report) {
        let (ebb, hpa) = (&r.policies["ebb"], &r.policies["hpa"]);
        assert!(
            ebb.sla_violation_minutes <= hpa.sla_violation_minutes
                && r.verdict.no_more_cost_than_hpa,
            "ebb {ebb:?} hpa {hpa:?}"
        );
    }

    #[test]
    fn on_a_noisy_daily_cycle_ebb_breaks_the_slo_no_more_than_hpa_at_no_more_cost() {
        // A week of a daily cycle sampled every minute with uniform noise of +-4% of the
        // mean: the noise, not the cycle, is what pushes a replica past the SLO, and a
        // forecast of the mean alone would call every such minute passing.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let load: Vec<f64> = (0..7 * 1440)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                let day = i as f64 * std::f64::consts::TAU / 1440.0;
                100.0 + 60.0 * day.sin() + 8.0 * noise
            })
            .collect();
        assert_no_worse_than_hpa(&replay(load));
    }

    #[test]
    fn on_a_daily_cycle_ebb_breaks_the_slo_less_than_hpa_at_no_more_cost() {
        // Three days of a smooth daily cycle with a morning surge: the reactive rule is
        // always a window late on the way up; the forecast is not.
        let load: Vec<f64> = (0..3 * 1440)
            .map(|i| {
                let day = i as f64 * std::f64::consts::TAU / 1440.0;
                600.0 + 400.0 * day.sin() + 150.0 * (2.0 * day).sin()
            })
            .collect();
        let r = replay(load);
        let (ebb, hpa) = (&r.policies["ebb"], &r.policies["hpa"]);
        assert!(
            r.verdict.fewer_violations_than_hpa && r.verdict.no_more_cost_than_hpa,
            "ebb {ebb:?} hpa {hpa:?}"
        );
        let oracle = &r.policies["oracle"];
        assert!(oracle.replica_minutes <= r.policies["static"].replica_minutes);
    }
}
