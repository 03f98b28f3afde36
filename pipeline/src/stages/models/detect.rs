//! Online anomaly detection for one series of windows: features normalised against the
//! series' own running baseline, k-means over its normal operating states, DBSCAN over its
//! recent windows, and the ensemble of both. Everything here is bounded and deterministic:
//! the same inputs in the same order give the same scores, which replay and the snapshot
//! round trip rely on.

use std::collections::VecDeque;

use linfa::prelude::*;
use linfa::DatasetBase;
use linfa_clustering::{Dbscan, IncrKMeansError, KMeans, KMeansInit};
use linfa_nn::distance::L2Dist;
use linfa_nn::LinearSearch;
use ndarray::{Array2, ArrayView1, Axis};
use serde::{Deserialize, Serialize};

/// Features derived per signal: level vs baseline, step vs previous, short-term shift.
pub const FEATURES_PER_SIGNAL: usize = 3;
/// Names of the per-signal features, in vector order.
pub const FEATURE_KINDS: [&str; FEATURES_PER_SIGNAL] = ["level", "step", "shift"];
/// A feature's magnitude is capped here: a poisoned input (a huge value) moves one window's
/// score to the top but cannot drag centroids or baselines off to infinity.
const FEATURE_CAP: f64 = 12.0;
/// DBSCAN's eps is re-estimated every this many windows; the k-distances move slowly.
const EPS_EVERY: u64 = 8;

/// Tuning of the detectors. One configuration serves every series: nothing here is tuned
/// per service or per file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Windows the running baseline (mean, variance) remembers, as an EWMA half-life.
    pub baseline_halflife: f64,
    /// Half-life, in windows, of the short-term mean behind the `shift` feature.
    pub short_halflife: f64,
    /// Windows seen before any score is given: the baseline needs them.
    pub warmup: usize,
    /// k of k-means: normal operating states per series.
    pub clusters: usize,
    /// Feature vectors kept (reservoir-sampled) for the scheduled full k-means refit.
    pub reservoir: usize,
    /// A full k-means refit runs every this many windows; mini-batch updates in between.
    pub refit_every: usize,
    /// Recent nearest-centroid distances kept to calibrate the k-means threshold.
    pub distance_history: usize,
    /// Quantile of recent distances above which a window is a k-means anomaly.
    pub threshold_quantile: f64,
    /// Recent windows DBSCAN clusters.
    pub dbscan_window: usize,
    /// DBSCAN's minimum neighbourhood (and the k of the k-distance that sets eps).
    pub dbscan_min_points: usize,
    /// Quantile of the k-distances that becomes eps.
    pub eps_quantile: f64,
    /// Weight of DBSCAN's excess k-distance (k-distance / eps - 1, when positive) added to
    /// the k-means score in the ensemble.
    pub dbscan_weight: f64,
    /// Windows of the ensemble score averaged for the anomaly likelihood's short term.
    pub likelihood_short: usize,
    /// Windows of the ensemble score kept as the likelihood's long-term distribution.
    pub likelihood_long: usize,
    /// Windows after a peak during which lower scores are damped.
    pub refractory: usize,
    /// Factor applied to a score below the recent peak.
    pub refractory_damping: f64,
    /// Ensemble score from which a window is reported as an anomaly.
    pub alert_score: f64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            baseline_halflife: 1000.0,
            short_halflife: 4.0,
            warmup: 24,
            clusters: 8,
            reservoir: 128,
            refit_every: 48,
            distance_history: 160,
            threshold_quantile: 0.99,
            dbscan_window: 48,
            dbscan_min_points: 4,
            eps_quantile: 0.9,
            dbscan_weight: 0.1,
            likelihood_short: 1,
            likelihood_long: 384,
            refractory: 100,
            refractory_damping: 0.5,
            alert_score: 0.7,
        }
    }
}

/// Why a detector configuration cannot run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DetectorConfigError {
    /// A value out of its range, naming the key.
    #[error("{key}: {why}")]
    Invalid {
        /// The config key (relative to the detector table).
        key: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

impl DetectorConfig {
    /// Checks ranges once, at start-up.
    pub fn validate(&self) -> Result<(), DetectorConfigError> {
        let bad = |key, why| Err(DetectorConfigError::Invalid { key, why });
        if self.baseline_halflife.is_nan() || self.baseline_halflife < 1.0 {
            return bad("baseline_halflife", "must be at least 1 window");
        }
        if self.short_halflife.is_nan()
            || self.short_halflife < 0.5
            || self.short_halflife >= self.baseline_halflife
        {
            return bad(
                "short_halflife",
                "must be at least 0.5 and below baseline_halflife",
            );
        }
        if self.clusters == 0 || self.clusters > 16 {
            return bad("clusters", "must be 1..=16");
        }
        if self.reservoir < self.clusters * 4 {
            return bad("reservoir", "must hold at least 4 vectors per cluster");
        }
        if self.refit_every == 0 {
            return bad("refit_every", "must be at least 1");
        }
        if self.distance_history < 16 {
            return bad("distance_history", "must be at least 16");
        }
        if !(0.5..1.0).contains(&self.threshold_quantile) {
            return bad("threshold_quantile", "must be in [0.5, 1)");
        }
        if self.dbscan_min_points < 2 || self.dbscan_window < self.dbscan_min_points * 3 {
            return bad(
                "dbscan_min_points",
                "must be at least 2, with dbscan_window at least 3x it",
            );
        }
        if !(0.5..1.0).contains(&self.eps_quantile) {
            return bad("eps_quantile", "must be in [0.5, 1)");
        }
        if self.likelihood_short == 0 || self.likelihood_long < self.likelihood_short * 4 {
            return bad(
                "likelihood_long",
                "must be at least 4x likelihood_short (which must be at least 1)",
            );
        }
        if !(0.0..=10.0).contains(&self.dbscan_weight) {
            return bad("dbscan_weight", "must be in [0, 10]");
        }
        if !(0.0..=1.0).contains(&self.refractory_damping) {
            return bad("refractory_damping", "must be in [0, 1]");
        }
        if !(0.0..1.0).contains(&self.alert_score) {
            return bad("alert_score", "must be in [0, 1)");
        }
        Ok(())
    }
}

/// Exponentially weighted mean and variance: the running baseline of one signal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ewm {
    /// Mean.
    pub mean: f64,
    /// Variance.
    pub var: f64,
    /// Observations folded in (saturating), so early windows weigh as a plain average.
    pub n: u32,
}

impl Ewm {
    /// Folds `x` in with half-life `halflife` (in observations).
    pub fn push(&mut self, x: f64, halflife: f64) {
        self.n = self.n.saturating_add(1);
        let alpha = (1.0 - (0.5f64).powf(1.0 / halflife)).max(1.0 / f64::from(self.n));
        let delta = x - self.mean;
        self.mean += alpha * delta;
        self.var = (1.0 - alpha) * (self.var + alpha * delta * delta);
    }

    /// Standard deviation, never zero: a flat series still gives finite features.
    pub fn std(&self) -> f64 {
        self.var.sqrt().max(1e-3 * self.mean.abs()).max(1e-9)
    }
}

/// Per-signal running state behind the features.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct SignalState {
    base: Ewm,
    short: Ewm,
    last: Option<f64>,
}

/// One detector's verdict on one window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DetectorScore {
    /// The raw measure in units of its typical size (distance / median recent distance;
    /// k-distance / eps): 1 is ordinary, 3 is far out.
    pub score: f64,
    /// The raw measure (distance to the nearest centroid; k-distance for DBSCAN).
    pub value: f64,
    /// The calibrated threshold on `value` (distance quantile; eps); none until enough
    /// history exists to calibrate it.
    pub threshold: Option<f64>,
    /// Whether this detector calls the window anomalous.
    pub anomalous: bool,
}

/// The ensemble's verdict on one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Ensemble anomaly score in [0, 1]: the likelihood that recent windows are unusual for
    /// this series (1 = certainly).
    pub score: f64,
    /// k-means' verdict; `None` while warming up.
    pub kmeans: Option<DetectorScore>,
    /// DBSCAN's verdict; `None` while warming up.
    pub dbscan: Option<DetectorScore>,
    /// The features that drove the score, largest |value| first: (name, value).
    pub drivers: Vec<(String, f64)>,
    /// Whether the ensemble calls this window an anomaly (`score >= alert_score`).
    pub anomalous: bool,
}

/// Online anomaly model of one series. Bounded: its size depends on the config only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnomalyModel {
    signals: Vec<SignalState>,
    seen: u64,
    kmeans: Option<KMeans<f64, L2Dist>>,
    reservoir: Points,
    recent: Points,
    distances: Ring<4000>,
    raw_scores: Ring<4000>,
    eps: Option<f64>,
    fresh_peaks: MaxWindow,
    rng: u64,
}

impl AnomalyModel {
    /// A fresh model for series with `signals` signals.
    pub fn new(signals: usize) -> Self {
        Self {
            signals: vec![SignalState::default(); signals],
            seen: 0,
            kmeans: None,
            reservoir: Points::default(),
            recent: Points::default(),
            distances: Ring::default(),
            raw_scores: Ring::default(),
            eps: None,
            fresh_peaks: MaxWindow::default(),
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Bytes this model holds: its own size plus every buffer it owns, counted by capacity
    /// (what is reserved, not what is filled). Allocator overhead is not included.
    pub fn state_bytes(&self) -> usize {
        let kmeans = self.kmeans.as_ref().map_or(0, |k| {
            (k.centroids().len() + k.cluster_count().len()) * std::mem::size_of::<f64>()
        });
        std::mem::size_of::<Self>()
            + self.signals.capacity() * std::mem::size_of::<SignalState>()
            + kmeans
            + (self.reservoir.data.capacity() + self.recent.data.capacity())
                * std::mem::size_of::<i16>()
            + (self.distances.data.capacity() + self.raw_scores.data.capacity())
                * std::mem::size_of::<u16>()
            + self.fresh_peaks.queue.capacity() * std::mem::size_of::<(u64, f32)>()
    }

    /// Windows seen so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Feature vector of a window, updating the signal baselines. A missing or non-finite
    /// signal contributes zeros and leaves its baseline alone.
    fn features(&mut self, values: &[Option<f64>], cfg: &DetectorConfig) -> Vec<f64> {
        let mut out = Vec::with_capacity(values.len() * FEATURES_PER_SIGNAL);
        for (state, value) in self.signals.iter_mut().zip(values) {
            let Some(x) = value.filter(|v| v.is_finite()) else {
                out.extend([0.0; FEATURES_PER_SIGNAL]);
                continue;
            };
            let (mean, std) = (state.base.mean, state.base.std());
            let primed = state.base.n > 1;
            let cap = |f: f64| f.clamp(-FEATURE_CAP, FEATURE_CAP);
            let level = if primed { cap((x - mean) / std) } else { 0.0 };
            let step = match state.last {
                Some(last) if primed => cap((x - last) / std),
                _ => 0.0,
            };
            state.short.push(x, cfg.short_halflife);
            let shift = if primed {
                cap((state.short.mean - mean) / std)
            } else {
                0.0
            };
            out.extend([level, step, shift]);
            // A poisoned value is clipped into the baseline so one spike cannot blow the
            // variance up and blind the detector for the next few hundred windows.
            let clipped = if primed {
                x.clamp(mean - FEATURE_CAP * std, mean + FEATURE_CAP * std)
            } else {
                x
            };
            state.base.push(clipped, cfg.baseline_halflife);
            state.last = Some(x);
        }
        out
    }

    /// The feature vector of a window, advancing only the baselines (no clustering): what
    /// the detectors would see. For benchmarks and for comparing other learners.
    pub fn features_of(&mut self, values: &[Option<f64>], cfg: &DetectorConfig) -> Vec<f64> {
        self.features(values, cfg)
    }

    /// Scores one window (its signals in a fixed order) and learns from it.
    pub fn update(
        &mut self,
        values: &[Option<f64>],
        names: &[&str],
        cfg: &DetectorConfig,
    ) -> Verdict {
        fit_on_this_thread();
        let features = self.features(values, cfg);
        self.seen += 1;
        let warm = self.seen > cfg.warmup as u64;

        let kmeans = if warm {
            self.kmeans_step(&features, cfg)
        } else {
            None
        };
        self.recent.push(&features, cfg.dbscan_window);
        if self.recent.len() > cfg.dbscan_window {
            self.recent.pop_front();
        }
        let dbscan = if warm { self.dbscan_step(cfg) } else { None };
        self.sample_reservoir(&features, cfg);

        let raw = match (kmeans, dbscan) {
            (Some(k), Some(d)) => k.score + cfg.dbscan_weight * (d.score - 1.0).max(0.0),
            (Some(k), None) => k.score,
            (None, Some(d)) => cfg.dbscan_weight * (d.score - 1.0).max(0.0),
            (None, None) => 0.0,
        };
        let fresh = if warm { self.likelihood(raw, cfg) } else { 0.0 };
        // An episode is reported by its first, strongest window: while the score stays below
        // the recent peak it is damped, so one incident does not page (or scale) ten times.
        let recent_peak = self.fresh_peaks.max(self.seen, cfg.refractory as u64);
        let score = if fresh <= recent_peak {
            fresh * cfg.refractory_damping
        } else {
            fresh
        };
        self.fresh_peaks.push(fresh, self.seen);
        let mut drivers: Vec<(String, f64)> = features
            .iter()
            .enumerate()
            .filter(|(_, f)| f.abs() >= 1.0)
            .map(|(i, &f)| {
                let signal = names
                    .get(i / FEATURES_PER_SIGNAL)
                    .copied()
                    .unwrap_or("signal");
                (
                    format!("{signal}.{}", FEATURE_KINDS[i % FEATURES_PER_SIGNAL]),
                    f,
                )
            })
            .collect();
        drivers.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
        drivers.truncate(4);
        let anomalous = score >= cfg.alert_score;
        Verdict {
            score,
            kmeans,
            dbscan,
            drivers,
            anomalous,
        }
    }

    /// Distance to the nearest centroid, scored against recent distances; then the model
    /// learns the point (mini-batch) and refits fully on schedule.
    fn kmeans_step(&mut self, features: &[f64], cfg: &DetectorConfig) -> Option<DetectorScore> {
        if self.kmeans.is_none() || self.seen.is_multiple_of(cfg.refit_every as u64) {
            self.refit(cfg);
        }
        let model = self.kmeans.take()?;
        let row = ArrayView1::from(features);
        let distance = model
            .centroids()
            .axis_iter(Axis(0))
            .map(|c| {
                c.iter()
                    .zip(row.iter())
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
            })
            .fold(f64::INFINITY, f64::min)
            .sqrt();
        let threshold = quantile(self.distances.iter(), cfg.threshold_quantile);
        let median = quantile(self.distances.iter(), 0.5);
        let score = distance / median.unwrap_or(1.0).max(1e-3);
        let anomalous = threshold.is_some_and(|t| distance > t) && self.distances.len() >= 16;
        self.distances.push(distance, cfg.distance_history);
        let batch = DatasetBase::from(row.insert_axis(Axis(0)).to_owned());
        let params = KMeans::params(cfg.clusters)
            .init_method(KMeansInit::Precomputed(model.centroids().clone()))
            .tolerance(1e-9);
        self.kmeans = match params.fit_with(Some(model), &batch) {
            Ok(m) | Err(IncrKMeansError::NotConverged(m)) => Some(m),
            // Only invalid parameters end here, and validate() rules them out; the next
            // scheduled refit rebuilds the model.
            Err(_) => None,
        };
        Some(DetectorScore {
            score,
            value: distance,
            threshold,
            anomalous,
        })
    }

    /// Full k-means refit on the reservoir.
    fn refit(&mut self, cfg: &DetectorConfig) {
        if self.reservoir.len() < cfg.clusters * 4 {
            return;
        }
        let Ok(records) = Array2::from_shape_vec(
            (self.reservoir.len(), self.reservoir.dims),
            self.reservoir.to_f64(),
        ) else {
            return;
        };
        let fitted = KMeans::params(cfg.clusters)
            .n_runs(1)
            .max_n_iterations(25)
            .tolerance(1e-4)
            .fit(&DatasetBase::from(records));
        if let Ok(model) = fitted {
            self.kmeans = Some(model);
        }
    }

    /// DBSCAN over the recent windows, eps from their k-distances: is the newest one noise?
    /// The newest point is a core point, so never noise, when its own k-distance is within
    /// eps; only otherwise does the full clustering run to tell border points from noise.
    fn dbscan_step(&mut self, cfg: &DetectorConfig) -> Option<DetectorScore> {
        let n = self.recent.len();
        let k = cfg.dbscan_min_points;
        if n < k * 3 {
            return None;
        }
        let dims = self.recent.dims;
        let flat = self.recent.to_f64();
        let row = |i: usize| &flat[i * dims..(i + 1) * dims];
        let newest = row(n - 1);
        let mut d: Vec<f64> = (0..n - 1).map(|i| distance(row(i), newest)).collect();
        d.sort_by(f64::total_cmp);
        let kdist = d[(k - 1).min(d.len() - 1)];
        if self.eps.is_none() || self.seen.is_multiple_of(EPS_EVERY) {
            self.eps = estimate_eps(&flat, n, dims, cfg);
        }
        let eps = self.eps?;
        let noise = kdist > eps && {
            let records = Array2::from_shape_vec((n, dims), flat).ok()?;
            // linfa counts the point itself in its neighbourhood, so min_points + 1 there
            // means min_points neighbours, matching the k-distance.
            let params = Dbscan::params_with(k + 1, L2Dist, LinearSearch)
                .tolerance(eps)
                .check()
                .ok()?;
            params.transform(&records)[n - 1].is_none()
        };
        Some(DetectorScore {
            score: kdist / eps,
            value: kdist,
            threshold: Some(eps),
            anomalous: noise,
        })
    }

    /// Algorithm R over the windows seen, driven by the model's own deterministic generator.
    fn sample_reservoir(&mut self, point: &[f64], cfg: &DetectorConfig) {
        if self.reservoir.len() < cfg.reservoir {
            self.reservoir.push(point, cfg.reservoir - 1);
            return;
        }
        // splitmix64: deterministic, and part of the state so a restored model continues
        // the same sequence.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let slot = z % self.seen.max(1);
        self.reservoir.set(slot as usize, point);
    }

    /// How unusual the mean of the last few raw scores is against the series' long-run
    /// distribution of raw scores (a z-score), mapped monotonically into [0, 1): series of
    /// any scale and noise level become comparable, and one threshold serves them all.
    fn likelihood(&mut self, raw: f64, cfg: &DetectorConfig) -> f64 {
        self.raw_scores.push(raw, cfg.likelihood_long);
        let n = self.raw_scores.len();
        if n < cfg.likelihood_short * 4 {
            return 0.0;
        }
        let short: f64 = self
            .raw_scores
            .iter()
            .rev()
            .take(cfg.likelihood_short)
            .sum::<f64>()
            / cfg.likelihood_short as f64;
        let n = n as f64;
        let (sum, sq) = self
            .raw_scores
            .iter()
            .fold((0.0, 0.0), |(s, q), x| (s + x, q + x * x));
        let mean = sum / n;
        let std = (sq / n - mean * mean).max(0.0).sqrt().max(1e-4);
        let z = (short - mean) / std;
        // Monotone in z with no ceiling, so very rare windows stay ranked above rare ones.
        if z > 0.0 {
            z / (z + 4.0)
        } else {
            0.0
        }
    }
}

thread_local! {
    /// A rayon pool whose only worker is this thread (it spawns none). linfa's k-means and
    /// DBSCAN hand every fit to rayon; from a thread outside a pool that is a wake-up and a
    /// wait on the global pool for a service's few hundred points, and its idle workers spin
    /// on the other cores. From a worker of a one-thread pool the same calls run inline.
    /// rayon keeps such a pool's small registry until the process ends: one per thread that
    /// ever updates a detector, and those are few and long-lived (a stage's, a replay's).
    static INLINE_POOL: Option<rayon::ThreadPool> = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .build()
        .ok();
}

/// Makes this thread, once, the worker of its own one-thread rayon pool: rayon then runs
/// parallel calls made on this thread inline (if that pool could not be made, e.g. on a
/// thread already in another pool, they go where they went before).
fn fit_on_this_thread() {
    INLINE_POOL.with(|_| ());
}

/// The `q` quantile (linear interpolation) of `values`; `None` when empty.
pub fn quantile(values: impl Iterator<Item = f64>, q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

/// Euclidean distance between two feature vectors.
fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

/// eps from the data: the `eps_quantile` of the points' k-distances (`flat` holds `n`
/// points of `dims` features).
fn estimate_eps(flat: &[f64], n: usize, dims: usize, cfg: &DetectorConfig) -> Option<f64> {
    let k = cfg.dbscan_min_points;
    let row = |i: usize| &flat[i * dims..(i + 1) * dims];
    let mut kdists = Vec::with_capacity(n);
    let mut others = Vec::with_capacity(n);
    for i in 0..n {
        others.clear();
        others.extend((0..n).filter(|&j| j != i).map(|j| distance(row(i), row(j))));
        let kth = (k - 1).min(others.len().checked_sub(1)?);
        others.select_nth_unstable_by(kth, f64::total_cmp);
        kdists.push(others[kth]);
    }
    quantile(kdists.into_iter(), cfg.eps_quantile).map(|e| e.max(1e-3))
}

/// Feature vectors stored compactly, oldest first: fixed point, 1/1000 of a feature unit in
/// an i16 (features are capped at ±12, well inside ±32.7). A service keeps a few hundred
/// of them, so this is most of its model state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Points {
    dims: usize,
    data: VecDeque<i16>,
}

impl Points {
    const SCALE: f64 = 1000.0;

    fn len(&self) -> usize {
        self.data.len().checked_div(self.dims).unwrap_or(0)
    }

    fn quantise(x: f64) -> i16 {
        (x * Self::SCALE)
            .round()
            .clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16
    }

    /// Appends a point; `cap` points is all this store will ever hold, so the memory is
    /// reserved exactly once.
    fn push(&mut self, point: &[f64], cap: usize) {
        if self.dims != point.len() {
            self.data.clear();
            self.dims = point.len();
        }
        if self.data.capacity() < (cap + 1) * self.dims {
            self.data
                .reserve_exact((cap + 1) * self.dims - self.data.len());
        }
        self.data.extend(point.iter().map(|&x| Self::quantise(x)));
    }

    fn pop_front(&mut self) {
        for _ in 0..self.dims {
            self.data.pop_front();
        }
    }

    fn set(&mut self, i: usize, point: &[f64]) {
        if point.len() != self.dims || i >= self.len() {
            return;
        }
        for (k, &x) in point.iter().enumerate() {
            self.data[i * self.dims + k] = Self::quantise(x);
        }
    }

    fn to_f64(&self) -> Vec<f64> {
        self.data
            .iter()
            .map(|&v| f64::from(v) / Self::SCALE)
            .collect()
    }
}

/// A bounded ring of non-negative measures stored as `ln(1 + x)` in 1/SCALE steps in a
/// u16: the recent history a detector calibrates against, at a quarter of the memory of
/// f64s, with the same relative precision for tiny and huge values (a flat series' rare
/// spike can be thousands of times its median).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Ring<const SCALE: u32> {
    data: VecDeque<u16>,
}

impl<const SCALE: u32> Ring<SCALE> {
    fn quantise(x: f64) -> u16 {
        let x = if x.is_finite() { x.max(0.0) } else { 0.0 };
        (x.ln_1p() * f64::from(SCALE))
            .round()
            .clamp(0.0, f64::from(u16::MAX)) as u16
    }

    fn value(q: u16) -> f64 {
        (f64::from(q) / f64::from(SCALE)).exp_m1()
    }

    /// Appends `x`, keeping at most `cap` values.
    fn push(&mut self, x: f64, cap: usize) {
        if self.data.capacity() < cap {
            self.data.reserve_exact(cap - self.data.len());
        }
        while self.data.len() >= cap.max(1) {
            self.data.pop_front();
        }
        self.data.push_back(Self::quantise(x));
    }

    fn len(&self) -> usize {
        self.data.len()
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = f64> + Clone + '_ {
        self.data.iter().map(|&v| Self::value(v))
    }
}

/// The maximum of the values of the last few windows, as a monotone queue: only values that
/// can still become the maximum are kept (a handful, not one per window).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MaxWindow {
    /// (window number, value), values strictly decreasing.
    queue: VecDeque<(u64, f32)>,
}

impl MaxWindow {
    /// Adds the value of window `at`.
    fn push(&mut self, value: f64, at: u64) {
        let v = value as f32;
        while self.queue.back().is_some_and(|&(_, b)| b <= v) {
            self.queue.pop_back();
        }
        self.queue.push_back((at, v));
    }

    /// The maximum over windows `(now - span, now)`, 0 when none; drops what has aged out.
    fn max(&mut self, now: u64, span: u64) -> f64 {
        while self.queue.front().is_some_and(|&(at, _)| at + span < now) {
            self.queue.pop_front();
        }
        self.queue.front().map_or(0.0, |&(_, v)| f64::from(v))
    }
}
