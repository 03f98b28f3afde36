//! The models stage end to end through Kafka, on the mock cluster and on real Apache Kafka:
//! a service's aggregates in, forecasts and anomaly events out; a second instance that
//! takes over restores the models from the snapshot topic and emits exactly what one
//! uninterrupted run would have, nothing twice.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{produce, read_until_quiet, RunningStage, Target};
use ebb::codec::AvroCodec;
use ebb::config::Config;
use ebb::stage::{Emitter, Input, Source, Stage};
use ebb::stages::models::{ModelsStage, ANOMALIES, FORECASTS};
use ebb::stages::window::WindowAggregate;

const T0: i64 = 1_700_000_000_000;
const STEP: i64 = 10_000;
const WINDOWS: usize = 240;
const FIRST_RUN: usize = 120;
const FAULT: usize = 200;

/// The four aggregates of window `w` of service `api`: a gentle cycle with noise, and a
/// latency and error fault in window FAULT.
fn window(w: usize) -> Vec<WindowAggregate> {
    let jitter = |k: u64| (((w as u64 * 2_654_435_761 + k * 97) % 1000) as f64 / 1000.0) - 0.5;
    let load = 300.0 + 40.0 * (w as f64 / 30.0).sin() + 10.0 * jitter(1);
    let fault = w == FAULT;
    let metrics = [
        ("requests_per_s", load / 3.0),
        ("cpu", 30.0 + load * 0.05 + jitter(2)),
        (
            "latency_p95_ms",
            if fault { 900.0 } else { 80.0 + 4.0 * jitter(3) },
        ),
        (
            "errors_per_s",
            if fault { 20.0 } else { 0.3 + 0.1 * jitter(4) },
        ),
    ];
    let start = T0 + w as i64 * STEP;
    metrics
        .iter()
        .map(|(metric, v)| WindowAggregate {
            window_id: format!("api/{metric}/{STEP}/{start}"),
            service: "api".into(),
            metric: (*metric).into(),
            unit: None,
            window_start: start,
            window_end: start + STEP,
            count: 30,
            sum: v * 30.0,
            mean: *v,
            min: *v,
            max: *v,
            stddev: Some(0.0),
            p50: *v,
            p95: *v,
            p99: *v,
            rate: 3.0,
            instances: 3,
            top_instance: None,
        })
        .collect()
}

fn payloads(range: std::ops::Range<usize>) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    range
        .flat_map(window)
        .map(|a| (Some(b"api".to_vec()), serde_json::to_vec(&a).unwrap()))
        .collect()
}

fn models_config(config: &mut Config) {
    // Snapshots every 25 windows: the first run stops with windows modelled since its last
    // snapshot, which the second instance must re-read and re-model without re-emitting.
    config.models.snapshot_every = 25;
}

/// What one uninterrupted stage emits for all windows: (output, id) -> payload.
fn reference(config: &Config) -> BTreeMap<(String, String), Vec<u8>> {
    let mut stage = ModelsStage::new(config.models.clone(), AvroCodec::default());
    let mut out = BTreeMap::new();
    for (offset, (key, payload)) in payloads(0..WINDOWS).into_iter().enumerate() {
        let mut emitter = Emitter::new();
        let input = Input {
            key: key.as_deref(),
            payload: Some(&payload),
            headers: Vec::new(),
            source: Source {
                topic: "aggregates".into(),
                partition: 0,
                offset: offset as i64,
            },
        };
        stage.process(&input, &mut emitter);
        let (outputs, dead) = emitter.drain();
        assert!(dead.is_empty());
        for o in outputs {
            if o.output == ANOMALIES || o.output == FORECASTS {
                let id = o.headers[0].1.clone();
                out.insert(
                    (o.output.to_string(), String::from_utf8(id).unwrap()),
                    o.payload,
                );
            }
        }
    }
    out
}

fn takeover_restores_the_models_and_emits_each_output_once(target: &Target) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = target.config(&rt);
    models_config(&mut config);
    let topic = config.topics.name(&config.topics.aggregates);
    let expected = reference(&config);
    assert!(
        expected.keys().any(|(o, id)| o == ANOMALIES
            && (id.ends_with(&format!("/{}", T0 + (FAULT as i64 + 1) * STEP))
                || id.ends_with(&format!("/{}", T0 + (FAULT as i64 + 2) * STEP)))),
        "the reference run must flag the fault within two windows: {:?}",
        expected
            .keys()
            .filter(|(o, _)| o == ANOMALIES)
            .collect::<Vec<_>>()
    );

    produce(&config, &topic, &payloads(0..FIRST_RUN));
    let first = RunningStage::start_models(&config, &rt);
    first.wait_for((FIRST_RUN * 4) as u64, Duration::from_secs(60));
    first.stop();

    produce(&config, &topic, &payloads(FIRST_RUN..WINDOWS));
    let second = RunningStage::start_models(&config, &rt);
    second.wait_for(((WINDOWS - FIRST_RUN) * 4) as u64, Duration::from_secs(60));
    let anomalies = config.topics.name(&config.topics.anomalies);
    let forecasts = config.topics.name(&config.topics.forecasts);
    let got = read_until_quiet(
        &config,
        &[&anomalies, &forecasts],
        expected.len(),
        Duration::from_secs(3),
        Duration::from_secs(60),
    );
    second.stop();

    let mut seen = BTreeMap::new();
    for r in &got {
        let output = if r.topic == anomalies {
            ANOMALIES
        } else {
            FORECASTS
        };
        let id_header = if output == ANOMALIES {
            "ebb.anomaly_id"
        } else {
            "ebb.forecast_id"
        };
        let id = r.headers[id_header].clone();
        let previous = seen.insert((output.to_string(), id.clone()), r.payload.clone().unwrap());
        assert!(previous.is_none(), "{output} {id} emitted twice");
    }
    assert_eq!(
        seen.len(),
        expected.len(),
        "outputs: got {} want {}",
        seen.len(),
        expected.len()
    );
    for (key, payload) in &expected {
        let got = seen.get(key).unwrap_or_else(|| panic!("{key:?} missing"));
        assert_eq!(
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(payload),
            "{key:?} differs from the uninterrupted run"
        );
    }
}

#[test]
fn mock_takeover_restores_the_models_and_emits_each_output_once() {
    takeover_restores_the_models_and_emits_each_output_once(&Target::mock());
}

#[test]
fn real_kafka_takeover_restores_the_models_and_emits_each_output_once() {
    if let Some(t) = Target::real() {
        takeover_restores_the_models_and_emits_each_output_once(&t);
    }
}
