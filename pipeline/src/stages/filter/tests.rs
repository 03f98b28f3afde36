//! The filter's behaviour, driven without Kafka.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::config::{FilterConfig, IpMode};
use super::process::FilterStage;
use crate::codec::avro::{encode_raw, CLEAN_SCHEMA, RAW_SCHEMA};
use crate::codec::{json, AvroCodec};
use crate::record::{RawTimestamp, TelemetrySample};
use crate::stage::{Emitter, Input, Source, Stage};

const KEY: &[u8] = b"test-key-0123456789";

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2024-06-01T12:00:00Z")
        .map(|d| d.with_timezone(&Utc))
        .unwrap_or_default()
}

fn avro() -> AvroCodec {
    let codec = AvroCodec::default();
    codec
        .schemas
        .set_output_id(crate::codec::avro::CLEAN_KEY, 2);
    assert!(codec.schemas.insert(1, RAW_SCHEMA).is_ok());
    assert!(codec.schemas.insert(2, CLEAN_SCHEMA).is_ok());
    codec
}

fn stage() -> FilterStage {
    FilterStage::new(FilterConfig::default(), KEY, avro(), now())
}

fn source(offset: i64) -> Source {
    Source {
        topic: "telemetry.raw".into(),
        partition: 0,
        offset,
    }
}

/// Runs one payload through the stage; returns the emitter.
fn run(stage: &mut FilterStage, key: Option<&[u8]>, payload: &[u8]) -> Emitter {
    let mut out = Emitter::new();
    let input = Input {
        key,
        payload: Some(payload),
        headers: vec![("trace", b"t1".as_slice())],
        source: source(7),
    };
    stage.process(&input, &mut out);
    assert_eq!(
        out.outputs().len() + out.dead_letters().len(),
        1,
        "exactly one result per record"
    );
    out
}

fn reason_of(stage: &mut FilterStage, payload: &[u8]) -> &'static str {
    let out = run(stage, Some(b"api"), payload);
    match out.dead_letters().first() {
        Some(dl) => {
            assert_eq!(
                dl.payload.as_deref(),
                Some(payload),
                "dead letter carries the original bytes"
            );
            dl.reason
        }
        None => "accepted",
    }
}

fn json_sample(value: &str, ts: &str) -> String {
    format!(
        r#"{{"service":"api","instance":"i-0abc","metric":"cpu","value":{value},"unit":"percent","ts":{ts},"labels":{{"user_id":"u-42","client_ip":"203.0.113.9","zone":"eu-1"}}}}"#
    )
}

#[test]
fn clean_json_record_is_anonymised_utc_and_keyed_by_service() {
    let mut s = stage();
    let out = run(
        &mut s,
        None,
        json_sample("42.5", r#""2024-06-01T13:59:00+02:00""#).as_bytes(),
    );
    let [clean] = out.outputs() else {
        panic!("one output, got {:?}", out.dead_letters())
    };
    assert_eq!(clean.key, b"api");
    assert_eq!(clean.headers, vec![("trace".to_string(), b"t1".to_vec())]);
    let text = String::from_utf8_lossy(&clean.payload);
    for secret in ["i-0abc", "u-42", "203.0.113.9"] {
        assert!(!text.contains(secret), "{secret} leaked into {text}");
    }
    let c = json::decode_clean(&clean.payload).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.ts_rfc3339(), "2024-06-01T11:59:00Z");
    assert!(text.contains(r#""ts":"2024-06-01T11:59:00Z""#));
    assert_eq!(c.instance, ebb_udf_core::anonymize(KEY, "i-0abc"));
    assert_eq!(
        c.labels.get("zone").map(String::as_str),
        Some("eu-1"),
        "other labels are kept"
    );
}

#[test]
fn ip_labels_can_be_truncated_instead_of_hashed() {
    let mut config = FilterConfig::default();
    config.anonymize.ip_mode = IpMode::Truncate;
    let mut s = FilterStage::new(config, KEY, avro(), now());
    let out = run(&mut s, None, json_sample("1", "1717243200").as_bytes());
    let [clean] = out.outputs() else {
        panic!("accepted")
    };
    let c = json::decode_clean(&clean.payload).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.labels.get("client_ip").map(String::as_str),
        Some("203.0.113.0/24")
    );
    assert_eq!(
        c.labels.get("user_id").map(String::as_str),
        Some(ebb_udf_core::anonymize(KEY, "u-42").as_str())
    );
}

#[test]
fn avro_in_gives_avro_out() {
    let mut s = stage();
    let sample = TelemetrySample {
        service: "api".into(),
        instance: "i-1".into(),
        metric: "cpu".into(),
        value: 0.5,
        unit: Some("ratio".into()),
        ts: RawTimestamp::Int(now().timestamp_millis()),
        labels: BTreeMap::new(),
    };
    let bytes = encode_raw(&sample, 1).unwrap_or_default();
    let out = run(&mut s, Some(b"api"), &bytes);
    let [clean] = out.outputs() else {
        panic!("accepted: {:?}", out.dead_letters())
    };
    assert_eq!(
        &clean.payload[..5],
        &[0, 0, 0, 0, 2],
        "framed with the clean schema id"
    );
}

#[test]
fn each_kind_of_bad_input_gets_its_reason() {
    let mut s = stage();
    let deep = format!(
        r#"{{"service":"api","instance":"i","metric":"cpu","value":1,"ts":1717243200,"x":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            br#"{"service":"api","instance":"i-1","metr"#.to_vec(),
            "malformed",
        ),
        (
            br#"{"service":"api","instance":"i-1","metric":"cpu","value":"high","ts":1717243200}"#
                .to_vec(),
            "wrong_type",
        ),
        (
            br#"{"service":"api","metric":"cpu","value":1,"ts":1717243200}"#.to_vec(),
            "missing_field",
        ),
        (
            br#"{"service":"","instance":"i","metric":"cpu","value":1,"ts":1717243200}"#.to_vec(),
            "empty_field",
        ),
        (
            br#"{"service":"api","instance":"i","metric":"cpu","value":"NaN","ts":1717243200}"#
                .to_vec(),
            "not_finite",
        ),
        (
            br#"{"service":"api","instance":"i","metric":"cpu","value":"-inf","ts":1717243200}"#
                .to_vec(),
            "not_finite",
        ),
        (
            br#"{"service":"api","instance":"i","metric":"cpu","value":-3,"ts":1717243200}"#
                .to_vec(),
            "out_of_range",
        ),
        (
            json_sample("140", "1717243200").into_bytes(),
            "out_of_range",
        ),
        (
            json_sample("1", r#""1970-01-01T00:00:00Z""#).into_bytes(),
            "too_old",
        ),
        (json_sample("1", "0").into_bytes(), "too_old"),
        (
            json_sample("1", r#""3000-01-01T00:00:00Z""#).into_bytes(),
            "in_future",
        ),
        (
            json_sample("1", r#""the day before""#).into_bytes(),
            "invalid_timestamp",
        ),
        (deep.into_bytes(), "malformed"),
        (vec![0, 0, 0, 0, 99, 2, 4], "unknown_schema_id"),
        (b"\x89PNG".to_vec(), "unknown_format"),
        (vec![b'{'; 70 * 1024], "oversized"),
    ];
    for (payload, want) in cases {
        let got = reason_of(&mut s, &payload);
        assert!(
            super::REASONS.contains(&got),
            "{got} is missing from REASONS"
        );
        assert_eq!(
            got,
            want,
            "for {}",
            String::from_utf8_lossy(&payload[..payload.len().min(120)])
        );
    }
}

#[test]
fn empty_key_and_tombstones_are_dead_lettered() {
    let mut s = stage();
    let out = run(&mut s, Some(b""), json_sample("1", "1717243200").as_bytes());
    assert_eq!(out.dead_letters()[0].reason, "empty_key");
    let mut out = Emitter::new();
    s.process(
        &Input {
            key: Some(b"api"),
            payload: None,
            headers: vec![],
            source: source(1),
        },
        &mut out,
    );
    assert_eq!(out.dead_letters()[0].reason, "empty_payload");
    assert_eq!(
        out.dead_letters()[0].source.to_string(),
        "telemetry.raw/0/1"
    );
}

#[test]
fn time_window_follows_the_injected_clock() {
    let mut s = stage();
    let old = json_sample("1", r#""2024-05-20T00:00:00Z""#);
    assert_eq!(reason_of(&mut s, old.as_bytes()), "too_old");
    let mut config = FilterConfig::default();
    config.time.max_age = std::time::Duration::from_secs(30 * 86_400);
    let mut backfill = FilterStage::new(config, KEY, avro(), now());
    assert_eq!(reason_of(&mut backfill, old.as_bytes()), "accepted");
    let mut e = Emitter::new();
    s.on_time(now() + chrono::Duration::days(365), &mut e);
    assert_eq!(
        reason_of(
            &mut s,
            json_sample("1", r#""2024-06-01T12:00:00Z""#).as_bytes()
        ),
        "too_old"
    );
}

#[test]
fn injected_outlier_goes_to_the_dead_letter_topic_as_outlier() {
    let mut s = stage();
    for i in 0..50 {
        let v = 40.0 + f64::from(i % 7);
        assert_eq!(
            reason_of(&mut s, json_sample(&v.to_string(), "1717243200").as_bytes()),
            "accepted"
        );
    }
    let out = run(
        &mut s,
        Some(b"api"),
        json_sample("99.9", "1717243200").as_bytes(),
    );
    let dl = &out.dead_letters()[0];
    assert_eq!(dl.reason, "outlier");
    assert!(dl.detail.contains("robust sigmas"), "{}", dl.detail);
    assert_eq!(
        dl.headers,
        vec![("trace".to_string(), b"t1".to_vec())],
        "original headers kept"
    );
}

#[test]
fn count_in_equals_out_plus_dead_lettered_for_a_mixed_stream() {
    let mut s = stage();
    let mut out = Emitter::new();
    let payloads: Vec<Vec<u8>> = (0..500)
        .map(|i| match i % 5 {
            0 => b"{broken".to_vec(),
            1 => json_sample("-1", "1717243200").into_bytes(),
            _ => json_sample(&format!("{}", 30 + i % 10), "1717243200").into_bytes(),
        })
        .collect();
    for (i, p) in payloads.iter().enumerate() {
        let input = Input {
            key: None,
            payload: Some(p),
            headers: vec![],
            source: source(i64::try_from(i).unwrap_or(0)),
        };
        s.process(&input, &mut out);
    }
    assert_eq!(out.outputs().len() + out.dead_letters().len(), 500);
    assert_eq!(out.dead_letters().len(), 200);
}
