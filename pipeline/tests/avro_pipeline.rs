//! Avro downstream of the window stage, on real Apache Kafka with the schema registry: Avro
//! aggregates in; the models stage writes Avro forecasts, decide reads them and writes Avro
//! commands, and an actuator reads and carries those out. Every record is framed with the id
//! the registry gave its topic's subject, and nothing is dead-lettered on the way.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{produce, read_until_quiet, RunningStage, Target};
use ebb::actuators::{log::LogDriver, Actuation};
use ebb::clock::SystemClock;
use ebb::codec::avro::{AGGREGATES_KEY, AGGREGATES_SCHEMA};
use ebb::codec::{confluent_schema_id, decode_event, AvroCodec, EventSchema, Format};
use ebb::metrics::Metrics;
use ebb::runner;
use ebb::stages::decide::Command;
use ebb::stages::models::process::ForecastEvent;
use ebb::stages::window::WindowAggregate;

const T0: i64 = 1_700_000_040_000;
const MINUTE: i64 = 60_000;
const SERVICES: usize = 6;
const WINDOWS: i64 = 150;

/// Window `w` of service `s`: even services ramp up steadily, odd ones hold.
fn aggregates(s: usize, w: i64) -> Vec<WindowAggregate> {
    let load = if s.is_multiple_of(2) {
        200.0 + 6.0 * w as f64
    } else {
        300.0
    };
    // Four instances, as common::minute_aggregate has them.
    let per_instance = load / 4.0;
    let start = T0 + w * MINUTE;
    let service = format!("svc-{s}");
    let agg = |metric: &str, mean: f64| {
        common::minute_aggregate(&service, metric, start, mean, mean * 1.05, "i-0")
    };
    vec![
        agg("requests_per_s", per_instance),
        agg("cpu", 100.0 * load / 400.0),
        agg("latency_p95_ms", 50.0),
        agg("errors_per_s", per_instance * 0.01),
    ]
}

/// Schema ids and a codec whose cache holds every schema they name, from the registry.
struct Registered {
    ids: BTreeMap<&'static str, u32>,
    codec: AvroCodec,
}

fn registered(
    config: &ebb::config::Config,
    rt: &tokio::runtime::Runtime,
    kinds: &[EventSchema],
) -> Registered {
    let registry = ebb::wiring::registry(config)
        .unwrap()
        .expect("a registry on real Kafka");
    let t = &config.topics;
    let codec = AvroCodec::default();
    let mut ids = BTreeMap::new();
    for kind in kinds {
        let topic = match kind {
            EventSchema::Anomalies => &t.anomalies,
            EventSchema::Forecasts => &t.forecasts,
            EventSchema::Commands => &t.commands,
        };
        let subject = format!("{}-value", t.name(topic));
        // Registering what is already there answers with the id it has.
        let id = rt
            .block_on(registry.register(&subject, kind.text()))
            .unwrap();
        let text = rt.block_on(registry.schema_by_id(id)).unwrap();
        codec.schemas.insert(id, &text).unwrap();
        ids.insert(kind.key(), id);
    }
    Registered { ids, codec }
}

fn dead_letters(metrics: &Metrics, stage: &str) -> BTreeMap<String, u64> {
    metrics
        .stage(stage)
        .dead_lettered
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default()
}

#[test]
fn avro_aggregates_give_avro_forecasts_and_commands_that_an_actuator_carries_out_on_real_kafka() {
    let Some(target) = Target::real() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = target.config(&rt);
    let prefix = config.topics.prefix.clone();
    config.decide.group_id = format!("{prefix}decide");
    config.decide.transactional_id = format!("{prefix}decide-tx");
    config.actuate.group_id = format!("{prefix}actuate");
    // The windows are from 2023: an actuator with the default max_age would call them stale.
    config.actuate.max_age = Duration::from_secs(3650 * 86_400);
    let t = config.topics.clone();

    let registry = ebb::wiring::registry(&config).unwrap().unwrap();
    let aggregates_id = rt
        .block_on(registry.register(
            &format!("{}-value", t.name(&t.aggregates)),
            AGGREGATES_SCHEMA,
        ))
        .unwrap();
    let writer = AvroCodec::default();
    writer.schemas.set_output_id(AGGREGATES_KEY, aggregates_id);
    let records: Vec<_> = (0..WINDOWS)
        .flat_map(|w| (0..SERVICES).flat_map(move |s| aggregates(s, w)))
        .map(|a| {
            (
                Some(a.service.clone().into_bytes()),
                writer.encode_aggregate(&a).unwrap(),
            )
        })
        .collect();
    produce(&config, &t.name(&t.aggregates), &records);

    let models = RunningStage::start_models(&config, &rt);
    let decide_metrics = Arc::new(Metrics::new());
    let decide_stop = Arc::new(AtomicBool::new(false));
    let (stage, ctx) = ebb::wiring::decide(
        &config,
        decide_metrics.clone(),
        Arc::new(SystemClock),
        decide_stop.clone(),
        rt.handle().clone(),
        None,
    )
    .unwrap();
    let decide =
        runner::spawn_transactional(stage, ctx, config.decide.transactional_id.clone()).unwrap();
    let actuate_metrics = Arc::new(Metrics::new());
    let actuate_stop = Arc::new(AtomicBool::new(false));
    let printed = Arc::new(Mutex::new(Vec::<u8>::new()));
    let (stage, ctx) = ebb::wiring::actuator(
        &config,
        Box::new(LogDriver::to(printed.clone())),
        false,
        actuate_metrics.clone(),
        Arc::new(SystemClock),
        actuate_stop.clone(),
        rt.handle().clone(),
    )
    .unwrap();
    let actuate = runner::spawn(stage, ctx).unwrap();

    let commands = read_until_quiet(
        &config,
        &[&t.name(&t.commands)],
        SERVICES / 2,
        Duration::from_secs(5),
        Duration::from_secs(120),
    );
    let actuations = read_until_quiet(
        &config,
        &[&t.name(&t.actuations)],
        commands.len(),
        Duration::from_secs(3),
        Duration::from_secs(60),
    );
    let forecasts = read_until_quiet(
        &config,
        &[&t.name(&t.forecasts)],
        1,
        Duration::from_secs(1),
        Duration::from_secs(30),
    );
    let models_metrics = models.metrics.clone();
    models.stop();
    actuate_stop.store(true, Ordering::Relaxed);
    decide_stop.store(true, Ordering::Relaxed);
    actuate.join().unwrap().unwrap();
    decide.join().unwrap().unwrap();

    let Registered { ids, codec } = registered(
        &config,
        &rt,
        &[EventSchema::Forecasts, EventSchema::Commands],
    );
    for f in &forecasts {
        let payload = f.payload.as_deref().unwrap();
        assert_eq!(confluent_schema_id(payload), Some(ids["forecasts"]));
        let (format, _) =
            decode_event::<ForecastEvent>(payload, EventSchema::Forecasts, &codec).unwrap();
        assert_eq!(format, Format::Avro);
    }
    let mut scaled = std::collections::BTreeSet::new();
    let mut command_ids = Vec::new();
    for c in &commands {
        let payload = c.payload.as_deref().unwrap();
        assert_eq!(confluent_schema_id(payload), Some(ids["commands"]));
        let (_, command) = decode_event::<Command>(payload, EventSchema::Commands, &codec).unwrap();
        assert_eq!(c.headers["ebb.command_id"], command.command_id);
        if command.action == "scale" {
            scaled.insert(command.service.clone());
        }
        command_ids.push(command.command_id);
    }
    assert!(
        (0..SERVICES)
            .step_by(2)
            .all(|s| scaled.contains(&format!("svc-{s}"))),
        "every ramping service is scaled: {scaled:?}"
    );
    let mut outcomes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for a in &actuations {
        let a: Actuation = serde_json::from_slice(a.payload.as_deref().unwrap()).unwrap();
        outcomes.entry(a.command_id).or_default().push(a.outcome);
    }
    for id in &command_ids {
        assert_eq!(
            outcomes.get(id).map(Vec::as_slice),
            Some(&["applied".to_string()][..]),
            "{id}"
        );
    }
    let printed = String::from_utf8(printed.lock().unwrap().clone()).unwrap();
    assert!(printed.contains("scale svc-0 to"), "{printed}");
    for (stage, metrics) in [
        ("models", &models_metrics),
        ("decide", &decide_metrics),
        ("actuate", &actuate_metrics),
    ] {
        let dead = dead_letters(metrics, stage);
        assert!(
            dead.values().all(|n| *n == 0),
            "{stage} dead-lettered {dead:?}"
        );
    }
}
