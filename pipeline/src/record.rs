//! The telemetry sample, as it arrives and as the filter emits it, and its Arrow schema.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{
    Float64Builder, MapBuilder, StringBuilder, StringDictionaryBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, SecondsFormat, Utc};

/// A timestamp as the service sent it, before normalisation.
#[derive(Debug, Clone, PartialEq)]
pub enum RawTimestamp {
    /// RFC 3339, naive local time, or a numeric string.
    Text(String),
    /// An integral epoch number (unit detected by magnitude).
    Int(i64),
    /// A fractional epoch number.
    Float(f64),
}

impl RawTimestamp {
    /// Borrowed view for the UDF core's parser.
    pub fn as_input(&self) -> ebb_udf_core::TimestampInput<'_> {
        match self {
            RawTimestamp::Text(s) => ebb_udf_core::TimestampInput::Text(s),
            RawTimestamp::Int(n) => ebb_udf_core::TimestampInput::Int(*n),
            RawTimestamp::Float(f) => ebb_udf_core::TimestampInput::Float(*f),
        }
    }
}

/// One metric sample as a service emits it to `telemetry.raw`.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySample {
    /// The service; also the Kafka key, so one service's samples stay in order.
    pub service: String,
    /// The instance (pod, host, task) that measured it.
    pub instance: String,
    /// Metric name, e.g. `cpu`, `latency_p95_ms`, `requests_per_s`.
    pub metric: String,
    /// The measured value.
    pub value: f64,
    /// Unit, e.g. `percent`, `ms`, `bytes`; optional.
    pub unit: Option<String>,
    /// When it was measured, as sent.
    pub ts: RawTimestamp,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
}

/// A sample that passed the filter: identifiers anonymised, time in UTC.
#[derive(Debug, Clone, PartialEq)]
pub struct CleanSample {
    /// The service (kept in clear: it is the unit of scaling, not personal data).
    pub service: String,
    /// The instance, pseudonymised.
    pub instance: String,
    /// Metric name.
    pub metric: String,
    /// The value, finite and within physical bounds.
    pub value: f64,
    /// Unit, if sent.
    pub unit: Option<String>,
    /// Event time in UTC.
    pub ts: DateTime<Utc>,
    /// Labels, with the configured identifiers pseudonymised.
    pub labels: BTreeMap<String, String>,
}

impl CleanSample {
    /// The event time as RFC 3339 UTC ending in `Z`, with as many fraction digits as needed.
    pub fn ts_rfc3339(&self) -> String {
        self.ts.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }
}

/// The Arrow schema of clean samples, the window stage's input batches.
pub fn clean_sample_schema() -> SchemaRef {
    let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    let entries = Fields::from(vec![
        Field::new("keys", DataType::Utf8, false),
        Field::new("values", DataType::Utf8, true),
    ]);
    Arc::new(Schema::new(vec![
        // Services and metrics repeat in every batch: dictionaries keep batches small.
        Field::new("service", dict.clone(), false),
        Field::new("instance", DataType::Utf8, false),
        Field::new("metric", dict, false),
        Field::new("value", DataType::Float64, false),
        Field::new("unit", DataType::Utf8, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new(
            "labels",
            DataType::Map(
                Arc::new(Field::new("entries", DataType::Struct(entries), false)),
                false,
            ),
            false,
        ),
    ]))
}

/// Builds one Arrow record batch of clean samples, in the order given.
pub fn clean_samples_to_batch(samples: &[CleanSample]) -> Result<RecordBatch, ArrowError> {
    let mut service = StringDictionaryBuilder::<Int32Type>::new();
    let mut instance = StringBuilder::new();
    let mut metric = StringDictionaryBuilder::<Int32Type>::new();
    let mut value = Float64Builder::with_capacity(samples.len());
    let mut unit = StringBuilder::new();
    let mut ts = TimestampMicrosecondBuilder::with_capacity(samples.len()).with_timezone("UTC");
    let mut labels = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    for s in samples {
        service.append_value(&s.service);
        instance.append_value(&s.instance);
        metric.append_value(&s.metric);
        value.append_value(s.value);
        unit.append_option(s.unit.as_deref());
        ts.append_value(s.ts.timestamp_micros());
        for (k, v) in &s.labels {
            labels.keys().append_value(k);
            labels.values().append_value(v);
        }
        labels.append(true)?;
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(service.finish()),
        Arc::new(instance.finish()),
        Arc::new(metric.finish()),
        Arc::new(value.finish()),
        Arc::new(unit.finish()),
        Arc::new(ts.finish()),
        Arc::new(labels.finish()),
    ];
    RecordBatch::try_new(clean_sample_schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float64Type;

    fn sample(service: &str, value: f64) -> CleanSample {
        CleanSample {
            service: service.into(),
            instance: "abc".into(),
            metric: "cpu".into(),
            value,
            unit: Some("percent".into()),
            ts: DateTime::from_timestamp(1_700_000_000, 5_000).unwrap_or_default(),
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
        }
    }

    #[test]
    fn batch_matches_the_declared_schema_and_keeps_values() {
        let batch = clean_samples_to_batch(&[sample("api", 1.5), sample("db", 2.5)]);
        let batch = match batch {
            Ok(b) => b,
            Err(e) => panic!("batch: {e}"),
        };
        assert_eq!(batch.schema(), clean_sample_schema());
        assert_eq!(batch.num_rows(), 2);
        let values = batch.column(3).as_primitive::<Float64Type>();
        assert_eq!(values.values().to_vec(), vec![1.5, 2.5]);
    }

    #[test]
    fn rfc3339_output_is_utc_with_z() {
        assert_eq!(
            sample("api", 1.0).ts_rfc3339(),
            "2023-11-14T22:13:20.000005Z"
        );
    }
}
