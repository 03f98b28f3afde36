//! The models stage's pure step: window aggregates in; per service and window, one anomaly
//! event when the ensemble calls the window anomalous, and the load forecasts.
//!
//! A service's aggregates for one window arrive together (the window stage closes them
//! at once), so the stage gathers one window's signals and runs the models when the set is
//! complete, or when the service's next window starts. Model state is snapshotted per
//! service to the compacted state topic, and the committed offset stays at the oldest
//! aggregate not yet covered by a snapshot: after a crash or a rebalance the new owner
//! restores the snapshot, re-reads those aggregates, and carries on exactly where the
//! previous owner was, without emitting anything twice.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::config::ModelsConfig;
use super::detect::{AnomalyModel, DetectorScore};
use super::forecast::{Forecaster, Prediction};
use crate::codec::{self, AvroCodec, EventSchema, Format};
use crate::sql::store::WindowStore;
use crate::stage::{Checkpoint, Emitter, Input, Output, Restore, Stage};
use crate::stages::window::aggregate::ms_to_rfc3339;
use crate::stages::window::WindowAggregate;

/// Output name of anomaly events.
pub const ANOMALIES: &str = "anomalies";
/// Output name of forecasts.
pub const FORECASTS: &str = "forecasts";
/// Output name of model-state snapshots (a compacted topic keyed by service).
pub const STATE: &str = "state";
/// Event noted (and counted in `ebb_stage_events_total`) when a forecaster's regression broke
/// down numerically and started over.
pub const EVENT_MODEL_RESET: &str = "forecast_model_reset";
/// Event noted when a load signal stopped arriving while its service's windows still do.
pub const EVENT_INPUT_MISSING: &str = "load_signal_missing";
/// Every event the models stage notes.
pub const EVENTS: &[&str] = &[EVENT_MODEL_RESET, EVENT_INPUT_MISSING];

/// Version of the snapshot layout; a snapshot of another layout is not restored.
pub const SNAPSHOT_LAYOUT: u32 = 1;

/// Every reason the models stage dead-letters a record (aggregates that do not read as
/// aggregates: a producer other than the window stage wrote to the topic).
pub const REASONS: &[&str] = codec::DECODE_REASONS;

/// What the stage has done.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ModelsCounts {
    /// Windows the models ran on.
    pub windows: u64,
    /// Anomaly events emitted.
    pub anomalies: u64,
    /// Forecast records emitted.
    pub forecasts: u64,
    /// Snapshots emitted.
    pub snapshots: u64,
    /// Aggregates of a window already modelled (redeliveries), skipped.
    pub duplicates: u64,
    /// Aggregates of metrics no signal uses.
    pub unused: u64,
    /// Services restored from a snapshot.
    pub restored: u64,
    /// Forecasts published as `model_reset`: a regression broke down and started over.
    pub model_resets: u64,
    /// Load signals that went missing from a service's windows (`no_input` published).
    pub inputs_stale: u64,
}

/// An anomaly event: one per (service, window) the ensemble calls anomalous.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyEvent {
    /// Deterministic: `service/window_end_ms`.
    pub anomaly_id: String,
    /// Service.
    pub service: String,
    /// Window start (RFC 3339, UTC).
    pub window_start: String,
    /// Window end.
    pub window_end: String,
    /// Ensemble score in [0, 1).
    pub score: f64,
    /// `low`, `medium` or `high`, from the score.
    pub severity: String,
    /// k-means' verdict.
    pub kmeans: Option<DetectorScore>,
    /// DBSCAN's verdict.
    pub dbscan: Option<DetectorScore>,
    /// The features that drove it: `signal.feature` and its value in baseline deviations.
    pub drivers: Vec<Driver>,
    /// The window's signal values.
    pub signals: Vec<SignalValue>,
    /// Model version that scored it.
    pub model_version: u32,
}

/// One explaining feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Driver {
    /// `signal.kind`, e.g. `latency_p95_ms.level`.
    pub feature: String,
    /// Its value, in standard deviations of the service's own baseline.
    pub value: f64,
}

/// A signal's value in a window (absent when the window had no such aggregate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalValue {
    /// Signal name.
    pub signal: String,
    /// Value.
    pub value: Option<f64>,
}

/// The forecasts of one load signal made at one window's end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastEvent {
    /// Deterministic: `service/signal/window_end_ms`.
    pub forecast_id: String,
    /// Service.
    pub service: String,
    /// Signal forecast (e.g. `requests_per_s`).
    pub signal: String,
    /// When it was made: the window's end.
    pub made_at: String,
    /// The signal's mean over the forecast step that ended there (with `no_input`, the last
    /// value seen).
    pub current: f64,
    /// `ok`; `warming_up` while the forecaster has scored fewer than its first forecasts;
    /// `model_reset` when a regression broke down numerically and started over; `no_input`
    /// (no horizons) once when a step passes without the signal. Anything but `ok`:
    /// downstream uses its reactive rule.
    pub status: String,
    /// One per configured horizon.
    pub horizons: Vec<Prediction>,
    /// Model version.
    pub model_version: u32,
}

/// A service's model state as snapshotted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Snapshot layout version.
    pub layout: u32,
    /// The configured model version that built it.
    pub model_version: u32,
    /// Service.
    pub service: String,
    /// End of the last window modelled, epoch ms.
    pub last_window_end: i64,
    /// Windows modelled.
    pub windows: u64,
    /// The anomaly model.
    pub anomaly: AnomalyModel,
    /// One forecaster per load signal, in config order.
    pub forecasters: Vec<Forecaster>,
    /// The forecast step being accumulated: per load signal (sum, count).
    pub step_acc: Vec<(f64, u32)>,
    /// Its end.
    pub step_end: i64,
}

#[derive(Debug)]
struct Open {
    start: i64,
    end: i64,
    values: Vec<Option<f64>>,
    first_offset: i64,
    /// The wire format of the window's aggregates: its anomaly and forecasts leave in it.
    format: Format,
}

#[derive(Debug)]
struct ServiceState {
    partition: i32,
    anomaly: AnomalyModel,
    forecasters: Vec<Forecaster>,
    open: Option<Open>,
    last_window_end: i64,
    windows: u64,
    since_snapshot: u64,
    /// First input offset modelled since the last snapshot: re-read from here to rebuild.
    dirty_from: Option<i64>,
    /// Per load signal, (sum, count) of the windows in the current forecast step.
    step_acc: Vec<(f64, u32)>,
    /// End of the current forecast step (epoch ms); `i64::MIN` before the first window.
    step_end: i64,
}

/// The `anomalies` and `forecasts` SQL tables, when the SQL engine runs in this process.
#[derive(Debug, Clone)]
pub struct ModelTables {
    /// One row per anomaly event.
    pub anomalies: Arc<WindowStore>,
    /// One row per forecast and horizon.
    pub forecasts: Arc<WindowStore>,
}

/// The models stage.
#[derive(Debug)]
pub struct ModelsStage {
    cfg: ModelsConfig,
    names: Vec<String>,
    load: Vec<usize>,
    avro: AvroCodec,
    services: HashMap<String, ServiceState>,
    snapshots: HashMap<String, Snapshot>,
    restores: HashMap<i32, Restore>,
    counts: ModelsCounts,
    tables: Option<ModelTables>,
}

impl ModelsStage {
    /// A stage with a validated config.
    pub fn new(cfg: ModelsConfig, avro: AvroCodec) -> Self {
        let names: Vec<String> = cfg.signals.iter().map(|s| s.name.clone()).collect();
        let load = cfg
            .forecast_signals
            .iter()
            .filter_map(|f| names.iter().position(|n| n == f))
            .collect();
        Self {
            cfg,
            names,
            load,
            avro,
            services: HashMap::new(),
            snapshots: HashMap::new(),
            restores: HashMap::new(),
            counts: ModelsCounts::default(),
            tables: None,
        }
    }

    /// Also writes what the stage emits to the `anomalies` and `forecasts` SQL tables.
    #[must_use]
    pub fn with_tables(mut self, tables: ModelTables) -> Self {
        self.tables = Some(tables);
        self
    }

    /// What the stage has done so far.
    pub fn counts(&self) -> ModelsCounts {
        self.counts
    }

    /// Keeps the snapshots read from the state topic; each is restored when its service's
    /// next aggregate arrives. Snapshots of another model version or layout, or that do not
    /// parse, are ignored (the service starts fresh).
    fn keep_snapshots(&mut self, records: &[(Vec<u8>, Vec<u8>)]) {
        for (_, value) in records {
            match serde_json::from_slice::<Snapshot>(value) {
                Ok(s)
                    if s.layout == SNAPSHOT_LAYOUT && s.model_version == self.cfg.model_version =>
                {
                    self.snapshots.insert(s.service.clone(), s);
                }
                Ok(s) => tracing::info!(
                    service = %s.service,
                    version = s.model_version,
                    "snapshot of another model version; the service starts fresh"
                ),
                Err(e) => tracing::warn!(error = %e, "unreadable model snapshot ignored"),
            }
        }
    }

    fn replaying(&self, partition: i32, offset: i64) -> bool {
        self.restores
            .get(&partition)
            .is_some_and(|r| offset < r.processed_until)
    }

    fn signal_of(&self, a: &WindowAggregate) -> Option<(usize, f64)> {
        let i = self.cfg.signals.iter().position(|s| s.matches(&a.metric))?;
        Some((i, self.cfg.signals[i].statistic.of(a)))
    }

    fn state_for(&mut self, service: &str, partition: i32) -> &mut ServiceState {
        if !self.services.contains_key(service) {
            let state = match self.snapshots.remove(service) {
                Some(s)
                    if s.forecasters.len() == self.load.len()
                        && s.step_acc.len() == self.load.len() =>
                {
                    self.counts.restored += 1;
                    ServiceState {
                        partition,
                        anomaly: s.anomaly,
                        forecasters: s.forecasters,
                        open: None,
                        last_window_end: s.last_window_end,
                        windows: s.windows,
                        since_snapshot: 0,
                        dirty_from: None,
                        step_acc: s.step_acc,
                        step_end: s.step_end,
                    }
                }
                _ => ServiceState {
                    partition,
                    anomaly: AnomalyModel::new(self.names.len()),
                    forecasters: self
                        .load
                        .iter()
                        .map(|_| Forecaster::new(&self.cfg.forecast))
                        .collect(),
                    open: None,
                    last_window_end: i64::MIN,
                    windows: 0,
                    since_snapshot: 0,
                    dirty_from: None,
                    step_acc: vec![(0.0, 0); self.load.len()],
                    step_end: i64::MIN,
                },
            };
            self.services.insert(service.to_string(), state);
        }
        let state = self
            .services
            .get_mut(service)
            .unwrap_or_else(|| unreachable!("inserted above"));
        state.partition = partition;
        state
    }

    /// Runs the models on a service's open window and emits what they say.
    fn close(&mut self, service: &str, emit: bool, out: &mut Emitter) {
        let cfg = &self.cfg;
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        let Some(state) = self.services.get_mut(service) else {
            return;
        };
        let Some(open) = state.open.take() else {
            return;
        };
        let verdict = state.anomaly.update(&open.values, &names, &cfg.detector);
        state.last_window_end = open.end;
        state.windows += 1;
        state.since_snapshot += 1;
        state.dirty_from = Some(
            state
                .dirty_from
                .map_or(open.first_offset, |d| d.min(open.first_offset)),
        );
        self.counts.windows += 1;
        let mut outputs = Vec::new();
        let mut anomaly_rows = Vec::new();
        let mut forecast_rows = Vec::new();
        let mut events = Vec::new();
        if verdict.anomalous {
            let severity = if verdict.score >= 0.85 {
                "high"
            } else if verdict.score >= 0.78 {
                "medium"
            } else {
                "low"
            };
            let event = AnomalyEvent {
                anomaly_id: format!("{service}/{}", open.end),
                service: service.to_string(),
                window_start: ms_to_rfc3339(open.start),
                window_end: ms_to_rfc3339(open.end),
                score: verdict.score,
                severity: severity.into(),
                kmeans: verdict.kmeans,
                dbscan: verdict.dbscan,
                drivers: verdict
                    .drivers
                    .iter()
                    .map(|(feature, value)| Driver {
                        feature: feature.clone(),
                        value: *value,
                    })
                    .collect(),
                signals: self
                    .names
                    .iter()
                    .zip(&open.values)
                    .map(|(signal, value)| SignalValue {
                        signal: signal.clone(),
                        value: *value,
                    })
                    .collect(),
                model_version: cfg.model_version,
            };
            match codec::encode_event(&event, EventSchema::Anomalies, open.format, &self.avro) {
                Ok(payload) => {
                    outputs.push(Output {
                        output: ANOMALIES,
                        key: service.as_bytes().to_vec(),
                        payload,
                        headers: vec![(
                            "ebb.anomaly_id".into(),
                            event.anomaly_id.as_bytes().to_vec(),
                        )],
                    });
                    self.counts.anomalies += 1;
                    anomaly_rows.push(event);
                }
                Err(e) => tracing::error!(service, error = %e, "anomaly event not encodable"),
            }
        }
        let step = cfg.forecast_step.as_millis().max(1) as i64;
        if state.step_end == i64::MIN {
            state.step_end = (open.start.div_euclid(step) + 1) * step;
        }
        for (acc, &signal) in state.step_acc.iter_mut().zip(&self.load) {
            if let Some(v) = open.values[signal] {
                acc.0 += v;
                acc.1 += 1;
            }
        }
        // The step is complete once a window reaches its end: forecast from the step's mean.
        let step_done = open.end >= state.step_end;
        if step_done {
            state.step_end = (open.end.div_euclid(step) + 1) * step;
        }
        for ((forecaster, acc), &signal) in state
            .forecasters
            .iter_mut()
            .zip(state.step_acc.iter_mut())
            .zip(&self.load)
        {
            if !step_done {
                continue;
            }
            let (sum, n) = std::mem::take(acc);
            let (current, horizons, status) = if n == 0 {
                // The service reports, but not this signal: said once, with no forecast, so
                // whoever reads forecasts sees why they stopped rather than guessing.
                let Some(last) = forecaster.missed_step() else {
                    continue;
                };
                self.counts.inputs_stale += 1;
                events.push(EVENT_INPUT_MISSING);
                (last, Vec::new(), "no_input")
            } else {
                let current = sum / f64::from(n);
                let horizons = forecaster.update(open.end, current, &cfg.forecast);
                if horizons.is_empty() {
                    continue;
                }
                let status = forecaster.status();
                if status == "model_reset" {
                    self.counts.model_resets += 1;
                    events.push(EVENT_MODEL_RESET);
                }
                (current, horizons, status)
            };
            let event = ForecastEvent {
                forecast_id: format!("{service}/{}/{}", self.names[signal], open.end),
                service: service.to_string(),
                signal: self.names[signal].clone(),
                made_at: ms_to_rfc3339(open.end),
                current,
                status: status.into(),
                horizons,
                model_version: cfg.model_version,
            };
            match codec::encode_event(&event, EventSchema::Forecasts, open.format, &self.avro) {
                Ok(payload) => {
                    outputs.push(Output {
                        output: FORECASTS,
                        key: service.as_bytes().to_vec(),
                        payload,
                        headers: vec![(
                            "ebb.forecast_id".into(),
                            event.forecast_id.as_bytes().to_vec(),
                        )],
                    });
                    self.counts.forecasts += 1;
                    forecast_rows.push(event);
                }
                Err(e) => tracing::error!(service, error = %e, "forecast event not encodable"),
            }
        }
        if state.since_snapshot >= cfg.snapshot_every {
            let snapshot = Snapshot {
                layout: SNAPSHOT_LAYOUT,
                model_version: cfg.model_version,
                service: service.to_string(),
                last_window_end: state.last_window_end,
                windows: state.windows,
                anomaly: state.anomaly.clone(),
                forecasters: state.forecasters.clone(),
                step_acc: state.step_acc.clone(),
                step_end: state.step_end,
            };
            match serde_json::to_vec(&snapshot) {
                Ok(payload) => {
                    outputs.push(Output {
                        output: STATE,
                        key: service.as_bytes().to_vec(),
                        payload,
                        headers: Vec::new(),
                    });
                    state.since_snapshot = 0;
                    state.dirty_from = None;
                    self.counts.snapshots += 1;
                }
                Err(e) => tracing::warn!(service, error = %e, "snapshot failed; will retry"),
            }
        }
        if emit {
            for o in outputs {
                out.emit(o);
            }
            for e in events {
                out.note(e);
            }
            if let Some(t) = &self.tables {
                store_rows(&t.anomalies, &anomaly_rows, super::table::anomalies_batch);
                store_rows(&t.forecasts, &forecast_rows, super::table::forecasts_batch);
            }
        }
    }
}

/// Adds `rows` to a SQL table (ids are unique there: a re-emitted event is listed once).
fn store_rows<T>(
    store: &WindowStore,
    rows: &[T],
    batch: fn(
        &[T],
    ) -> Result<
        datafusion::arrow::array::RecordBatch,
        datafusion::arrow::error::ArrowError,
    >,
) {
    if rows.is_empty() {
        return;
    }
    match batch(rows) {
        Ok(b) => store.insert_batch(b),
        Err(e) => tracing::warn!(table = store.name(), error = %e, "rows not stored for SQL"),
    }
}

impl ModelsStage {
    /// Models one decoded aggregate (read at `offset` of `partition`): the stage's step once
    /// the bytes are decoded, also called directly by an in-process chain (replay).
    pub fn on_aggregate(
        &mut self,
        aggregate: &WindowAggregate,
        format: Format,
        partition: i32,
        offset: i64,
        out: &mut Emitter,
    ) {
        let emit = !self.replaying(partition, offset);
        let Some((signal, value)) = self.signal_of(aggregate) else {
            self.counts.unused += 1;
            return;
        };
        let signals = self.names.len();
        let service = aggregate.service.clone();
        let state = self.state_for(&service, partition);
        // Anything before the open window was modelled already (a redelivery).
        let open_end = state.open.as_ref().map(|o| o.end);
        if aggregate.window_end <= state.last_window_end
            || open_end.is_some_and(|end| aggregate.window_end < end)
        {
            self.counts.duplicates += 1;
            return;
        }
        if open_end.is_some_and(|end| aggregate.window_end > end) {
            self.close(&service, emit, out);
        }
        let state = self.state_for(&service, partition);
        let open = state.open.get_or_insert_with(|| Open {
            start: aggregate.window_start,
            end: aggregate.window_end,
            values: vec![None; signals],
            first_offset: offset,
            format,
        });
        open.values[signal] = value.is_finite().then_some(value);
        if open.values.iter().all(Option::is_some) {
            self.close(&service, emit, out);
        }
    }
}

impl Stage for ModelsStage {
    fn name(&self) -> &'static str {
        "models"
    }

    fn process(&mut self, input: &Input<'_>, out: &mut Emitter) {
        let partition = input.source.partition;
        let offset = input.source.offset;
        let emit = !self.replaying(partition, offset);
        let Some(payload) = input.payload.filter(|p| !p.is_empty()) else {
            if emit {
                out.dead_letter(input, "empty_payload", "no value");
            }
            return;
        };
        match codec::decode_aggregate(payload, &self.avro) {
            Ok((format, aggregate)) => {
                self.on_aggregate(&aggregate, format, partition, offset, out)
            }
            Err(e) => {
                if emit {
                    out.dead_letter(input, e.reason(), e.to_string());
                }
            }
        }
    }

    fn checkpoint(&self, partition: i32) -> Option<Checkpoint> {
        let replay_from = self
            .services
            .values()
            .filter(|s| s.partition == partition)
            .flat_map(|s| [s.dirty_from, s.open.as_ref().map(|o| o.first_offset)])
            .flatten()
            .min();
        Some(Checkpoint {
            replay_from,
            watermark_ms: 0,
            processed_until: self.restores.get(&partition).map(|r| r.processed_until),
        })
    }

    fn assigned(&mut self, partition: i32, restore: Option<Restore>) {
        if let Some(r) = restore {
            self.restores.insert(partition, r);
        }
    }

    fn revoked(&mut self, partition: i32) {
        self.services.retain(|_, s| s.partition != partition);
        self.restores.remove(&partition);
    }

    fn restore_state(&mut self, _partition: i32, records: &[(Vec<u8>, Vec<u8>)]) {
        self.keep_snapshots(records);
    }
}
