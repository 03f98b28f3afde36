//! Commands as an Arrow table, so `SELECT ... FROM commands` answers "what did ebb do to
//! this service, and why" next to the windows that led to it.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;

use super::process::Command;

/// Column of the `commands` table holding the decision time, for retention.
pub const TIME_COLUMN: usize = 3;

/// The Arrow schema of the `commands` table.
pub fn commands_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("command_id", DataType::Utf8, false),
        Field::new("service", DataType::Utf8, false),
        Field::new("action", DataType::Utf8, false),
        Field::new("decided_at", ts, false),
        Field::new("replicas", DataType::Int64, true),
        Field::new("instance", DataType::Utf8, true),
        Field::new("policy", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("current_replicas", DataType::Int64, false),
        Field::new("desired_replicas", DataType::Int64, true),
        Field::new("load", DataType::Float64, true),
        Field::new("utilization", DataType::Float64, true),
        Field::new("forecast", DataType::Float64, true),
        Field::new("forecast_upper", DataType::Float64, true),
        Field::new("fallback", DataType::Utf8, true),
        Field::new("limits", DataType::Utf8, true),
        Field::new("shadow", DataType::Boolean, false),
        Field::new("evidence", DataType::Utf8, false),
    ]))
}

/// Commands as a `commands` batch; a command whose time does not parse is left out (the
/// stage writes RFC 3339, so that would be a bug, not data).
pub fn to_batch(rows: &[Command]) -> Result<RecordBatch, ArrowError> {
    let n = rows.len();
    let mut text: [StringBuilder; 9] =
        std::array::from_fn(|_| StringBuilder::with_capacity(n, n * 24));
    let mut decided = TimestampMillisecondBuilder::with_capacity(n);
    let mut ints: [Int64Builder; 3] = std::array::from_fn(|_| Int64Builder::with_capacity(n));
    let mut floats: [Float64Builder; 4] = std::array::from_fn(|_| Float64Builder::with_capacity(n));
    let mut shadow = BooleanBuilder::with_capacity(n);
    for c in rows {
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(&c.decided_at) else {
            continue;
        };
        let e = &c.evidence;
        let evidence =
            serde_json::to_string(e).map_err(|err| ArrowError::ExternalError(Box::new(err)))?;
        let limits = (!e.limits.is_empty()).then(|| e.limits.join(","));
        let [id, service, action, instance, policy, reason, fallback, limits_b, evidence_b] =
            &mut text;
        id.append_value(&c.command_id);
        service.append_value(&c.service);
        action.append_value(&c.action);
        instance.append_option(c.instance.as_deref());
        policy.append_value(&c.policy);
        reason.append_value(&c.reason);
        fallback.append_option(e.fallback.as_deref());
        limits_b.append_option(limits.as_deref());
        evidence_b.append_value(evidence);
        decided.append_value(at.timestamp_millis());
        let [replicas, current, desired] = &mut ints;
        replicas.append_option(c.replicas.map(i64::from));
        current.append_value(i64::from(e.current_replicas));
        desired.append_option(e.desired_replicas.map(i64::from));
        let [load, utilization, forecast, upper] = &mut floats;
        load.append_option(e.load);
        utilization.append_option(e.utilization);
        forecast.append_option(e.forecast.as_ref().map(|f| f.value));
        upper.append_option(e.forecast.as_ref().map(|f| f.upper));
        shadow.append_value(c.shadow);
    }
    let [mut id, mut service, mut action, mut instance, mut policy, mut reason, mut fallback, mut limits, mut evidence] =
        text;
    let [mut replicas, mut current, mut desired] = ints;
    let [mut load, mut utilization, mut forecast, mut upper] = floats;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(service.finish()),
        Arc::new(action.finish()),
        Arc::new(decided.finish().with_timezone("UTC")),
        Arc::new(replicas.finish()),
        Arc::new(instance.finish()),
        Arc::new(policy.finish()),
        Arc::new(reason.finish()),
        Arc::new(current.finish()),
        Arc::new(desired.finish()),
        Arc::new(load.finish()),
        Arc::new(utilization.finish()),
        Arc::new(forecast.finish()),
        Arc::new(upper.finish()),
        Arc::new(fallback.finish()),
        Arc::new(limits.finish()),
        Arc::new(shadow.finish()),
        Arc::new(evidence.finish()),
    ];
    RecordBatch::try_new(commands_schema(), columns)
}
