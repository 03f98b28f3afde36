//! The window stage driven by hand: no Kafka, no clock but the one given.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use super::*;
use crate::codec::json::encode_clean;
use crate::codec::AvroCodec;
use crate::record::CleanSample;
use crate::stage::{Emitter, Input, Output, Restore, Source, Stage};

const T0: i64 = 1_700_000_000_000; // a multiple of 10 s

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn payload(service: &str, instance: &str, metric: &str, value: f64, ts_ms: i64) -> Vec<u8> {
    encode_clean(&CleanSample {
        service: service.into(),
        instance: instance.into(),
        metric: metric.into(),
        value,
        unit: Some("ms".into()),
        ts: at(ts_ms),
        labels: BTreeMap::new(),
    })
    .unwrap_or_default()
}

fn stage(config: WindowConfig) -> WindowStage {
    WindowStage::new(config, AvroCodec::default(), None, at(T0)).unwrap_or_else(|e| panic!("{e}"))
}

fn config() -> WindowConfig {
    WindowConfig {
        size: Duration::from_secs(10),
        allowed_lateness: Duration::from_secs(1),
        grace: Duration::from_secs(2),
        ..WindowConfig::default()
    }
}

fn feed(s: &mut WindowStage, partition: i32, offset: i64, bytes: &[u8]) -> Emitter {
    let mut out = Emitter::new();
    s.process(
        &Input {
            key: Some(b"svc"),
            payload: Some(bytes),
            headers: vec![],
            source: Source {
                topic: "telemetry.clean".into(),
                partition,
                offset,
            },
        },
        &mut out,
    );
    out
}

fn aggregates(out: &[Output]) -> Vec<serde_json::Value> {
    out.iter()
        .filter(|o| o.output == AGGREGATES)
        .map(|o| serde_json::from_slice(&o.payload).unwrap_or_default())
        .collect()
}

#[test]
fn a_window_closes_only_when_the_watermark_passes_its_end_plus_grace() {
    let mut s = stage(config());
    // Window [T0, T0+10s); watermark = max ts - 1 s; closes once watermark >= T0+12s.
    assert!(feed(&mut s, 0, 0, &payload("api", "a", "cpu", 10.0, T0 + 1_000)).is_empty());
    assert!(feed(&mut s, 0, 1, &payload("api", "a", "cpu", 30.0, T0 + 9_999)).is_empty());
    let out = feed(&mut s, 0, 2, &payload("api", "a", "cpu", 1.0, T0 + 12_999));
    assert!(
        out.is_empty(),
        "watermark T0+11.999s has not passed end + grace"
    );
    let out = feed(&mut s, 0, 3, &payload("api", "a", "cpu", 1.0, T0 + 13_000));
    let aggs = aggregates(out.outputs());
    assert_eq!(aggs.len(), 1, "{aggs:?}");
    let w = &aggs[0];
    assert_eq!(w["window_id"], format!("api/cpu/10000/{T0}"));
    assert_eq!(w["count"], 2);
    assert_eq!(w["mean"], 20.0);
    assert_eq!(w["window_start"], "2023-11-14T22:13:20.000Z");
    assert_eq!(out.outputs()[0].key, b"api".to_vec());
    assert_eq!(s.counts().closed, 1);
}

#[test]
fn a_late_record_within_grace_still_counts_in_its_window() {
    let mut s = stage(config());
    feed(&mut s, 0, 0, &payload("api", "a", "cpu", 10.0, T0 + 1_000));
    feed(&mut s, 0, 1, &payload("api", "a", "cpu", 10.0, T0 + 12_500)); // watermark T0+11.5s
    let out = feed(&mut s, 0, 2, &payload("api", "b", "cpu", 40.0, T0 + 5_000));
    assert!(
        out.is_empty(),
        "behind the watermark but within grace: no late output"
    );
    let out = feed(&mut s, 0, 3, &payload("api", "a", "cpu", 10.0, T0 + 20_000));
    let w = &aggregates(out.outputs())[0];
    assert_eq!(
        (w["count"].as_i64(), w["max"].as_f64()),
        (Some(2), Some(40.0))
    );
    assert_eq!(w["instances"], 2);
    assert_eq!(s.counts().late, 0);
}

#[test]
fn late_record_after_grace_goes_to_late_topic_with_its_window() {
    let mut s = stage(config());
    feed(&mut s, 0, 0, &payload("api", "a", "cpu", 10.0, T0 + 1_000));
    let closing = feed(&mut s, 0, 1, &payload("api", "a", "cpu", 10.0, T0 + 13_000));
    assert_eq!(aggregates(closing.outputs()).len(), 1);
    let late = payload("api", "a", "cpu", 99.0, T0 + 2_000);
    let out = feed(&mut s, 0, 2, &late);
    assert_eq!(out.outputs().len(), 1);
    let o = &out.outputs()[0];
    assert_eq!(o.output, LATE);
    assert_eq!(o.payload, late, "the record goes on unchanged");
    let header = |name: &str| {
        o.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(
        header("ebb.window_start").as_deref(),
        Some("2023-11-14T22:13:20.000Z")
    );
    assert_eq!(
        header("ebb.window_end").as_deref(),
        Some("2023-11-14T22:13:30.000Z")
    );
    assert_eq!(header("ebb.source").as_deref(), Some("telemetry.clean/0/2"));
    assert_eq!(s.counts().late, 1);
    // The closed window is never emitted again.
    let out = feed(&mut s, 0, 3, &payload("api", "a", "cpu", 10.0, T0 + 40_000));
    assert!(aggregates(out.outputs())
        .iter()
        .all(|w| w["window_id"] != format!("api/cpu/10000/{T0}")));
}

#[test]
fn hopping_windows_put_a_record_in_every_window_that_covers_it() {
    let mut c = config();
    c.metrics.insert(
        "latency_*".into(),
        config::WindowSpecConfig {
            size: Duration::from_secs(30),
            advance: Some(Duration::from_secs(10)),
        },
    );
    let mut s = stage(c);
    feed(
        &mut s,
        0,
        0,
        &payload("api", "a", "latency_ms", 5.0, T0 + 25_000),
    );
    let mut out = feed(
        &mut s,
        0,
        1,
        &payload("api", "a", "latency_ms", 7.0, T0 + 200_000),
    );
    let ids: Vec<String> = aggregates(out.outputs())
        .iter()
        .map(|w| w["window_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        ids,
        vec![
            format!("api/latency_ms/30000/{T0}"),
            format!("api/latency_ms/30000/{}", T0 + 10_000),
            format!("api/latency_ms/30000/{}", T0 + 20_000),
        ]
    );
    let _ = out.drain();
}

#[test]
fn a_quiet_partition_closes_its_windows_by_the_wall_clock() {
    let mut s = stage(config());
    feed(&mut s, 3, 0, &payload("api", "a", "cpu", 1.0, T0 + 1_000));
    let mut out = Emitter::new();
    s.on_time(at(T0 + 10_000), &mut out);
    assert!(out.is_empty(), "not idle yet");
    s.on_time(at(T0 + 45_000), &mut out);
    assert_eq!(aggregates(out.outputs()).len(), 1);
}

#[test]
fn a_record_that_is_not_clean_telemetry_is_dead_lettered() {
    let mut s = stage(config());
    let out = feed(&mut s, 0, 0, b"{\"service\":\"x\"}");
    assert_eq!(out.dead_letters().len(), 1);
    assert_eq!(out.dead_letters()[0].reason, "missing_field");
    let out = feed(&mut s, 0, 1, b"\x07junk");
    assert_eq!(out.dead_letters()[0].reason, "unknown_format");
}

#[test]
fn a_full_buffer_closes_the_oldest_windows_early() {
    let mut s = stage(WindowConfig {
        max_buffered_records: 10,
        allowed_lateness: Duration::from_secs(3600),
        ..config()
    });
    let mut closed = 0;
    for i in 0..30 {
        // Every record in its own window and the watermark held back by a huge lateness.
        let out = feed(
            &mut s,
            0,
            i,
            &payload("api", "a", "cpu", 1.0, T0 + i * 10_000),
        );
        closed += aggregates(out.outputs()).len();
    }
    assert!(s.buffered() <= 10);
    assert!(closed > 0 && s.counts().forced > 0);
}

/// Out-of-order telemetry of a few services on one partition, deterministic.
fn telemetry(n: i64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let jitter = (i * 7919) % 3_000;
            let ts = T0 + i * 250 - jitter;
            let svc = ["api", "web", "db"][(i % 3) as usize];
            let value = ((i * 104_729) % 1000) as f64 / 7.0;
            payload(svc, &format!("i{}", i % 5), "cpu", value, ts)
        })
        .collect()
}

/// Runs records `[from, to)` and returns the outputs by (output, key, window id) bytes.
fn run(s: &mut WindowStage, records: &[Vec<u8>], from: usize, to: usize) -> Vec<Output> {
    let mut all = Vec::new();
    for (i, r) in records.iter().enumerate().take(to).skip(from) {
        let mut out = feed(s, 0, i as i64, r);
        all.extend(out.drain().0);
    }
    all
}

#[test]
fn a_restart_from_the_checkpoint_emits_exactly_what_an_uninterrupted_run_does() {
    let records = telemetry(600);
    let mut whole = stage(config());
    let expected = run(&mut whole, &records, 0, records.len());
    assert!(aggregates(&expected).len() > 20);
    for crash_after in [1usize, 37, 150, 299, 300, 451, 599] {
        let mut first = stage(config());
        let mut got = run(&mut first, &records, 0, crash_after);
        // What the runner would commit: the oldest open record, and the position + watermark.
        let cp = first
            .checkpoint(0)
            .unwrap_or_else(|| panic!("a checkpoint"));
        let replay_from = cp.replay_from.unwrap_or(crash_after as i64) as usize;
        let mut second = stage(config());
        second.assigned(
            0,
            Some(Restore {
                processed_until: crash_after as i64,
                watermark_ms: cp.watermark_ms,
            }),
        );
        got.extend(run(&mut second, &records, replay_from, records.len()));
        assert_eq!(
            got, expected,
            "crash after {crash_after}, replay from {replay_from}: outputs differ"
        );
    }
}

#[test]
fn rebuilding_windows_counts_replayed_records_and_emits_nothing_twice() {
    let records = telemetry(100);
    let mut first = stage(config());
    let before = run(&mut first, &records, 0, 60);
    let cp = first
        .checkpoint(0)
        .unwrap_or_else(|| panic!("a checkpoint"));
    let mut second = stage(config());
    second.assigned(
        0,
        Some(Restore {
            processed_until: 60,
            watermark_ms: cp.watermark_ms,
        }),
    );
    let from = cp.replay_from.unwrap_or(60) as usize;
    let replayed = run(&mut second, &records, from, 60);
    assert!(replayed.is_empty(), "replayed records only rebuild state");
    assert_eq!(second.counts().replayed, (60 - from) as u64);
    assert_eq!(
        second.checkpoint(0).and_then(|c| c.processed_until),
        Some(60),
        "while rebuilding, the previous owner's position is what gets committed"
    );
    let _ = before;
}
