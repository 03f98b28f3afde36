//! `[decide]`: the scale and restart policies and their safety limits. Every default is
//! written here, on its field, once; `ebb run`, `ebb demo` and `ebb replay` read this table.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// The decide stage's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecideConfig {
    /// Consumer group. Default `ebb-decide`.
    pub group_id: String,
    /// Transactional id of this instance's producer. Each running decide instance needs its
    /// own (e.g. the pod name): a restarted instance with the same id fences its zombie.
    /// `EBB_DECIDE_TRANSACTIONAL_ID` overrides. Default `ebb-decide`.
    pub transactional_id: String,
    /// The models signal whose forecasts drive scaling (a load, e.g. requests per second).
    /// Default `requests_per_s`.
    pub load_signal: String,
    /// A models signal that is a per-instance utilization in percent, used to learn the
    /// capacity of one replica when none is configured. Default `cpu`; empty to disable.
    pub utilization_signal: String,
    /// Record commands but let actuators skip them, for every service not overridden.
    /// Default off.
    pub shadow: bool,
    /// `[decide.scale]`.
    pub scale: ScaleConfig,
    /// `[decide.restart]`.
    pub restart: RestartConfig,
    /// `[decide.services."<name>"]`: per-service overrides.
    pub services: BTreeMap<String, ServiceOverride>,
}

impl Default for DecideConfig {
    fn default() -> Self {
        Self {
            group_id: "ebb-decide".into(),
            transactional_id: "ebb-decide".into(),
            load_signal: "requests_per_s".into(),
            utilization_signal: "cpu".into(),
            shadow: false,
            scale: ScaleConfig::default(),
            restart: RestartConfig::default(),
            services: BTreeMap::new(),
        }
    }
}

/// `[decide.scale]`: desired replicas from the forecast, and the limits that keep it safe.
/// The stabilization windows and the reactive rule follow the Kubernetes HPA's `behavior`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScaleConfig {
    /// Load one replica serves at 100% (units of the load signal). Unset (the default), it
    /// is learned per service from the load per replica and the utilization signal.
    pub capacity_per_replica: Option<f64>,
    /// Utilization each replica should run at. Default 0.7.
    pub target_utilization: f64,
    /// The reactive rule does nothing while utilization is within this fraction of the
    /// target (the HPA's tolerance). Default 0.1.
    pub tolerance: f64,
    /// Default 1.
    pub min_replicas: u32,
    /// Default 50.
    pub max_replicas: u32,
    /// Replicas one decision may add: the larger of this and `max_step_up_percent` of the
    /// current count (as the HPA's default "4 pods or 100%"). Default 4.
    pub max_step_up: u32,
    /// Default 100.
    pub max_step_up_percent: u32,
    /// Replicas one decision may remove: the larger of this and `max_step_down_percent` of
    /// the current count. Default 2.
    pub max_step_down: u32,
    /// Default 50.
    pub max_step_down_percent: u32,
    /// The steps above are allowed once per this much of the window decided on (as the
    /// HPA's `periodSeconds`), compounding: a 5-minute window may move as far as twenty
    /// 15-second ones, so long windows do not make the policy slower than the HPA.
    /// Default 15s, the HPA's.
    #[serde(with = "humantime_serde")]
    pub step_period: Duration,
    /// Scale up to the lowest recommendation of this long. Default 0s, the HPA's: a load
    /// already over the forecast is met at once, as the HPA meets it. Waiting to tell a
    /// one-window spike from a lasting step cost several times the HPA's SLA-violation
    /// minutes on steps in one-minute and ten-second data; what a spike's replicas cost
    /// instead is bounded by `cost_ceiling`.
    #[serde(with = "humantime_serde")]
    pub up_stabilization: Duration,
    /// Scale down to the highest recommendation of this long (HPA default 5m).
    #[serde(with = "humantime_serde")]
    pub down_stabilization: Duration,
    /// No scale command for this long after the last one. Default 0s, as the HPA, whose
    /// stabilization windows alone keep it from flapping: a pause after a first step up
    /// would leave a service short through a rise larger than one step.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// How long a new replica takes to serve: the forecast horizon that covers it is used,
    /// and a scale action counts as in progress this long. Default 1m.
    #[serde(with = "humantime_serde")]
    pub startup_time: Duration,
    /// A forecast older than this at a decision is stale: the reactive rule decides.
    /// Default 3m.
    #[serde(with = "humantime_serde")]
    pub forecast_staleness: Duration,
    /// Headroom, as a fraction of the forecast's interval above its value: 0 plans for the
    /// forecast, 1 for its upper bound. Default 0.1.
    pub headroom: f64,
    /// The replica-minutes of a service stay within this multiple of what the Kubernetes
    /// HPA rule (its default `behavior` at `target_utilization`) runs on the same load,
    /// counted since the service's policy state began: headroom is bought only while under
    /// it, and over it the policy asks for no more replicas than that rule would. So
    /// forecast-driven scaling never costs more than the autoscaler it replaces, and spends
    /// what its forecasts save where they expect a rise. 0 turns the ceiling off. Default 1.
    pub cost_ceiling: f64,
    /// A forecast whose recent error exceeds this fraction of the load is worse than the
    /// reactive rule can do: fall back (a forecast worse than naive falls back anyway: the
    /// forecaster then leads with the naive value). Default 2.
    pub max_forecast_error: f64,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        Self {
            capacity_per_replica: None,
            target_utilization: 0.7,
            tolerance: 0.1,
            min_replicas: 1,
            max_replicas: 50,
            max_step_up: 4,
            max_step_up_percent: 100,
            max_step_down: 2,
            max_step_down_percent: 50,
            step_period: Duration::from_secs(15),
            up_stabilization: Duration::ZERO,
            down_stabilization: Duration::from_secs(300),
            cooldown: Duration::ZERO,
            startup_time: Duration::from_secs(60),
            forecast_staleness: Duration::from_secs(180),
            headroom: 0.1,
            cost_ceiling: 1.0,
            max_forecast_error: 2.0,
        }
    }
}

impl ScaleConfig {
    /// The Kubernetes HPA's default `behavior` around this config's target utilization and
    /// limits: the reactive baseline that savings are counted against and replay compares.
    pub fn hpa_baseline(&self) -> ScaleConfig {
        ScaleConfig {
            tolerance: 0.1,
            // The HPA's default policies: up by 4 pods or 100%, down by 100%, every 15 s.
            max_step_up: 4,
            max_step_up_percent: 100,
            max_step_down: 0,
            max_step_down_percent: 100,
            step_period: Duration::from_secs(15),
            up_stabilization: Duration::ZERO,
            down_stabilization: Duration::from_secs(300),
            cooldown: Duration::ZERO,
            headroom: 0.0,
            cost_ceiling: 0.0,
            ..self.clone()
        }
    }
}

/// `[decide.restart]`: when one instance is sick enough to restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    /// Restart at all. Default on.
    pub enabled: bool,
    /// Health metrics whose worst instance is looked at. Default `errors_per_s`,
    /// `latency_p95_ms`.
    pub metrics: Vec<String>,
    /// Windows in a row the same instance must stand out while an anomaly is open.
    /// Default 3.
    pub persist_windows: u32,
    /// An instance stands out when its highest sample is at least this many times the
    /// service's median sample of the metric. Default 3.
    pub dominance: f64,
    /// An anomaly stays open this long after the last anomaly event. Default 5m.
    #[serde(with = "humantime_serde")]
    pub anomaly_hold: Duration,
    /// At most one restart per service per this interval. Default 10m.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Never restart more than this fraction of a service's instances within `interval`
    /// (a single-instance service is never restarted at the default). Default 0.34.
    pub max_fraction: f64,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            metrics: vec!["errors_per_s".into(), "latency_p95_ms".into()],
            persist_windows: 3,
            dominance: 3.0,
            anomaly_hold: Duration::from_secs(300),
            interval: Duration::from_secs(600),
            max_fraction: 0.34,
        }
    }
}

/// `[decide.services."<name>"]`: what one service does differently.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceOverride {
    /// Shadow mode for this service: commands are recorded, actuators skip them.
    pub shadow: Option<bool>,
    /// Capacity of one replica.
    pub capacity_per_replica: Option<f64>,
    /// Minimum replicas.
    pub min_replicas: Option<u32>,
    /// Maximum replicas.
    pub max_replicas: Option<u32>,
}

/// The scale limits in force for one service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceLimits {
    /// Shadow mode.
    pub shadow: bool,
    /// Configured capacity of one replica.
    pub capacity_per_replica: Option<f64>,
    /// Minimum replicas.
    pub min_replicas: u32,
    /// Maximum replicas.
    pub max_replicas: u32,
}

impl DecideConfig {
    /// The limits for `service`: its overrides over the defaults.
    pub fn limits(&self, service: &str) -> ServiceLimits {
        let o = self.services.get(service);
        ServiceLimits {
            shadow: o.and_then(|o| o.shadow).unwrap_or(self.shadow),
            capacity_per_replica: o
                .and_then(|o| o.capacity_per_replica)
                .or(self.scale.capacity_per_replica),
            min_replicas: o
                .and_then(|o| o.min_replicas)
                .unwrap_or(self.scale.min_replicas),
            max_replicas: o
                .and_then(|o| o.max_replicas)
                .unwrap_or(self.scale.max_replicas),
        }
    }

    /// Checks every range once, at start-up, naming the key. `signals` are the models
    /// signal names the load and utilization signals must be among.
    pub fn validate(&self, signals: &[&str]) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| {
            Err(ConfigError::Invalid {
                key: format!("decide.{key}"),
                why: why.into(),
            })
        };
        if self.group_id.trim().is_empty() {
            return bad("group_id", "must not be empty");
        }
        if self.transactional_id.trim().is_empty() {
            return bad("transactional_id", "must not be empty");
        }
        if !signals.contains(&self.load_signal.as_str()) {
            return bad("load_signal", "must name one of models.signals");
        }
        if !self.utilization_signal.is_empty()
            && !signals.contains(&self.utilization_signal.as_str())
        {
            return bad(
                "utilization_signal",
                "must name one of models.signals (or be empty)",
            );
        }
        let s = &self.scale;
        let capacity_ok = |c: Option<f64>| c.is_none_or(|c| c.is_finite() && c > 0.0);
        if !capacity_ok(s.capacity_per_replica) {
            return bad("scale.capacity_per_replica", "must be a positive number");
        }
        if !(s.target_utilization > 0.0 && s.target_utilization <= 1.0) {
            return bad("scale.target_utilization", "must be in (0, 1]");
        }
        if !(0.0..1.0).contains(&s.tolerance) {
            return bad("scale.tolerance", "must be in [0, 1)");
        }
        if s.min_replicas > s.max_replicas || s.max_replicas == 0 {
            return bad(
                "scale.max_replicas",
                "must be positive and at least scale.min_replicas",
            );
        }
        if s.max_step_up == 0 || s.max_step_down == 0 {
            return bad("scale.max_step_up", "steps up and down must be at least 1");
        }
        if s.max_step_down_percent > 100 {
            return bad("scale.max_step_down_percent", "must be at most 100");
        }
        if s.startup_time.is_zero() {
            return bad("scale.startup_time", "must be positive");
        }
        if !(0.0..=1.0).contains(&s.headroom) {
            return bad("scale.headroom", "must be between 0 and 1");
        }
        if !(s.cost_ceiling == 0.0 || (0.5..=10.0).contains(&s.cost_ceiling)) {
            return bad(
                "scale.cost_ceiling",
                "must be 0 (off) or between 0.5 and 10",
            );
        }
        if s.step_period.is_zero() {
            return bad("scale.step_period", "must be above zero");
        }
        if s.forecast_staleness.is_zero() {
            return bad("scale.forecast_staleness", "must be positive");
        }
        if s.max_forecast_error.is_nan() || s.max_forecast_error <= 0.0 {
            return bad("scale.max_forecast_error", "must be positive");
        }
        let r = &self.restart;
        if r.persist_windows == 0 {
            return bad("restart.persist_windows", "must be at least 1");
        }
        if r.dominance.is_nan() || r.dominance < 1.0 {
            return bad("restart.dominance", "must be at least 1");
        }
        if !(r.max_fraction > 0.0 && r.max_fraction <= 1.0) {
            return bad("restart.max_fraction", "must be in (0, 1]");
        }
        if r.interval.is_zero() {
            return bad("restart.interval", "must be positive");
        }
        for (name, o) in &self.services {
            if !capacity_ok(o.capacity_per_replica) {
                return bad(
                    &format!("services.\"{name}\".capacity_per_replica"),
                    "must be a positive number",
                );
            }
            let limits = self.limits(name);
            if limits.min_replicas > limits.max_replicas || limits.max_replicas == 0 {
                return bad(
                    &format!("services.\"{name}\".max_replicas"),
                    "must be positive and at least min_replicas",
                );
            }
        }
        Ok(())
    }
}
