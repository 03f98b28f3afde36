//! The filter's pure step: one raw record in; one clean record or one dead letter out.
//!
//! Checks run cheapest and most certain first, so a record is rejected for its most basic
//! fault: size, framing, decoding, required fields, value, time, and only then the outlier
//! test, whose state must see nothing but plausible samples.

use std::net::IpAddr;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use chrono_tz::Tz;
use ebb_udf_core::Anonymizer;
use foldhash::{HashMap, HashMapExt};

use super::config::{FilterConfig, IpMode};
use super::outliers::{OutlierDetector, Verdict};
use crate::codec::{self, AvroCodec, DecodeError};
use crate::glob::glob_match;
use crate::record::{CleanSample, TelemetrySample};
use crate::stage::{Emitter, Input, Output, Stage};

/// The filter's output name for clean records.
pub const CLEAN: &str = "clean";

/// Every reason the filter rejects a record, for docs, metrics and dashboards.
pub const REASONS: &[&str] = &[
    "empty_payload",
    "oversized",
    "empty_key",
    "unknown_format",
    "malformed",
    "missing_field",
    "wrong_type",
    "unknown_schema_id",
    "empty_field",
    "not_finite",
    "out_of_range",
    "invalid_timestamp",
    "too_old",
    "in_future",
    "outlier",
    "encode_failed",
];

/// Caps the pseudonym cache: instance ids repeat, so most records hash nothing.
const PSEUDONYM_CACHE: usize = 100_000;

/// The filter stage: anonymise, normalise time to UTC, drop the impossible and the outliers.
pub struct FilterStage {
    config: FilterConfig,
    zone: Tz,
    anonymizer: Anonymizer,
    pseudonyms: HashMap<String, String>,
    avro: AvroCodec,
    outliers: OutlierDetector,
    now: DateTime<Utc>,
    max_age: ChronoDuration,
    max_future: ChronoDuration,
    anonymize_instance: bool,
    anonymize_service: bool,
}

impl std::fmt::Debug for FilterStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterStage")
            .field("now", &self.now)
            .field("series", &self.outliers.series_count())
            .finish()
    }
}

/// Why a sample was refused after decoding.
struct Reject {
    reason: &'static str,
    detail: String,
}

fn reject(reason: &'static str, detail: impl Into<String>) -> Reject {
    Reject {
        reason,
        detail: detail.into(),
    }
}

impl FilterStage {
    /// Builds the stage. `config` must have passed [`FilterConfig::validate`]; `key` is the
    /// HMAC key; `now` is the time the runner (or replay) says it is.
    pub fn new(config: FilterConfig, key: &[u8], avro: AvroCodec, now: DateTime<Utc>) -> Self {
        let zone = config.time.local_zone.parse::<Tz>().unwrap_or(Tz::UTC);
        let max_age = ChronoDuration::from_std(config.time.max_age).unwrap_or(ChronoDuration::MAX);
        let max_future =
            ChronoDuration::from_std(config.time.max_future).unwrap_or(ChronoDuration::MAX);
        let anonymize_instance = config.anonymize.fields.iter().any(|f| f == "instance");
        let anonymize_service = config.anonymize.fields.iter().any(|f| f == "service");
        Self {
            outliers: OutlierDetector::new(config.outliers.clone()),
            config,
            zone,
            anonymizer: Anonymizer::new(key),
            pseudonyms: HashMap::new(),
            avro,
            now,
            max_age,
            max_future,
            anonymize_instance,
            anonymize_service,
        }
    }

    /// Outlier series tracked now.
    pub fn series_count(&self) -> usize {
        self.outliers.series_count()
    }

    fn pseudonym(&mut self, value: &str) -> String {
        if let Some(p) = self.pseudonyms.get(value) {
            return p.clone();
        }
        let p = self.anonymizer.hash(value);
        if self.pseudonyms.len() >= PSEUDONYM_CACHE {
            self.pseudonyms.clear();
        }
        self.pseudonyms.insert(value.to_string(), p.clone());
        p
    }

    fn anonymize_label(&mut self, value: &str) -> String {
        if self.config.anonymize.ip_mode == IpMode::Truncate {
            if let Ok(ip) = value.trim().parse::<IpAddr>() {
                return ebb_udf_core::truncate_ip(
                    ip,
                    self.config.anonymize.ipv4_prefix,
                    self.config.anonymize.ipv6_prefix,
                );
            }
        }
        self.pseudonym(value)
    }

    fn check_value(&self, s: &TelemetrySample) -> Result<(), Reject> {
        let v = s.value;
        if !v.is_finite() {
            return Err(reject(
                "not_finite",
                format!("value {v} of {} is not a finite number", s.metric),
            ));
        }
        let limits = &self.config.limits;
        let unit = s.unit.as_deref().unwrap_or("");
        let out = |lo: f64, hi: f64, what: &str| {
            if v < lo || v > hi {
                Err(reject(
                    "out_of_range",
                    format!("{} = {v} is outside [{lo}, {hi}] for {what}", s.metric),
                ))
            } else {
                Ok(())
            }
        };
        if limits
            .percent_units
            .iter()
            .any(|u| u.eq_ignore_ascii_case(unit))
        {
            out(0.0, 100.0, "a percentage")?;
        } else if limits
            .ratio_units
            .iter()
            .any(|u| u.eq_ignore_ascii_case(unit))
        {
            out(0.0, 1.0, "a ratio")?;
        }
        if v < 0.0
            && limits.non_negative.iter().any(|p| glob_match(p, &s.metric))
            && !limits.signed.iter().any(|p| glob_match(p, &s.metric))
        {
            return Err(reject(
                "out_of_range",
                format!("{} = {v} cannot be negative", s.metric),
            ));
        }
        for b in &limits.bounds {
            if glob_match(&b.metric, &s.metric) {
                out(
                    b.min.unwrap_or(f64::NEG_INFINITY),
                    b.max.unwrap_or(f64::INFINITY),
                    &format!("pattern {:?}", b.metric),
                )?;
            }
        }
        Ok(())
    }

    fn check_time(&self, s: &TelemetrySample) -> Result<DateTime<Utc>, Reject> {
        let ts = ebb_udf_core::parse_timestamp(&s.ts.as_input(), self.zone)
            .map_err(|e| reject("invalid_timestamp", e.to_string()))?;
        if self.now.signed_duration_since(ts) > self.max_age {
            return Err(reject(
                "too_old",
                format!(
                    "{} is older than max_age {} (now {})",
                    rfc(ts),
                    humantime::format_duration(self.config.time.max_age),
                    rfc(self.now)
                ),
            ));
        }
        if ts.signed_duration_since(self.now) > self.max_future {
            return Err(reject(
                "in_future",
                format!(
                    "{} is more than {} ahead of now ({})",
                    rfc(ts),
                    humantime::format_duration(self.config.time.max_future),
                    rfc(self.now)
                ),
            ));
        }
        Ok(ts)
    }

    /// Decides one raw record: the clean sample and the format it came in, or why not.
    fn clean_sample(&mut self, input: &Input<'_>) -> Result<(codec::Format, CleanSample), Reject> {
        let payload = match input.payload {
            None | Some([]) => {
                return Err(reject(
                    "empty_payload",
                    "no value (tombstone or zero bytes)",
                ))
            }
            Some(p) => p,
        };
        if payload.len() > self.config.max_payload_bytes {
            return Err(reject(
                "oversized",
                format!(
                    "{} bytes is over filter.max_payload_bytes ({})",
                    payload.len(),
                    self.config.max_payload_bytes
                ),
            ));
        }
        if input.key == Some(&[]) {
            return Err(reject("empty_key", "the record key is present but empty"));
        }
        let (format, sample) = codec::decode_sample(payload, &self.avro)
            .map_err(|e: DecodeError| reject(e.reason(), e.to_string()))?;
        for (name, v) in [
            ("service", &sample.service),
            ("instance", &sample.instance),
            ("metric", &sample.metric),
        ] {
            if v.trim().is_empty() {
                return Err(reject("empty_field", format!("{name} is empty")));
            }
        }
        if sample.labels.keys().any(|k| k.trim().is_empty()) {
            return Err(reject("empty_field", "a label has an empty name"));
        }
        self.check_value(&sample)?;
        let ts = self.check_time(&sample)?;
        if let Verdict::Outlier { z, median, sigma } = self.outliers.check(
            &sample.service,
            &sample.instance,
            &sample.metric,
            sample.value,
        ) {
            return Err(reject(
                "outlier",
                format!(
                    "{} = {} is {z:.1} robust sigmas from the recent median {median} (sigma {sigma:.4}) of this instance of {}",
                    sample.metric, sample.value, sample.service
                ),
            ));
        }
        let TelemetrySample {
            service,
            instance,
            metric,
            value,
            unit,
            labels,
            ..
        } = sample;
        let instance = if self.anonymize_instance {
            self.pseudonym(&instance)
        } else {
            instance
        };
        let mut labels = labels;
        // Taken out and put back so the loop can borrow `self` mutably without a clone per record.
        let names = std::mem::take(&mut self.config.anonymize.labels);
        for name in &names {
            if let Some(v) = labels.get_mut(name) {
                *v = self.anonymize_label(v);
            }
        }
        self.config.anonymize.labels = names;
        let service = if self.anonymize_service {
            self.pseudonym(&service)
        } else {
            service
        };
        let clean = CleanSample {
            service,
            instance,
            metric,
            value,
            unit,
            ts,
            labels,
        };
        Ok((format, clean))
    }

    /// The clean sample and its encoding, in the format it came in.
    fn clean(
        &mut self,
        input: &Input<'_>,
    ) -> Result<(codec::Format, CleanSample, Vec<u8>), Reject> {
        let (format, clean) = self.clean_sample(input)?;
        let payload = codec::encode_clean(&clean, format, &self.avro)
            .map_err(|e| reject("encode_failed", e.to_string()))?;
        Ok((format, clean, payload))
    }

    /// [`Stage::process`], also handing back the clean sample it emitted, so an in-process
    /// chain (replay) can give the window stage the sample instead of decoding it again.
    pub fn process_sample(
        &mut self,
        input: &Input<'_>,
        out: &mut Emitter,
    ) -> Option<(codec::Format, CleanSample)> {
        match self.clean(input) {
            Ok((format, sample, payload)) => {
                out.emit(clean_output(
                    input,
                    sample.service.as_bytes().to_vec(),
                    payload,
                ));
                Some((format, sample))
            }
            Err(Reject { reason, detail }) => {
                out.dead_letter(input, reason, detail);
                None
            }
        }
    }
}

/// The clean record of `input`: keyed by service, its headers carried over.
fn clean_output(input: &Input<'_>, key: Vec<u8>, payload: Vec<u8>) -> Output {
    Output {
        output: CLEAN,
        key,
        payload,
        headers: input
            .headers
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.to_vec()))
            .collect(),
    }
}

fn rfc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

impl Stage for FilterStage {
    fn name(&self) -> &'static str {
        "filter"
    }

    fn process(&mut self, input: &Input<'_>, out: &mut Emitter) {
        // As `process_sample`, with the sample's service moved into the key, not copied.
        match self.clean(input) {
            Ok((_, sample, payload)) => {
                out.emit(clean_output(input, sample.service.into_bytes(), payload));
            }
            Err(Reject { reason, detail }) => out.dead_letter(input, reason, detail),
        }
    }

    fn on_time(&mut self, now: DateTime<Utc>, _out: &mut Emitter) {
        self.now = now;
    }
}
