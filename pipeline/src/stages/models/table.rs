//! Anomalies and forecasts as Arrow tables, so SQL can put "what did ebb see, and what did it
//! expect" next to the windows that led to it and the commands that followed.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;

use super::process::{AnomalyEvent, ForecastEvent};

/// Column of the `anomalies` table holding the window's end, for retention.
pub const ANOMALIES_TIME_COLUMN: usize = 3;
/// Column of the `forecasts` table holding the time the forecast was made, for retention.
pub const FORECASTS_TIME_COLUMN: usize = 4;

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn parse_ms(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn external(e: serde_json::Error) -> ArrowError {
    ArrowError::ExternalError(Box::new(e))
}

/// The Arrow schema of the `anomalies` table: one row per anomaly event.
pub fn anomalies_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("anomaly_id", DataType::Utf8, false),
        Field::new("service", DataType::Utf8, false),
        Field::new("window_start", ts(), false),
        Field::new("window_end", ts(), false),
        Field::new("score", DataType::Float64, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("kmeans_score", DataType::Float64, true),
        Field::new("kmeans_anomalous", DataType::Boolean, true),
        Field::new("dbscan_score", DataType::Float64, true),
        Field::new("dbscan_anomalous", DataType::Boolean, true),
        Field::new("top_driver", DataType::Utf8, true),
        Field::new("drivers", DataType::Utf8, false),
        Field::new("signals", DataType::Utf8, false),
        Field::new("model_version", DataType::Int64, false),
    ]))
}

/// Anomaly events as an `anomalies` batch (`drivers` and `signals` as JSON text); an event
/// whose times do not parse is left out (the stage writes RFC 3339, so that would be a bug).
pub fn anomalies_batch(rows: &[AnomalyEvent]) -> Result<RecordBatch, ArrowError> {
    let n = rows.len();
    let mut text: [StringBuilder; 6] =
        std::array::from_fn(|_| StringBuilder::with_capacity(n, n * 32));
    let mut times: [TimestampMillisecondBuilder; 2] =
        std::array::from_fn(|_| TimestampMillisecondBuilder::with_capacity(n));
    let mut floats: [Float64Builder; 3] = std::array::from_fn(|_| Float64Builder::with_capacity(n));
    let mut flags: [BooleanBuilder; 2] = std::array::from_fn(|_| BooleanBuilder::with_capacity(n));
    let mut version = Int64Builder::with_capacity(n);
    for a in rows {
        let (Some(start), Some(end)) = (parse_ms(&a.window_start), parse_ms(&a.window_end)) else {
            continue;
        };
        let [id, service, severity, top, drivers, signals] = &mut text;
        id.append_value(&a.anomaly_id);
        service.append_value(&a.service);
        severity.append_value(&a.severity);
        top.append_option(a.drivers.first().map(|d| d.feature.as_str()));
        drivers.append_value(serde_json::to_string(&a.drivers).map_err(external)?);
        signals.append_value(serde_json::to_string(&a.signals).map_err(external)?);
        let [start_b, end_b] = &mut times;
        start_b.append_value(start);
        end_b.append_value(end);
        let [score, kmeans, dbscan] = &mut floats;
        score.append_value(a.score);
        kmeans.append_option(a.kmeans.as_ref().map(|d| d.score));
        dbscan.append_option(a.dbscan.as_ref().map(|d| d.score));
        let [kmeans_flag, dbscan_flag] = &mut flags;
        kmeans_flag.append_option(a.kmeans.as_ref().map(|d| d.anomalous));
        dbscan_flag.append_option(a.dbscan.as_ref().map(|d| d.anomalous));
        version.append_value(i64::from(a.model_version));
    }
    let [mut id, mut service, mut severity, mut top, mut drivers, mut signals] = text;
    let [mut start, mut end] = times;
    let [mut score, mut kmeans, mut dbscan] = floats;
    let [mut kmeans_flag, mut dbscan_flag] = flags;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(service.finish()),
        Arc::new(start.finish().with_timezone("UTC")),
        Arc::new(end.finish().with_timezone("UTC")),
        Arc::new(score.finish()),
        Arc::new(severity.finish()),
        Arc::new(kmeans.finish()),
        Arc::new(kmeans_flag.finish()),
        Arc::new(dbscan.finish()),
        Arc::new(dbscan_flag.finish()),
        Arc::new(top.finish()),
        Arc::new(drivers.finish()),
        Arc::new(signals.finish()),
        Arc::new(version.finish()),
    ];
    RecordBatch::try_new(anomalies_schema(), columns)
}

/// The Arrow schema of the `forecasts` table: one row per forecast and horizon, so a query
/// filters on `horizon_s` rather than unpacking a list.
pub fn forecasts_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("prediction_id", DataType::Utf8, false),
        Field::new("forecast_id", DataType::Utf8, false),
        Field::new("service", DataType::Utf8, false),
        Field::new("signal", DataType::Utf8, false),
        Field::new("made_at", ts(), false),
        Field::new("target_at", ts(), false),
        Field::new("horizon_s", DataType::Int64, false),
        Field::new("current", DataType::Float64, false),
        Field::new("value", DataType::Float64, false),
        Field::new("lower", DataType::Float64, false),
        Field::new("upper", DataType::Float64, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("model_value", DataType::Float64, false),
        Field::new("recent_mae", DataType::Float64, true),
        Field::new("status", DataType::Utf8, false),
        Field::new("model_version", DataType::Int64, false),
    ]))
}

/// Forecast events as a `forecasts` batch, a row per horizon (`prediction_id` is
/// `forecast_id/horizon_ms`).
pub fn forecasts_batch(rows: &[ForecastEvent]) -> Result<RecordBatch, ArrowError> {
    let n: usize = rows.iter().map(|f| f.horizons.len()).sum();
    let mut text: [StringBuilder; 6] =
        std::array::from_fn(|_| StringBuilder::with_capacity(n, n * 24));
    let mut times: [TimestampMillisecondBuilder; 2] =
        std::array::from_fn(|_| TimestampMillisecondBuilder::with_capacity(n));
    let mut ints: [Int64Builder; 2] = std::array::from_fn(|_| Int64Builder::with_capacity(n));
    let mut floats: [Float64Builder; 6] = std::array::from_fn(|_| Float64Builder::with_capacity(n));
    for f in rows {
        let Some(made) = parse_ms(&f.made_at) else {
            continue;
        };
        for p in &f.horizons {
            let [pid, fid, service, signal, method, status] = &mut text;
            pid.append_value(format!("{}/{}", f.forecast_id, p.horizon_ms));
            fid.append_value(&f.forecast_id);
            service.append_value(&f.service);
            signal.append_value(&f.signal);
            method.append_value(p.method.as_str());
            status.append_value(&f.status);
            let [made_b, target] = &mut times;
            made_b.append_value(made);
            target.append_value(p.target_ms);
            let [horizon, version] = &mut ints;
            horizon.append_value(p.horizon_ms / 1000);
            version.append_value(i64::from(f.model_version));
            let [current, value, lower, upper, model_value, mae] = &mut floats;
            current.append_value(f.current);
            value.append_value(p.value);
            lower.append_value(p.lower);
            upper.append_value(p.upper);
            model_value.append_value(p.model_value);
            mae.append_option(p.recent_mae);
        }
    }
    let [mut pid, mut fid, mut service, mut signal, mut method, mut status] = text;
    let [mut made, mut target] = times;
    let [mut horizon, mut version] = ints;
    let [mut current, mut value, mut lower, mut upper, mut model_value, mut mae] = floats;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(pid.finish()),
        Arc::new(fid.finish()),
        Arc::new(service.finish()),
        Arc::new(signal.finish()),
        Arc::new(made.finish().with_timezone("UTC")),
        Arc::new(target.finish().with_timezone("UTC")),
        Arc::new(horizon.finish()),
        Arc::new(current.finish()),
        Arc::new(value.finish()),
        Arc::new(lower.finish()),
        Arc::new(upper.finish()),
        Arc::new(method.finish()),
        Arc::new(model_value.finish()),
        Arc::new(mae.finish()),
        Arc::new(status.finish()),
        Arc::new(version.finish()),
    ];
    RecordBatch::try_new(forecasts_schema(), columns)
}
