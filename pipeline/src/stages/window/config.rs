//! The window stage's settings: the `[window]` table of `ebb.toml`. Every default is written
//! here, once, next to the field it belongs to.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::glob::glob_match;

/// `[window]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Consumer group of `ebb run window`. Default `ebb-window`.
    pub group_id: String,
    /// Window length of every metric no pattern in `metrics` names. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub size: Duration,
    /// How far consecutive windows start apart: equal to `size` for tumbling windows (the
    /// default), smaller for hopping (sliding) ones. Must divide `size`.
    #[serde(with = "humantime_serde", default)]
    pub advance: Option<Duration>,
    /// Per-metric windows: `[window.metrics."latency_*"] size = "30s", advance = "10s"`.
    /// An exact name wins over patterns; patterns are tried longest first.
    pub metrics: BTreeMap<String, WindowSpecConfig>,
    /// Out-of-orderness the watermark allows: it trails the newest event time seen on a
    /// partition by this much. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// How long after the watermark passes a window's end the window still accepts records.
    /// A record later than that goes to the late topic. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// A partition with no record for this long (wall clock) has its watermark advanced by
    /// the wall clock, so a quiet service's windows still close. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Records buffered in open windows per partition at most; beyond it the oldest open
    /// windows are closed early (and counted) rather than growing without bound. Default 2,000,000.
    pub max_buffered_records: usize,
    /// The store of closed windows that SQL reads.
    pub store: StoreConfig,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            group_id: "ebb-window".into(),
            size: Duration::from_secs(10),
            advance: None,
            metrics: BTreeMap::new(),
            allowed_lateness: Duration::from_secs(2),
            grace: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_buffered_records: 2_000_000,
            store: StoreConfig::default(),
        }
    }
}

/// `[window.metrics."<pattern>"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpecConfig {
    /// Window length.
    #[serde(with = "humantime_serde")]
    pub size: Duration,
    /// Hop; default `size` (tumbling).
    #[serde(with = "humantime_serde", default)]
    pub advance: Option<Duration>,
}

/// `[window.store]`: closed windows kept for SQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Windows whose end is older than the newest window end minus this are evicted from
    /// memory (spilled first, when `spill_dir` is set). Default 1 h.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Rows kept in memory at most; the oldest go first. Default 1,000,000.
    pub max_rows: usize,
    /// Evicted windows are written here as Parquet and stay queryable. Default none (dropped).
    pub spill_dir: Option<PathBuf>,
    /// Parquet files older than this (by window end) are deleted. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub spill_retention: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(3600),
            max_rows: 1_000_000,
            spill_dir: None,
            spill_retention: Duration::from_secs(7 * 86_400),
        }
    }
}

/// A window shape in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowSpec {
    /// Length.
    pub size_ms: i64,
    /// Hop.
    pub advance_ms: i64,
}

impl WindowSpec {
    /// The starts of every window that holds `ts_ms`, oldest first. Windows are aligned to
    /// the epoch, so every instance of the stage cuts the same windows.
    pub fn starts(self, ts_ms: i64) -> impl Iterator<Item = i64> {
        let last = ts_ms.div_euclid(self.advance_ms) * self.advance_ms;
        let n = self.size_ms / self.advance_ms;
        (0..n).rev().map(move |k| last - k * self.advance_ms)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl WindowConfig {
    /// The window shape for `metric`.
    pub fn spec_for(&self, metric: &str) -> WindowSpec {
        let pick = self.metrics.get(metric).or_else(|| {
            let mut patterns: Vec<_> = self
                .metrics
                .iter()
                .filter(|(p, _)| p.contains('*') && glob_match(p, metric))
                .collect();
            patterns.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
            patterns.first().map(|(_, s)| *s)
        });
        let (size, advance) = match pick {
            Some(s) => (s.size, s.advance.unwrap_or(s.size)),
            None => (self.size, self.advance.unwrap_or(self.size)),
        };
        WindowSpec {
            size_ms: millis(size),
            advance_ms: millis(advance),
        }
    }

    /// Allowed lateness in milliseconds.
    pub fn lateness_ms(&self) -> i64 {
        millis(self.allowed_lateness)
    }

    /// Grace in milliseconds.
    pub fn grace_ms(&self) -> i64 {
        millis(self.grace)
    }

    /// Checks what serde cannot, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: String, why: &str| {
            Err(ConfigError::Invalid {
                key,
                why: why.into(),
            })
        };
        let check = |key: &str, size: Duration, advance: Option<Duration>| {
            let advance = advance.unwrap_or(size);
            if size.as_millis() == 0 || !size.subsec_micros().is_multiple_of(1000) {
                return bad(
                    format!("{key}.size"),
                    "must be a positive whole number of milliseconds",
                );
            }
            if advance.as_millis() == 0
                || advance > size
                || !size.as_millis().is_multiple_of(advance.as_millis())
            {
                return bad(
                    format!("{key}.advance"),
                    "must be positive and divide size (equal to size for tumbling windows)",
                );
            }
            if size.as_millis() / advance.as_millis() > 60 {
                return bad(
                    format!("{key}.advance"),
                    "at most 60 overlapping windows per record (size / advance <= 60)",
                );
            }
            Ok(())
        };
        check("window", self.size, self.advance)?;
        for (pattern, spec) in &self.metrics {
            check(
                &format!("window.metrics.\"{pattern}\""),
                spec.size,
                spec.advance,
            )?;
        }
        if self.idle_timeout.is_zero() {
            return bad("window.idle_timeout".into(), "must be positive");
        }
        if self.max_buffered_records == 0 {
            return bad("window.max_buffered_records".into(), "must be positive");
        }
        if self.store.max_rows == 0 {
            return bad("window.store.max_rows".into(), "must be positive");
        }
        if self.store.retention.is_zero() {
            return bad("window.store.retention".into(), "must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exact_names_beat_patterns_and_longer_patterns_beat_shorter() {
        let mut c = WindowConfig::default();
        c.metrics.insert(
            "latency_*".into(),
            WindowSpecConfig {
                size: Duration::from_secs(30),
                advance: Some(Duration::from_secs(10)),
            },
        );
        c.metrics.insert(
            "latency_p95_*".into(),
            WindowSpecConfig {
                size: Duration::from_secs(60),
                advance: None,
            },
        );
        c.metrics.insert(
            "latency_p95_ms".into(),
            WindowSpecConfig {
                size: Duration::from_secs(5),
                advance: None,
            },
        );
        assert_eq!(c.spec_for("latency_p95_ms").size_ms, 5_000);
        assert_eq!(c.spec_for("latency_p95_s").size_ms, 60_000);
        assert_eq!(
            c.spec_for("latency_p50_ms"),
            WindowSpec {
                size_ms: 30_000,
                advance_ms: 10_000
            }
        );
        assert_eq!(c.spec_for("cpu").size_ms, 10_000);
    }

    #[test]
    fn an_advance_that_does_not_divide_the_size_is_refused_by_key() {
        let c = WindowConfig {
            advance: Some(Duration::from_secs(3)),
            ..WindowConfig::default()
        };
        let e = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("window.advance"), "{e}");
    }

    proptest! {
        #[test]
        fn every_window_a_record_falls_in_contains_it(
            ts in -10_000_000_000i64..10_000_000_000_000,
            advance_s in 1i64..60,
            hops in 1i64..6,
        ) {
            let spec = WindowSpec { size_ms: advance_s * 1000 * hops, advance_ms: advance_s * 1000 };
            let starts: Vec<i64> = spec.starts(ts).collect();
            prop_assert_eq!(starts.len() as i64, hops);
            for s in &starts {
                prop_assert!(*s <= ts && ts < s + spec.size_ms);
                prop_assert_eq!(s.rem_euclid(spec.advance_ms), 0);
            }
            prop_assert!(starts.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
