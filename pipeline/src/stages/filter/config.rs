//! The filter's settings: the `[filter]` table of `ebb.toml`. Every default is written here,
//! once, next to the field it belongs to.

use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, Secret};
use crate::glob::glob_match;

/// `[filter]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// Consumer group of `ebb run filter`. Default `ebb-filter`.
    pub group_id: String,
    /// Payloads larger than this are dead-lettered as `oversized`. Default 65536 (64 KiB).
    pub max_payload_bytes: usize,
    /// Identifier pseudonymisation.
    pub anonymize: AnonymizeConfig,
    /// Timestamp normalisation and plausibility.
    pub time: TimeConfig,
    /// Physical bounds.
    pub limits: LimitsConfig,
    /// Statistical outliers.
    pub outliers: OutlierConfig,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            group_id: "ebb-filter".into(),
            max_payload_bytes: 64 * 1024,
            anonymize: AnonymizeConfig::default(),
            time: TimeConfig::default(),
            limits: LimitsConfig::default(),
            outliers: OutlierConfig::default(),
        }
    }
}

/// How IP addresses in anonymised labels are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpMode {
    /// Keyed hash, like every other identifier.
    Hash,
    /// Keep the network prefix (`ipv4_prefix`, `ipv6_prefix`), zero the host part.
    Truncate,
}

/// `[filter.anonymize]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnonymizeConfig {
    /// HMAC key. Prefer the `EBB_ANON_KEY` environment variable, which overrides this.
    /// Without either, a random key is drawn per process (pseudonyms then change on restart).
    pub key: Option<Secret>,
    /// Top-level fields to pseudonymise: `instance` (default) and/or `service`.
    pub fields: Vec<String>,
    /// Label names whose values are pseudonymised. Default `user_id`, `user`, `ip`, `client_ip`.
    pub labels: Vec<String>,
    /// `hash` (default) or `truncate` for label values that parse as IP addresses.
    pub ip_mode: IpMode,
    /// Prefix kept by `truncate` for IPv4. Default 24.
    pub ipv4_prefix: u8,
    /// Prefix kept by `truncate` for IPv6. Default 48.
    pub ipv6_prefix: u8,
}

impl Default for AnonymizeConfig {
    fn default() -> Self {
        Self {
            key: None,
            fields: vec!["instance".into()],
            labels: ["user_id", "user", "ip", "client_ip"]
                .map(String::from)
                .to_vec(),
            ip_mode: IpMode::Hash,
            ipv4_prefix: 24,
            ipv6_prefix: 48,
        }
    }
}

/// `[filter.time]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeConfig {
    /// IANA zone for naive local timestamps (no offset). Default `UTC`.
    pub local_zone: String,
    /// Older samples are dead-lettered as `too_old`. Default 7 days (raise it for backfills).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Samples further ahead than this are dead-lettered as `in_future`. Default 5 minutes.
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
}

impl Default for TimeConfig {
    fn default() -> Self {
        Self {
            local_zone: "UTC".into(),
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_future: Duration::from_secs(300),
        }
    }
}

/// One explicit bound, e.g. `{ metric = "disk_*", min = 0, max = 1e15 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricBound {
    /// Metric name pattern (`*` matches any run of characters).
    pub metric: String,
    /// Smallest possible value.
    pub min: Option<f64>,
    /// Largest possible value.
    pub max: Option<f64>,
}

/// `[filter.limits]`: what is physically impossible.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Metrics that can never be negative (CPU, memory, latency, rates, counts).
    /// Default `["*"]`: every metric.
    pub non_negative: Vec<String>,
    /// Metrics exempt from `non_negative` (e.g. temperature deltas). Default none.
    pub signed: Vec<String>,
    /// Units meaning percent, bounded to [0, 100]. Default `percent`, `%`, `pct`.
    pub percent_units: Vec<String>,
    /// Units meaning a fraction, bounded to [0, 1]. Default `ratio`, `fraction`.
    pub ratio_units: Vec<String>,
    /// Extra bounds per metric pattern. Default none.
    pub bounds: Vec<MetricBound>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            non_negative: vec!["*".into()],
            signed: Vec::new(),
            percent_units: ["percent", "%", "pct"].map(String::from).to_vec(),
            ratio_units: ["ratio", "fraction"].map(String::from).to_vec(),
            bounds: Vec::new(),
        }
    }
}

/// `[filter.outliers]`: a rolling median/MAD (Hampel) test per (service, instance, metric).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Off switch. Default on.
    pub enabled: bool,
    /// Samples kept per series. Default 32.
    pub window: usize,
    /// No verdicts until a series has this many samples. Default 16: a MAD from fewer is too
    /// noisy to judge by.
    pub min_samples: usize,
    /// Robust z-score beyond which a sample is an outlier. Default 6: this filter drops
    /// glitches; spikes that matter are the models stage's business, not this one's.
    pub threshold: f64,
    /// Spread floor as a fraction of |median|, so near-constant series do not flag noise.
    /// Default 0.01.
    pub relative_floor: f64,
    /// A sample must also differ from the median by at least this fraction of |median|.
    /// Default 1.0 (at least double, or at or below zero): traffic bursts and load steps are
    /// real and pass; a reading a thousand times too large does not.
    pub min_jump: f64,
    /// Metric patterns tested. Default `["*"]`.
    pub include: Vec<String>,
    /// Metric patterns never tested. Default `*error*`, `*count*`, `*_total`: sparse event
    /// counts are heavy-tailed and their bursts are signal.
    pub exclude: Vec<String>,
    /// Series tracked at once; the least recently seen are forgotten beyond it. Default 100000.
    pub max_series: usize,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: 32,
            min_samples: 16,
            threshold: 6.0,
            relative_floor: 0.01,
            min_jump: 1.0,
            include: vec!["*".into()],
            exclude: ["*error*", "*count*", "*_total"].map(String::from).to_vec(),
            max_series: 100_000,
        }
    }
}

impl OutlierConfig {
    /// Whether `metric` is tested for outliers.
    pub fn applies_to(&self, metric: &str) -> bool {
        self.include.iter().any(|p| glob_match(p, metric))
            && !self.exclude.iter().any(|p| glob_match(p, metric))
    }
}

impl FilterConfig {
    /// Checks values serde cannot: each error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| {
            Err(ConfigError::Invalid {
                key: format!("filter.{key}"),
                why,
            })
        };
        if self.group_id.trim().is_empty() {
            return bad("group_id", "must not be empty".into());
        }
        if self.max_payload_bytes == 0 {
            return bad("max_payload_bytes", "must be positive".into());
        }
        for f in &self.anonymize.fields {
            if f != "instance" && f != "service" {
                return bad(
                    "anonymize.fields",
                    format!("{f:?} is not a field that can be anonymised (instance, service)"),
                );
            }
        }
        if self.anonymize.ipv4_prefix > 32 {
            return bad(
                "anonymize.ipv4_prefix",
                format!("{} is more than 32", self.anonymize.ipv4_prefix),
            );
        }
        if self.anonymize.ipv6_prefix > 128 {
            return bad(
                "anonymize.ipv6_prefix",
                format!("{} is more than 128", self.anonymize.ipv6_prefix),
            );
        }
        if self.time.local_zone.parse::<chrono_tz::Tz>().is_err() {
            return bad(
                "time.local_zone",
                format!("{:?} is not an IANA time zone", self.time.local_zone),
            );
        }
        if self.time.max_age.is_zero() {
            return bad("time.max_age", "must be positive".into());
        }
        for (i, b) in self.limits.bounds.iter().enumerate() {
            if let (Some(lo), Some(hi)) = (b.min, b.max) {
                if lo > hi {
                    return bad(
                        &format!("limits.bounds[{i}]"),
                        format!("min {lo} is above max {hi}"),
                    );
                }
            }
        }
        let o = &self.outliers;
        if o.window < 3 {
            return bad(
                "outliers.window",
                format!("{} is too small (at least 3)", o.window),
            );
        }
        if o.min_samples < 3 || o.min_samples > o.window {
            return bad(
                "outliers.min_samples",
                format!(
                    "{} must be between 3 and window ({})",
                    o.min_samples, o.window
                ),
            );
        }
        if !(o.threshold.is_finite() && o.threshold > 0.0) {
            return bad(
                "outliers.threshold",
                format!("{} must be a positive number", o.threshold),
            );
        }
        if !(o.relative_floor.is_finite() && o.relative_floor >= 0.0) {
            return bad(
                "outliers.relative_floor",
                format!("{} must be zero or positive", o.relative_floor),
            );
        }
        if !(o.min_jump.is_finite() && o.min_jump >= 0.0) {
            return bad(
                "outliers.min_jump",
                format!("{} must be zero or positive", o.min_jump),
            );
        }
        if o.max_series == 0 {
            return bad("outliers.max_series", "must be positive".into());
        }
        Ok(())
    }
}
