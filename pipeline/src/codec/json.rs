//! JSON telemetry: `{"service", "instance", "metric", "value", "unit"?, "ts", "labels"?}`.
//!
//! Decoding borrows from the payload where it can and classifies every failure, because the
//! reason is what a person reads on the dead-letter topic. Unknown fields are ignored so
//! producers can add fields before ebb knows them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{DecodeError, EncodeError};
use crate::record::{CleanSample, RawTimestamp, TelemetrySample};

#[derive(Deserialize)]
struct JsonSample<'a> {
    #[serde(borrow)]
    service: Cow<'a, str>,
    #[serde(borrow)]
    instance: Cow<'a, str>,
    #[serde(borrow)]
    metric: Cow<'a, str>,
    value: Number,
    #[serde(default, borrow)]
    unit: Option<Cow<'a, str>>,
    ts: Timestamp,
    #[serde(default)]
    labels: Option<Labels>,
}

/// A value: a JSON number, or a numeric string (some emitters send `"NaN"` or `"1.5"`).
struct Number(f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Number;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or a numeric string")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
                Ok(Number(v))
            }
            #[allow(clippy::cast_precision_loss)]
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            #[allow(clippy::cast_precision_loss)]
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Number, E> {
                v.trim()
                    .parse::<f64>()
                    .map(Number)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// A timestamp: a string or an epoch number.
struct Timestamp(RawTimestamp);

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 string or an epoch number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Timestamp, E> {
                Ok(Timestamp(RawTimestamp::Float(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Timestamp, E> {
                Ok(Timestamp(RawTimestamp::Int(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Timestamp, E> {
                Ok(Timestamp(match i64::try_from(v) {
                    Ok(n) => RawTimestamp::Int(n),
                    #[allow(clippy::cast_precision_loss)]
                    Err(_) => RawTimestamp::Float(v as f64),
                }))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Ok(Timestamp(RawTimestamp::Text(v.to_string())))
            }
        }
        d.deserialize_any(V)
    }
}

/// Labels: an object of scalars; numbers and booleans are kept as their JSON text.
struct Labels(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Scalar(String);
        impl<'de> Deserialize<'de> for Scalar {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = Scalar;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string, number or boolean label value")
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                        Ok(Scalar(v.to_string()))
                    }
                    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                        Ok(Scalar(v.to_string()))
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                        Ok(Scalar(v.to_string()))
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                        Ok(Scalar(v.to_string()))
                    }
                    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                        Ok(Scalar(v.to_string()))
                    }
                }
                d.deserialize_any(V)
            }
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of label values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, Scalar(v))) = map.next_entry::<Cow<'de, str>, Scalar>()? {
                    out.insert(k.into_owned(), v);
                }
                Ok(Labels(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A serde_json error as a decode error: bad syntax is malformed, an absent field missing, any
/// other bad shape a type error.
pub(crate) fn classify(err: &serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    let msg = err.to_string();
    match err.classify() {
        Category::Data if msg.starts_with("missing field") => DecodeError::MissingField(msg),
        Category::Data => DecodeError::WrongType(msg),
        Category::Syntax | Category::Eof | Category::Io => DecodeError::Malformed {
            format: "json",
            detail: msg,
        },
    }
}

/// Deepest nesting accepted. Telemetry is two levels deep; serde_json skips unknown fields
/// without any depth limit, so without this a payload could hide arbitrary nesting there.
pub const MAX_DEPTH: usize = 32;

/// True if `payload` nests objects or arrays deeper than `max` (strings are skipped).
pub fn nested_deeper_than(payload: &[u8], max: usize) -> bool {
    // Cheap first look: with no more brackets than `max` in total, no nesting can exceed it.
    if payload.iter().filter(|&&b| b == b'{' || b == b'[').count() <= max {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in payload {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Decodes one raw JSON telemetry sample.
pub fn decode_sample(payload: &[u8]) -> Result<TelemetrySample, DecodeError> {
    if nested_deeper_than(payload, MAX_DEPTH) {
        return Err(DecodeError::Malformed {
            format: "json",
            detail: format!("nested deeper than {MAX_DEPTH} levels"),
        });
    }
    let s: JsonSample<'_> = serde_json::from_slice(payload).map_err(|e| classify(&e))?;
    Ok(TelemetrySample {
        service: s.service.into_owned(),
        instance: s.instance.into_owned(),
        metric: s.metric.into_owned(),
        value: s.value.0,
        unit: s.unit.map(Cow::into_owned),
        ts: s.ts.0,
        labels: s.labels.map(|l| l.0).unwrap_or_default(),
    })
}

#[derive(Serialize, Deserialize)]
struct CleanJson<'a> {
    #[serde(borrow)]
    service: Cow<'a, str>,
    #[serde(borrow)]
    instance: Cow<'a, str>,
    #[serde(borrow)]
    metric: Cow<'a, str>,
    value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    unit: Option<Cow<'a, str>>,
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(default)]
    labels: Cow<'a, BTreeMap<String, String>>,
}

/// Encodes a clean sample as JSON, `ts` in RFC 3339 UTC ending in `Z`.
pub fn encode_clean(sample: &CleanSample) -> Result<Vec<u8>, EncodeError> {
    let out = CleanJson {
        service: Cow::Borrowed(&sample.service),
        instance: Cow::Borrowed(&sample.instance),
        metric: Cow::Borrowed(&sample.metric),
        value: sample.value,
        unit: sample.unit.as_deref().map(Cow::Borrowed),
        ts: Cow::Owned(sample.ts_rfc3339()),
        labels: Cow::Borrowed(&sample.labels),
    };
    // Clean records run to ~200 bytes: serde_json's 128-byte start would grow once each.
    let mut buf = Vec::with_capacity(256);
    serde_json::to_writer(&mut buf, &out)?;
    Ok(buf)
}

/// Decodes a clean sample written by [`encode_clean`] (used downstream and in tests).
pub fn decode_clean(payload: &[u8]) -> Result<CleanSample, DecodeError> {
    let c: CleanJson<'_> = serde_json::from_slice(payload).map_err(|e| classify(&e))?;
    let ts = chrono::DateTime::parse_from_rfc3339(&c.ts)
        .map_err(|e| DecodeError::WrongType(format!("ts {:?}: {e}", c.ts)))?
        .with_timezone(&chrono::Utc);
    Ok(CleanSample {
        service: c.service.into_owned(),
        instance: c.instance.into_owned(),
        metric: c.metric.into_owned(),
        value: c.value,
        unit: c.unit.map(Cow::into_owned),
        ts,
        labels: c.labels.into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(payload: &str) -> TelemetrySample {
        match decode_sample(payload.as_bytes()) {
            Ok(s) => s,
            Err(e) => panic!("{payload}: {e}"),
        }
    }

    fn reason(payload: &[u8]) -> &'static str {
        match decode_sample(payload) {
            Ok(s) => panic!("accepted {s:?}"),
            Err(e) => e.reason(),
        }
    }

    #[test]
    fn decodes_the_contract_shape_with_optional_fields() {
        let s = ok(
            r#"{"service":"api","instance":"i-1","metric":"cpu","value":0.73,"unit":"ratio","ts":"2024-01-01T00:00:00Z","labels":{"zone":"a"}}"#,
        );
        assert_eq!(s.service, "api");
        assert_eq!(s.value, 0.73);
        assert_eq!(s.unit.as_deref(), Some("ratio"));
        assert_eq!(s.ts, RawTimestamp::Text("2024-01-01T00:00:00Z".into()));
        assert_eq!(s.labels.get("zone").map(String::as_str), Some("a"));
        let bare =
            ok(r#"{"service":"api","instance":"i-1","metric":"cpu","value":1,"ts":1700000000}"#);
        assert_eq!(bare.unit, None);
        assert!(bare.labels.is_empty());
        assert_eq!(bare.ts, RawTimestamp::Int(1_700_000_000));
    }

    #[test]
    fn tolerates_unknown_fields_numeric_strings_and_scalar_labels() {
        let s = ok(
            r#"{"v":2,"service":"a","instance":"b","metric":"c","value":"NaN","ts":1.5,"labels":{"code":500,"ok":true}}"#,
        );
        assert!(s.value.is_nan());
        assert_eq!(s.ts, RawTimestamp::Float(1.5));
        assert_eq!(s.labels.get("code").map(String::as_str), Some("500"));
        assert_eq!(s.labels.get("ok").map(String::as_str), Some("true"));
    }

    #[test]
    fn classifies_bad_input() {
        assert_eq!(
            reason(br#"{"service":"a","instance":"b","metric":"c","val"#),
            "malformed"
        );
        assert_eq!(reason(b"{not json}"), "malformed");
        assert_eq!(
            reason(br#"{"service":"a","metric":"c","value":1,"ts":1}"#),
            "missing_field"
        );
        assert_eq!(
            reason(br#"{"service":"a","instance":"b","metric":"c","value":true,"ts":1}"#),
            "wrong_type"
        );
        assert_eq!(
            reason(br#"{"service":1,"instance":"b","metric":"c","value":1,"ts":1}"#),
            "wrong_type"
        );
        assert_eq!(reason(br#"{"service":"a","instance":"b","metric":"c","value":1,"ts":1,"labels":{"x":{"y":1}}}"#), "wrong_type");
        assert_eq!(
            reason(br#"{"service":"a","instance":"b","metric":"c","value":"fast","ts":1}"#),
            "wrong_type"
        );
    }

    #[test]
    fn deep_nesting_is_malformed_not_a_stack_overflow() {
        let deep = format!(
            r#"{{"service":"a","x":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(reason(deep.as_bytes()), "malformed");
        let inside_string = format!(
            r#"{{"service":"a","instance":"b","metric":"c","value":1,"ts":1,"note":"{}"}}"#,
            "[".repeat(100)
        );
        assert!(
            decode_sample(inside_string.as_bytes()).is_ok(),
            "brackets inside strings do not nest"
        );
        let escaped = r#"{"service":"a\"[[","instance":"b","metric":"c","value":1,"ts":1}"#;
        assert!(!nested_deeper_than(escaped.as_bytes(), 1));
    }

    #[test]
    fn clean_json_round_trips_and_ends_in_z() {
        let s = CleanSample {
            service: "api".into(),
            instance: "abc".into(),
            metric: "cpu".into(),
            value: 12.5,
            unit: None,
            ts: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            labels: BTreeMap::new(),
        };
        let bytes = encode_clean(&s).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains(r#""ts":"2023-11-14T22:13:20Z""#), "{text}");
        assert_eq!(decode_clean(&bytes), Ok(s));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_sample(&bytes);
        }

        #[test]
        fn clean_json_round_trips_any_sample(
            service in "[a-z]{1,12}", instance in "\\PC{1,20}", metric in "[a-z_]{1,16}",
            value in -1e12f64..1e12, secs in 0i64..4_000_000_000, micros in 0u32..1_000_000,
            labels in proptest::collection::btree_map("\\PC{1,8}", "\\PC{0,8}", 0..4),
        ) {
            let s = CleanSample {
                service, instance, metric, value, unit: Some("ms".into()),
                ts: chrono::DateTime::from_timestamp(secs, micros * 1000).unwrap_or_default(),
                labels,
            };
            let bytes = encode_clean(&s).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(decode_clean(&bytes), Ok(s));
        }
    }
}
