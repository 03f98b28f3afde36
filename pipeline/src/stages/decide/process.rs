//! The decide stage's pure step: window aggregates, forecasts and anomalies in; scale and
//! restart commands out, each with its policy, evidence and reason.
//!
//! Decisions are driven by event time, not by arrival: a service is decided once per
//! window, when its aggregates for the window are in and, when the models stage forecasts at
//! the window's end, that forecast too (a join on the window's end, as a stream-table join
//! would wait for its table side). The forecast used is the latest made by the window's end,
//! so a decision sees the load of the window it decides on; anomalies are those of windows
//! that ended by the window's start. A forecast that never comes (models down or lagging a
//! whole window) does not hold the decision: the service's next window decides it with the
//! forecast there is, and the staleness rule judges that one.
//!
//! State (per service: policy history, recent forecasts and anomalies, the open window) is
//! written to a compacted state topic at each flush, inside the same Kafka transaction as
//! the commands and the input offsets: a restarted or rebalanced instance restores it and
//! continues exactly where the last commit left off.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::config::DecideConfig;
use super::policy::{
    self, ForecastView, Health, Observation, RestartState, ScaleDecision, ScaleState,
    StoredForecast,
};
use crate::codec::{self, AvroCodec, EventSchema, Format};
use crate::stage::{Emitter, Input, Output, Stage};
use crate::stages::models::config::SignalSpec;
use crate::stages::models::process::{AnomalyEvent, ForecastEvent};
use crate::stages::window::aggregate::ms_to_rfc3339;
use crate::stages::window::WindowAggregate;

/// Output name of commands.
pub const COMMANDS: &str = "commands";
/// Output name of state snapshots (a compacted topic keyed by service).
pub const STATE: &str = "state";
/// Version of the snapshot layout; a snapshot of another layout is not restored.
pub const SNAPSHOT_LAYOUT: u32 = 1;
/// Forecasts kept per service (the decision uses the latest made by its window's end).
const FORECASTS_KEPT: usize = 8;

/// Every reason the decide stage dead-letters a record: the decode reasons of its three
/// inputs, and a record of a topic the stage was not wired to.
pub const REASONS: &[&str] = &[
    "empty_payload",
    "unknown_format",
    "malformed",
    "missing_field",
    "wrong_type",
    "unknown_schema_id",
    "unknown_topic",
];

/// What the stage has done.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecideCounts {
    /// Service windows decided.
    pub decisions: u64,
    /// Scale commands.
    pub scales: u64,
    /// Restart commands.
    pub restarts: u64,
    /// Decisions by the reactive rule (no usable forecast).
    pub reactive: u64,
    /// Inputs for windows already decided, skipped.
    pub duplicates: u64,
}

/// The topics the stage reads, to tell its inputs apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecideInputs {
    /// Window aggregates.
    pub aggregates: String,
    /// Forecasts.
    pub forecasts: String,
    /// Anomaly events.
    pub anomalies: String,
}

/// A command on the commands topic (`schemas/commands.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Deterministic: `service/window_end_ms/action`, so a replay or a retry is idempotent.
    pub command_id: String,
    /// Service.
    pub service: String,
    /// `scale` or `restart`.
    pub action: String,
    /// For `scale`: the replicas to run.
    pub replicas: Option<u32>,
    /// For `restart`: the instance (as the pipeline knows it, pseudonymised or not).
    pub instance: Option<String>,
    /// The policy that fired: `forecast`, `reactive` or `restart`.
    pub policy: String,
    /// A sentence a person can read.
    pub reason: String,
    /// What the decision rested on.
    pub evidence: Evidence,
    /// The end of the window decided on (RFC 3339, UTC).
    pub decided_at: String,
    /// Shadow mode: recorded, not to be carried out.
    pub shadow: bool,
}

/// The numbers behind a command.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Replicas counted as current.
    pub current_replicas: u32,
    /// What the rule asked for before the safety limits.
    pub desired_replicas: Option<u32>,
    /// The load in the window.
    pub load: Option<f64>,
    /// Utilization of a replica, as a fraction.
    pub utilization: Option<f64>,
    /// Capacity of one replica used.
    pub capacity_per_replica: Option<f64>,
    /// The forecast considered.
    pub forecast: Option<ForecastView>,
    /// Why the forecast was not used.
    pub fallback: Option<String>,
    /// Safety limits that changed the answer.
    pub limits: Vec<String>,
    /// Anomaly scores of the open anomaly.
    pub anomaly_scores: Vec<f64>,
    /// For restarts: the health metric pointing at the instance.
    pub health_metric: Option<String>,
    /// For restarts: the instance's highest sample over the service's median.
    pub health_ratio: Option<f64>,
}

/// The window being gathered for a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OpenWindow {
    start: i64,
    end: i64,
    load: Option<f64>,
    utilization: Option<f64>,
    replicas: Option<u32>,
    health: Vec<(String, Option<String>, f64, f64)>,
    /// The wire format of the window's aggregates: its commands leave in it. (Absent from
    /// snapshots taken before commands could be Avro: JSON, as they were.)
    #[serde(default)]
    format: Format,
}

/// A service's state, as snapshotted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ServiceState {
    layout: u32,
    service: String,
    #[serde(skip)]
    partition: i32,
    scale: ScaleState,
    restart: RestartState,
    forecasts: VecDeque<StoredForecast>,
    open: Option<OpenWindow>,
    last_window_end: i64,
}

impl ServiceState {
    fn new(service: &str, partition: i32) -> Self {
        Self {
            layout: SNAPSHOT_LAYOUT,
            service: service.to_string(),
            partition,
            scale: ScaleState::default(),
            restart: RestartState::default(),
            forecasts: VecDeque::new(),
            open: None,
            last_window_end: i64::MIN,
        }
    }
}

/// The decide stage.
#[derive(Debug)]
pub struct DecideStage {
    cfg: DecideConfig,
    load: SignalSpec,
    utilization: Option<SignalSpec>,
    inputs: DecideInputs,
    avro: AvroCodec,
    services: BTreeMap<String, ServiceState>,
    dirty: BTreeSet<String>,
    counts: DecideCounts,
    /// The `commands` SQL table, when the SQL engine runs in this process.
    store: Option<std::sync::Arc<crate::sql::store::WindowStore>>,
    /// The models stage's forecast step, ms: a window whose end passes a step's end gets a
    /// forecast made at its end, which its decision waits for.
    forecast_step_ms: Option<i64>,
}

fn parse_ms(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

impl DecideStage {
    /// A stage with a validated config; `signals` are the models signals (the load and
    /// utilization signals are looked up among them).
    pub fn new(
        cfg: DecideConfig,
        signals: &[SignalSpec],
        inputs: DecideInputs,
        avro: AvroCodec,
    ) -> Self {
        let find = |name: &str| signals.iter().find(|s| s.name == name).cloned();
        let load = find(&cfg.load_signal).unwrap_or_else(|| SignalSpec {
            name: cfg.load_signal.clone(),
            metric: cfg.load_signal.clone(),
            statistic: crate::stages::models::config::Statistic::Total,
        });
        let utilization = find(&cfg.utilization_signal);
        Self {
            cfg,
            load,
            utilization,
            inputs,
            avro,
            services: BTreeMap::new(),
            dirty: BTreeSet::new(),
            counts: DecideCounts::default(),
            store: None,
            forecast_step_ms: None,
        }
    }

    /// Decisions wait for the forecast the models stage makes every `step` (its
    /// `forecast_step`) at the end of the window being decided.
    pub fn expecting_forecasts_every(mut self, step: std::time::Duration) -> Self {
        self.forecast_step_ms = i64::try_from(step.as_millis()).ok().filter(|s| *s > 0);
        self
    }

    /// Whether `open` has what its decision needs: the load, the utilization if one is
    /// configured, every health metric, and the forecast made at its end when one is due.
    fn complete(&self, state: &ServiceState) -> bool {
        let Some(open) = &state.open else {
            return false;
        };
        let forecast_due = match self.forecast_step_ms {
            // Only once the service's forecaster speaks at all (it is silent at first).
            Some(step) if !state.forecasts.is_empty() => {
                open.end.div_euclid(step) > open.start.div_euclid(step)
            }
            _ => false,
        };
        open.load.is_some()
            && (self.utilization.is_none() || open.utilization.is_some())
            && open.health.len() >= self.cfg.restart.metrics.len()
            && (!forecast_due || state.forecasts.iter().any(|f| f.made_at_ms == open.end))
    }

    /// Also keeps every command in `store` (the `commands` table) for SQL.
    pub fn with_store(mut self, store: std::sync::Arc<crate::sql::store::WindowStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// What the stage has done so far.
    pub fn counts(&self) -> DecideCounts {
        self.counts
    }

    fn state(&mut self, service: &str, partition: i32) -> &mut ServiceState {
        let state = self
            .services
            .entry(service.to_string())
            .or_insert_with(|| ServiceState::new(service, partition));
        state.partition = partition;
        state
    }

    fn on_forecast(&mut self, e: ForecastEvent, partition: i32, out: &mut Emitter) {
        if e.signal != self.load.name {
            return;
        }
        let Some(made_at_ms) = parse_ms(&e.made_at) else {
            return;
        };
        if e.horizons.is_empty() {
            return;
        }
        let stored = StoredForecast::new(made_at_ms, &e.status, &e.horizons);
        let service = e.service;
        let state = self.state(&service, partition);
        if state.forecasts.iter().any(|f| f.made_at_ms == made_at_ms) {
            return;
        }
        let at = state
            .forecasts
            .partition_point(|f| f.made_at_ms < made_at_ms);
        state.forecasts.insert(at, stored);
        while state.forecasts.len() > FORECASTS_KEPT {
            state.forecasts.pop_front();
        }
        let completes = state.open.as_ref().is_some_and(|o| o.end == made_at_ms);
        self.dirty.insert(service.clone());
        if completes
            && self
                .services
                .get(&service)
                .is_some_and(|s| self.complete(s))
        {
            self.decide(&service, out);
        }
    }

    fn on_anomaly(&mut self, e: AnomalyEvent, partition: i32) {
        let Some(end) = parse_ms(&e.window_end) else {
            return;
        };
        let service = e.service;
        self.state(&service, partition)
            .restart
            .anomaly(end, e.score);
        self.dirty.insert(service);
    }

    /// Decides on one decoded aggregate: the stage's step once the bytes are decoded, also
    /// called directly by an in-process chain (replay).
    pub fn on_aggregate(
        &mut self,
        a: WindowAggregate,
        format: Format,
        partition: i32,
        out: &mut Emitter,
    ) {
        let is_load = self.load.matches(&a.metric);
        let utilization = self
            .utilization
            .as_ref()
            .filter(|s| s.matches(&a.metric))
            .map(|s| s.statistic.of(&a) / 100.0);
        let is_health = self
            .cfg
            .restart
            .metrics
            .iter()
            .any(|m| crate::glob::glob_match(m, &a.metric));
        if !is_load && utilization.is_none() && !is_health {
            return;
        }
        let load_value = is_load.then(|| self.load.statistic.of(&a));
        let state = self.state(&a.service, partition);
        let open_end = state.open.as_ref().map(|o| o.end);
        if a.window_end <= state.last_window_end || open_end.is_some_and(|e| a.window_end < e) {
            self.counts.duplicates += 1;
            return;
        }
        let service = a.service.clone();
        if open_end.is_some_and(|e| a.window_end > e) {
            self.decide(&service, out);
        }
        let state = self.state(&service, partition);
        let open = state.open.get_or_insert_with(|| OpenWindow {
            start: a.window_start,
            end: a.window_end,
            load: None,
            utilization: None,
            replicas: None,
            health: Vec::new(),
            format,
        });
        if let Some(v) = load_value.filter(|v| v.is_finite()) {
            open.load = Some(v);
            open.replicas = u32::try_from(a.instances).ok();
        }
        if let Some(u) = utilization.filter(|u| u.is_finite()) {
            open.utilization = Some(u);
        }
        if is_health && !open.health.iter().any(|h| h.0 == a.metric) {
            open.health
                .push((a.metric.clone(), a.top_instance.clone(), a.max, a.p50));
        }
        self.dirty.insert(service.clone());
        if self
            .services
            .get(&service)
            .is_some_and(|s| self.complete(s))
        {
            self.decide(&service, out);
        }
    }

    /// Decides a service's open window.
    fn decide(&mut self, service: &str, out: &mut Emitter) {
        let cfg = &self.cfg;
        let limits = cfg.limits(service);
        let Some(state) = self.services.get_mut(service) else {
            return;
        };
        let Some(open) = state.open.take() else {
            return;
        };
        state.last_window_end = open.end;
        self.counts.decisions += 1;
        let hold_ms = i64::try_from(cfg.restart.anomaly_hold.as_millis()).unwrap_or(i64::MAX);
        let startup_ms = i64::try_from(cfg.scale.startup_time.as_millis()).unwrap_or(i64::MAX);
        let anomaly_scores = state
            .restart
            .scores_between(open.start - hold_ms, open.start);
        let obs = Observation {
            window_start: open.start,
            window_end: open.end,
            load: open.load,
            replicas: open.replicas.unwrap_or(0),
            utilization: open.utilization,
            forecast: state
                .forecasts
                .iter()
                .rev()
                .find(|f| f.made_at_ms <= open.end)
                // Replicas asked for now serve after the start-up and must carry the load
                // until the next window's decision serves: plan that far ahead.
                .and_then(|f| f.view(open.end, startup_ms.saturating_add(open.end - open.start))),
            anomaly_open: !anomaly_scores.is_empty(),
        };
        let decided_at = ms_to_rfc3339(open.end);
        let command = |action: &str, policy: &str, reason: String, evidence: Evidence| Command {
            command_id: format!("{service}/{}/{action}", open.end),
            service: service.to_string(),
            action: action.to_string(),
            replicas: None,
            instance: None,
            policy: policy.to_string(),
            reason,
            evidence,
            decided_at: decided_at.clone(),
            shadow: limits.shadow,
        };
        let scale = policy::scale(&mut state.scale, &cfg.scale, &limits, &obs);
        let mut commands = Vec::new();
        if let Some(d) = &scale {
            let ScaleDecision {
                target,
                from,
                policy,
                desired,
                fallback,
                limits: limited,
                capacity,
                utilization,
                planned_load: _,
                reason,
            } = d.clone();
            if fallback.is_some() {
                self.counts.reactive += 1;
            }
            let evidence = Evidence {
                current_replicas: from,
                desired_replicas: Some(desired),
                load: obs.load,
                utilization,
                capacity_per_replica: capacity,
                forecast: obs.forecast.clone(),
                fallback,
                limits: limited.iter().map(|s| (*s).to_string()).collect(),
                anomaly_scores: anomaly_scores.clone(),
                health_metric: None,
                health_ratio: None,
            };
            commands.push(Command {
                replicas: Some(target),
                ..command("scale", policy.as_str(), reason, evidence)
            });
            self.counts.scales += 1;
        }
        let scaling = scale.is_some()
            || state
                .scale
                .last_action_ms
                .is_some_and(|t| open.end - t < startup_ms);
        let health: Vec<Health> = open
            .health
            .iter()
            .map(|(metric, top, max, p50)| Health {
                metric: metric.clone(),
                top_instance: top.clone(),
                max: *max,
                p50: *p50,
            })
            .collect();
        if let Some(r) = policy::restart(&mut state.restart, &cfg.restart, &obs, &health, scaling) {
            let evidence = Evidence {
                current_replicas: obs.replicas,
                load: obs.load,
                utilization: obs.utilization,
                anomaly_scores: r.anomaly_scores.clone(),
                health_metric: Some(r.metric.clone()),
                health_ratio: Some(r.ratio),
                ..Evidence::default()
            };
            commands.push(Command {
                instance: Some(r.instance.clone()),
                ..command("restart", "restart", r.reason, evidence)
            });
            self.counts.restarts += 1;
        }
        if let Some(store) = self.store.as_ref().filter(|_| !commands.is_empty()) {
            // Ids are unique in the table: a command re-sent after an aborted transaction is
            // not listed twice.
            match super::table::to_batch(&commands) {
                Ok(batch) => store.insert_batch(batch),
                Err(e) => tracing::warn!(service, error = %e, "commands not stored for SQL"),
            }
        }
        for c in commands {
            let payload =
                match codec::encode_event(&c, EventSchema::Commands, open.format, &self.avro) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(service, error = %e, "command not encodable");
                        continue;
                    }
                };
            out.emit(Output {
                output: COMMANDS,
                key: service.as_bytes().to_vec(),
                payload,
                headers: vec![
                    ("ebb.command_id".into(), c.command_id.into_bytes()),
                    ("ebb.action".into(), c.action.into_bytes()),
                ],
            });
        }
    }
}

impl Stage for DecideStage {
    fn name(&self) -> &'static str {
        "decide"
    }

    fn process(&mut self, input: &Input<'_>, out: &mut Emitter) {
        let partition = input.source.partition;
        let Some(payload) = input.payload.filter(|p| !p.is_empty()) else {
            out.dead_letter(input, "empty_payload", "no value");
            return;
        };
        let topic = input.source.topic.as_str();
        if topic == self.inputs.aggregates {
            match codec::decode_aggregate(payload, &self.avro) {
                Ok((format, a)) => self.on_aggregate(a, format, partition, out),
                Err(e) => out.dead_letter(input, e.reason(), e.to_string()),
            }
        } else if topic == self.inputs.forecasts {
            match codec::decode_event::<ForecastEvent>(payload, EventSchema::Forecasts, &self.avro)
            {
                Ok((_, e)) => self.on_forecast(e, partition, out),
                Err(e) => out.dead_letter(input, e.reason(), format!("forecast: {e}")),
            }
        } else if topic == self.inputs.anomalies {
            match codec::decode_event::<AnomalyEvent>(payload, EventSchema::Anomalies, &self.avro) {
                Ok((_, e)) => self.on_anomaly(e, partition),
                Err(e) => out.dead_letter(input, e.reason(), format!("anomaly: {e}")),
            }
        } else {
            out.dead_letter(
                input,
                "unknown_topic",
                format!("decide does not read {topic}"),
            );
        }
    }

    fn flush(&mut self, out: &mut Emitter) {
        for service in std::mem::take(&mut self.dirty) {
            let Some(state) = self.services.get(&service) else {
                continue;
            };
            match serde_json::to_vec(state) {
                Ok(payload) => out.emit(Output {
                    output: STATE,
                    key: service.into_bytes(),
                    payload,
                    headers: Vec::new(),
                }),
                Err(e) => tracing::error!(service, error = %e, "decide state not serialisable"),
            }
        }
    }

    fn revoked(&mut self, partition: i32) {
        self.services.retain(|_, s| s.partition != partition);
        self.dirty
            .retain(|s| self.services.contains_key(s.as_str()));
    }

    fn restore_state(&mut self, partition: i32, records: &[(Vec<u8>, Vec<u8>)]) {
        for (_, value) in records {
            match serde_json::from_slice::<ServiceState>(value) {
                Ok(mut s) if s.layout == SNAPSHOT_LAYOUT => {
                    s.partition = partition;
                    self.services.insert(s.service.clone(), s);
                }
                Ok(s) => {
                    tracing::info!(service = %s.service, "decide state of another layout; starting fresh");
                }
                Err(e) => tracing::warn!(error = %e, "unreadable decide state ignored"),
            }
        }
    }
}
