//! The decide stage through Kafka transactions, on the mock cluster and on real Apache
//! Kafka: an instance that dies between producing its commands and committing them leaves
//! nothing visible; the instance that takes over restores the policy state from the
//! changelog and emits every command exactly once, byte for byte what one uninterrupted run
//! emits.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{produce, read_until_quiet, Target};
use ebb::clock::SystemClock;
use ebb::codec::AvroCodec;
use ebb::config::Config;
use ebb::metrics::Metrics;
use ebb::runner::{self, RunnerError};
use ebb::stage::{Emitter, Input, Source, Stage};
use ebb::stages::decide::{Command, DecideInputs, DecideStage, COMMANDS, STATE};
use ebb::stages::models::process::AnomalyEvent;
use ebb::stages::window::aggregate::ms_to_rfc3339;
use ebb::stages::window::WindowAggregate;

const T0: i64 = 1_700_000_040_000;
const MINUTE: i64 = 60_000;
const SERVICES: usize = 9;
const WINDOWS: i64 = 80;

fn service(s: usize) -> String {
    format!("svc-{s}")
}

/// Window `w` of service `s`: every third service ramps up, every third drops, and `svc-2`
/// has a crash-looping instance from window 30.
fn aggregates(s: usize, w: i64) -> Vec<WindowAggregate> {
    let load = match s % 3 {
        0 => 200.0 + 8.0 * w as f64,
        1 => {
            if w < 40 {
                600.0
            } else {
                150.0
            }
        }
        _ => 280.0,
    };
    let sick = s == 2 && w >= 30;
    // Four instances, as common::minute_aggregate has them.
    let per_instance = load / 4.0;
    let errors = per_instance * 0.01;
    let start = T0 + w * MINUTE;
    let name = service(s);
    let agg = |metric: &str, mean: f64, max: f64, top: &str| {
        common::minute_aggregate(&name, metric, start, mean, max, top)
    };
    vec![
        agg("requests_per_s", per_instance, per_instance, "i-0"),
        agg("cpu", 100.0 * load / 400.0, 100.0 * load / 400.0, "i-0"),
        agg("latency_p95_ms", 50.0, 52.0, "i-1"),
        if sick {
            agg("errors_per_s", errors, errors * 12.0, "i-2")
        } else {
            agg("errors_per_s", errors, errors * 1.1, "i-3")
        },
    ]
}

fn anomalies() -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    (30..WINDOWS)
        .step_by(5)
        .map(|w| {
            let end = T0 + (w + 1) * MINUTE;
            let e = AnomalyEvent {
                anomaly_id: format!("{}/{end}", service(2)),
                service: service(2),
                window_start: ms_to_rfc3339(end - MINUTE),
                window_end: ms_to_rfc3339(end),
                score: 0.91,
                severity: "high".into(),
                kmeans: None,
                dbscan: None,
                drivers: Vec::new(),
                signals: Vec::new(),
                model_version: 1,
            };
            (
                Some(service(2).into_bytes()),
                serde_json::to_vec(&e).unwrap(),
            )
        })
        .collect()
}

fn windows() -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    (0..WINDOWS)
        .flat_map(|w| (0..SERVICES).flat_map(move |s| aggregates(s, w)))
        .map(|a| {
            (
                Some(a.service.clone().into_bytes()),
                serde_json::to_vec(&a).unwrap(),
            )
        })
        .collect()
}

fn inputs(config: &Config) -> DecideInputs {
    let t = &config.topics;
    DecideInputs {
        aggregates: t.name(&t.aggregates),
        forecasts: t.name(&t.forecasts),
        anomalies: t.name(&t.anomalies),
    }
}

/// What one uninterrupted stage commands: command id -> payload.
fn reference(config: &Config) -> BTreeMap<String, Vec<u8>> {
    restarted_at(config, None)
}

/// What the stage commands when, after `cut` records, it is dropped and a fresh one restored
/// from the state changelog it wrote carries on (`None`: never).
fn restarted_at(config: &Config, cut: Option<usize>) -> BTreeMap<String, Vec<u8>> {
    let names = inputs(config);
    let fresh = || {
        DecideStage::new(
            config.decide.clone(),
            &config.models.signals,
            names.clone(),
            AvroCodec::default(),
        )
    };
    let mut stage = fresh();
    let mut changelog: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    let records = anomalies()
        .into_iter()
        .map(|r| (names.anomalies.clone(), r))
        .chain(windows().into_iter().map(|r| (names.aggregates.clone(), r)));
    for (offset, (topic, (key, payload))) in records.enumerate() {
        let mut emitter = Emitter::new();
        if Some(offset) == cut {
            stage.flush(&mut emitter);
            let (outputs, _) = emitter.drain();
            for o in outputs.into_iter().filter(|o| o.output == STATE) {
                changelog.insert(o.key, o.payload);
            }
            stage = fresh();
            let records: Vec<_> = changelog.clone().into_iter().collect();
            stage.restore_state(0, &records);
        }
        stage.process(
            &Input {
                key: key.as_deref(),
                payload: Some(&payload),
                headers: Vec::new(),
                source: Source {
                    topic,
                    partition: 0,
                    offset: offset as i64,
                },
            },
            &mut emitter,
        );
        let (outputs, dead) = emitter.drain();
        assert!(dead.is_empty());
        for o in outputs.into_iter().filter(|o| o.output == COMMANDS) {
            let c: Command = serde_json::from_slice(&o.payload).unwrap();
            out.insert(c.command_id, o.payload);
        }
    }
    out
}

#[test]
fn a_stage_restored_from_its_changelog_commands_what_an_uninterrupted_one_does() {
    let config = Config::default();
    let expected = reference(&config);
    let total = anomalies().len() + windows().len();
    for cut in (1..total).step_by(97).chain([370, 371, 372, 406]) {
        let got = restarted_at(&config, Some(cut));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "restarted after {cut} records"
        );
        assert_eq!(got, expected, "restarted after {cut} records");
    }
}

struct Decide {
    metrics: Arc<Metrics>,
    shutdown: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<runner::RunSummary, RunnerError>>,
}

fn start(
    config: &Config,
    rt: &tokio::runtime::Runtime,
    crash_before_commit: Option<u64>,
) -> Decide {
    let metrics = Arc::new(Metrics::new());
    let shutdown = Arc::new(AtomicBool::new(false));
    let (stage, mut ctx) = ebb::wiring::decide(
        config,
        metrics.clone(),
        Arc::new(SystemClock),
        shutdown.clone(),
        rt.handle().clone(),
        None,
    )
    .expect("wiring");
    ctx.crash_before_commit = crash_before_commit;
    // Small batches: several transactions, so the crash lands in the middle of the input.
    ctx.settings.batch_size = 60;
    let handle = runner::spawn_transactional(stage, ctx, config.decide.transactional_id.clone())
        .expect("decide thread");
    Decide {
        metrics,
        shutdown,
        handle,
    }
}

impl Decide {
    fn consumed(&self) -> u64 {
        self.metrics
            .stage("decide")
            .records_in
            .load(Ordering::Relaxed)
    }
}

fn a_crash_between_produce_and_commit_yields_each_command_once(target: &Target) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = target.config(&rt);
    config.decide.group_id = format!("{}decide", config.topics.prefix);
    config.decide.transactional_id = format!("{}decide-tx", config.topics.prefix);
    // The crashed run leaves its transaction open; the mock cluster aborts it only when it
    // times out, so a short timeout keeps the takeover quick.
    config
        .kafka
        .insert("transaction.timeout.ms".into(), "10000".into());
    let expected = reference(&config);
    let actions: Vec<&str> = expected
        .values()
        .map(|p| serde_json::from_slice::<Command>(p).unwrap())
        .map(|c| {
            if c.action == "scale" {
                "scale"
            } else {
                "restart"
            }
        })
        .collect();
    assert!(actions.contains(&"scale") && actions.contains(&"restart"));

    let names = inputs(&config);
    let anomalies_in = anomalies();
    produce(&config, &names.anomalies, &anomalies_in);
    let first = start(&config, &rt, Some(6));
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.consumed() < anomalies_in.len() as u64 {
        assert!(Instant::now() < deadline, "anomalies not consumed");
        std::thread::sleep(Duration::from_millis(20));
    }
    produce(&config, &names.aggregates, &windows());
    let Decide {
        metrics, handle, ..
    } = first;
    match handle.join().expect("decide thread") {
        Err(RunnerError::InjectedCrash(n)) => assert_eq!(n, 6),
        other => panic!("expected the injected crash, got {other:?}"),
    }
    let crashed_at = metrics.stage("decide").records_in.load(Ordering::Relaxed);
    assert!(
        crashed_at < (anomalies_in.len() + windows().len()) as u64,
        "the crash must land before the end of the input"
    );

    let second = start(&config, &rt, None);
    let commands = config.topics.name(&config.topics.commands);
    let got = read_until_quiet(
        &config,
        &[&commands],
        expected.len(),
        Duration::from_secs(3),
        Duration::from_secs(90),
    );
    second.shutdown.store(true, Ordering::Relaxed);
    second
        .handle
        .join()
        .expect("decide thread")
        .expect("decide run");

    let mut seen = BTreeMap::new();
    for r in &got {
        let id = r.headers["ebb.command_id"].clone();
        let previous = seen.insert(id.clone(), r.payload.clone().unwrap());
        assert!(previous.is_none(), "command {id} visible twice");
    }
    let missing: Vec<_> = expected.keys().filter(|k| !seen.contains_key(*k)).collect();
    let extra: Vec<_> = seen.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, unexpected {:?}",
        extra
            .iter()
            .map(|k| String::from_utf8_lossy(&seen[*k]))
            .collect::<Vec<_>>()
    );
    for (id, payload) in &expected {
        assert_eq!(
            String::from_utf8_lossy(&seen[id]),
            String::from_utf8_lossy(payload),
            "{id} differs from the uninterrupted run"
        );
    }
}

#[test]
fn mock_a_crash_between_produce_and_commit_yields_each_command_once() {
    a_crash_between_produce_and_commit_yields_each_command_once(&Target::mock());
}

#[test]
fn real_kafka_a_crash_between_produce_and_commit_yields_each_command_once() {
    if let Some(t) = Target::real() {
        a_crash_between_produce_and_commit_yields_each_command_once(&t);
    }
}
