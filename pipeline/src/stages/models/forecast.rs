//! Incremental load forecast for one series: recursive least squares over the recent
//! change, trend and a daily profile, one model per horizon, each checked against the two
//! naive forecasts ("last value", "same time yesterday") and replaced by the better of them
//! while its own recent error is worse. Bounded state, deterministic.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Inputs of the regression (all divided by the series' running scale):
/// bias, last step, deviation from the short and long means, the daily profile's change
/// from now to the target time, and the profile's level at the target time vs now.
const INPUTS: usize = 6;
/// Milliseconds in a day.
const DAY_MS: i64 = 86_400_000;
/// Largest diagonal entry of the RLS covariance (and its initial value).
const P_CAP: f64 = 10.0;
/// Learning targets and predicted changes are bounded to this many scale units: a burst
/// teaches the regression as much as a large move, not as much as its square.
const TARGET_CAP: f64 = 6.0;
const LEARN_CAP: f64 = 2.5;
/// Values further than this many times the level (plus scale) from it are poison.
const POISON_BAND: f64 = 100.0;
/// Forecasts a horizon must have scored before its regression is published.
const WARMUP_SCORED: u32 = 16;

/// Tuning of the forecaster; one configuration for every series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForecastConfig {
    /// Horizons forecast, as durations ("1m", "5m", "15m").
    #[serde(with = "durations")]
    pub horizons: Vec<std::time::Duration>,
    /// RLS forgetting factor per observation: closer to 1 remembers longer.
    pub forgetting: f64,
    /// Buckets of the daily profile (144 = ten minutes each).
    pub profile_buckets: usize,
    /// Weight of a new observation in its daily-profile bucket.
    pub profile_rate: f64,
    /// Half-life, in observations, of the recent absolute errors that choose between the
    /// model and the naive forecasts.
    pub error_halflife: f64,
    /// Recent residuals kept per horizon for the prediction interval.
    pub residuals: usize,
    /// Coverage of the prediction interval.
    pub interval: f64,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        Self {
            horizons: vec![
                std::time::Duration::from_secs(60),
                std::time::Duration::from_secs(300),
                std::time::Duration::from_secs(900),
            ],
            forgetting: 0.998,
            profile_buckets: 144,
            profile_rate: 0.5,
            error_halflife: 48.0,
            residuals: 32,
            interval: 0.9,
        }
    }
}

/// Why a forecast configuration cannot run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ForecastConfigError {
    /// A value out of its range, naming the key.
    #[error("{key}: {why}")]
    Invalid {
        /// The config key.
        key: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

impl ForecastConfig {
    /// Checks ranges once, at start-up.
    pub fn validate(&self) -> Result<(), ForecastConfigError> {
        let bad = |key, why| Err(ForecastConfigError::Invalid { key, why });
        if self.horizons.is_empty() || self.horizons.len() > 8 {
            return bad("horizons", "must list 1 to 8 durations");
        }
        if self
            .horizons
            .iter()
            .any(|h| h.is_zero() || h.as_millis() as i64 > DAY_MS)
        {
            return bad("horizons", "each must be above zero and at most a day");
        }
        if !(0.9..=1.0).contains(&self.forgetting) {
            return bad("forgetting", "must be in [0.9, 1]");
        }
        if !(24..=1440).contains(&self.profile_buckets) {
            return bad("profile_buckets", "must be 24..=1440");
        }
        if !(0.0..=1.0).contains(&self.profile_rate) || self.profile_rate == 0.0 {
            return bad("profile_rate", "must be in (0, 1]");
        }
        if self.error_halflife.is_nan() || self.error_halflife < 1.0 {
            return bad("error_halflife", "must be at least 1");
        }
        if !(8..=512).contains(&self.residuals) {
            return bad("residuals", "must be 8..=512");
        }
        if !(0.5..1.0).contains(&self.interval) {
            return bad("interval", "must be in [0.5, 1)");
        }
        Ok(())
    }
}

/// A list of durations as humans write them ("1m", "15m").
mod durations {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| humantime::parse_duration(t).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// A vector of floats whose NaNs travel as JSON nulls (JSON has no NaN).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| x.is_finite().then_some(*x)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        Ok(Vec::<Option<f32>>::deserialize(d)?
            .into_iter()
            .map(|x| x.unwrap_or(f32::NAN))
            .collect())
    }
}

/// Which forecast a horizon currently publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// ebb's regression.
    Model,
    /// The last value.
    Last,
    /// The daily profile at the target time ("same time yesterday").
    Yesterday,
}

impl Method {
    /// Stable name for outputs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Model => "model",
            Method::Last => "last",
            Method::Yesterday => "yesterday",
        }
    }
}

/// One horizon's published forecast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The horizon, in milliseconds.
    pub horizon_ms: i64,
    /// Target time (UTC ms).
    pub target_ms: i64,
    /// The published value.
    pub value: f64,
    /// Lower bound of the prediction interval.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
    /// Which forecast it is.
    pub method: Method,
    /// The regression's own value, even when a naive one is published.
    pub model_value: f64,
    /// Recent mean absolute error of the leading method (none until known).
    pub recent_mae: Option<f64>,
}

/// A forecast made earlier, waiting for its target to arrive.
///
/// Kept compact (f32 where the value only feeds error tracking, NaN for "none"): a service
/// holds one per horizon step ahead, some forty in all, so each byte here is forty in the
/// per-service budget. The "last value" forecast is `base` itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    target_ms: i64,
    base: f64,
    x: [f32; INPUTS],
    scale: f32,
    model: f32,
    /// "Same time yesterday"; NaN while that profile bucket is unseen (null in a snapshot).
    #[serde(with = "nan_as_none")]
    yesterday: f32,
    /// The error-weighted blend of the three, published or not; NaN when there was none
    /// (null in a snapshot, absent in older ones).
    #[serde(default = "nan", with = "nan_as_none")]
    blend: f32,
    value: f32,
}

fn nan() -> f32 {
    f32::NAN
}

/// One float whose NaN travels as a JSON null, as `Option<f32>` did before.
mod nan_as_none {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
        match v.is_finite() {
            true => s.serialize_some(v),
            false => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
    }
}

/// Recursive least squares with forgetting.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rls {
    w: [f64; INPUTS],
    p: [[f64; INPUTS]; INPUTS],
}

impl Rls {
    fn new() -> Self {
        let mut p = [[0.0; INPUTS]; INPUTS];
        for (i, row) in p.iter_mut().enumerate() {
            row[i] = P_CAP;
        }
        Self {
            w: [0.0; INPUTS],
            p,
        }
    }

    fn predict(&self, x: &[f64; INPUTS]) -> f64 {
        self.w.iter().zip(x).map(|(w, x)| w * x).sum()
    }

    /// Learns `y` at `x`; true when the update broke down numerically and the model was
    /// reset.
    fn learn(&mut self, x: &[f64; INPUTS], y: f64, lambda: f64) -> bool {
        let mut px = [0.0; INPUTS];
        for (i, row) in self.p.iter().enumerate() {
            px[i] = row.iter().zip(x).map(|(p, x)| p * x).sum();
        }
        let denom = lambda + x.iter().zip(&px).map(|(x, p)| x * p).sum::<f64>();
        if !(denom.is_finite() && denom > 1e-12) {
            return false;
        }
        let err = y - self.predict(x);
        let mut next = self.clone();
        for i in 0..INPUTS {
            let k = px[i] / denom;
            next.w[i] += k * err;
            for ((n, p), pxj) in next.p[i].iter_mut().zip(&self.p[i]).zip(&px) {
                *n = (p - k * pxj) / lambda;
            }
        }
        // Round-off makes P drift from symmetric, and an asymmetric P soon stops being
        // positive definite: the gain then points the wrong way and the weights run off.
        for i in 0..INPUTS {
            for j in 0..i {
                let m = 0.5 * (next.p[i][j] + next.p[j][i]);
                next.p[i][j] = m;
                next.p[j][i] = m;
            }
        }
        // A numerically broken update is dropped rather than kept: the model must never
        // turn into NaN because one window was strange.
        let sane = next.w.iter().all(|w| w.is_finite() && w.abs() < 1e6)
            && next.p.iter().flatten().all(|p| p.is_finite())
            && (0..INPUTS).all(|i| next.p[i][i] > 0.0);
        if !sane {
            *self = Rls::new();
            return true;
        }
        // Forgetting inflates P along directions the inputs stop exciting (a flat night,
        // a constant series) until one new input swings the weights wildly: cap it.
        let peak = (0..INPUTS).map(|i| next.p[i][i]).fold(0.0, f64::max);
        if peak > P_CAP {
            let f = P_CAP / peak;
            next.p.iter_mut().flatten().for_each(|p| *p *= f);
        }
        *self = next;
        false
    }
}

/// Per-horizon state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Horizon {
    horizon_ms: i64,
    rls: Rls,
    pending: VecDeque<Pending>,
    mae: [Option<f64>; 3],
    /// Recent absolute error of the blend (absent in older snapshots).
    #[serde(default)]
    mae_blend: Option<f64>,
    scored: u32,
    residuals: VecDeque<f32>,
}

/// Online forecaster of one series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forecaster {
    horizons: Vec<Horizon>,
    /// Daily profile; NaN marks a bucket not seen yet (null in a snapshot).
    #[serde(with = "nan_as_null")]
    profile: Vec<f32>,
    short: f64,
    long: f64,
    scale: f64,
    last: Option<(i64, f64)>,
    seen: u64,
    /// A regression was reset since the last forecast was published (absent in older
    /// snapshots).
    #[serde(default)]
    reset: bool,
    /// A forecast step has passed without a value since the last one (absent in older
    /// snapshots).
    #[serde(default)]
    input_missing: bool,
}

impl Forecaster {
    /// A fresh forecaster for `cfg`'s horizons.
    pub fn new(cfg: &ForecastConfig) -> Self {
        Self {
            horizons: cfg
                .horizons
                .iter()
                .map(|h| Horizon {
                    horizon_ms: h.as_millis() as i64,
                    rls: Rls::new(),
                    pending: VecDeque::new(),
                    mae: [None; 3],
                    mae_blend: None,
                    scored: 0,
                    residuals: VecDeque::new(),
                })
                .collect(),
            profile: vec![f32::NAN; cfg.profile_buckets],
            short: 0.0,
            long: 0.0,
            scale: 0.0,
            last: None,
            seen: 0,
            reset: false,
            input_missing: false,
        }
    }

    /// The status of the forecasts [`Forecaster::update`] just made: `model_reset` when a
    /// regression broke down numerically and started over since the last ones, `warming_up`
    /// while too few have been scored, else `ok`. Anything but `ok` is not to be acted on.
    pub fn status(&mut self) -> &'static str {
        if std::mem::take(&mut self.reset) {
            "model_reset"
        } else if self.warming_up() {
            "warming_up"
        } else {
            "ok"
        }
    }

    /// Notes a forecast step that passed without a value. Returns the last value seen the
    /// first time this happens after a value (the input has gone stale), `None` after that
    /// or before any value.
    pub fn missed_step(&mut self) -> Option<f64> {
        let last = self.last.map(|(_, v)| v)?;
        (!std::mem::replace(&mut self.input_missing, true)).then_some(last)
    }

    /// Bytes this forecaster holds: its own size plus every buffer it owns, counted by
    /// capacity. Allocator overhead is not included.
    pub fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.profile.capacity() * std::mem::size_of::<f32>()
            + self.horizons.capacity() * std::mem::size_of::<Horizon>()
            + self
                .horizons
                .iter()
                .map(|h| {
                    h.pending.capacity() * std::mem::size_of::<Pending>()
                        + h.residuals.capacity() * std::mem::size_of::<f32>()
                })
                .sum::<usize>()
    }

    /// Whether no horizon has been scored often enough to publish its regression yet.
    pub fn warming_up(&self) -> bool {
        self.horizons.iter().all(|h| h.scored < WARMUP_SCORED)
    }

    fn bucket(&self, t_ms: i64) -> usize {
        let n = self.profile.len() as i64;
        (t_ms.rem_euclid(DAY_MS) * n / DAY_MS) as usize
    }

    /// The daily profile's value at time `t_ms`, if that bucket has been seen.
    pub fn profile_at(&self, t_ms: i64) -> Option<f64> {
        let v = self.profile[self.bucket(t_ms)];
        v.is_finite().then_some(f64::from(v))
    }

    /// Folds in the observation `y` at `t_ms` (non-finite values are ignored) and returns
    /// the forecasts for every horizon from `t_ms`.
    pub fn update(&mut self, t_ms: i64, y: f64, cfg: &ForecastConfig) -> Vec<Prediction> {
        if !y.is_finite() {
            return Vec::new();
        }
        self.seen += 1;
        self.input_missing = false;
        // A poisoned value (orders of magnitude off, like 1e300) is clipped before it
        // reaches anything: the regression, the profile, the "last value" forecast. The band
        // is wide on purpose (a hundred times the level): a real burst is never clipped, and
        // a band tied to recent variation could lock onto its own edge.
        let y_fit = if self.seen > 8 {
            let band = POISON_BAND * (self.long.abs() + self.scale);
            y.clamp(self.long - band, self.long + band)
        } else {
            y
        };
        self.learn_due(t_ms, y_fit, cfg);
        let prev = self.last.map(|(_, v)| v).unwrap_or(y_fit);
        let rate =
            |halflife: f64, seen: u64| (1.0 - 0.5f64.powf(1.0 / halflife)).max(1.0 / seen as f64);
        self.short += rate(4.0, self.seen) * (y_fit - self.short);
        self.long += rate(96.0, self.seen) * (y_fit - self.long);
        self.scale +=
            rate(96.0, self.seen) * ((y_fit - prev).abs().max(1e-9 * y_fit.abs()) - self.scale);
        let b = self.bucket(t_ms);
        let slot = &mut self.profile[b];
        *slot = if slot.is_finite() {
            (f64::from(*slot) + cfg.profile_rate * (y_fit - f64::from(*slot))) as f32
        } else {
            y_fit as f32
        };
        self.last = Some((t_ms, y_fit));
        let scale = self.scale.max(1e-9);
        let now_profile = self.profile_at(t_ms);
        let mut out = Vec::with_capacity(self.horizons.len());
        let z = quantile_z(cfg.interval);
        for h in 0..self.horizons.len() {
            let horizon_ms = self.horizons[h].horizon_ms;
            let target_ms = t_ms + horizon_ms;
            let yesterday = self.profile_at(target_ms);
            let season = match (yesterday, now_profile) {
                (Some(a), Some(b)) => ((a - b) / scale, (a - y_fit) / scale),
                _ => (0.0, 0.0),
            };
            let x = [
                1.0,
                (y_fit - prev) / scale,
                (y_fit - self.short) / scale,
                (y_fit - self.long) / scale,
                season.0,
                season.1,
            ]
            .map(|v| v.clamp(-50.0, 50.0));
            let hz = &mut self.horizons[h];
            let model = y_fit + hz.rls.predict(&x).clamp(-TARGET_CAP, TARGET_CAP) * scale;
            let (method, value, blend) = choose(hz, model, y_fit, yesterday);
            let mut sorted: Vec<f32> = hz.residuals.iter().map(|r| r.abs()).collect();
            sorted.sort_by(f32::total_cmp);
            let spread = if sorted.len() >= 8 {
                let i = ((sorted.len() - 1) as f64 * cfg.interval).round() as usize;
                f64::from(sorted[i])
            } else {
                z * scale * (horizon_ms as f64).sqrt().max(1.0) / 8.0
            };
            hz.pending.push_back(Pending {
                target_ms,
                x: x.map(|v| v as f32),
                base: y_fit,
                scale: scale as f32,
                model: model as f32,
                yesterday: yesterday.map_or(f32::NAN, |v| v as f32),
                blend: blend.map_or(f32::NAN, |v| v as f32),
                value: value as f32,
            });
            // Bounded: a series that stops advancing in time cannot grow this without end.
            while hz.pending.len() > 4096 {
                hz.pending.pop_front();
            }
            // The queue settles at the horizon's steps ahead; give back what doubling left.
            if hz.pending.capacity() > hz.pending.len() + 2 {
                hz.pending.shrink_to(hz.pending.len() + 1);
            }
            out.push(Prediction {
                horizon_ms,
                target_ms,
                value,
                lower: value - spread,
                upper: value + spread,
                method,
                model_value: model,
                recent_mae: hz.mae[method as usize],
            });
        }
        out
    }

    /// Learns from every pending forecast whose target time has come.
    fn learn_due(&mut self, t_ms: i64, y: f64, cfg: &ForecastConfig) {
        let alpha = 1.0 - 0.5f64.powf(1.0 / cfg.error_halflife);
        for hz in &mut self.horizons {
            while hz.pending.front().is_some_and(|p| p.target_ms <= t_ms) {
                let Some(p) = hz.pending.pop_front() else {
                    break;
                };
                // Seen well after its target (a gap in the series), the value says nothing of
                // what the target was: learning from it would teach the model, and score the
                // naive forecasts, on a horizon it is never asked for.
                if t_ms - p.target_ms > hz.horizon_ms / 2 {
                    continue;
                }
                let x = p.x.map(f64::from);
                self.reset |= hz.rls.learn(
                    &x,
                    ((y - p.base) / f64::from(p.scale)).clamp(-LEARN_CAP, LEARN_CAP),
                    cfg.forgetting,
                );
                let errors = [
                    (f64::from(p.model) - y).abs(),
                    (p.base - y).abs(),
                    (f64::from(p.yesterday) - y).abs(),
                ];
                let blend = (f64::from(p.blend) - y).abs();
                for (m, e) in hz
                    .mae
                    .iter_mut()
                    .chain([&mut hz.mae_blend])
                    .zip(errors.into_iter().chain([blend]))
                {
                    if e.is_finite() {
                        *m = Some(m.map_or(e, |m| m + alpha * (e - m)));
                    }
                }
                hz.scored = hz.scored.saturating_add(1);
                if hz.residuals.capacity() < cfg.residuals {
                    hz.residuals
                        .reserve_exact(cfg.residuals - hz.residuals.len());
                }
                while hz.residuals.len() >= cfg.residuals {
                    hz.residuals.pop_front();
                }
                let residual = (f64::from(p.value) - y).clamp(-1e30, 1e30);
                hz.residuals.push_back(residual as f32);
            }
        }
    }
}

/// The forecast a horizon publishes, and the blend it was chosen against: the blend of the
/// model and the naive forecasts, unless the last value leads and alone has been doing better
/// lately (or the model has not been scored yet).
fn choose(
    hz: &Horizon,
    model: f64,
    last: f64,
    yesterday: Option<f64>,
) -> (Method, f64, Option<f64>) {
    if hz.scored < WARMUP_SCORED || !model.is_finite() {
        return (Method::Last, last, None);
    }
    // Each forecast weighs by the inverse square of its recent error: the combination beats
    // hard switching, which flaps on noise, and a forecast that has gone bad fades out.
    let weight = |mae: Option<f64>| mae.map_or(0.0, |m| 1.0 / m.max(1e-12).powi(2));
    let candidates = [
        (Method::Model, model, weight(hz.mae[0])),
        (Method::Last, last, weight(hz.mae[1])),
        (
            Method::Yesterday,
            yesterday.unwrap_or(f64::NAN),
            yesterday.map_or(0.0, |_| weight(hz.mae[2])),
        ),
    ];
    let total: f64 = candidates.iter().map(|c| c.2).sum();
    if !(total > 0.0 && total.is_finite()) {
        return (Method::Last, last, None);
    }
    let blend = candidates
        .iter()
        .filter(|c| c.2 > 0.0)
        .map(|c| c.1 * c.2)
        .sum::<f64>()
        / total;
    let lead = candidates
        .iter()
        .fold(candidates[0], |a, c| if c.2 > a.2 { *c } else { a });
    // On a series close to a random walk (travel times, bursty counts) the blend's share of
    // a worse model costs more than it gains: while the last value leads and has also been
    // beating the blend it is published alone, and the blend, still scored, takes over once
    // it is ahead. (Decide already treats a forecast led by the last value as no forecast.)
    match (hz.mae_blend, hz.mae[Method::Last as usize]) {
        (Some(b), Some(l)) if lead.0 == Method::Last && l < b => (Method::Last, last, Some(blend)),
        _ => (lead.0, blend, Some(blend)),
    }
}

/// The two-sided normal quantile for coverage `p` (e.g. 0.9 -> 1.645), by bisection on erf.
fn quantile_z(p: f64) -> f64 {
    let target = 0.5 + p / 2.0;
    let (mut lo, mut hi) = (0.0f64, 8.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if normal_cdf(mid) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

fn normal_cdf(x: f64) -> f64 {
    // Abramowitz-Stegun 7.1.26 erf.
    let t = 1.0 / (1.0 + 0.327_591_1 * (x.abs() / std::f64::consts::SQRT_2));
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
            + 0.254_829_592)
            * t
            * (-(x * x) / 2.0).exp();
    0.5 * (1.0 + if x >= 0.0 { y } else { -y })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regression_that_breaks_down_is_reset_and_its_next_forecasts_say_so() {
        let cfg = ForecastConfig::default();
        let mut f = Forecaster::new(&cfg);
        for i in 0..60 {
            f.update(i * 60_000, 100.0 + (i % 5) as f64, &cfg);
        }
        assert_eq!(f.status(), "ok");
        // State gone bad however it happened (a bit flip, a bug): the next update that
        // learns must not carry it on.
        f.horizons[0].rls.w[0] = f64::NAN;
        let out = f.update(60 * 60_000, 101.0, &cfg);
        assert!(out.iter().all(|p| p.value.is_finite()), "{out:?}");
        assert_eq!(f.status(), "model_reset");
        assert!(f.horizons[0].rls.w.iter().all(|w| *w == 0.0));
        f.update(61 * 60_000, 102.0, &cfg);
        assert_eq!(f.status(), "ok", "said once");
    }

    #[test]
    fn months_of_a_smooth_daily_cycle_never_break_the_regression_down() {
        use rand::{Rng, SeedableRng};
        // Per-minute windows of a per-second service: a smooth cycle with little noise
        // excites the inputs unevenly for months. Round-off once drove P indefinite here
        // (36 resets in these 120 days), each one a forecast the decide stage could not use.
        let cfg = ForecastConfig::default();
        let mut f = Forecaster::new(&cfg);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut resets = 0;
        for i in 0..120 * 1440_i64 {
            let day = (i % 1440) as f64 / 1440.0;
            let y =
                100.0 + 60.0 * (std::f64::consts::TAU * day).sin() + rng.random_range(-0.5..0.5);
            f.update(i * 60_000, y, &cfg);
            if f.status() == "model_reset" {
                resets += 1;
            }
        }
        assert_eq!(resets, 0);
        for h in &f.horizons {
            for i in 0..INPUTS {
                assert!(h.rls.p[i][i] > 0.0, "{:?}", h.rls.p);
                for j in 0..i {
                    assert_eq!(h.rls.p[i][j], h.rls.p[j][i]);
                }
            }
        }
    }

    #[test]
    fn a_pending_forecast_fits_in_64_bytes() {
        // About forty are pending per service (two signals, 1 + 5 + 15 steps ahead): their
        // size is a large share of the 16 KiB model budget.
        assert!(std::mem::size_of::<Pending>() <= 64);
    }

    #[test]
    fn pending_forecasts_of_older_snapshots_restore_with_their_gaps() {
        // The layout before "last" was folded into "base": an explicit last value, an
        // optional yesterday and no blend.
        let old = r#"{"target_ms":60000,"x":[1,0,0,0,0,0],"base":10.0,"scale":1.0,
            "model":11.0,"last":10.0,"yesterday":null,"value":10.5}"#;
        let p: Pending = serde_json::from_str(old).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.yesterday.is_nan() && p.blend.is_nan());
        assert_eq!((p.base, p.model, p.value), (10.0, 11.0, 10.5));
        let again = serde_json::to_value(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again["yesterday"], serde_json::Value::Null);
        assert_eq!(again["blend"], serde_json::Value::Null);
        let with = r#"{"target_ms":0,"x":[0,0,0,0,0,0],"base":1.0,"scale":1.0,"model":1.0,
            "yesterday":2.5,"blend":3.5,"value":1.0}"#;
        let p: Pending = serde_json::from_str(with).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.yesterday, p.blend), (2.5, 3.5));
    }
}
