//! The filter stage end to end through Kafka: on the mock cluster (JSON) and on real Apache
//! Kafka with the schema registry (Avro).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::Utc;
use common::{produce, read_exactly, RunningFilter, Target};
use ebb::codec::avro::encode_raw;
use ebb::codec::registry::Registry;
use ebb::codec::{confluent_schema_id, json, AvroCodec};
use ebb::config::Config;
use ebb::demo::generator::{json_raw, Generator, GeneratorConfig, Kind, WireFormat};
use ebb::record::{RawTimestamp, TelemetrySample};

type Expect = Option<&'static str>;

fn good_sample(ts: RawTimestamp, value: f64) -> TelemetrySample {
    TelemetrySample {
        service: "api".into(),
        instance: "i-edge-1".into(),
        metric: "cpu".into(),
        value,
        unit: Some("percent".into()),
        ts,
        labels: BTreeMap::from([
            ("user_id".into(), "u-777".into()),
            ("client_ip".into(), "192.0.2.44".into()),
        ]),
    }
}

/// Every kind of bad input the issue names, each with the reason it must get.
fn hand_made_bad_records(format: WireFormat) -> Vec<(Option<Vec<u8>>, Vec<u8>, Expect)> {
    let now = Utc::now();
    let key = Some(b"api".to_vec());
    let enc = |s: &TelemetrySample| match format {
        // JSON has no NaN or infinity: emitters send them as strings.
        WireFormat::Json if !s.value.is_finite() => String::from_utf8(json_raw(&TelemetrySample {
            value: 0.0,
            ..s.clone()
        }))
        .unwrap()
        .replace(r#""value":0.0"#, &format!(r#""value":"{}""#, s.value))
        .into_bytes(),
        WireFormat::Json => json_raw(s),
        WireFormat::Avro(id) => encode_raw(s, id).expect("avro"),
    };
    let full = String::from_utf8(json_raw(&good_sample(
        RawTimestamp::Text(now.to_rfc3339()),
        1.0,
    )))
    .unwrap();
    let mut deep =
        String::from(r#"{"service":"api","instance":"i","metric":"cpu","value":1,"ts":1,"x":"#);
    deep.push_str(&"[".repeat(20_000));
    deep.push_str(&"]".repeat(20_000));
    deep.push('}');
    let mut oversized = full.clone();
    oversized.insert_str(1, &format!(r#""pad":"{}","#, "x".repeat(1_000_000)));
    vec![
        (
            key.clone(),
            full.as_bytes()[..full.len() / 2].to_vec(),
            Some("malformed"),
        ),
        (
            key.clone(),
            br#"{"service":"api","instance":"i","metric":"cpu","value":[1],"ts":1}"#.to_vec(),
            Some("wrong_type"),
        ),
        (
            key.clone(),
            br#"{"service":"api","instance":"i","metric":"cpu","ts":1}"#.to_vec(),
            Some("missing_field"),
        ),
        (
            key.clone(),
            vec![0, 0, 0x0f, 0x42, 0x3f, 2, 4, 6],
            Some("unknown_schema_id"),
        ),
        (
            key.clone(),
            enc(&good_sample(RawTimestamp::Text(now.to_rfc3339()), f64::NAN)),
            Some("not_finite"),
        ),
        (
            key.clone(),
            enc(&good_sample(
                RawTimestamp::Text(now.to_rfc3339()),
                f64::INFINITY,
            )),
            Some("not_finite"),
        ),
        (
            key.clone(),
            enc(&good_sample(
                RawTimestamp::Text("1970-01-01T00:00:00Z".into()),
                5.0,
            )),
            Some("too_old"),
        ),
        (
            key.clone(),
            enc(&good_sample(
                RawTimestamp::Text("3000-01-01T00:00:00Z".into()),
                5.0,
            )),
            Some("in_future"),
        ),
        (
            key.clone(),
            enc(&good_sample(RawTimestamp::Text(now.to_rfc3339()), -5.0)),
            Some("out_of_range"),
        ),
        (key.clone(), oversized.into_bytes(), Some("oversized")),
        (key.clone(), deep.into_bytes(), Some("malformed")),
        (
            Some(Vec::new()),
            enc(&good_sample(RawTimestamp::Text(now.to_rfc3339()), 5.0)),
            Some("empty_key"),
        ),
        (
            None,
            enc(&good_sample(RawTimestamp::Int(now.timestamp_millis()), 5.0)),
            None,
        ),
    ]
}

/// Runs the filter over generated and hand-made records and checks every promise.
fn filter_loses_nothing_and_leaks_nothing(target: &Target, avro: bool) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config: Config = target.config(&rt);
    let topics = &config.topics;
    let (raw, clean, dead) = (
        topics.name(&topics.raw),
        topics.name(&topics.clean),
        topics.name(&topics.dead_letter),
    );
    let registry = config
        .registry
        .url
        .as_deref()
        .map(|u| Registry::new(u, Duration::from_secs(5)).unwrap());
    let format = match (&registry, avro) {
        (Some(r), true) => WireFormat::Avro(
            rt.block_on(r.register(&format!("{raw}-value"), ebb::codec::avro::RAW_SCHEMA))
                .unwrap(),
        ),
        _ => WireFormat::Json,
    };

    let mut records: Vec<(Option<Vec<u8>>, Vec<u8>, Expect)> = Vec::new();
    let mut generator = Generator::new(
        GeneratorConfig {
            services: 5,
            instances: 3,
            fault_rate: 0.03,
            seed: 7,
            incidents: false,
        },
        format,
    );
    let start = Utc::now() - chrono::Duration::minutes(2);
    for tick in 0..40 {
        for g in generator.tick(start + chrono::Duration::seconds(tick * 2)) {
            let expect = match g.kind {
                Kind::Good => None,
                Kind::Bad(reason) => Some(reason),
            };
            records.push((Some(g.key), g.payload, expect));
        }
    }
    records.extend(hand_made_bad_records(format));
    let raw_identifiers: BTreeSet<String> = records
        .iter()
        .filter_map(|(_, p, _)| json::decode_sample(p).ok())
        .flat_map(|s| {
            [
                s.instance.clone(),
                s.labels.get("user_id").cloned().unwrap_or_default(),
                s.labels.get("client_ip").cloned().unwrap_or_default(),
            ]
        })
        .chain([
            "i-edge-1".to_string(),
            "u-777".to_string(),
            "192.0.2.44".to_string(),
        ])
        .filter(|s| !s.is_empty())
        .collect();

    let filter = RunningFilter::start(&config, &rt);
    produce(
        &config,
        &raw,
        &records
            .iter()
            .map(|(k, p, _)| (k.clone(), p.clone()))
            .collect::<Vec<_>>(),
    );
    let n = records.len();
    filter.wait_for(n as u64, Duration::from_secs(120));
    let summary = filter.stop();
    assert_eq!(summary.consumed, n as u64);
    assert_eq!(
        summary.consumed,
        summary.emitted + summary.dead_lettered,
        "in = out + dead-lettered"
    );

    let outputs = read_exactly(
        &config,
        &[&clean, &dead],
        n,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let expected_dead: usize = records.iter().filter(|r| r.2.is_some()).count();
    let (cleaned, dead_letters): (Vec<_>, Vec<_>) =
        outputs.into_iter().partition(|r| r.topic == clean);
    assert_eq!(
        dead_letters.len(),
        expected_dead,
        "dead letters: {:?}",
        dead_letters
            .iter()
            .map(|d| &d.headers["ebb.reason"])
            .collect::<Vec<_>>()
    );
    assert_eq!(cleaned.len(), n - expected_dead);

    // Every dead letter: original bytes, its reason, and where it came from.
    let by_payload: HashMap<&[u8], Expect> =
        records.iter().map(|(_, p, e)| (p.as_slice(), *e)).collect();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for dl in &dead_letters {
        let payload = dl.payload.as_deref().unwrap_or_default();
        let want = by_payload.get(payload).copied().flatten();
        assert_eq!(
            Some(dl.headers["ebb.reason"].as_str()),
            want,
            "detail: {}",
            dl.headers["ebb.detail"]
        );
        assert_eq!(dl.headers["ebb.stage"], "filter");
        assert!(
            dl.headers["ebb.source"].starts_with(&format!("{raw}/")),
            "{}",
            dl.headers["ebb.source"]
        );
        *reasons.entry(dl.headers["ebb.reason"].clone()).or_default() += 1;
    }
    for must in [
        "malformed",
        "wrong_type",
        "missing_field",
        "unknown_schema_id",
        "not_finite",
        "too_old",
        "in_future",
        "oversized",
        "empty_key",
        "outlier",
    ] {
        assert!(
            reasons.contains_key(must),
            "no {must} dead letter among {reasons:?}"
        );
    }

    // Every clean record: keyed by service, UTC, no identifier in clear, same format as in.
    let codec = AvroCodec::default();
    for c in &cleaned {
        let payload = c.payload.as_deref().unwrap();
        let sample = if avro {
            let id = confluent_schema_id(payload).expect("clean Avro is Confluent-framed");
            if !codec.schemas.knows(id) {
                let text = rt
                    .block_on(registry.as_ref().unwrap().schema_by_id(id))
                    .unwrap();
                codec.schemas.insert(id, &text).unwrap();
            }
            codec.decode_sample(payload).expect("clean Avro decodes")
        } else {
            assert_eq!(payload[0], b'{', "JSON in gives JSON out");
            json::decode_sample(payload).expect("clean JSON decodes")
        };
        assert_eq!(c.key.as_deref(), Some(sample.service.as_bytes()));
        let RawTimestamp::Text(ts) = &sample.ts else {
            panic!("clean ts is text: {:?}", sample.ts)
        };
        assert!(
            ts.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
            "{ts}"
        );
        let text = String::from_utf8_lossy(payload);
        for secret in &raw_identifiers {
            assert!(
                !text.contains(secret.as_str()),
                "{secret} leaked into clean output"
            );
        }
    }
}

#[test]
fn filter_on_mock_cluster_loses_nothing_and_leaks_nothing() {
    filter_loses_nothing_and_leaks_nothing(&Target::mock(), false);
}

#[test]
fn filter_on_real_kafka_with_registry_avro_in_gives_avro_out() {
    let Some(target) = Target::real() else { return };
    filter_loses_nothing_and_leaks_nothing(&target, true);
}

#[test]
fn filter_on_real_kafka_json_in_gives_json_out() {
    let Some(target) = Target::real() else { return };
    filter_loses_nothing_and_leaks_nothing(&target, false);
}

/// After a clean stop the group's offsets are committed: a restart reads nothing twice.
fn restart_resumes_after_committed_offsets(target: &Target) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config = target.config(&rt);
    let raw = config.topics.name(&config.topics.raw);
    let now = Utc::now();
    let batch = |v: f64| -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
        (0..50)
            .map(|i| {
                (
                    Some(b"api".to_vec()),
                    json_raw(&good_sample(
                        RawTimestamp::Int(now.timestamp_millis() + i),
                        v,
                    )),
                )
            })
            .collect()
    };
    produce(&config, &raw, &batch(10.0));
    let first = RunningFilter::start(&config, &rt);
    first.wait_for(50, Duration::from_secs(60));
    assert_eq!(first.stop().consumed, 50);
    produce(&config, &raw, &batch(11.0));
    let second = RunningFilter::start(&config, &rt);
    second.wait_for(50, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        second.stop().consumed,
        50,
        "the second run reads only the new records"
    );
}

#[test]
fn restart_on_mock_cluster_reads_nothing_twice() {
    restart_resumes_after_committed_offsets(&Target::mock());
}

#[test]
fn restart_on_real_kafka_reads_nothing_twice() {
    let Some(target) = Target::real() else { return };
    restart_resumes_after_committed_offsets(&target);
}

/// All brokers go away mid-run and come back: the stage keeps running, retries, and in the
/// end every record is accounted for, none lost.
#[test]
fn broker_outage_is_retried_and_loses_nothing() {
    let target = Target::mock();
    let Target::Mock(cluster) = &target else {
        unreachable!()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config = target.config(&rt);
    let raw = config.topics.name(&config.topics.raw);
    let clean = config.topics.name(&config.topics.clean);
    let now = Utc::now();
    let batch = |from: i64| -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
        (from..from + 200)
            .map(|i| {
                (
                    Some(b"api".to_vec()),
                    json_raw(&good_sample(
                        RawTimestamp::Int(now.timestamp_millis() + i),
                        10.0,
                    )),
                )
            })
            .collect()
    };
    let filter = RunningFilter::start(&config, &rt);
    produce(&config, &raw, &batch(0));
    filter.wait_for(200, Duration::from_secs(60));
    for broker in 1..=3 {
        cluster.broker_down(broker).unwrap();
    }
    // The second batch is sent during the outage: it waits in the producer, then the stage
    // has to reconnect its consumer and producer to carry it through.
    let late = {
        let (config, raw, records) = (config.clone(), raw.clone(), batch(200));
        std::thread::spawn(move || produce(&config, &raw, &records))
    };
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        filter.consumed(),
        200,
        "nothing can be read while every broker is down"
    );
    for broker in 1..=3 {
        cluster.broker_up(broker).unwrap();
    }
    late.join().unwrap();
    filter.wait_for(400, Duration::from_secs(120));
    let summary = filter.stop();
    assert_eq!(summary.consumed, 400);
    assert_eq!(summary.emitted, 400);
    read_exactly(
        &config,
        &[&clean],
        400,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
}
