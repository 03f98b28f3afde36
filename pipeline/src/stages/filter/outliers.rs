//! The Hampel test per (service, instance, metric): a rolling median and MAD over the last
//! `window` samples, with state bounded per series and in the number of series.
//!
//! Per instance, not per service: instances of one service differ (a faulty one most of all),
//! and a shared series would flag the odd instance on every sample, erasing the very incident
//! the models stage exists to see. Each instance is judged against its own history.
//!
//! Every finite sample enters the window, flagged or not, so a real level shift becomes
//! the new normal within half a window; and a second flag in the same direction in a row is
//! read as that shift starting, not as another glitch, and passes. An isolated glitch is
//! dropped; a sustained change loses at most its first sample.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use foldhash::{HashMap, HashMapExt};

use ebb_udf_core::robust::MAD_TO_SIGMA;

use super::config::OutlierConfig;

/// Scales the mean absolute deviation to sigma for normal data (sqrt(pi/2)).
const MEAN_AD_TO_SIGMA: f64 = 1.2533;

/// What the test says of one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Not tested, too little history, or within bounds.
    Accept,
    /// Beyond the threshold.
    Outlier {
        /// Robust z-score.
        z: f64,
        /// Window median before this sample.
        median: f64,
        /// Window spread (sigma estimate) before this sample.
        sigma: f64,
    },
}

#[derive(Debug, Clone)]
struct Series {
    order: VecDeque<f64>,
    sorted: Vec<f64>,
    /// Direction of the previous sample's flag: -1, 0 or 1.
    last_flag: i8,
    last_seen: u64,
}

impl Series {
    fn new(window: usize) -> Self {
        Self {
            order: VecDeque::with_capacity(window),
            sorted: Vec::with_capacity(window),
            last_flag: 0,
            last_seen: 0,
        }
    }

    fn push(&mut self, x: f64, window: usize) {
        if self.order.len() == window {
            if let Some(old) = self.order.pop_front() {
                let at = self.sorted.partition_point(|v| *v < old);
                if at < self.sorted.len() {
                    self.sorted.remove(at);
                }
            }
        }
        self.order.push_back(x);
        let at = self.sorted.partition_point(|v| *v < x);
        self.sorted.insert(at, x);
    }

    fn median(&self) -> f64 {
        median_of_sorted(&self.sorted)
    }

    /// Sigma estimate: 1.4826 * MAD, or 1.2533 * mean absolute deviation when more than half
    /// the window sits on the median (MAD is then zero); `None` for a constant window.
    fn sigma(&self, median: f64) -> Option<f64> {
        let sorted = &self.sorted;
        let n = sorted.len();
        if n == 0 {
            return None;
        }
        let mad = if n % 2 == 1 {
            kth_deviation(sorted, median, n / 2)
        } else {
            (kth_deviation(sorted, median, n / 2 - 1) + kth_deviation(sorted, median, n / 2)) / 2.0
        };
        if mad > 0.0 {
            return Some(MAD_TO_SIGMA * mad);
        }
        #[allow(clippy::cast_precision_loss)]
        let mean_ad = sorted.iter().map(|v| (v - median).abs()).sum::<f64>() / n as f64;
        (mean_ad > 0.0).then_some(MEAN_AD_TO_SIGMA * mean_ad)
    }
}

/// The `k`-th smallest (from 0) of `|v - median|` over `sorted`, without building them all.
/// Walking outwards from the median the deviations on each side only grow, so they form two
/// sorted runs, and the k-th of two sorted runs is found by bisection: O(log n) a sample
/// where merging the runs was O(n), and the MAD is computed for every sample.
fn kth_deviation(sorted: &[f64], median: f64, k: usize) -> f64 {
    let (below, above) = sorted.split_at(sorted.partition_point(|v| *v < median));
    let left = |i: usize| median - below[below.len() - 1 - i];
    let right = |j: usize| above[j] - median;
    let take = (k + 1).min(sorted.len());
    // How many of the `take` smallest come from the left run: the first count at which the
    // left run's next deviation is no longer below the right run's last one taken.
    let (mut lo, mut hi) = (take.saturating_sub(above.len()), take.min(below.len()));
    while lo < hi {
        let i = (lo + hi) / 2;
        if left(i) < right(take - i - 1) {
            lo = i + 1;
        } else {
            hi = i;
        }
    }
    let from_left = if lo > 0 {
        left(lo - 1)
    } else {
        f64::NEG_INFINITY
    };
    let from_right = if take > lo {
        right(take - lo - 1)
    } else {
        f64::NEG_INFINITY
    };
    from_left.max(from_right)
}

fn median_of_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Hampel state for every series this instance sees.
#[derive(Debug)]
pub struct OutlierDetector {
    config: OutlierConfig,
    series: HashMap<u64, Series>,
    applies: HashMap<String, bool>,
    tick: u64,
    evicted: u64,
}

fn series_key(service: &str, instance: &str, metric: &str) -> u64 {
    // A fixed seed: deterministic across runs, so replays see the same state. foldhash, not
    // SipHash: hashing three names a sample was a tenth of the filter's time.
    const KEY: foldhash::quality::FixedState =
        foldhash::quality::FixedState::with_seed(0x6562_6221);
    KEY.hash_one((service, instance, metric))
}

impl OutlierDetector {
    /// A detector with no history.
    pub fn new(config: OutlierConfig) -> Self {
        Self {
            config,
            series: HashMap::new(),
            applies: HashMap::new(),
            tick: 0,
            evicted: 0,
        }
    }

    /// Number of series tracked.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Series forgotten so far to stay within `max_series`.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn applies_to(&mut self, metric: &str) -> bool {
        if let Some(hit) = self.applies.get(metric) {
            return *hit;
        }
        let hit = self.config.applies_to(metric);
        // Metric names are few; the cap only guards against a producer minting endless names.
        if self.applies.len() >= 65_536 {
            self.applies.clear();
        }
        self.applies.insert(metric.to_string(), hit);
        hit
    }

    /// Tests `value` (finite) against its series and then adds it to the series.
    pub fn check(&mut self, service: &str, instance: &str, metric: &str, value: f64) -> Verdict {
        if !self.config.enabled || !value.is_finite() || !self.applies_to(metric) {
            return Verdict::Accept;
        }
        self.tick += 1;
        let window = self.config.window;
        let key = series_key(service, instance, metric);
        if !self.series.contains_key(&key) && self.series.len() >= self.config.max_series {
            self.evict();
        }
        let series = self
            .series
            .entry(key)
            .or_insert_with(|| Series::new(window));
        series.last_seen = self.tick;
        let mut verdict = Verdict::Accept;
        if series.order.len() >= self.config.min_samples {
            let median = series.median();
            if let Some(spread) = series.sigma(median) {
                let sigma = spread.max(self.config.relative_floor * median.abs());
                let z = (value - median) / sigma;
                let jump = (value - median).abs() >= self.config.min_jump * median.abs();
                if z.abs() > self.config.threshold && jump {
                    let direction: i8 = if z > 0.0 { 1 } else { -1 };
                    if series.last_flag != direction {
                        verdict = Verdict::Outlier { z, median, sigma };
                    }
                    series.last_flag = direction;
                } else {
                    series.last_flag = 0;
                }
            }
        }
        series.push(value, window);
        verdict
    }

    /// Forgets the least recently seen tenth of the series.
    fn evict(&mut self) {
        let mut seen: Vec<(u64, u64)> =
            self.series.iter().map(|(k, s)| (s.last_seen, *k)).collect();
        seen.sort_unstable();
        let n = (self.series.len() / 10).max(1);
        for (_, key) in seen.into_iter().take(n) {
            self.series.remove(&key);
            self.evicted += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn detector() -> OutlierDetector {
        OutlierDetector::new(OutlierConfig::default())
    }

    fn is_outlier(v: Verdict) -> bool {
        matches!(v, Verdict::Outlier { .. })
    }

    proptest::proptest! {
        #[test]
        fn the_kth_deviation_is_what_sorting_them_all_gives(
            mut values in proptest::collection::vec(-1e6f64..1e6, 1..64),
            pick in 0usize..64,
        ) {
            values.sort_unstable_by(f64::total_cmp);
            // On a sample (ties at zero) or between samples.
            let at = values[pick % values.len()];
            let median = if pick % 2 == 0 { at } else { at * 0.999 };
            let mut sorted: Vec<f64> = values.iter().map(|v| (v - median).abs()).collect();
            sorted.sort_unstable_by(f64::total_cmp);
            for (k, want) in sorted.iter().enumerate() {
                proptest::prop_assert_eq!(kth_deviation(&values, median, k), *want);
            }
        }
    }

    #[test]
    fn isolated_spike_is_an_outlier_and_noise_is_not() {
        let mut d = detector();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut flagged = 0;
        for _ in 0..2_000 {
            let v = 50.0 + rng.random_range(-5.0..5.0);
            if is_outlier(d.check("api", "i-1", "cpu", v)) {
                flagged += 1;
            }
        }
        assert_eq!(flagged, 0, "uniform noise never exceeds 6 robust sigmas");
        assert!(is_outlier(d.check("api", "i-1", "cpu", 5_000.0)));
        assert!(!is_outlier(d.check("api", "i-1", "cpu", 51.0)));
    }

    #[test]
    fn level_shift_loses_only_its_first_sample() {
        let mut d = detector();
        for i in 0..40 {
            d.check("api", "i-1", "latency_ms", 100.0 + f64::from(i % 5));
        }
        assert!(is_outlier(d.check("api", "i-1", "latency_ms", 900.0)));
        for _ in 0..30 {
            assert!(!is_outlier(d.check("api", "i-1", "latency_ms", 900.0)));
        }
    }

    #[test]
    fn no_verdict_before_min_samples_or_on_a_constant_series() {
        let mut d = detector();
        for _ in 0..7 {
            assert!(!is_outlier(d.check("api", "i-1", "mem", 1.0)));
        }
        assert!(
            !is_outlier(d.check("api", "i-1", "mem", 1e9)),
            "7 samples of history is too few"
        );
        let mut c = detector();
        for _ in 0..50 {
            c.check("api", "i-1", "mem", 0.0);
        }
        assert!(
            !is_outlier(c.check("api", "i-1", "mem", 3.0)),
            "a constant window has no spread to judge by"
        );
    }

    #[test]
    fn excluded_metrics_and_separate_series_are_independent() {
        let mut d = detector();
        for i in 0..50 {
            d.check("api", "i-1", "http_errors", 0.0);
            d.check("api", "i-1", "cpu", 10.0 + f64::from(i % 3) / 3.0);
        }
        assert!(!is_outlier(d.check("api", "i-1", "http_errors", 500.0)));
        assert!(
            !is_outlier(d.check("db", "i-1", "cpu", 900.0)),
            "db has no history of its own"
        );
        assert!(is_outlier(d.check("api", "i-1", "cpu", 900.0)));
    }

    #[test]
    fn a_faulty_instance_among_healthy_ones_is_flagged_once_not_on_every_sample() {
        let mut d = detector();
        let mut flagged = 0;
        for tick in 0..100 {
            for (instance, base) in [("i-1", 50.0), ("i-2", 52.0), ("i-3", 300.0)] {
                let v = base + f64::from(tick % 4);
                if is_outlier(d.check("api", instance, "latency_ms", v)) {
                    flagged += 1;
                }
            }
        }
        assert_eq!(
            flagged, 0,
            "each instance is normal against its own history"
        );
    }

    #[test]
    fn a_burst_is_not_a_glitch_but_a_thousandfold_reading_is() {
        let mut d = detector();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..64 {
            d.check(
                "api",
                "i-1",
                "requests_per_s",
                200.0 * (1.0 + rng.random_range(-0.05..0.05)),
            );
        }
        assert!(
            !is_outlier(d.check("api", "i-1", "requests_per_s", 330.0)),
            "a 65% burst is real traffic"
        );
        assert!(is_outlier(d.check(
            "api",
            "i-1",
            "requests_per_s",
            200_000.0
        )));
    }

    #[test]
    fn series_count_stays_within_its_bound() {
        let mut d = OutlierDetector::new(OutlierConfig {
            max_series: 100,
            ..OutlierConfig::default()
        });
        for i in 0..1_000 {
            d.check(&format!("svc-{i}"), "i-1", "cpu", 1.0);
        }
        assert!(d.series_count() <= 100);
        assert!(d.evicted() >= 900);
    }

    #[test]
    fn rolling_window_keeps_sorted_copy_in_step() {
        let mut s = Series::new(4);
        for v in [5.0, 1.0, 3.0, 2.0, 4.0, 0.0] {
            s.push(v, 4);
        }
        assert_eq!(
            s.order.iter().copied().collect::<Vec<_>>(),
            vec![3.0, 2.0, 4.0, 0.0]
        );
        assert_eq!(s.sorted, vec![0.0, 2.0, 3.0, 4.0]);
        assert_eq!(s.median(), 2.5);
    }
}
