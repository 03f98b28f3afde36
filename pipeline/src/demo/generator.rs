//! Synthetic telemetry: several services with daily seasonality, noise, bursts, a load ramp,
//! a faulty instance, and a steady trickle of bad records of every kind the filter rejects.
//!
//! Pure and seeded: the same seed and the same times give the same records, so the demo,
//! `ebb produce --synthetic`, tests and replays can all rely on it.

use std::collections::BTreeMap;
use std::f64::consts::PI;

use chrono::{DateTime, Duration, FixedOffset, SecondsFormat, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::codec::avro::encode_raw;
use crate::record::{RawTimestamp, TelemetrySample};

/// Which kind of record was generated (what the filter should do with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A good sample.
    Good,
    /// A bad record, with the dead-letter reason the filter must give it.
    Bad(&'static str),
}

/// One generated record, ready to produce.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Kafka key (the service, except for the empty-key fault).
    pub key: Vec<u8>,
    /// Value bytes.
    pub payload: Vec<u8>,
    /// What it is.
    pub kind: Kind,
}

/// Wire format of generated records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// JSON.
    Json,
    /// Confluent Avro under this raw schema id.
    Avro(u32),
}

/// Generator settings.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Number of services.
    pub services: usize,
    /// Instances per service.
    pub instances: usize,
    /// Fraction of records replaced by a bad record (0..1).
    pub fault_rate: f64,
    /// Seed.
    pub seed: u64,
    /// Load ramp on the first service, a faulty instance on the second, random bursts.
    /// Off, every good record is one the filter must accept.
    pub incidents: bool,
}

const SERVICE_NAMES: &[&str] = &[
    "checkout",
    "search",
    "payments",
    "catalog",
    "auth",
    "gateway",
    "inventory",
    "shipping",
    "reviews",
    "ads",
    "profile",
    "recommend",
];

/// The bad-record kinds injected, with the reason the filter must give each.
pub const FAULTS: &[&str] = &[
    "malformed",
    "missing_field",
    "wrong_type",
    "not_finite",
    "out_of_range",
    "too_old",
    "in_future",
    "empty_key",
    "invalid_timestamp",
    "outlier",
];

#[derive(Debug, Clone)]
struct ServiceModel {
    name: String,
    base_rps: f64,
    base_latency: f64,
    phase: f64,
}

/// The generator.
#[derive(Debug)]
pub struct Generator {
    config: GeneratorConfig,
    format: WireFormat,
    services: Vec<ServiceModel>,
    rng: ChaCha8Rng,
    noise: Normal<f64>,
    start: Option<DateTime<Utc>>,
    burst_until: BTreeMap<usize, DateTime<Utc>>,
    ticks: u64,
}

impl Generator {
    /// A generator with `config`, writing `format`.
    pub fn new(config: GeneratorConfig, format: WireFormat) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let services = (0..config.services)
            .map(|i| {
                let base = SERVICE_NAMES[i % SERVICE_NAMES.len()];
                let name = if i < SERVICE_NAMES.len() {
                    base.to_string()
                } else {
                    format!("{base}-{}", i / SERVICE_NAMES.len())
                };
                ServiceModel {
                    name,
                    base_rps: rng.random_range(50.0..800.0),
                    base_latency: rng.random_range(20.0..120.0),
                    phase: rng.random_range(0.0..24.0),
                }
            })
            .collect();
        let noise = Normal::new(0.0, 1.0).unwrap_or_else(|_| unreachable!("unit normal is valid"));
        Self {
            config,
            format,
            services,
            rng,
            noise,
            start: None,
            burst_until: BTreeMap::new(),
            ticks: 0,
        }
    }

    /// The service names, in order.
    pub fn service_names(&self) -> Vec<String> {
        self.services.iter().map(|s| s.name.clone()).collect()
    }

    /// The samples measured at `at`: every metric of every instance of every service, with
    /// some replaced by bad records.
    pub fn tick(&mut self, at: DateTime<Utc>) -> Vec<Generated> {
        let start = *self.start.get_or_insert(at);
        self.ticks += 1;
        let seconds = (at - start).num_milliseconds() as f64 / 1000.0;
        let mut out = Vec::with_capacity(self.services.len() * self.config.instances * 5);
        for si in 0..self.services.len() {
            let svc = self.services[si].clone();
            let hour = f64::from(chrono::Timelike::hour(&at))
                + f64::from(chrono::Timelike::minute(&at)) / 60.0;
            let daily = 1.0 + 0.4 * (2.0 * PI * (hour - svc.phase) / 24.0).sin();
            // Service 0 ramps to four times its load between 10 s and 40 s, then holds: soon
            // enough that a one-minute demo shows the scale-up it calls for.
            let incidents = self.config.incidents;
            let ramp = if si == 0 && incidents {
                1.0 + 3.0 * ((seconds - 10.0) / 30.0).clamp(0.0, 1.0)
            } else {
                1.0
            };
            if incidents && !self.burst_until.contains_key(&si) && self.rng.random_bool(0.002) {
                self.burst_until
                    .insert(si, at + Duration::seconds(self.rng.random_range(5..30)));
            }
            let burst = match self.burst_until.get(&si) {
                Some(until) if *until > at => 1.6,
                Some(_) => {
                    self.burst_until.remove(&si);
                    1.0
                }
                None => 1.0,
            };
            let rps_total = svc.base_rps * daily * ramp * burst;
            for ii in 0..self.config.instances {
                // Instance 0 of service 1 turns faulty after 35 s (once the models have warmed
                // up on a demo's short windows): its latency and errors jump and stay.
                let faulty =
                    incidents && si == 1 % self.services.len().max(1) && ii == 0 && seconds > 35.0;
                let rps = rps_total / self.config.instances as f64
                    * (1.0 + 0.05 * self.noise.sample(&mut self.rng));
                let util = (rps / (svc.base_rps / self.config.instances as f64 * 2.5)).min(1.0);
                let cpu = (100.0 * util + 3.0 * self.noise.sample(&mut self.rng)).clamp(1.0, 99.0);
                let mem =
                    (40.0 + 20.0 * util + 2.0 * self.noise.sample(&mut self.rng)).clamp(5.0, 98.0);
                let mut latency = svc.base_latency
                    * (1.0 + 2.0 * util.powi(4))
                    * (1.0 + 0.08 * self.noise.sample(&mut self.rng)).max(0.2);
                let mut errors =
                    (rps * 0.002 * (1.0 + self.noise.sample(&mut self.rng).abs())).max(0.0);
                if faulty {
                    latency *= 6.0;
                    errors = rps * 0.25;
                }
                let instance = format!("{}-{:x}", svc.name, 0x5f00 + ii);
                for (metric, value, unit) in [
                    ("requests_per_s", rps.max(0.0), "1/s"),
                    ("cpu", cpu, "percent"),
                    ("memory", mem, "percent"),
                    ("latency_p95_ms", latency, "ms"),
                    ("errors_per_s", errors, "1/s"),
                ] {
                    let good = self.sample((&svc.name, &instance, ii), (metric, value, unit), at);
                    if self.rng.random_bool(self.config.fault_rate.clamp(0.0, 1.0)) {
                        let fault = FAULTS[self.rng.random_range(0..FAULTS.len())];
                        out.push(self.bad(fault, &good, at));
                    } else {
                        out.push(self.encode(&good, Kind::Good));
                    }
                }
            }
        }
        out
    }

    /// One measurement `(metric, value, unit)` of `instance` (the `ii`-th) of `service`.
    fn sample(
        &mut self,
        (service, instance, ii): (&str, &str, usize),
        (metric, value, unit): (&str, f64, &str),
        at: DateTime<Utc>,
    ) -> TelemetrySample {
        // Instances report time in different ways, as real fleets do.
        let ts = match ii % 4 {
            0 => RawTimestamp::Text(at.to_rfc3339_opts(SecondsFormat::Millis, true)),
            1 => RawTimestamp::Int(at.timestamp_millis()),
            2 => {
                let offset = FixedOffset::east_opt(2 * 3600)
                    .unwrap_or_else(|| unreachable!("+02:00 is valid"));
                RawTimestamp::Text(
                    at.with_timezone(&offset)
                        .to_rfc3339_opts(SecondsFormat::Millis, false),
                )
            }
            _ => RawTimestamp::Float(at.timestamp_micros() as f64 / 1e6),
        };
        let user = self.rng.random_range(1000..1100);
        let labels = BTreeMap::from([
            ("zone".to_string(), format!("eu-{}", 1 + ii % 3)),
            ("user_id".to_string(), format!("u-{user}")),
            (
                "client_ip".to_string(),
                format!("198.51.100.{}", 1 + user % 250),
            ),
        ]);
        TelemetrySample {
            service: service.to_string(),
            instance: instance.to_string(),
            metric: metric.to_string(),
            value,
            unit: Some(unit.to_string()),
            ts,
            labels,
        }
    }

    fn encode(&self, s: &TelemetrySample, kind: Kind) -> Generated {
        let payload = match self.format {
            WireFormat::Json => json_raw(s),
            WireFormat::Avro(id) => encode_raw(s, id).unwrap_or_else(|_| json_raw(s)),
        };
        Generated {
            key: s.service.as_bytes().to_vec(),
            payload,
            kind,
        }
    }

    fn bad(&mut self, fault: &'static str, good: &TelemetrySample, at: DateTime<Utc>) -> Generated {
        let mut s = good.clone();
        let kind = Kind::Bad(fault);
        let raw_json = |text: String| Generated {
            key: good.service.as_bytes().to_vec(),
            payload: text.into_bytes(),
            kind,
        };
        match fault {
            "malformed" => {
                let full = String::from_utf8_lossy(&json_raw(good)).into_owned();
                raw_json(full[..full.len() / 2].to_string())
            }
            "missing_field" => raw_json(format!(
                r#"{{"service":"{}","metric":"{}","value":1.0,"ts":"{}"}}"#,
                s.service,
                s.metric,
                at.to_rfc3339()
            )),
            "wrong_type" => raw_json(format!(
                r#"{{"service":"{}","instance":"{}","metric":"{}","value":{{"v":1}},"ts":"{}"}}"#,
                s.service,
                s.instance,
                s.metric,
                at.to_rfc3339()
            )),
            "not_finite" => {
                s.value = if self.rng.random_bool(0.5) {
                    f64::NAN
                } else {
                    f64::INFINITY
                };
                match self.format {
                    WireFormat::Avro(_) => self.encode(&s, kind),
                    WireFormat::Json => raw_json(
                        String::from_utf8_lossy(&json_raw(&TelemetrySample {
                            value: 0.0,
                            ..s.clone()
                        }))
                        .replace(r#""value":0.0"#, &format!(r#""value":"{}""#, s.value)),
                    ),
                }
            }
            "out_of_range" => {
                s.metric = "cpu".into();
                s.unit = Some("percent".into());
                s.value = if self.rng.random_bool(0.5) {
                    -12.0
                } else {
                    180.0
                };
                self.encode(&s, kind)
            }
            "too_old" => {
                s.ts = RawTimestamp::Int(self.rng.random_range(0..86_400));
                self.encode(&s, kind)
            }
            "in_future" => {
                s.ts = RawTimestamp::Text("3000-01-01T00:00:00Z".into());
                self.encode(&s, kind)
            }
            "invalid_timestamp" => {
                s.ts = RawTimestamp::Text("last tuesday".into());
                self.encode(&s, kind)
            }
            "empty_key" => {
                let mut g = self.encode(&s, kind);
                g.key.clear();
                g
            }
            _ => {
                // A glitch: a reading ten thousand times too large. Injected only once every
                // series has the history the Hampel test needs (min_samples 16, plus room for
                // other faults), so its verdict is certain; before that, the good sample goes.
                if self.ticks <= 24 {
                    return self.encode(good, Kind::Good);
                }
                // Latency always: it is tested (error counts are not) and is never below 20 ms,
                // so 10^4 x (1 + v) is at least ~25x its median.
                s.value = 1e4 * (1.0 + good.value.abs()) * (1.0 + self.rng.random::<f64>());
                s.metric = "latency_p95_ms".into();
                s.unit = Some("ms".into());
                self.encode(&s, kind)
            }
        }
    }
}

/// A raw sample as contract JSON.
pub fn json_raw(s: &TelemetrySample) -> Vec<u8> {
    let ts = match &s.ts {
        RawTimestamp::Text(t) => serde_json::Value::String(t.clone()),
        RawTimestamp::Int(n) => serde_json::Value::from(*n),
        RawTimestamp::Float(f) => serde_json::Value::from(*f),
    };
    let mut obj = serde_json::json!({
        "service": s.service, "instance": s.instance, "metric": s.metric,
        "value": s.value, "ts": ts, "labels": s.labels,
    });
    if let (Some(unit), Some(map)) = (&s.unit, obj.as_object_mut()) {
        map.insert("unit".into(), serde_json::Value::String(unit.clone()));
    }
    serde_json::to_vec(&obj).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(fault_rate: f64) -> GeneratorConfig {
        GeneratorConfig {
            services: 4,
            instances: 3,
            fault_rate,
            seed: 9,
            incidents: true,
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_717_243_200 + secs, 0).unwrap_or_default()
    }

    #[test]
    fn same_seed_same_records() {
        let mut a = Generator::new(cfg(0.05), WireFormat::Json);
        let mut b = Generator::new(cfg(0.05), WireFormat::Json);
        for i in 0..20 {
            let (x, y) = (a.tick(at(i)), b.tick(at(i)));
            assert_eq!(
                x.iter().map(|g| &g.payload).collect::<Vec<_>>(),
                y.iter().map(|g| &g.payload).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn one_sample_per_metric_per_instance_per_service() {
        let mut g = Generator::new(cfg(0.0), WireFormat::Json);
        let records = g.tick(at(0));
        assert_eq!(records.len(), 4 * 3 * 5);
        assert!(records.iter().all(|r| r.kind == Kind::Good));
        assert!(records
            .iter()
            .all(|r| crate::codec::json::decode_sample(&r.payload).is_ok()));
    }

    #[test]
    fn faults_of_every_kind_appear() {
        let mut g = Generator::new(cfg(0.2), WireFormat::Json);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..100 {
            for r in g.tick(at(i)) {
                if let Kind::Bad(reason) = r.kind {
                    seen.insert(reason);
                }
            }
        }
        assert_eq!(seen.len(), FAULTS.len(), "{seen:?}");
    }
}
