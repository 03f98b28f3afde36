//! The window stage end to end through Kafka, on the mock cluster and on real Apache Kafka:
//! windows close at the watermark, late records go to the late topic, a crash (SIGKILL) mid
//! window loses and changes nothing, and two instances in one group emit each window once.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use common::{produce, read_exactly, read_until_quiet, Read, RunningWindow, Target};
use ebb::codec::json::encode_clean;
use ebb::codec::AvroCodec;
use ebb::config::Config;
use ebb::record::CleanSample;
use ebb::stage::{Emitter, Input, Source, Stage};
use ebb::stages::window::{WindowStage, AGGREGATES};

const T0: i64 = 1_700_000_000_000;

fn clean(
    service: &str,
    metric: &str,
    instance: &str,
    value: f64,
    ts_ms: i64,
) -> (Option<Vec<u8>>, Vec<u8>) {
    let sample = CleanSample {
        service: service.into(),
        instance: instance.into(),
        metric: metric.into(),
        value,
        unit: None,
        ts: Utc.timestamp_millis_opt(ts_ms).single().unwrap(),
        labels: BTreeMap::new(),
    };
    (
        Some(service.as_bytes().to_vec()),
        encode_clean(&sample).unwrap(),
    )
}

fn window_config(config: &mut Config) {
    config.window.size = Duration::from_secs(10);
    config.window.allowed_lateness = Duration::from_secs(1);
    config.window.grace = Duration::from_secs(2);
    config.window.idle_timeout = Duration::from_secs(1);
}

fn json(r: &Read) -> serde_json::Value {
    serde_json::from_slice(r.payload.as_deref().unwrap_or_default()).unwrap()
}

fn close_and_late(target: &Target) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = target.config(&rt);
    window_config(&mut config);
    let clean_topic = config.topics.name(&config.topics.clean);
    let stage = RunningWindow::start_window(&config, &rt);
    produce(
        &config,
        &clean_topic,
        &[
            clean("api", "cpu", "a", 10.0, T0 + 1_000),
            clean("api", "cpu", "a", 30.0, T0 + 9_000),
            clean("api", "cpu", "a", 1.0, T0 + 11_500), // watermark 10.5 s: window 0 still open
            clean("api", "cpu", "b", 50.0, T0 + 5_000), // behind the watermark, within grace
            clean("api", "cpu", "a", 1.0, T0 + 13_000), // watermark 12 s = end + grace: closes
            clean("api", "cpu", "a", 99.0, T0 + 2_000), // after grace: late
        ],
    );
    let aggregates = config.topics.name(&config.topics.aggregates);
    let late = config.topics.name(&config.topics.late);
    // Window 1 closes by the idle rule once input stops.
    let out = read_exactly(
        &config,
        &[&aggregates, &late],
        3,
        Duration::from_secs(60),
        Duration::from_secs(3),
    );
    stage.stop();
    let by_id: HashMap<String, serde_json::Value> = out
        .iter()
        .filter(|r| r.topic == aggregates)
        .map(|r| {
            let v = json(r);
            (v["window_id"].as_str().unwrap().to_string(), v)
        })
        .collect();
    let w0 = &by_id[&format!("api/cpu/10000/{T0}")];
    assert_eq!(w0["count"], 3, "{w0}");
    assert_eq!(w0["max"], 50.0, "the in-grace record counts");
    assert_eq!(w0["instances"], 2);
    let w1 = &by_id[&format!("api/cpu/10000/{}", T0 + 10_000)];
    assert_eq!(w1["count"], 2);
    let late: Vec<&Read> = out.iter().filter(|r| r.topic == late).collect();
    assert_eq!(late.len(), 1);
    assert_eq!(json(late[0])["value"], 99.0);
    assert_eq!(
        late[0].headers["ebb.window_start"],
        "2023-11-14T22:13:20.000Z"
    );
    assert_eq!(late[0].key.as_deref(), Some(&b"api"[..]));
}

#[test]
fn windows_close_at_the_watermark_and_late_records_go_to_the_late_topic_on_mock() {
    close_and_late(&Target::mock());
}

#[test]
fn windows_close_at_the_watermark_and_late_records_go_to_the_late_topic_on_real_kafka() {
    let Some(target) = Target::real() else { return };
    close_and_late(&target);
}

/// In-order-ish telemetry (jitter within the allowed lateness, so nothing is late and the
/// answer does not depend on how services share partitions).
fn fleet(services: usize, per_series: i64) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..per_series {
        for s in 0..services {
            for metric in ["cpu", "latency_ms"] {
                let jitter = (i * 7919 + s as i64 * 31) % 500;
                let value = ((i * 104_729 + s as i64) % 1000) as f64 / 3.0;
                out.push(clean(
                    &format!("svc-{s}"),
                    metric,
                    &format!("i{}", i % 3),
                    value,
                    T0 + i * 100 - jitter,
                ));
            }
        }
    }
    out
}

/// The aggregates an uninterrupted stage emits for `records`, by window id.
fn reference(config: &Config, records: &[(Option<Vec<u8>>, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
    let mut stage = WindowStage::new(
        config.window.clone(),
        AvroCodec::default(),
        None,
        Utc::now(),
    )
    .unwrap();
    let mut out = Emitter::new();
    for (i, (key, payload)) in records.iter().enumerate() {
        stage.process(
            &Input {
                key: key.as_deref(),
                payload: Some(payload),
                headers: vec![],
                source: Source {
                    topic: "clean".into(),
                    partition: 0,
                    offset: i as i64,
                },
            },
            &mut out,
        );
    }
    stage.flush(&mut out);
    let (outputs, dead) = out.drain();
    assert!(dead.is_empty());
    outputs
        .into_iter()
        .filter(|o| o.output == AGGREGATES)
        .map(|o| {
            let v: serde_json::Value = serde_json::from_slice(&o.payload).unwrap();
            (v["window_id"].as_str().unwrap().to_string(), o.payload)
        })
        .collect()
}

/// Window id -> payload; a window emitted twice (after a crash) must be byte-identical.
fn distinct(records: &[Read]) -> BTreeMap<String, Vec<u8>> {
    let mut m: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for r in records {
        let id = r.headers["ebb.window_id"].clone();
        let payload = r.payload.clone().unwrap();
        if let Some(before) = m.insert(id.clone(), payload.clone()) {
            assert_eq!(
                String::from_utf8_lossy(&before),
                String::from_utf8_lossy(&payload),
                "window {id} emitted twice with different contents"
            );
        }
    }
    m
}

fn config_file(config: &Config) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ebb-window-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ebb.toml");
    let text = format!(
        r#"[kafka]
"bootstrap.servers" = "{brokers}"
"auto.commit.interval.ms" = "100"
# The killed member's partitions move once its session lapses: keep that short.
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000"

[topics]
prefix = "{prefix}"

[http]
enabled = false

[sql]
pg_enabled = false

[runner]
batch_size = 50
poll_timeout = "20ms"

[window]
group_id = "{group}"
size = "10s"
allowed_lateness = "1s"
grace = "2s"
idle_timeout = "1s"
"#,
        brokers = config.brokers(),
        prefix = config.topics.prefix,
        group = config.window.group_id,
    );
    std::fs::write(&file, text).unwrap();
    file
}

fn crash_and_restart(target: &Target) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = target.config(&rt);
    config.registry.url = None;
    window_config(&mut config);
    // 60 s of event time from just before T0: 7 windows per series, 84 in all.
    let records = fleet(6, 600);
    let expected = reference(&config, &records);
    assert_eq!(expected.len(), 84);
    let file = config_file(&config);
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_ebb"))
            .args(["run", "window", "--config"])
            .arg(&file)
            .env_remove("EBB_CONFIG")
            .env_remove("EBB_TOPIC_PREFIX")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    let clean_topic = config.topics.name(&config.topics.clean);
    let aggregates = config.topics.name(&config.topics.aggregates);
    let mut first = run();
    // Feed the input over a few seconds so the kill lands with windows open.
    let chunks: Vec<_> = records.chunks(records.len() / 8).collect();
    let (before, after) = chunks.split_at(5);
    for part in before {
        produce(&config, &clean_topic, part);
        std::thread::sleep(Duration::from_millis(300));
    }
    // Some windows closed, others open: now SIGKILL (no shutdown, no final commit).
    read_until_quiet(
        &config,
        &[&aggregates],
        1,
        Duration::ZERO,
        Duration::from_secs(30),
    );
    first.kill().unwrap();
    first.wait().unwrap();
    for part in after {
        produce(&config, &clean_topic, part);
    }
    let mut second = run();
    let got = read_until_quiet(
        &config,
        &[&aggregates],
        expected.len(),
        Duration::from_secs(4),
        Duration::from_secs(90),
    );
    second.kill().unwrap();
    second.wait().unwrap();
    let got = distinct(&got);
    let extra: Vec<&String> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    let missing: Vec<&String> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "after the crash: extra windows {extra:?}, missing {missing:?}"
    );
    for (id, payload) in &expected {
        assert_eq!(
            got.get(id).map(|p| String::from_utf8_lossy(p).into_owned()),
            Some(String::from_utf8_lossy(payload).into_owned()),
            "window {id} differs from the uninterrupted run"
        );
    }
}

#[test]
fn killing_the_window_stage_mid_window_and_restarting_gives_identical_aggregates_on_mock() {
    crash_and_restart(&Target::mock());
}

#[test]
fn killing_the_window_stage_mid_window_and_restarting_gives_identical_aggregates_on_real_kafka() {
    let Some(target) = Target::real() else { return };
    crash_and_restart(&target);
}

fn two_instances(target: &Target) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = target.config(&rt);
    window_config(&mut config);
    let records = fleet(9, 200);
    let expected = reference(&config, &records);
    let a = RunningWindow::start_window(&config, &rt);
    let b = RunningWindow::start_window(&config, &rt);
    // Let the group settle before any input, so no partition changes hands mid-stream:
    // both instances hold partitions and together all of them.
    let held = |r: &RunningWindow| {
        r.metrics
            .stage("window")
            .partitions
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // The window stage reads the clean topic, made with 3 partitions for every test.
    let total = 3;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(held(&a) > 0 && held(&b) > 0 && held(&a) + held(&b) == total) {
        assert!(
            std::time::Instant::now() < deadline,
            "the group never settled: {} and {} of {total} partitions",
            held(&a),
            held(&b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let scraped = a.metrics.encode();
    assert!(
        scraped.contains(&format!("ebb_partitions{{stage=\"window\"}} {}", held(&a))),
        "{scraped}"
    );
    produce(&config, &config.topics.name(&config.topics.clean), &records);
    let aggregates = config.topics.name(&config.topics.aggregates);
    let out = read_exactly(
        &config,
        &[&aggregates],
        expected.len(),
        Duration::from_secs(60),
        Duration::from_secs(4),
    );
    let (ma, mb) = (a.metrics.clone(), b.metrics.clone());
    a.stop();
    b.stop();
    let consumed = |m: &ebb::metrics::Metrics| {
        m.stage("window")
            .records_in
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let (ca, cb) = (consumed(&ma), consumed(&mb));
    assert!(
        ca > 0 && cb > 0,
        "both instances had partitions ({ca} and {cb} records)"
    );
    assert_eq!(ca + cb, records.len() as u64);
    let got = distinct(&out);
    assert_eq!(got, expected);
}

#[test]
fn two_instances_in_one_group_split_partitions_and_emit_each_window_once_on_mock() {
    two_instances(&Target::mock());
}

#[test]
fn two_instances_in_one_group_split_partitions_and_emit_each_window_once_on_real_kafka() {
    let Some(target) = Target::real() else { return };
    two_instances(&target);
}
