//! Wire formats: JSON and Avro in the Confluent wire format (magic byte 0, 4-byte schema id).
//!
//! Both decode to the same [`TelemetrySample`] and encode the same [`CleanSample`]; a record's
//! format is told from its first byte, so one topic may carry both and each record leaves in
//! the format it came in.

pub mod avro;
pub mod json;
pub mod registry;

use crate::record::{CleanSample, TelemetrySample};

pub use avro::{AvroCodec, EventSchema, SchemaCache};

/// The Confluent wire format's magic byte.
pub const CONFLUENT_MAGIC: u8 = 0;

/// A payload's format, told from its first byte.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// UTF-8 JSON object.
    #[default]
    Json,
    /// Confluent-framed Avro datum.
    Avro,
}

impl Format {
    /// Detects the format: magic byte 0 means Confluent Avro; `{` (after optional white space
    /// or a UTF-8 BOM) means JSON; anything else is neither.
    pub fn detect(payload: &[u8]) -> Option<Format> {
        match payload.first()? {
            &CONFLUENT_MAGIC => Some(Format::Avro),
            _ => {
                let trimmed = payload.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(payload);
                let first = trimmed.iter().find(|b| !b.is_ascii_whitespace())?;
                (*first == b'{').then_some(Format::Json)
            }
        }
    }
}

/// The schema id of a Confluent-framed payload, if it is one.
pub fn confluent_schema_id(payload: &[u8]) -> Option<u32> {
    match payload {
        [CONFLUENT_MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Why a payload could not be decoded. Each kind maps to a stable dead-letter reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Not parseable at all: truncated, bad syntax, nested too deep, bad Avro bytes.
    #[error("malformed {format}: {detail}")]
    Malformed {
        /// `json` or `avro`.
        format: &'static str,
        /// The parser's message.
        detail: String,
    },
    /// A required field is absent.
    #[error("missing field: {0}")]
    MissingField(String),
    /// A field has the wrong type.
    #[error("wrong type: {0}")]
    WrongType(String),
    /// Avro framing names a schema id the registry does not know.
    #[error("unknown schema id {0}")]
    UnknownSchemaId(u32),
    /// Neither JSON nor Confluent Avro.
    #[error(
        "unknown format (first byte 0x{0:02x}): expected a JSON object or Confluent-framed Avro"
    )]
    UnknownFormat(u8),
}

/// Every dead-letter reason of a stage whose input is another stage's output: an empty
/// value, or one of [`DecodeError::reason`]'s.
pub const DECODE_REASONS: &[&str] = &[
    "empty_payload",
    "unknown_format",
    "malformed",
    "missing_field",
    "wrong_type",
    "unknown_schema_id",
];

impl DecodeError {
    /// The dead-letter reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Malformed { .. } => "malformed",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::WrongType(_) => "wrong_type",
            DecodeError::UnknownSchemaId(_) => "unknown_schema_id",
            DecodeError::UnknownFormat(_) => "unknown_format",
        }
    }
}

/// Why a clean sample could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// JSON serialisation failed.
    #[error("json encode: {0}")]
    Json(#[from] serde_json::Error),
    /// Avro serialisation failed.
    #[error("avro encode: {0}")]
    Avro(String),
    /// The clean schema has no registry id yet (no registry configured or not reachable).
    #[error("the clean telemetry schema has no registry id: is [registry] url set and reachable?")]
    NoCleanSchemaId,
    /// An output schema was never registered.
    #[error("the {0} schema has no registry id: is [registry] url set and reachable?")]
    NoSchemaId(&'static str),
}

/// Decodes a raw telemetry payload in whichever format it is in.
pub fn decode_sample(
    payload: &[u8],
    avro: &AvroCodec,
) -> Result<(Format, TelemetrySample), DecodeError> {
    match Format::detect(payload) {
        Some(Format::Json) => json::decode_sample(payload).map(|s| (Format::Json, s)),
        Some(Format::Avro) => avro.decode_sample(payload).map(|s| (Format::Avro, s)),
        None => Err(DecodeError::UnknownFormat(
            payload.first().copied().unwrap_or(0),
        )),
    }
}

/// Decodes a clean telemetry payload (what the filter writes) in whichever format it is in.
pub fn decode_clean(
    payload: &[u8],
    avro: &AvroCodec,
) -> Result<(Format, CleanSample), DecodeError> {
    match Format::detect(payload) {
        Some(Format::Json) => json::decode_clean(payload).map(|s| (Format::Json, s)),
        Some(Format::Avro) => avro.decode_clean(payload).map(|s| (Format::Avro, s)),
        None => Err(DecodeError::UnknownFormat(
            payload.first().copied().unwrap_or(0),
        )),
    }
}

/// Encodes a clean sample in `format`.
pub fn encode_clean(
    sample: &CleanSample,
    format: Format,
    avro: &AvroCodec,
) -> Result<Vec<u8>, EncodeError> {
    match format {
        Format::Json => json::encode_clean(sample),
        Format::Avro => avro.encode_clean(sample),
    }
}

/// Encodes one of the models' or decide's records in `format`; Avro falls back to JSON (with
/// a warning) when its schema has no registry id yet, as aggregates do: a record late in a
/// readable format beats a record lost.
pub fn encode_event<T: serde::Serialize>(
    value: &T,
    kind: EventSchema,
    format: Format,
    avro: &AvroCodec,
) -> Result<Vec<u8>, EncodeError> {
    if format == Format::Avro {
        match avro.encode_event(kind, value) {
            Ok(p) => return Ok(p),
            Err(e) => tracing::warn!(error = %e, "{} written as JSON", kind.key()),
        }
    }
    Ok(serde_json::to_vec(value)?)
}

/// Decodes one of the models' or decide's records in whichever format it is in.
pub fn decode_event<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    kind: EventSchema,
    avro: &AvroCodec,
) -> Result<(Format, T), DecodeError> {
    match Format::detect(payload) {
        Some(Format::Json) => serde_json::from_slice(payload)
            .map(|v| (Format::Json, v))
            .map_err(|e| json::classify(&e)),
        Some(Format::Avro) => avro.decode_event(kind, payload).map(|v| (Format::Avro, v)),
        None => Err(DecodeError::UnknownFormat(
            payload.first().copied().unwrap_or(0),
        )),
    }
}

/// Decodes a window aggregate (what the window stage writes) in whichever format it is in.
pub fn decode_aggregate(
    payload: &[u8],
    avro: &AvroCodec,
) -> Result<(Format, crate::stages::window::WindowAggregate), DecodeError> {
    let format = Format::detect(payload)
        .ok_or_else(|| DecodeError::UnknownFormat(payload.first().copied().unwrap_or(0)))?;
    let wire: AggregateWire = match format {
        Format::Json => serde_json::from_slice(payload).map_err(|e| json::classify(&e))?,
        Format::Avro => avro.read_aggregate(payload)?,
    };
    Ok((format, wire.into_aggregate()))
}

/// A window aggregate as either wire format spells it: times as RFC 3339 text (JSON) or
/// epoch milliseconds (Avro).
#[derive(serde::Deserialize)]
#[serde(rename = "WindowAggregate")]
pub(crate) struct AggregateWire {
    window_id: String,
    service: String,
    metric: String,
    #[serde(default)]
    unit: Option<String>,
    #[serde(deserialize_with = "epoch_ms")]
    window_start: i64,
    #[serde(deserialize_with = "epoch_ms")]
    window_end: i64,
    count: i64,
    sum: f64,
    mean: f64,
    min: f64,
    max: f64,
    #[serde(default)]
    stddev: Option<f64>,
    p50: f64,
    p95: f64,
    p99: f64,
    rate: f64,
    instances: i64,
    #[serde(default)]
    top_instance: Option<String>,
}

impl AggregateWire {
    fn into_aggregate(self) -> crate::stages::window::WindowAggregate {
        crate::stages::window::WindowAggregate {
            window_id: self.window_id,
            service: self.service,
            metric: self.metric,
            unit: self.unit,
            window_start: self.window_start,
            window_end: self.window_end,
            count: self.count,
            sum: self.sum,
            mean: self.mean,
            min: self.min,
            max: self.max,
            stddev: self.stddev,
            p50: self.p50,
            p95: self.p95,
            p99: self.p99,
            rate: self.rate,
            instances: self.instances,
            top_instance: self.top_instance,
        }
    }
}

fn epoch_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    // A visitor, not an untagged enum: serde buffers an untagged value before trying each
    // variant, which was a third of decoding an aggregate.
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("epoch milliseconds or an RFC 3339 time")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom(format!("time {v} ms is out of range")))
        }
        fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<i64, E> {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|t| t.timestamp_millis())
                .map_err(|e| E::custom(format!("time {t:?}: {e}")))
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_format_from_the_first_byte() {
        assert_eq!(Format::detect(b"{\"a\":1}"), Some(Format::Json));
        assert_eq!(Format::detect(b"  \n{}"), Some(Format::Json));
        assert_eq!(Format::detect(b"\xEF\xBB\xBF{}"), Some(Format::Json));
        assert_eq!(Format::detect(&[0, 0, 0, 0, 7, 2]), Some(Format::Avro));
        assert_eq!(Format::detect(b"[1,2]"), None);
        assert_eq!(Format::detect(b""), None);
        assert_eq!(confluent_schema_id(&[0, 0, 0, 1, 2, 9]), Some(258));
        assert_eq!(confluent_schema_id(&[0, 0, 1]), None);
    }
}
