//! `ebb bench window`: the window stage's aggregation rate on one core for many series, and
//! DuckDB's rate for the same aggregation over the same Arrow data, measured in one run.
//!
//! Both sides start from decoded samples in an Arrow batch. ebb streams them through the
//! window stage (buffering, watermarks, a DataFusion aggregation per watermark step); DuckDB
//! (one thread) runs the same aggregates as one batch query over the whole table, which is
//! the most favourable case for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use chrono::{TimeZone, Utc};
use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::ipc::writer::FileWriter;
use serde::Serialize;

use crate::codec::{AvroCodec, Format};
use crate::record::CleanSample;
use crate::stage::Emitter;
use crate::stages::window::{WindowConfig, WindowStage};

/// The DuckDB side, run by the Python interpreter given.
pub const DUCKDB_SCRIPT: &str = include_str!("../../compose/bench/duckdb_window.py");

/// Figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct WindowFigures {
    /// Distinct (service, metric) series.
    pub series: u64,
    /// Samples aggregated.
    pub records: u64,
    /// Window length, seconds.
    pub window_s: u64,
    /// Windows emitted.
    pub windows: u64,
    /// ebb: samples per second through the window stage, one core.
    pub ebb_records_per_s: f64,
    /// DuckDB: samples per second for the same aggregates, one thread (None if not run).
    pub duckdb_records_per_s: Option<f64>,
    /// ebb / DuckDB.
    pub ratio: Option<f64>,
    /// Series the memory figures were measured over (at least [`MEMORY_SERIES`]).
    pub memory_series: u64,
    /// Resident memory per open series beyond the buffered samples' own bytes.
    pub bytes_per_open_series: f64,
    /// Bytes per buffered sample (Arrow builders).
    pub bytes_per_buffered_record: f64,
    /// Why DuckDB did not run, if it did not.
    pub duckdb_error: Option<String>,
}

/// Bench errors.
#[derive(Debug, thiserror::Error)]
pub enum WindowBenchError {
    /// DataFusion could not start.
    #[error(transparent)]
    Aggregate(#[from] crate::stages::window::aggregate::AggregateError),
    /// Writing the shared Arrow file failed.
    #[error("arrow: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    /// File system.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

const T0: i64 = 1_700_000_000_000;

/// The data: `series` series (100 metrics per service), one sample per series per second,
/// three instances per service, in time order.
fn data(series: u64, records: u64) -> Result<RecordBatch, WindowBenchError> {
    let per_tick = series;
    let ticks = records.div_ceil(per_tick);
    let n = usize::try_from(ticks * per_tick).unwrap_or(usize::MAX);
    let (mut service, mut metric, mut instance) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut value, mut ts) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let metrics = 100u64.min(series.max(1));
    for t in 0..ticks {
        for s in 0..series {
            let svc = s / metrics;
            service.push(format!("svc-{svc}"));
            metric.push(format!("m{}", s % metrics));
            instance.push(format!("i{}", (t + s) % 3));
            #[allow(clippy::cast_precision_loss)]
            value.push(((t * 7919 + s * 104_729) % 10_000) as f64 / 10.0);
            ts.push(
                T0 + i64::try_from(t).unwrap_or(0) * 1000 + i64::try_from(s % 997).unwrap_or(0),
            );
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("service", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("instance", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
        Field::new("ts_ms", DataType::Int64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(service)),
        Arc::new(StringArray::from(metric)),
        Arc::new(StringArray::from(instance)),
        Arc::new(Float64Array::from(value)),
        Arc::new(Int64Array::from(ts)),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// The fewest series memory is measured over. RSS grows in the allocator's steps (mimalloc
/// commits up to 4 MiB at a time), which over 10,000 series read as ±400 B a series, over
/// 100,000 as ±40 B.
pub const MEMORY_SERIES: u64 = 100_000;

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn column<T: 'static>(b: &RecordBatch, i: usize) -> Option<&T> {
    b.column(i).as_any().downcast_ref::<T>()
}

/// Runs the benchmark; `python` runs the DuckDB side (needs the duckdb and pyarrow packages).
pub fn window(
    series: u64,
    records: u64,
    python: Option<&Path>,
) -> Result<WindowFigures, WindowBenchError> {
    // First, while the heap is fresh: freed memory reused later would hide the growth.
    let memory_series = series.max(MEMORY_SERIES);
    let (bytes_per_open_series, bytes_per_buffered_record) = open_series_memory(memory_series)?;
    let batch = data(series, records)?;
    let rows = batch.num_rows();
    let (Some(service), Some(metric), Some(instance), Some(value), Some(ts)) = (
        column::<StringArray>(&batch, 0),
        column::<StringArray>(&batch, 1),
        column::<StringArray>(&batch, 2),
        column::<Float64Array>(&batch, 3),
        column::<Int64Array>(&batch, 4),
    ) else {
        return Ok(empty(series));
    };
    let config = WindowConfig {
        size: std::time::Duration::from_secs(10),
        allowed_lateness: std::time::Duration::from_secs(1),
        grace: std::time::Duration::ZERO,
        max_buffered_records: usize::MAX,
        ..WindowConfig::default()
    };
    let mut stage = WindowStage::new(config, AvroCodec::default(), None, Utc::now())?;
    let mut out = Emitter::new();
    let mut windows = 0u64;
    let mut sample = CleanSample {
        service: String::new(),
        instance: String::new(),
        metric: String::new(),
        value: 0.0,
        unit: None,
        ts: Utc::now(),
        labels: BTreeMap::new(),
    };
    let started = Instant::now();
    for i in 0..rows {
        sample.service.clear();
        sample.service.push_str(service.value(i));
        sample.metric.clear();
        sample.metric.push_str(metric.value(i));
        sample.instance.clear();
        sample.instance.push_str(instance.value(i));
        sample.value = value.value(i);
        sample.ts = Utc
            .timestamp_millis_opt(ts.value(i))
            .single()
            .unwrap_or_default();
        let offset = i64::try_from(i).unwrap_or(i64::MAX);
        stage.accept(0, offset, &sample, Format::Json, None, &mut out);
        if !out.is_empty() {
            windows += out.outputs().len() as u64;
            out.drain();
        }
    }
    stage.flush(&mut out);
    windows += out.outputs().len() as u64;
    let elapsed = started.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let ebb_rate = rows as f64 / elapsed;
    let (duckdb, duckdb_error) = match python {
        Some(p) => match run_duckdb(p, &batch) {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, Some("not run (pass --python)".into())),
    };
    Ok(WindowFigures {
        series,
        records: rows as u64,
        window_s: 10,
        windows,
        ebb_records_per_s: ebb_rate,
        duckdb_records_per_s: duckdb,
        ratio: duckdb.map(|d| ebb_rate / d),
        memory_series,
        bytes_per_open_series,
        bytes_per_buffered_record,
        duckdb_error,
    })
}

fn empty(series: u64) -> WindowFigures {
    WindowFigures {
        series,
        records: 0,
        window_s: 10,
        windows: 0,
        ebb_records_per_s: 0.0,
        duckdb_records_per_s: None,
        ratio: None,
        memory_series: 0,
        bytes_per_open_series: 0.0,
        bytes_per_buffered_record: 0.0,
        duckdb_error: None,
    }
}

/// Memory of open windows: RSS growth for `series` open series holding `k` samples each,
/// at two values of `k`; the slope is the cost per buffered sample, the intercept the cost
/// per open series beyond its samples.
fn open_series_memory(series: u64) -> Result<(f64, f64), WindowBenchError> {
    let measure = |per_series: u64| -> Result<f64, WindowBenchError> {
        let config = WindowConfig {
            size: std::time::Duration::from_secs(3600),
            max_buffered_records: usize::MAX,
            ..WindowConfig::default()
        };
        let mut stage = WindowStage::new(config, AvroCodec::default(), None, Utc::now())?;
        let mut out = Emitter::new();
        let before = rss_bytes().unwrap_or(0);
        let mut sample = CleanSample {
            service: String::new(),
            instance: "i0".into(),
            metric: String::new(),
            value: 1.0,
            unit: None,
            ts: Utc::now(),
            labels: BTreeMap::new(),
        };
        for k in 0..per_series {
            for s in 0..series {
                sample.service = format!("svc-{}", s / 100);
                sample.metric = format!("m{}", s % 100);
                sample.ts = Utc
                    .timestamp_millis_opt(T0 + i64::try_from(k).unwrap_or(0))
                    .single()
                    .unwrap_or_default();
                stage.accept(0, 0, &sample, Format::Json, None, &mut out);
            }
        }
        let after = rss_bytes().unwrap_or(0);
        drop(stage);
        #[allow(clippy::cast_precision_loss)]
        Ok(after.saturating_sub(before) as f64)
    };
    let (k1, k2) = (8u64, 40u64);
    let (m1, m2) = (measure(k1)?, measure(k2)?);
    #[allow(clippy::cast_precision_loss)]
    let per_record = (m2 - m1) / ((k2 - k1) * series) as f64;
    #[allow(clippy::cast_precision_loss)]
    let per_series = ((m1 - per_record * (k1 * series) as f64) / series as f64).max(0.0);
    Ok((per_series, per_record))
}

fn run_duckdb(python: &Path, batch: &RecordBatch) -> Result<f64, String> {
    let dir = std::env::temp_dir().join(format!("ebb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let data: PathBuf = dir.join("samples.arrow");
    let script = dir.join("duckdb_window.py");
    std::fs::write(&script, DUCKDB_SCRIPT).map_err(|e| e.to_string())?;
    {
        let file = std::fs::File::create(&data).map_err(|e| e.to_string())?;
        let mut w = FileWriter::try_new(file, &batch.schema()).map_err(|e| e.to_string())?;
        w.write(batch).map_err(|e| e.to_string())?;
        w.finish().map_err(|e| e.to_string())?;
    }
    let out = Command::new(python)
        .arg(&script)
        .arg(&data)
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).map_err(|e| format!("{e}: {text}"))?;
    v["records_per_s"]
        .as_f64()
        .ok_or_else(|| format!("no records_per_s in {last}"))
}
