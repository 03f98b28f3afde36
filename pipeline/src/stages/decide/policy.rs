//! The scale and restart policies: plain functions of a service's policy state and what one
//! window showed. The decide stage calls them once per service and window; replay calls the
//! scale policy on its simulated cluster, so a backtest runs the very rules `ebb run` does.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::config::{RestartConfig, ScaleConfig, ServiceLimits};

/// Recommendations and anomaly marks kept per service, at most: bounds the state whatever
/// the window size and stabilization settings.
const MAX_HISTORY: usize = 1024;
/// Smoothing of the learned capacity per replica.
const CAPACITY_ALPHA: f64 = 0.1;
/// Below this utilization the load per replica says little about capacity.
const MIN_LEARNING_UTILIZATION: f64 = 0.05;

/// A forecast as the scale policy sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastView {
    /// When it was made (epoch ms).
    pub made_at_ms: i64,
    /// False unless the forecaster's status was `ok`.
    pub ready: bool,
    /// The forecaster's status (`ok`, `warming_up`, `model_reset`; empty in older state).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    /// The horizon used (ms).
    pub horizon_ms: i64,
    /// Forecast value.
    pub value: f64,
    /// Lower bound of its interval.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
    /// Which forecast led: `model`, `last` or `yesterday`.
    pub method: String,
    /// Recent mean absolute error of the leading method.
    pub recent_mae: Option<f64>,
}

/// A forecast event as decide keeps it: every horizon, so the one that covers a decision's
/// start-up delay can be chosen when the decision is made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredForecast {
    /// When it was made (epoch ms).
    pub made_at_ms: i64,
    /// False unless the forecaster's status was `ok`.
    pub ready: bool,
    /// The forecaster's status (empty in older state).
    #[serde(default)]
    pub status: String,
    /// (horizon ms, value, lower, upper, method, recent MAE), shortest horizon first.
    pub horizons: Vec<(i64, f64, f64, f64, String, Option<f64>)>,
}

impl StoredForecast {
    /// From a forecaster's predictions made at `made_at_ms`.
    pub fn new(
        made_at_ms: i64,
        status: &str,
        predictions: &[crate::stages::models::forecast::Prediction],
    ) -> Self {
        let mut horizons: Vec<_> = predictions
            .iter()
            .map(|p| {
                (
                    p.horizon_ms,
                    p.value,
                    p.lower,
                    p.upper,
                    p.method.as_str().to_string(),
                    p.recent_mae,
                )
            })
            .collect();
        horizons.sort_by_key(|h| h.0);
        Self {
            made_at_ms,
            ready: status == "ok",
            status: status.to_string(),
            horizons,
        }
    }

    /// The view for a decision at `decision_ms` whose replicas serve `startup_ms` later: the
    /// shortest horizon reaching that far, else the longest there is.
    pub fn view(&self, decision_ms: i64, startup_ms: i64) -> Option<ForecastView> {
        let needed = decision_ms
            .saturating_sub(self.made_at_ms)
            .saturating_add(startup_ms);
        let h = self
            .horizons
            .iter()
            .find(|h| h.0 >= needed)
            .or_else(|| self.horizons.last())?;
        Some(ForecastView {
            made_at_ms: self.made_at_ms,
            ready: self.ready,
            status: self.status.clone(),
            horizon_ms: h.0,
            value: h.1,
            lower: h.2,
            upper: h.3,
            method: h.4.clone(),
            recent_mae: h.5,
        })
    }
}

/// What one window of one service showed the scale policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Window start (epoch ms).
    pub window_start: i64,
    /// Window end (epoch ms): the decision's time.
    pub window_end: i64,
    /// The load (units of the load signal).
    pub load: Option<f64>,
    /// Replicas that reported in the window.
    pub replicas: u32,
    /// Mean utilization of a replica, as a fraction.
    pub utilization: Option<f64>,
    /// The latest forecast made by the window's end, if any.
    pub forecast: Option<ForecastView>,
    /// An anomaly is open: no scale-down.
    pub anomaly_open: bool,
}

/// A service's scale-policy state: small, bounded, snapshotted with the stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScaleState {
    /// Replicas last commanded.
    pub target: Option<u32>,
    /// When (window end, epoch ms).
    pub last_action_ms: Option<i64>,
    /// Recent (window end, desired replicas), for the stabilization windows.
    pub recommendations: VecDeque<(i64, u32)>,
    /// Learned load one replica serves at 100%.
    pub capacity: Option<f64>,
    /// The HPA rule's own state on the same load, under a cost ceiling.
    #[serde(default)]
    pub baseline: Option<Box<ScaleState>>,
    /// Replica-minutes asked for so far, under a cost ceiling.
    #[serde(default)]
    pub replica_minutes: f64,
    /// Replica-minutes the HPA rule asked for on the same load meanwhile.
    #[serde(default)]
    pub baseline_minutes: f64,
}

/// Which rule produced a scale decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScalePolicy {
    /// From the forecast at the start-up horizon.
    Forecast,
    /// The HPA's reactive rule.
    Reactive,
}

impl ScalePolicy {
    /// Stable name, as in commands and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ScalePolicy::Forecast => "forecast",
            ScalePolicy::Reactive => "reactive",
        }
    }
}

/// A scale decision and everything that led to it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleDecision {
    /// Replicas to run.
    pub target: u32,
    /// Replicas counted as current.
    pub from: u32,
    /// The rule that fired.
    pub policy: ScalePolicy,
    /// What the rule asked for before the safety limits.
    pub desired: u32,
    /// Why the forecast was not used, when it was not.
    pub fallback: Option<String>,
    /// The safety limits that changed the rule's answer.
    pub limits: Vec<&'static str>,
    /// Capacity of one replica used.
    pub capacity: Option<f64>,
    /// Utilization now, as a fraction.
    pub utilization: Option<f64>,
    /// The load planned for (forecast bound, or the load now).
    pub planned_load: Option<f64>,
    /// A sentence a person can read.
    pub reason: String,
}

fn ceil_replicas(x: f64) -> u32 {
    if x.is_finite() && x > 0.0 {
        x.ceil().min(f64::from(u32::MAX)) as u32
    } else {
        0
    }
}

/// What a decision on `obs` rests on: `forecast` when the forecast can be trusted, else
/// the kind of reason it cannot (`no_forecast`, `warming_up`, `model_reset`, `stale`,
/// `no_better_than_last`, `capacity_unknown`, `error_too_high`, `status`), as a replay
/// report counts them.
pub fn forecast_basis(cfg: &ScaleConfig, obs: &Observation, capacity: Option<f64>) -> &'static str {
    match (&obs.forecast, forecast_problem(cfg, obs, capacity)) {
        (None, _) => "no_forecast",
        (Some(_), None) => "forecast",
        (Some(_), Some((kind, _))) => kind,
    }
}

/// Why a forecast cannot be trusted for this decision (a kind and a sentence); `None` when
/// it can.
fn forecast_problem(
    cfg: &ScaleConfig,
    obs: &Observation,
    capacity: Option<f64>,
) -> Option<(&'static str, String)> {
    let Some(f) = &obs.forecast else {
        return None;
    };
    let stale_ms = i64::try_from(cfg.forecast_staleness.as_millis()).unwrap_or(i64::MAX);
    if !f.ready {
        Some(match f.status.as_str() {
            "" | "warming_up" => ("warming_up", "forecast warming up".to_string()),
            "model_reset" => (
                "model_reset",
                "forecast model reset (numerical breakdown)".to_string(),
            ),
            other => ("status", format!("forecast status {other}")),
        })
    } else if obs.window_start - f.made_at_ms > stale_ms {
        // Age at the window's start: a decision uses the forecast made at the window's end,
        // or the previous window's when this one's has not come; both count as fresh,
        // whatever the window's length.
        Some((
            "stale",
            format!(
                "forecast stale ({} s old)",
                (obs.window_start - f.made_at_ms) / 1000
            ),
        ))
    } else if f.method == "last" {
        Some((
            "no_better_than_last",
            "forecast no better than the last value".to_string(),
        ))
    } else if capacity.is_none() {
        Some((
            "capacity_unknown",
            "capacity per replica not known yet".to_string(),
        ))
    } else {
        let scale = obs.load.unwrap_or(f.value).abs().max(f.value.abs());
        match f.recent_mae {
            Some(mae) if scale > 0.0 && mae > cfg.max_forecast_error * scale => Some((
                "error_too_high",
                format!("forecast error {:.0}% of load", 100.0 * mae / scale),
            )),
            _ => None,
        }
    }
}

/// Decides whether a service should scale after one window. Updates `state` (learned
/// capacity, recommendation history, last action) and returns the command to send, if any.
pub fn scale(
    state: &mut ScaleState,
    cfg: &ScaleConfig,
    limits: &ServiceLimits,
    obs: &Observation,
) -> Option<ScaleDecision> {
    let observed = obs.replicas;
    if observed == 0 {
        return None;
    }
    if limits.capacity_per_replica.is_none() {
        if let (Some(load), Some(u)) = (obs.load, obs.utilization) {
            if u >= MIN_LEARNING_UTILIZATION && load.is_finite() && load > 0.0 {
                let sample = load / f64::from(observed) / u;
                state.capacity = Some(match state.capacity {
                    Some(c) => c + CAPACITY_ALPHA * (sample - c),
                    None => sample,
                });
            }
        }
    }
    let capacity = limits.capacity_per_replica.or(state.capacity);
    let startup_ms = i64::try_from(cfg.startup_time.as_millis()).unwrap_or(i64::MAX);
    let in_progress = state
        .last_action_ms
        .is_some_and(|t| obs.window_end - t < startup_ms);
    // While new replicas start, the commanded count is the truth; after, what reports is.
    let current = match (in_progress, state.target) {
        (true, Some(t)) => t,
        _ => observed,
    };
    let utilization = match (obs.load, capacity) {
        (Some(load), Some(c)) => Some(load / (f64::from(observed) * c)),
        _ => obs.utilization,
    };
    let target_u = cfg.target_utilization;
    let within_tolerance = |ratio: f64| (ratio - 1.0).abs() <= cfg.tolerance;
    let baseline = match capacity {
        Some(c) if cfg.cost_ceiling > 0.0 => Some(run_baseline(state, cfg, limits, obs, c)),
        _ => None,
    };
    // At the ceiling, the forecast alone is planned for (no headroom) and never above what
    // the HPA rule runs, until the forecasts have saved enough to pay for more.
    // Headroom is bought for a window at a time, so the savings must cover a window of the
    // current fleet before it is.
    let window_minutes = (obs.window_end - obs.window_start).max(0) as f64 / 60_000.0;
    let reserve = f64::from(current) * window_minutes;
    let at_ceiling = baseline.is_some()
        && state.replica_minutes + reserve >= cfg.cost_ceiling * state.baseline_minutes;
    let headroom = if at_ceiling { 0.0 } else { cfg.headroom };
    let problem = forecast_problem(cfg, obs, capacity);
    let (policy, desired, planned_load, fallback) = match (&obs.forecast, problem, capacity) {
        (Some(f), None, Some(c)) => {
            let ahead = f.value + headroom * (f.upper - f.value).max(0.0);
            // The load already here is evidence too. Above the forecast's interval, the
            // forecast missed a surge; above what the fleet carries within the tolerance, the
            // service is overloaded now, whatever the forecast expects next. Either way the
            // forecast must not hold the service below what it carries now: the HPA would
            // scale for it, and noise on a smooth cycle breaks the SLO window after window
            // while a forecast of the mean calls it passing. Otherwise the forecast leads, on
            // the way down as on the way up.
            let fleet = f64::from(current) * c * target_u;
            let planned = match obs.load.filter(|l| l.is_finite()) {
                Some(l) if l > f.upper || l / fleet > 1.0 + cfg.tolerance => ahead.max(l),
                _ => ahead,
            };
            let desired = if within_tolerance(planned / fleet) {
                current
            } else {
                ceil_replicas(planned / (c * target_u))
            };
            (ScalePolicy::Forecast, desired, Some(planned), None)
        }
        (_, problem, _) => {
            let why = problem.map_or_else(|| "no forecast".to_string(), |(_, w)| w);
            let u = utilization?;
            let ratio = u / target_u;
            let desired = if within_tolerance(ratio) {
                current
            } else {
                ceil_replicas(f64::from(observed) * ratio)
            };
            (ScalePolicy::Reactive, desired, obs.load, Some(why))
        }
    };
    let mut limited = Vec::new();
    let desired = match baseline {
        Some(b) if at_ceiling && desired > b => {
            limited.push("cost_ceiling");
            b
        }
        _ => desired,
    };
    let mut next = desired;
    if obs.anomaly_open && next < current {
        next = current;
        limited.push("anomaly_open");
    }
    // Stabilization (as the HPA): up to the lowest recommendation of the up window, down to
    // the highest of the down window.
    state.recommendations.push_back((obs.window_end, desired));
    let up_ms = i64::try_from(cfg.up_stabilization.as_millis()).unwrap_or(i64::MAX);
    let down_ms = i64::try_from(cfg.down_stabilization.as_millis()).unwrap_or(i64::MAX);
    let keep = up_ms.max(down_ms);
    while state
        .recommendations
        .front()
        .is_some_and(|(t, _)| obs.window_end - t > keep)
        || state.recommendations.len() > MAX_HISTORY
    {
        state.recommendations.pop_front();
    }
    let within = |ms: i64| {
        state
            .recommendations
            .iter()
            .filter(move |(t, _)| obs.window_end - t <= ms)
            .map(|(_, r)| *r)
    };
    if next > current {
        let lowest = within(up_ms).min().unwrap_or(next).max(current);
        if lowest < next {
            next = lowest;
            limited.push("up_stabilization");
        }
    } else if next < current {
        let highest = within(down_ms).max().unwrap_or(next).min(current);
        if highest > next {
            next = highest;
            limited.push("down_stabilization");
        }
    }
    // At the ceiling, no more than the HPA rule runs, whose own stabilization has already
    // held any drop it follows; an open anomaly still holds every drop.
    let ceiling = baseline.map(|b| if obs.anomaly_open { b.max(current) } else { b });
    if let Some(b) = ceiling.filter(|b| at_ceiling && next > *b) {
        next = b;
        if !limited.contains(&"cost_ceiling") {
            limited.push("cost_ceiling");
        }
    }
    // One step per period of the window, compounding, at least one.
    let period_ms = i64::try_from(cfg.step_period.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    let periods = ((obs.window_end - obs.window_start).max(1) + period_ms - 1) / period_ms;
    let periods = periods.clamp(1, 64);
    let step = |from: u32, abs: u32, percent: u32| {
        let relative = (u64::from(from) * u64::from(percent)).div_ceil(100);
        abs.max(u32::try_from(relative).unwrap_or(u32::MAX))
    };
    let (mut highest, mut lowest) = (current, current);
    for _ in 0..periods {
        highest = highest.saturating_add(step(highest, cfg.max_step_up, cfg.max_step_up_percent));
        lowest -= step(lowest, cfg.max_step_down, cfg.max_step_down_percent).min(lowest);
    }
    if next > highest {
        next = highest;
        limited.push("max_step_up");
    }
    if next < lowest {
        next = lowest;
        limited.push("max_step_down");
    }
    if next > limits.max_replicas {
        next = limits.max_replicas;
        limited.push("max_replicas");
    }
    if next < limits.min_replicas {
        next = limits.min_replicas;
        limited.push("min_replicas");
    }
    let cooldown_ms = i64::try_from(cfg.cooldown.as_millis()).unwrap_or(i64::MAX);
    // A target commanded lately stands even if the replicas have not followed (actuators own
    // retries; shadow mode must not repeat itself every cooldown). Later it is sent again.
    let repeat_ms = cooldown_ms.max(down_ms);
    let repeated = state.target == Some(next)
        && state
            .last_action_ms
            .is_some_and(|t| obs.window_end - t < repeat_ms);
    let cooling = state
        .last_action_ms
        .is_some_and(|t| obs.window_end - t < cooldown_ms);
    let acts = next != current && !repeated && !cooling;
    if let Some(baseline) = baseline {
        // The coming window is billed at what each side has asked for through it (replicas
        // still starting are billed already).
        let ours = if acts {
            next
        } else {
            state.target.unwrap_or(current)
        };
        state.replica_minutes += f64::from(ours) * window_minutes;
        state.baseline_minutes += f64::from(baseline) * window_minutes;
    }
    if !acts {
        return None;
    }
    state.target = Some(next);
    state.last_action_ms = Some(obs.window_end);
    let direction = if next > current { "up" } else { "down" };
    let mut reason = match (policy, &obs.forecast, planned_load) {
        (ScalePolicy::Forecast, Some(f), Some(planned)) => format!(
            "scale {direction} {current} -> {next}: load forecast {:.1} (upper {:.1}, planned {planned:.1}) in {} s by {} needs {desired} replicas of capacity {:.1} at {:.0}% target",
            f.value,
            f.upper,
            f.horizon_ms / 1000,
            f.method,
            capacity.unwrap_or_default(),
            100.0 * target_u
        ),
        _ => format!(
            "scale {direction} {current} -> {next}: reactive rule, utilization {:.0}% vs target {:.0}% needs {desired} replicas",
            100.0 * utilization.unwrap_or_default(),
            100.0 * target_u
        ),
    };
    if let Some(why) = &fallback {
        reason.push_str(&format!(" ({why})"));
    }
    if policy == ScalePolicy::Forecast && headroom < cfg.headroom {
        reason.push_str(&format!(
            " (no headroom: at the cost ceiling, {:.0} replica-minutes against the HPA rule's {:.0})",
            state.replica_minutes, state.baseline_minutes
        ));
    }
    if !limited.is_empty() {
        reason.push_str(&format!("; limited by {}", limited.join(", ")));
    }
    Some(ScaleDecision {
        target: next,
        from: current,
        policy,
        desired,
        fallback,
        limits: limited,
        capacity,
        utilization,
        planned_load,
        reason,
    })
}

/// Steps the HPA baseline kept in `state` through the same window, at capacity `capacity`,
/// and returns the replicas it asks for through the coming window.
fn run_baseline(
    state: &mut ScaleState,
    cfg: &ScaleConfig,
    limits: &ServiceLimits,
    obs: &Observation,
    capacity: f64,
) -> u32 {
    let baseline = state.baseline.get_or_insert_with(|| {
        Box::new(ScaleState {
            target: Some(obs.replicas),
            ..ScaleState::default()
        })
    });
    let replicas = baseline.target.unwrap_or(obs.replicas);
    let seen = Observation {
        replicas,
        utilization: None,
        forecast: None,
        anomaly_open: false,
        ..obs.clone()
    };
    let limits = ServiceLimits {
        capacity_per_replica: Some(capacity),
        ..*limits
    };
    match scale(baseline, &cfg.hpa_baseline(), &limits, &seen) {
        Some(d) => d.target,
        None => baseline.target.unwrap_or(replicas),
    }
}

/// One health metric's window, as the restart policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// Metric name.
    pub metric: String,
    /// The instance with the window's highest sample.
    pub top_instance: Option<String>,
    /// That sample.
    pub max: f64,
    /// The service's median sample.
    pub p50: f64,
}

/// A service's restart-policy state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestartState {
    /// Recent anomaly events: (window end, score).
    pub anomalies: VecDeque<(i64, f64)>,
    /// The instance standing out, in how many windows in a row, and the last one's end.
    pub suspect: Option<(String, u32, i64)>,
    /// Recent restarts: (window end, instance).
    pub restarts: VecDeque<(i64, String)>,
    /// The instance last restarted, while it has kept standing out ever since: a restart
    /// that did not help is not repeated (a crash loop needs a person, not a restart loop).
    #[serde(default)]
    pub unhelped: Option<String>,
}

impl RestartState {
    /// Notes an anomaly event for the window ending at `end`.
    pub fn anomaly(&mut self, end: i64, score: f64) {
        if self.anomalies.iter().any(|(t, _)| *t == end) {
            return;
        }
        let at = self.anomalies.partition_point(|(t, _)| *t < end);
        self.anomalies.insert(at, (end, score));
        while self.anomalies.len() > 64 {
            self.anomalies.pop_front();
        }
    }

    /// Scores of anomalies of windows ending in `[from, until]`.
    pub fn scores_between(&self, from: i64, until: i64) -> Vec<f64> {
        self.anomalies
            .iter()
            .filter(|(t, _)| (from..=until).contains(t))
            .map(|(_, s)| *s)
            .collect()
    }
}

/// A restart decision.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartDecision {
    /// The instance.
    pub instance: String,
    /// The health metric that points at it.
    pub metric: String,
    /// Its highest sample over the service's median.
    pub ratio: f64,
    /// Windows in a row it stood out.
    pub windows: u32,
    /// Recent anomaly scores.
    pub anomaly_scores: Vec<f64>,
    /// A sentence a person can read.
    pub reason: String,
}

/// Decides whether one instance of a service should be restarted after a window; `scaling`
/// is true while a scale action is in progress (never restart then).
pub fn restart(
    state: &mut RestartState,
    cfg: &RestartConfig,
    obs: &Observation,
    health: &[Health],
    scaling: bool,
) -> Option<RestartDecision> {
    // Which instance stands out most in this window, on any health metric.
    let standout = health
        .iter()
        .filter_map(|h| {
            let instance = h.top_instance.as_ref()?;
            let ratio = if h.p50 > 0.0 {
                h.max / h.p50
            } else if h.max > 0.0 {
                f64::INFINITY
            } else {
                0.0
            };
            (ratio >= cfg.dominance).then_some((instance, &h.metric, ratio))
        })
        .max_by(|a, b| a.2.total_cmp(&b.2).then_with(|| b.0.cmp(a.0)));
    let size = obs.window_end - obs.window_start;
    state.suspect = match (standout, state.suspect.take()) {
        (Some((instance, _, _)), Some((prev, n, end)))
            if &prev == instance && obs.window_end - end <= size =>
        {
            Some((prev, n + 1, obs.window_end))
        }
        (Some((instance, _, _)), _) => Some((instance.clone(), 1, obs.window_end)),
        (None, _) => None,
    };
    let interval_ms = i64::try_from(cfg.interval.as_millis()).unwrap_or(i64::MAX);
    while state
        .restarts
        .front()
        .is_some_and(|(t, _)| obs.window_end - t >= interval_ms)
    {
        state.restarts.pop_front();
    }
    if state
        .unhelped
        .as_ref()
        .is_some_and(|u| standout.is_none_or(|(i, _, _)| i != u))
    {
        state.unhelped = None;
    }
    let (instance, metric, ratio) = standout?;
    let windows = state.suspect.as_ref().map_or(0, |s| s.1);
    let hold_ms = i64::try_from(cfg.anomaly_hold.as_millis()).unwrap_or(i64::MAX);
    let scores = state.scores_between(obs.window_start - hold_ms, obs.window_start);
    let allowed = (cfg.max_fraction * f64::from(obs.replicas)).floor() as usize;
    if !cfg.enabled
        || scores.is_empty()
        || windows < cfg.persist_windows
        || scaling
        || !state.restarts.is_empty()
        || state.unhelped.as_ref() == Some(instance)
        || allowed == 0
    {
        return None;
    }
    state.restarts.push_back((obs.window_end, instance.clone()));
    state.unhelped = Some(instance.clone());
    state.suspect = None;
    let peak = scores.iter().copied().fold(0.0, f64::max);
    let ratio_text = if ratio.is_finite() {
        format!("{ratio:.1}x")
    } else {
        "far above".to_string()
    };
    let reason = format!(
        "restart {instance}: its {metric} stood {ratio_text} the service median for {windows} windows in a row while an anomaly was open (peak score {peak:.2})"
    );
    Some(RestartDecision {
        instance: instance.clone(),
        metric: metric.clone(),
        ratio: if ratio.is_finite() { ratio } else { f64::MAX },
        windows,
        anomaly_scores: scores,
        reason,
    })
}
