//! The window stage's pure step: clean samples in; one aggregate per (service, metric,
//! window) out when the partition's watermark passes the window's end plus grace; records
//! later than that to the late topic with the window they missed.
//!
//! State lives per input partition, because the key is the service: a service's samples,
//! its windows and its watermark all live on one partition and move with it on rebalance.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::aggregate::{ms_to_rfc3339, AggregateError, Aggregator, Rows, WindowAggregate};
use super::config::{WindowConfig, WindowSpec};
use crate::codec::{self, AvroCodec, Format};
use crate::record::CleanSample;
use crate::sql::store::WindowStore;
use crate::stage::{Checkpoint, Emitter, Input, Output, Restore, Stage};

/// Output name of window aggregates.
pub const AGGREGATES: &str = "aggregates";
/// Output name of records that arrived after their window closed.
pub const LATE: &str = "late";

/// Every reason the window stage dead-letters a record (clean telemetry that does not read
/// as clean telemetry: a producer other than the filter wrote to the topic).
pub const REASONS: &[&str] = codec::DECODE_REASONS;

/// What the stage has done, for metrics and the demo's live view.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WindowCounts {
    /// Records added to at least one open window.
    pub accepted: u64,
    /// Records sent to the late topic.
    pub late: u64,
    /// Windows closed and emitted.
    pub closed: u64,
    /// Windows closed early because a partition buffered `max_buffered_records`.
    pub forced: u64,
    /// Records read again after a restart only to rebuild open windows.
    pub replayed: u64,
}

/// One buffer of rows whose windows all end at the same instant.
#[derive(Debug, Default)]
struct Slice {
    rows: Rows,
    /// Oldest input offset in the slice: the partition must be re-read from here to rebuild it.
    min_offset: i64,
}

#[derive(Debug)]
struct PartitionState {
    max_event_ms: Option<i64>,
    watermark_ms: i64,
    last_input: DateTime<Utc>,
    /// Open windows, by end (epoch ms).
    slices: BTreeMap<i64, Slice>,
    buffered: usize,
    format: Format,
    restore: Option<Restore>,
}

impl PartitionState {
    fn new(now: DateTime<Utc>, restore: Option<Restore>) -> Self {
        Self {
            max_event_ms: None,
            watermark_ms: restore.map_or(i64::MIN, |r| r.watermark_ms),
            last_input: now,
            slices: BTreeMap::new(),
            buffered: 0,
            format: Format::Json,
            restore,
        }
    }
}

/// The window stage.
pub struct WindowStage {
    config: WindowConfig,
    lateness_ms: i64,
    grace_ms: i64,
    avro: AvroCodec,
    aggregator: Aggregator,
    partitions: HashMap<i32, PartitionState>,
    specs: HashMap<String, WindowSpec>,
    store: Option<Arc<WindowStore>>,
    counts: WindowCounts,
    now: DateTime<Utc>,
}

impl std::fmt::Debug for WindowStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowStage")
            .field("partitions", &self.partitions.len())
            .field("counts", &self.counts)
            .finish()
    }
}

impl WindowStage {
    /// A window stage. `store`, when given, receives every closed window for SQL; `now` is
    /// the wall time the idle-partition rule starts counting from.
    pub fn new(
        config: WindowConfig,
        avro: AvroCodec,
        store: Option<Arc<WindowStore>>,
        now: DateTime<Utc>,
    ) -> Result<Self, AggregateError> {
        Ok(Self {
            lateness_ms: config.lateness_ms(),
            grace_ms: config.grace_ms(),
            config,
            avro,
            aggregator: Aggregator::new()?,
            partitions: HashMap::new(),
            specs: HashMap::new(),
            store,
            counts: WindowCounts::default(),
            now,
        })
    }

    /// What the stage has done so far.
    pub fn counts(&self) -> WindowCounts {
        self.counts
    }

    /// The watermark of `partition`, if it has one yet.
    pub fn watermark(&self, partition: i32) -> Option<i64> {
        self.partitions
            .get(&partition)
            .map(|p| p.watermark_ms)
            .filter(|w| *w != i64::MIN)
    }

    /// Records buffered in open windows, over all partitions.
    pub fn buffered(&self) -> usize {
        self.partitions.values().map(|p| p.buffered).sum()
    }

    /// Closes every open window now, whatever the watermark (end of a replay or a demo).
    pub fn flush(&mut self, out: &mut Emitter) {
        let parts: Vec<i32> = self.partitions.keys().copied().collect();
        for p in parts {
            self.close(p, i64::MAX, out);
        }
    }

    fn spec(&mut self, metric: &str) -> WindowSpec {
        if let Some(s) = self.specs.get(metric) {
            return *s;
        }
        let s = self.config.spec_for(metric);
        if self.specs.len() < 100_000 {
            self.specs.insert(metric.to_string(), s);
        }
        s
    }

    /// Closes the windows of `partition` whose end plus grace the watermark has passed
    /// (`until` = the watermark; `i64::MAX` closes all).
    fn close(&mut self, partition: i32, until: i64, out: &mut Emitter) {
        let Some(state) = self.partitions.get_mut(&partition) else {
            return;
        };
        let grace = self.grace_ms;
        let ends: Vec<i64> = state
            .slices
            .keys()
            .copied()
            .take_while(|end| end.saturating_add(grace) <= until)
            .collect();
        self.close_slices(partition, &ends, out);
    }

    fn close_slices(&mut self, partition: i32, ends: &[i64], out: &mut Emitter) {
        let Some(state) = self.partitions.get_mut(&partition) else {
            return;
        };
        if ends.is_empty() {
            return;
        }
        let mut batches = Vec::with_capacity(ends.len());
        for end in ends {
            if let Some(mut slice) = state.slices.remove(end) {
                state.buffered -= slice.rows.len();
                match slice.rows.finish() {
                    Ok(b) => batches.push(b),
                    Err(e) => tracing::error!(error = %e, "window rows could not be batched"),
                }
            }
        }
        let format = state.format;
        let batch = match datafusion::arrow::compute::concat_batches(
            &super::aggregate::buffered_schema(),
            &batches,
        ) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "window batches could not be joined");
                return;
            }
        };
        let aggregates = match self.aggregator.aggregate(batch) {
            Ok(a) => a,
            Err(e) => {
                // Aggregation of well-typed rows fails only on a bug or resource exhaustion;
                // say so loudly rather than emitting a partial window.
                tracing::error!(error = %e, partition, "window aggregation failed; windows lost");
                return;
            }
        };
        self.counts.closed += aggregates.len() as u64;
        for a in &aggregates {
            out.emit(self.encode(a, format));
        }
        if let Some(store) = &self.store {
            store.insert(&aggregates);
        }
    }

    fn encode(&self, a: &WindowAggregate, format: Format) -> Output {
        let payload = match format {
            Format::Avro => match self.avro.encode_aggregate(a) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "aggregate written as JSON");
                    serde_json::to_vec(a).unwrap_or_default()
                }
            },
            Format::Json => serde_json::to_vec(a).unwrap_or_default(),
        };
        Output {
            output: AGGREGATES,
            key: a.service.as_bytes().to_vec(),
            payload,
            headers: vec![("ebb.window_id".into(), a.window_id.as_bytes().to_vec())],
        }
    }

    /// Bounds memory: closes the oldest windows of an over-full partition early.
    fn enforce_bound(&mut self, partition: i32, out: &mut Emitter) {
        let max = self.config.max_buffered_records;
        let Some(state) = self.partitions.get(&partition) else {
            return;
        };
        if state.buffered <= max {
            return;
        }
        let mut ends = Vec::new();
        let mut left = state.buffered;
        for (end, slice) in &state.slices {
            if left <= max / 2 {
                break;
            }
            ends.push(*end);
            left -= slice.rows.len();
        }
        tracing::warn!(
            partition,
            windows = ends.len(),
            "window buffer full: closing the oldest windows early (raise window.max_buffered_records?)"
        );
        self.counts.forced += ends.len() as u64;
        self.close_slices(partition, &ends, out);
    }
}

impl WindowStage {
    /// Adds a decoded sample to its windows, then closes what the watermark passed.
    /// `original` is the record as read (for the late topic); without it (benchmarks,
    /// replay from files) a late sample is sent as JSON.
    pub fn accept(
        &mut self,
        partition: i32,
        offset: i64,
        sample: &CleanSample,
        format: Format,
        original: Option<(&Input<'_>, &[u8])>,
        out: &mut Emitter,
    ) {
        let now = self.now;
        let replaying = self
            .partitions
            .get(&partition)
            .and_then(|p| p.restore)
            .is_some_and(|r| offset < r.processed_until);
        let spec = self.spec(&sample.metric);
        let (lateness, grace) = (self.lateness_ms, self.grace_ms);
        let state = self
            .partitions
            .entry(partition)
            .or_insert_with(|| PartitionState::new(now, None));
        state.format = format;
        state.last_input = now;
        let ts = sample.ts.timestamp_millis();
        // Replayed records rebuild only the windows the checkpoint left open; everything else
        // they did (closed windows, late records) was done and acknowledged before.
        let closed_before = if replaying {
            state.restore.map_or(i64::MIN, |r| r.watermark_ms)
        } else {
            state.watermark_ms
        };
        let mut missed: Vec<(i64, i64)> = Vec::new();
        for start in spec.starts(ts) {
            let end = start + spec.size_ms;
            if end.saturating_add(grace) <= closed_before {
                missed.push((start, end));
                continue;
            }
            let slice = state.slices.entry(end).or_insert_with(|| Slice {
                rows: Rows::default(),
                min_offset: offset,
            });
            slice.min_offset = slice.min_offset.min(offset);
            slice.rows.push(
                &sample.service,
                &sample.metric,
                sample.unit.as_deref(),
                &sample.instance,
                sample.value,
                start,
                end,
            );
            state.buffered += 1;
        }
        state.max_event_ms = Some(state.max_event_ms.map_or(ts, |m| m.max(ts)));
        let candidate = ts.saturating_sub(lateness);
        if candidate > state.watermark_ms {
            state.watermark_ms = candidate;
        }
        if replaying {
            self.counts.replayed += 1;
            return;
        }
        if state.restore.is_some() {
            // Past the checkpoint: the partition is fully rebuilt.
            state.restore = None;
        }
        let watermark = state.watermark_ms;
        if missed.len() < spec.starts(ts).count() {
            self.counts.accepted += 1;
        }
        if let Some((start, end)) = missed.last().copied() {
            self.counts.late += 1;
            let mut headers: Vec<(String, Vec<u8>)> = original
                .map(|(input, _)| {
                    input
                        .headers
                        .iter()
                        .map(|(k, v)| ((*k).to_string(), v.to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            headers.push(("ebb.window_start".into(), ms_to_rfc3339(start).into_bytes()));
            headers.push(("ebb.window_end".into(), ms_to_rfc3339(end).into_bytes()));
            headers.push((
                "ebb.windows_missed".into(),
                missed.len().to_string().into_bytes(),
            ));
            headers.push((
                "ebb.watermark".into(),
                ms_to_rfc3339(watermark).into_bytes(),
            ));
            let payload = match original {
                Some((input, payload)) => {
                    headers.push(("ebb.source".into(), input.source.to_string().into_bytes()));
                    payload.to_vec()
                }
                None => crate::codec::json::encode_clean(sample).unwrap_or_default(),
            };
            out.emit(Output {
                output: LATE,
                key: sample.service.as_bytes().to_vec(),
                payload,
                headers,
            });
        }
        self.close(partition, watermark, out);
        self.enforce_bound(partition, out);
    }
}

impl Stage for WindowStage {
    fn name(&self) -> &'static str {
        "window"
    }

    fn process(&mut self, input: &Input<'_>, out: &mut Emitter) {
        let partition = input.source.partition;
        let offset = input.source.offset;
        let replaying = self
            .partitions
            .get(&partition)
            .and_then(|p| p.restore)
            .is_some_and(|r| offset < r.processed_until);
        let Some(payload) = input.payload.filter(|p| !p.is_empty()) else {
            if !replaying {
                out.dead_letter(input, "empty_payload", "no value");
            }
            return;
        };
        let (format, sample) = match codec::decode_clean(payload, &self.avro) {
            Ok(v) => v,
            Err(e) => {
                if !replaying {
                    out.dead_letter(input, e.reason(), e.to_string());
                }
                return;
            }
        };
        self.accept(
            partition,
            offset,
            &sample,
            format,
            Some((input, payload)),
            out,
        );
    }

    fn on_time(&mut self, now: DateTime<Utc>, out: &mut Emitter) {
        self.now = now;
        let idle =
            chrono::Duration::from_std(self.config.idle_timeout).unwrap_or(chrono::Duration::MAX);
        let lateness = self.lateness_ms;
        let mut advanced = Vec::new();
        for (p, state) in &mut self.partitions {
            let quiet = now - state.last_input;
            if quiet < idle || state.slices.is_empty() || state.restore.is_some() {
                continue;
            }
            // Event time keeps flowing at wall-clock speed on a quiet partition, so its last
            // windows close instead of waiting for a record that may never come.
            let Some(max) = state.max_event_ms else {
                continue;
            };
            let wm = max
                .saturating_add(quiet.num_milliseconds())
                .saturating_sub(lateness);
            if wm > state.watermark_ms {
                state.watermark_ms = wm;
                advanced.push((*p, wm));
            }
        }
        for (p, wm) in advanced {
            self.close(p, wm, out);
        }
    }

    fn checkpoint(&self, partition: i32) -> Option<Checkpoint> {
        let state = self.partitions.get(&partition)?;
        Some(Checkpoint {
            replay_from: state.slices.values().map(|s| s.min_offset).min(),
            watermark_ms: state.watermark_ms,
            processed_until: state.restore.map(|r| r.processed_until),
        })
    }

    fn assigned(&mut self, partition: i32, restore: Option<Restore>) {
        self.partitions
            .insert(partition, PartitionState::new(self.now, restore));
    }

    fn revoked(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }
}
