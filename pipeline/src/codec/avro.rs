//! Avro telemetry in the Confluent wire format.
//!
//! Decoding needs the writer's schema, which only the registry knows. The runner fetches
//! any schema a batch needs into the [`SchemaCache`] before the stage sees the batch, so
//! decoding itself stays pure and never waits on the network.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, RwLock};

use apache_avro::types::Value;
use apache_avro::{reader::datum::GenericDatumReader, writer::datum::GenericDatumWriter, Schema};

use super::{confluent_schema_id, DecodeError, EncodeError, CONFLUENT_MAGIC};
use crate::record::{CleanSample, RawTimestamp, TelemetrySample};

/// The raw telemetry schema (`schemas/telemetry.raw.avsc`).
pub const RAW_SCHEMA: &str = include_str!("../../../schemas/telemetry.raw.avsc");
/// The clean telemetry schema (`schemas/telemetry.clean.avsc`).
pub const CLEAN_SCHEMA: &str = include_str!("../../../schemas/telemetry.clean.avsc");

/// The window aggregate schema (`schemas/aggregates.avsc`).
pub const AGGREGATES_SCHEMA: &str = include_str!("../../../schemas/aggregates.avsc");

/// Schema key of window aggregates.
pub const AGGREGATES_KEY: &str = "aggregates";

static AGGREGATES: LazyLock<Result<Schema, String>> =
    LazyLock::new(|| Schema::parse_str(AGGREGATES_SCHEMA).map_err(|e| e.to_string()));

static AGGREGATES_WRITER: LazyLock<Result<GenericDatumWriter<'static>, String>> =
    LazyLock::new(|| {
        let schema = AGGREGATES
            .as_ref()
            .map_err(|e| format!("aggregates schema does not parse: {e}"))?;
        GenericDatumWriter::builder(schema)
            .validate(false)
            .build()
            .map_err(|e| e.to_string())
    });

static CLEAN: LazyLock<Result<Schema, String>> =
    LazyLock::new(|| Schema::parse_str(CLEAN_SCHEMA).map_err(|e| e.to_string()));

// Built once: resolving a schema costs more than encoding a sample.
static CLEAN_WRITER: LazyLock<Result<GenericDatumWriter<'static>, String>> = LazyLock::new(|| {
    let schema = CLEAN
        .as_ref()
        .map_err(|e| format!("clean schema does not parse: {e}"))?;
    GenericDatumWriter::builder(schema)
        .validate(false)
        .build()
        .map_err(|e| e.to_string())
});

/// A writer schema from the registry, with its reader built once.
struct Entry {
    reader: GenericDatumReader<'static>,
}

/// What the registry said about each schema id seen so far, shared between the runner
/// (which fills it) and the stage (which reads it).
#[derive(Clone, Default)]
pub struct SchemaCache {
    inner: Arc<RwLock<HashMap<u32, Option<Arc<Entry>>>>>,
    outputs: Arc<RwLock<HashMap<String, u32>>>,
}

impl std::fmt::Debug for SchemaCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.read().map(|m| m.len()).unwrap_or(0);
        write!(f, "SchemaCache({n} ids)")
    }
}

impl SchemaCache {
    /// True if the registry has answered for `id`, either way.
    pub fn knows(&self, id: u32) -> bool {
        self.inner
            .read()
            .map(|m| m.contains_key(&id))
            .unwrap_or(false)
    }

    /// Stores the writer schema of `id`. Schemas live as long as the process: the registry
    /// never changes what an id means, and a fleet has few of them.
    pub fn insert(&self, id: u32, schema_json: &str) -> Result<(), String> {
        let schema = Schema::parse_str(schema_json)
            .map_err(|e| format!("schema {id} does not parse: {e}"))?;
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let reader = GenericDatumReader::builder(schema)
            .build()
            .map_err(|e| format!("schema {id} cannot be resolved: {e}"))?;
        if let Ok(mut m) = self.inner.write() {
            m.insert(id, Some(Arc::new(Entry { reader })));
        }
        Ok(())
    }

    /// Records that the registry does not know `id`.
    pub fn insert_missing(&self, id: u32) {
        if let Ok(mut m) = self.inner.write() {
            m.insert(id, None);
        }
    }

    /// Records the registry id of an output schema, by its schema key (e.g. `telemetry.clean`).
    pub fn set_output_id(&self, key: &str, id: u32) {
        if let Ok(mut m) = self.outputs.write() {
            m.insert(key.to_string(), id);
        }
    }

    /// The registry id of an output schema, once registered.
    pub fn output_id(&self, key: &str) -> Option<u32> {
        self.outputs.read().ok().and_then(|m| m.get(key).copied())
    }

    fn get(&self, id: u32) -> Option<Option<Arc<Entry>>> {
        self.inner.read().ok().and_then(|m| m.get(&id).cloned())
    }
}

/// Schema key of clean telemetry: the topic's base name, whatever prefix the topic has.
pub const CLEAN_KEY: &str = "telemetry.clean";

/// Confluent-framed Avro codec for telemetry.
#[derive(Clone, Debug, Default)]
pub struct AvroCodec {
    /// Writer schemas by id and output schema ids, filled by the runner from the registry.
    pub schemas: SchemaCache,
}

#[cfg(test)]
fn field<'v>(fields: &'v [(String, Value)], name: &str) -> Option<&'v Value> {
    fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// Takes a field's value out of a decoded record (unions unwrapped), so strings move into the
/// sample instead of being copied.
fn take(fields: &mut Vec<(String, Value)>, name: &str) -> Option<Value> {
    let at = fields.iter().position(|(n, _)| n == name)?;
    Some(match fields.swap_remove(at).1 {
        Value::Union(_, inner) => *inner,
        other => other,
    })
}

fn string(fields: &mut Vec<(String, Value)>, name: &str) -> Result<String, DecodeError> {
    match take(fields, name) {
        Some(Value::String(s) | Value::Enum(_, s)) => Ok(s),
        Some(other) => Err(DecodeError::WrongType(format!(
            "{name}: expected string, got {other:?}"
        ))),
        None => Err(DecodeError::MissingField(format!("missing field `{name}`"))),
    }
}

#[allow(clippy::cast_precision_loss)]
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Double(d) => Some(*d),
        Value::Float(f) => Some(f64::from(*f)),
        Value::Long(n) => Some(*n as f64),
        Value::Int(n) => Some(f64::from(*n)),
        _ => None,
    }
}

fn to_sample(value: Value) -> Result<TelemetrySample, DecodeError> {
    let Value::Record(mut fields) = value else {
        return Err(DecodeError::WrongType(format!(
            "expected a record, got {value:?}"
        )));
    };
    let value = match take(&mut fields, "value") {
        Some(v) => number(&v).ok_or_else(|| {
            DecodeError::WrongType(format!("value: expected a number, got {v:?}"))
        })?,
        None => return Err(DecodeError::MissingField("missing field `value`".into())),
    };
    let ts = match take(&mut fields, "ts") {
        Some(Value::String(s)) => RawTimestamp::Text(s),
        Some(Value::Long(n) | Value::TimestampMillis(n)) => RawTimestamp::Int(n),
        Some(Value::Int(n)) => RawTimestamp::Int(i64::from(n)),
        Some(Value::Double(d)) => RawTimestamp::Float(d),
        Some(Value::Float(f)) => RawTimestamp::Float(f64::from(f)),
        Some(other) => {
            return Err(DecodeError::WrongType(format!(
                "ts: expected string or number, got {other:?}"
            )))
        }
        None => return Err(DecodeError::MissingField("missing field `ts`".into())),
    };
    let unit = match take(&mut fields, "unit") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            return Err(DecodeError::WrongType(format!(
                "unit: expected string, got {other:?}"
            )))
        }
    };
    let labels = match take(&mut fields, "labels") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Map(m)) => m
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                Value::Union(_, inner) => match *inner {
                    Value::String(s) => Ok((k, s)),
                    other => Err(DecodeError::WrongType(format!(
                        "labels.{k}: expected string, got {other:?}"
                    ))),
                },
                other => Err(DecodeError::WrongType(format!(
                    "labels.{k}: expected string, got {other:?}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(DecodeError::WrongType(format!(
                "labels: expected a map, got {other:?}"
            )))
        }
    };
    Ok(TelemetrySample {
        service: string(&mut fields, "service")?,
        instance: string(&mut fields, "instance")?,
        metric: string(&mut fields, "metric")?,
        value,
        unit,
        ts,
        labels,
    })
}

/// A raw sample as serde sees it, for the decoding fast path. apache-avro matches the
/// struct's name to the record's, so it is named like `schemas/telemetry.raw.avsc`; other
/// record names take the slower, general path.
#[derive(serde::Deserialize)]
#[serde(rename = "Sample")]
struct RawAvro {
    service: String,
    instance: String,
    metric: String,
    value: f64,
    #[serde(default)]
    unit: Option<String>,
    ts: AvroTs,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl RawAvro {
    fn into_sample(self) -> TelemetrySample {
        TelemetrySample {
            service: self.service,
            instance: self.instance,
            metric: self.metric,
            value: self.value,
            unit: self.unit,
            ts: self.ts.0,
            labels: self.labels,
        }
    }
}

/// The `ts` union (string, long or double).
struct AvroTs(RawTimestamp);

impl<'de> serde::Deserialize<'de> for AvroTs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = AvroTs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, long or double timestamp")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AvroTs, E> {
                Ok(AvroTs(RawTimestamp::Text(v.to_string())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<AvroTs, E> {
                Ok(AvroTs(RawTimestamp::Text(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<AvroTs, E> {
                Ok(AvroTs(RawTimestamp::Int(v)))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<AvroTs, E> {
                Ok(AvroTs(RawTimestamp::Float(v)))
            }
        }
        d.deserialize_any(V)
    }
}

/// The clean record as serde sees it: written straight under the clean schema, with no
/// intermediate `Value` tree (which cost an allocation per field name per record).
#[derive(serde::Serialize)]
struct CleanAvro<'a> {
    service: &'a str,
    instance: &'a str,
    metric: &'a str,
    value: f64,
    unit: Option<&'a str>,
    ts: String,
    labels: &'a BTreeMap<String, String>,
}

/// A datum's bytes that remember whether decoding asked for more than there was.
///
/// apache-avro reads a string, boolean or union cut off by the end of the input as null
/// rather than failing, so a truncated record would otherwise decode "successfully" with
/// its last fields gone. A whole datum never reads past its own end.
struct Datum<'a> {
    rest: &'a [u8],
    overran: bool,
}

impl std::io::Read for Datum<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && self.rest.is_empty() {
            self.overran = true;
        }
        std::io::Read::read(&mut self.rest, buf)
    }
}

/// Runs `read` over the datum after the Confluent frame and accepts its result only if it
/// used exactly the datum's bytes.
fn whole<T>(
    payload: &[u8],
    read: impl FnOnce(&mut Datum<'_>) -> apache_avro::AvroResult<T>,
) -> Result<T, DecodeError> {
    let malformed = |detail: String| DecodeError::Malformed {
        format: "avro",
        detail,
    };
    let mut datum = Datum {
        rest: payload.get(5..).unwrap_or_default(),
        overran: false,
    };
    let value = read(&mut datum).map_err(|e| malformed(e.to_string()));
    if datum.overran {
        return Err(malformed("the datum ends early (truncated)".into()));
    }
    let value = value?;
    if !datum.rest.is_empty() {
        return Err(malformed(format!(
            "{} trailing bytes after the datum",
            datum.rest.len()
        )));
    }
    Ok(value)
}

impl AvroCodec {
    /// The writer schema a Confluent-framed payload names.
    fn writer(&self, payload: &[u8]) -> Result<Arc<Entry>, DecodeError> {
        let id = confluent_schema_id(payload).ok_or_else(|| DecodeError::Malformed {
            format: "avro",
            detail: format!(
                "{} bytes is too short for the Confluent frame",
                payload.len()
            ),
        })?;
        match self.schemas.get(id) {
            Some(Some(entry)) => Ok(entry),
            // The runner asks the registry before processing; None means it said 404 (or, in
            // a test without a registry, nobody asked).
            Some(None) | None => Err(DecodeError::UnknownSchemaId(id)),
        }
    }

    /// Decodes a Confluent-framed raw sample with the writer schema named in its frame.
    /// Any record schema carrying the contract's fields is accepted, so producers may evolve.
    pub fn decode_sample(&self, payload: &[u8]) -> Result<TelemetrySample, DecodeError> {
        let entry = self.writer(payload)?;
        // Fast path: straight into the sample, no Value tree. Anything it refuses (a type
        // mismatch, an evolved schema it cannot map) is decoded again through Value, which
        // accepts every compatible shape and words the error a dead letter carries.
        if let Ok(raw) = whole(payload, |d| entry.reader.read_deser::<RawAvro>(d)) {
            return Ok(raw.into_sample());
        }
        to_sample(whole(payload, |d| entry.reader.read_value(d))?)
    }

    /// Encodes a clean sample under the registered clean schema.
    pub fn encode_clean(&self, s: &CleanSample) -> Result<Vec<u8>, EncodeError> {
        let id = self
            .schemas
            .output_id(CLEAN_KEY)
            .ok_or(EncodeError::NoCleanSchemaId)?;
        let writer = CLEAN_WRITER
            .as_ref()
            .map_err(|e| EncodeError::Avro(e.clone()))?;
        let record = CleanAvro {
            service: &s.service,
            instance: &s.instance,
            metric: &s.metric,
            value: s.value,
            unit: s.unit.as_deref(),
            ts: s.ts_rfc3339(),
            labels: &s.labels,
        };
        let mut out = Vec::with_capacity(128);
        out.push(CONFLUENT_MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
        writer
            .write_ser(&mut out, &record)
            .map_err(|e| EncodeError::Avro(e.to_string()))?;
        Ok(out)
    }
}

/// A clean sample as the clean schema reads it.
#[derive(serde::Deserialize)]
#[serde(rename = "CleanSample")]
struct CleanAvroOwned {
    service: String,
    instance: String,
    metric: String,
    value: f64,
    #[serde(default)]
    unit: Option<String>,
    ts: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl AvroCodec {
    /// Reads a Confluent-framed record straight into `T` under its writer schema.
    fn read<T: serde::de::DeserializeOwned>(&self, payload: &[u8]) -> Result<T, DecodeError> {
        let entry = self.writer(payload)?;
        whole(payload, |d| entry.reader.read_deser(d))
    }

    /// Decodes a Confluent-framed clean sample (what the filter writes).
    pub fn decode_clean(&self, payload: &[u8]) -> Result<CleanSample, DecodeError> {
        let c: CleanAvroOwned = self.read(payload)?;
        let ts = chrono::DateTime::parse_from_rfc3339(&c.ts)
            .map_err(|e| DecodeError::WrongType(format!("ts {:?}: {e}", c.ts)))?
            .with_timezone(&chrono::Utc);
        Ok(CleanSample {
            service: c.service,
            instance: c.instance,
            metric: c.metric,
            value: c.value,
            unit: c.unit,
            ts,
            labels: c.labels,
        })
    }

    /// Reads a Confluent-framed window aggregate.
    pub(crate) fn read_aggregate(
        &self,
        payload: &[u8],
    ) -> Result<super::AggregateWire, DecodeError> {
        self.read(payload)
    }

    /// Encodes a window aggregate under the registered aggregates schema.
    pub fn encode_aggregate(
        &self,
        a: &crate::stages::window::WindowAggregate,
    ) -> Result<Vec<u8>, EncodeError> {
        let id = self
            .schemas
            .output_id(AGGREGATES_KEY)
            .ok_or(EncodeError::NoSchemaId(AGGREGATES_KEY))?;
        let writer = AGGREGATES_WRITER
            .as_ref()
            .map_err(|e| EncodeError::Avro(e.clone()))?;
        let mut out = Vec::with_capacity(192);
        out.push(CONFLUENT_MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
        writer
            .write_ser(&mut out, &AggregateAvro(a))
            .map_err(|e| EncodeError::Avro(e.to_string()))?;
        Ok(out)
    }
}

/// Serialises an aggregate with its timestamps as longs (the JSON form writes RFC 3339).
struct AggregateAvro<'a>(&'a crate::stages::window::WindowAggregate);

impl serde::Serialize for AggregateAvro<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let a = self.0;
        let mut r = s.serialize_struct("WindowAggregate", 18)?;
        r.serialize_field("window_id", &a.window_id)?;
        r.serialize_field("service", &a.service)?;
        r.serialize_field("metric", &a.metric)?;
        r.serialize_field("unit", &a.unit)?;
        r.serialize_field("window_start", &a.window_start)?;
        r.serialize_field("window_end", &a.window_end)?;
        r.serialize_field("count", &a.count)?;
        r.serialize_field("sum", &a.sum)?;
        r.serialize_field("mean", &a.mean)?;
        r.serialize_field("min", &a.min)?;
        r.serialize_field("max", &a.max)?;
        r.serialize_field("stddev", &a.stddev)?;
        r.serialize_field("p50", &a.p50)?;
        r.serialize_field("p95", &a.p95)?;
        r.serialize_field("p99", &a.p99)?;
        r.serialize_field("rate", &a.rate)?;
        r.serialize_field("instances", &a.instances)?;
        r.serialize_field("top_instance", &a.top_instance)?;
        r.end()
    }
}

/// The anomaly event schema (`schemas/anomalies.avsc`).
pub const ANOMALIES_SCHEMA: &str = include_str!("../../../schemas/anomalies.avsc");
/// The forecast event schema (`schemas/forecasts.avsc`).
pub const FORECASTS_SCHEMA: &str = include_str!("../../../schemas/forecasts.avsc");
/// The command schema (`schemas/commands.avsc`).
pub const COMMANDS_SCHEMA: &str = include_str!("../../../schemas/commands.avsc");

/// A record type that travels as the serde shape of a Rust struct and, in Avro, under one of
/// `schemas/`: the models' and decide's outputs. Few per window, so they go through Avro's
/// `Value` (validated against the schema on the way out) rather than a hand-written fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSchema {
    /// `anomalies`.
    Anomalies,
    /// `forecasts`.
    Forecasts,
    /// `commands`.
    Commands,
}

/// A shipped schema parsed once, with its writer.
struct Compiled {
    schema: &'static Schema,
    writer: GenericDatumWriter<'static>,
}

impl Compiled {
    fn new(text: &str) -> Result<Self, String> {
        let schema = Schema::parse_str(text).map_err(|e| format!("schema does not parse: {e}"))?;
        // One per event kind for the process's life: leaking it gives the writer its
        // 'static borrow without a self-referential struct.
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let writer = GenericDatumWriter::builder(schema)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { schema, writer })
    }
}

impl EventSchema {
    /// The schema key the runner registers the schema's id under: the topic's base name.
    pub fn key(self) -> &'static str {
        match self {
            EventSchema::Anomalies => "anomalies",
            EventSchema::Forecasts => "forecasts",
            EventSchema::Commands => "commands",
        }
    }

    /// The schema text.
    pub fn text(self) -> &'static str {
        match self {
            EventSchema::Anomalies => ANOMALIES_SCHEMA,
            EventSchema::Forecasts => FORECASTS_SCHEMA,
            EventSchema::Commands => COMMANDS_SCHEMA,
        }
    }

    fn compiled(self) -> Result<&'static Compiled, String> {
        static ANOMALIES: LazyLock<Result<Compiled, String>> =
            LazyLock::new(|| Compiled::new(ANOMALIES_SCHEMA));
        static FORECASTS: LazyLock<Result<Compiled, String>> =
            LazyLock::new(|| Compiled::new(FORECASTS_SCHEMA));
        static COMMANDS: LazyLock<Result<Compiled, String>> =
            LazyLock::new(|| Compiled::new(COMMANDS_SCHEMA));
        let cell = match self {
            EventSchema::Anomalies => &ANOMALIES,
            EventSchema::Forecasts => &FORECASTS,
            EventSchema::Commands => &COMMANDS,
        };
        cell.as_ref()
            .map_err(|e| format!("{} schema: {e}", self.key()))
    }
}

impl AvroCodec {
    /// Encodes `value` under `kind`'s registered schema, Confluent-framed.
    pub fn encode_event<T: serde::Serialize>(
        &self,
        kind: EventSchema,
        value: &T,
    ) -> Result<Vec<u8>, EncodeError> {
        let id = self
            .schemas
            .output_id(kind.key())
            .ok_or(EncodeError::NoSchemaId(kind.key()))?;
        let compiled = kind.compiled().map_err(EncodeError::Avro)?;
        let value = apache_avro::to_value(value)
            .and_then(|v| v.resolve(compiled.schema))
            .map_err(|e| EncodeError::Avro(format!("{}: {e}", kind.key())))?;
        let mut out = Vec::with_capacity(256);
        out.push(CONFLUENT_MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
        compiled
            .writer
            .write_value_ref(&mut out, &value)
            .map_err(|e| EncodeError::Avro(format!("{}: {e}", kind.key())))?;
        Ok(out)
    }

    /// Decodes a Confluent-framed `kind` record written under any schema the registry knows
    /// that resolves to ours (fields added with defaults, reordered, and so on).
    pub fn decode_event<T: serde::de::DeserializeOwned>(
        &self,
        kind: EventSchema,
        payload: &[u8],
    ) -> Result<T, DecodeError> {
        let entry = self.writer(payload)?;
        let value = whole(payload, |d| entry.reader.read_value(d))?;
        let compiled = kind.compiled().map_err(DecodeError::WrongType)?;
        let value = value
            .resolve(compiled.schema)
            .map_err(|e| DecodeError::WrongType(format!("{}: {e}", kind.key())))?;
        apache_avro::from_value(&value)
            .map_err(|e| DecodeError::WrongType(format!("{}: {e}", kind.key())))
    }
}

/// Encodes a raw sample under `schema_id` with the raw schema: what producers (the demo
/// generator, tests) send.
pub fn encode_raw(sample: &TelemetrySample, schema_id: u32) -> Result<Vec<u8>, EncodeError> {
    static RAW: LazyLock<Result<Schema, String>> =
        LazyLock::new(|| Schema::parse_str(RAW_SCHEMA).map_err(|e| e.to_string()));
    let schema = RAW
        .as_ref()
        .map_err(|e| EncodeError::Avro(format!("raw schema does not parse: {e}")))?;
    let ts = match &sample.ts {
        RawTimestamp::Text(s) => Value::Union(0, Box::new(Value::String(s.clone()))),
        RawTimestamp::Int(n) => Value::Union(1, Box::new(Value::Long(*n))),
        RawTimestamp::Float(f) => Value::Union(2, Box::new(Value::Double(*f))),
    };
    let value = Value::Record(vec![
        ("service".into(), Value::String(sample.service.clone())),
        ("instance".into(), Value::String(sample.instance.clone())),
        ("metric".into(), Value::String(sample.metric.clone())),
        ("value".into(), Value::Double(sample.value)),
        (
            "unit".into(),
            match &sample.unit {
                None => Value::Union(0, Box::new(Value::Null)),
                Some(u) => Value::Union(1, Box::new(Value::String(u.clone()))),
            },
        ),
        ("ts".into(), ts),
        (
            "labels".into(),
            Value::Map(
                sample
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            ),
        ),
    ]);
    let mut out = vec![CONFLUENT_MAGIC];
    out.extend_from_slice(&schema_id.to_be_bytes());
    let writer = GenericDatumWriter::builder(schema)
        .build()
        .map_err(|e| EncodeError::Avro(e.to_string()))?;
    writer
        .write_value_ref(&mut out, &value)
        .map_err(|e| EncodeError::Avro(e.to_string()))?;
    Ok(out)
}

/// A codec whose cache knows every shipped schema, as a registry would have numbered them:
/// raw 1, clean 2, aggregates 3, anomalies 4, forecasts 5, commands 6; output ids set.
#[cfg(test)]
pub(crate) fn test_codec() -> AvroCodec {
    let codec = AvroCodec::default();
    let schemas: [(u32, &str, &str); 6] = [
        (1, "telemetry.raw", RAW_SCHEMA),
        (2, CLEAN_KEY, CLEAN_SCHEMA),
        (3, AGGREGATES_KEY, AGGREGATES_SCHEMA),
        (4, EventSchema::Anomalies.key(), ANOMALIES_SCHEMA),
        (5, EventSchema::Forecasts.key(), FORECASTS_SCHEMA),
        (6, EventSchema::Commands.key(), COMMANDS_SCHEMA),
    ];
    for (id, key, text) in schemas {
        if let Err(e) = codec.schemas.insert(id, text) {
            panic!("{e}");
        }
        codec.schemas.set_output_id(key, id);
    }
    codec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> AvroCodec {
        let codec = AvroCodec::default();
        codec.schemas.set_output_id(CLEAN_KEY, 2);
        if let Err(e) = codec.schemas.insert(1, RAW_SCHEMA) {
            panic!("{e}");
        }
        if let Err(e) = codec.schemas.insert(2, CLEAN_SCHEMA) {
            panic!("{e}");
        }
        codec
    }

    fn raw() -> TelemetrySample {
        TelemetrySample {
            service: "api".into(),
            instance: "i-1".into(),
            metric: "cpu".into(),
            value: 0.5,
            unit: Some("ratio".into()),
            ts: RawTimestamp::Int(1_700_000_000_000),
            labels: BTreeMap::from([("user_id".into(), "42".into())]),
        }
    }

    #[test]
    fn raw_avro_round_trips_through_the_cached_writer_schema() {
        let codec = codec();
        let bytes = encode_raw(&raw(), 1).unwrap_or_default();
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 1]);
        assert_eq!(codec.decode_sample(&bytes), Ok(raw()));
    }

    #[test]
    fn unknown_ids_truncation_and_trailing_bytes_are_classified() {
        let codec = codec();
        let mut bytes = encode_raw(&raw(), 9).unwrap_or_default();
        assert_eq!(
            codec.decode_sample(&bytes).map_err(|e| e.reason()),
            Err("unknown_schema_id")
        );
        bytes[4] = 1;
        let cut = &bytes[..bytes.len() - 3];
        assert_eq!(
            codec.decode_sample(cut).map_err(|e| e.reason()),
            Err("malformed")
        );
        let mut long = bytes.clone();
        long.push(7);
        assert_eq!(
            codec.decode_sample(&long).map_err(|e| e.reason()),
            Err("malformed")
        );
        assert_eq!(
            codec.decode_sample(&[0, 0, 1]).map_err(|e| e.reason()),
            Err("malformed")
        );
    }

    #[test]
    fn every_truncation_of_a_datum_is_malformed_never_read_as_nulls() {
        let codec = test_codec();
        let clean = CleanSample {
            service: "api".into(),
            instance: "abc".into(),
            metric: "cpu".into(),
            value: 0.5,
            unit: Some("ratio".into()),
            ts: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
        };
        let Ok(bytes) = codec.encode_clean(&clean) else {
            panic!("encodes")
        };
        assert_eq!(codec.decode_clean(&bytes).map(|c| c.unit), Ok(clean.unit));
        for cut in 6..bytes.len() {
            assert_eq!(
                codec.decode_clean(&bytes[..cut]).map_err(|e| e.reason()),
                Err("malformed"),
                "cut at {cut}"
            );
        }
        let raw_bytes = encode_raw(&raw(), 1).unwrap_or_default();
        for cut in 6..raw_bytes.len() {
            assert_eq!(
                codec
                    .decode_sample(&raw_bytes[..cut])
                    .map_err(|e| e.reason()),
                Err("malformed"),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn clean_avro_is_readable_with_the_clean_schema() {
        let codec = codec();
        let clean = CleanSample {
            service: "api".into(),
            instance: "abc".into(),
            metric: "cpu".into(),
            value: 0.5,
            unit: None,
            ts: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            labels: BTreeMap::new(),
        };
        let bytes = match codec.encode_clean(&clean) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        let entry = codec.schemas.get(2).flatten();
        let Some(entry) = entry else {
            panic!("clean schema cached")
        };
        let value = entry
            .reader
            .read_value(&mut &bytes[5..])
            .unwrap_or(Value::Null);
        let Value::Record(fields) = value else {
            panic!("record")
        };
        assert_eq!(
            field(&fields, "ts"),
            Some(&Value::String("2023-11-14T22:13:20Z".into()))
        );
    }

    #[test]
    fn clean_avro_keeps_unit_and_labels() {
        let codec = codec();
        let clean = CleanSample {
            service: "api".into(),
            instance: "abc".into(),
            metric: "latency".into(),
            value: 12.25,
            unit: Some("ms".into()),
            ts: chrono::DateTime::from_timestamp(1_700_000_000, 1_000).unwrap_or_default(),
            labels: BTreeMap::from([
                ("zone".into(), "eu-1".into()),
                ("user_id".into(), "x".into()),
            ]),
        };
        let bytes = codec.encode_clean(&clean).unwrap_or_default();
        let back = codec.decode_sample(&bytes).map_err(|e| e.to_string());
        let back = match back {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(back.unit.as_deref(), Some("ms"));
        assert_eq!(back.labels, clean.labels);
        assert_eq!(back.value, 12.25);
        assert_eq!(
            back.ts,
            RawTimestamp::Text("2023-11-14T22:13:20.000001Z".into())
        );
    }

    #[test]
    fn the_contract_schema_takes_the_fast_path() {
        let codec = codec();
        let Some(Some(entry)) = codec.schemas.get(1) else {
            panic!("raw schema cached")
        };
        for unit in [None, Some("ms".to_string())] {
            let bytes = encode_raw(&TelemetrySample { unit, ..raw() }, 1).unwrap_or_default();
            let fast = entry
                .reader
                .read_deser::<RawAvro>(&mut &bytes[5..])
                .map(|_| ())
                .map_err(|e| e.to_string());
            assert!(fast.is_ok(), "{fast:?}");
        }
    }

    #[test]
    fn every_ts_branch_and_an_evolved_writer_schema_decode() {
        let codec = codec();
        for ts in [
            RawTimestamp::Text("2024-01-01T00:00:00Z".into()),
            RawTimestamp::Int(7),
            RawTimestamp::Float(1.5),
        ] {
            let sample = TelemetrySample {
                ts: ts.clone(),
                unit: None,
                ..raw()
            };
            let bytes = encode_raw(&sample, 1).unwrap_or_default();
            assert_eq!(codec.decode_sample(&bytes), Ok(sample));
        }
        // A producer's newer schema: an extra field first, no unit, no labels, a float value.
        let evolved = r#"{"type":"record","name":"Sample","namespace":"ebb.telemetry","fields":[
            {"name":"region","type":"string"},
            {"name":"service","type":"string"},{"name":"instance","type":"string"},
            {"name":"metric","type":"string"},{"name":"value","type":"float"},
            {"name":"ts","type":"long"}]}"#;
        assert!(codec.schemas.insert(3, evolved).is_ok());
        let schema = Schema::parse_str(evolved).unwrap_or(Schema::Null);
        let value = Value::Record(vec![
            ("region".into(), Value::String("eu".into())),
            ("service".into(), Value::String("api".into())),
            ("instance".into(), Value::String("i-1".into())),
            ("metric".into(), Value::String("cpu".into())),
            ("value".into(), Value::Float(0.5)),
            ("ts".into(), Value::Long(1_700_000_000)),
        ]);
        let mut bytes = vec![0, 0, 0, 0, 3];
        let writer = GenericDatumWriter::builder(&schema).build();
        assert!(writer.is_ok_and(|w| w.write_value_ref(&mut bytes, &value).is_ok()));
        let got = codec.decode_sample(&bytes);
        assert_eq!(
            got,
            Ok(TelemetrySample {
                service: "api".into(),
                instance: "i-1".into(),
                metric: "cpu".into(),
                value: 0.5,
                unit: None,
                ts: RawTimestamp::Int(1_700_000_000),
                labels: BTreeMap::new(),
            })
        );
    }

    #[test]
    fn encoding_clean_without_a_registered_schema_says_why() {
        let codec = AvroCodec::default();
        let err = codec.encode_clean(&CleanSample {
            service: "a".into(),
            instance: "b".into(),
            metric: "c".into(),
            value: 1.0,
            unit: None,
            ts: chrono::DateTime::UNIX_EPOCH,
            labels: BTreeMap::new(),
        });
        assert!(matches!(err, Err(EncodeError::NoCleanSchemaId)));
    }
}
