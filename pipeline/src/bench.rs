//! `ebb bench filter`: figures a person can read, measured in one run.
//!
//! - in-process: decode + filter + encode on one core, JSON and Avro, no broker;
//! - through a broker: the raw rdkafka consume rate of one topic, and the filter stage's rate
//!   over the same topic on the same broker, as a ratio.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::Message;
use serde::Serialize;

use crate::clock::{Clock, ManualClock};
use crate::codec::avro::{CLEAN_KEY, CLEAN_SCHEMA, RAW_SCHEMA};
use crate::codec::AvroCodec;
use crate::config::Config;
use crate::demo::generator::{Generator, GeneratorConfig, WireFormat};
use crate::demo::{produce, Pace, ProduceCounts, ProduceJob};
use crate::metrics::Metrics;
use crate::runner::{self, client_config, RunContext};
use crate::stage::{Emitter, Input, Source, Stage};
use crate::stages::filter::{FilterStage, CLEAN};

/// Bench errors.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Kafka.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Runner.
    #[error(transparent)]
    Runner(#[from] runner::RunnerError),
    /// Timed out.
    #[error("{0}")]
    Timeout(String),
    /// The stage thread could not be started.
    #[error("cannot start the stage thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The figures, printed as a table and as the JSON last line.
#[derive(Debug, Clone, Serialize)]
pub struct FilterFigures {
    /// Records per run.
    pub records: u64,
    /// In-process JSON rate, records/s on one core.
    pub json_records_per_s: f64,
    /// In-process Avro rate.
    pub avro_records_per_s: f64,
    /// Which broker the broker figures came from.
    pub broker: String,
    /// Records the topic held for the broker figures (the mock cluster keeps ~5 MB a partition).
    pub broker_records: u64,
    /// Raw rdkafka consume rate of the topic (no processing).
    pub raw_consume_records_per_s: f64,
    /// The filter stage through the runner over the same topic.
    pub filter_records_per_s: f64,
    /// A stage that copies records unchanged, through the same runner: the runner's ceiling.
    pub passthrough_records_per_s: f64,
    /// filter / raw.
    pub ratio: f64,
}

const START: i64 = 1_717_243_200;

fn start() -> DateTime<Utc> {
    DateTime::from_timestamp(START, 0).unwrap_or_default()
}

/// 50 services x 4 instances, all good records: the fleet every bench figure uses.
fn fleet() -> GeneratorConfig {
    GeneratorConfig {
        services: 50,
        instances: 4,
        fault_rate: 0.0,
        seed: 1,
        incidents: false,
    }
}

fn generate(n: usize, format: WireFormat) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cfg = fleet();
    let mut g = Generator::new(cfg, format);
    let mut out = Vec::with_capacity(n);
    let mut t = 0i64;
    while out.len() < n {
        let at = start() + chrono::Duration::seconds(t);
        out.extend(g.tick(at).into_iter().map(|r| (r.key, r.payload)));
        t += 10;
    }
    out.truncate(n);
    out
}

/// Decode + filter + encode rate on this thread, under `config`'s filter settings.
pub fn in_process(config: &Config, records: usize, format: WireFormat) -> f64 {
    let data = generate(records, format);
    let codec = AvroCodec::default();
    let _ = codec.schemas.insert(1, RAW_SCHEMA);
    let _ = codec.schemas.insert(2, CLEAN_SCHEMA);
    codec.schemas.set_output_id(CLEAN_KEY, 2);
    let end = start() + chrono::Duration::seconds(i64::try_from(records).unwrap_or(0));
    let mut stage = FilterStage::new(config.filter.clone(), b"bench-key-0123456789", codec, end);
    let mut out = Emitter::new();
    let source = Source {
        topic: "bench".into(),
        partition: 0,
        offset: 0,
    };
    let mut pass = || {
        for (key, payload) in &data {
            let input = Input {
                key: Some(key),
                payload: Some(payload),
                headers: Vec::new(),
                source: source.clone(),
            };
            stage.process(&input, &mut out);
            if out.outputs().len() >= 4096 {
                out.drain();
            }
        }
        let rejected = out.dead_letters().len();
        out.drain();
        rejected
    };
    // One pass warms the caches (pseudonyms, outlier series); the second is measured.
    pass();
    let t0 = Instant::now();
    let rejected = pass();
    let rate = data.len() as f64 / t0.elapsed().as_secs_f64();
    if rejected > 0 {
        tracing::warn!(
            rejected,
            "bench data was partly rejected; figures include dead letters"
        );
    }
    rate
}

fn held_records(kafka: &BTreeMap<String, String>, topic: &str) -> Result<u64, BenchError> {
    let consumer: BaseConsumer = client_config(kafka).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut held = 0u64;
    for t in metadata.topics() {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            held += u64::try_from(high - low).unwrap_or(0);
        }
    }
    Ok(held)
}

fn raw_consume(kafka: &BTreeMap<String, String>, topic: &str, n: u64) -> Result<f64, BenchError> {
    let consumer: BaseConsumer = client_config(kafka)
        .set("group.id", format!("bench-raw-{}", rand::random::<u32>()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut seen = 0u64;
    let mut t0: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen < n {
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "raw consume saw {seen} of {n} records"
            )));
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            t0.get_or_insert_with(Instant::now);
            seen += 1;
            std::hint::black_box(m.payload());
        }
    }
    Ok(n as f64 / t0.map_or(1.0, |t| t.elapsed().as_secs_f64()))
}

/// Copies every record to the clean topic unchanged: the runner's own ceiling (consume,
/// produce, acknowledge, commit) with no work per record.
struct Passthrough;

impl Stage for Passthrough {
    fn name(&self) -> &'static str {
        "filter"
    }

    fn process(&mut self, input: &Input<'_>, out: &mut Emitter) {
        out.emit(crate::stage::Output {
            output: CLEAN,
            key: input.key.unwrap_or_default().to_vec(),
            payload: input.payload.unwrap_or_default().to_vec(),
            headers: Vec::new(),
        });
    }
}

fn filter_through_broker(
    config: &Config,
    topic: &str,
    prefix: &str,
    n: u64,
) -> Result<f64, BenchError> {
    let clock = ManualClock::new(start() + chrono::Duration::days(1));
    let stage = FilterStage::new(
        config.filter.clone(),
        b"bench-key-0123456789",
        AvroCodec::default(),
        clock.now(),
    );
    through_broker(stage, Arc::new(clock), config, topic, prefix, n)
}

fn through_broker<S: Stage + Send + 'static>(
    stage: S,
    clock: Arc<dyn Clock>,
    config: &Config,
    topic: &str,
    prefix: &str,
    n: u64,
) -> Result<f64, BenchError> {
    let metrics = Arc::new(Metrics::new());
    let shutdown = Arc::new(AtomicBool::new(false));
    let ctx = RunContext {
        kafka: config.kafka.clone(),
        group_id: format!("bench-filter-{}", rand::random::<u32>()),
        input_topics: vec![topic.to_string()],
        outputs: HashMap::from([(CLEAN, format!("{prefix}telemetry.clean"))]),
        dead_letter_topic: format!("{prefix}telemetry.dead-letter"),
        settings: config.runner.clone(),
        metrics: metrics.clone(),
        clock,
        shutdown: shutdown.clone(),
        avro: None,
        state_topic: None,
        crash_before_commit: None,
    };
    let counts = metrics.stage("filter");
    let handle = runner::spawn(stage, ctx)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut t0: Option<Instant> = None;
    while counts.records_in.load(Ordering::Relaxed) < n {
        if counts.records_in.load(Ordering::Relaxed) > 0 {
            t0.get_or_insert_with(Instant::now);
        }
        if Instant::now() > deadline {
            shutdown.store(true, Ordering::Relaxed);
            return Err(BenchError::Timeout("filter did not finish in 300 s".into()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let rate = n as f64 / t0.map_or(1.0, |t| t.elapsed().as_secs_f64());
    shutdown.store(true, Ordering::Relaxed);
    match handle.join() {
        Ok(r) => {
            r?;
        }
        Err(_) => return Err(BenchError::Timeout("filter thread panicked".into())),
    }
    Ok(rate)
}

/// Runs every filter figure under `base` (its `[kafka]`, `[runner]` and `[filter]` settings).
/// With `brokers`, the broker part runs there (topics are created by the caller's `topics
/// apply` or auto-created); without, on a mock cluster.
pub fn filter(
    base: &Config,
    records: u64,
    brokers: Option<&str>,
) -> Result<FilterFigures, BenchError> {
    let n = usize::try_from(records).unwrap_or(usize::MAX);
    let json = in_process(base, n, WireFormat::Json);
    let avro = in_process(base, n, WireFormat::Avro(1));
    let mut config = base.clone();
    config.filter.time.max_age = Duration::from_secs(10 * 365 * 86_400);
    let prefix = format!("bench-{}.", rand::random::<u32>());
    let mock;
    let broker_name;
    match brokers {
        Some(b) => {
            config.set_brokers(b);
            broker_name = b.to_string();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| BenchError::Timeout(e.to_string()))?;
            config.topics.prefix = prefix.clone();
            let specs =
                crate::topics::declared(&config).map_err(|e| BenchError::Timeout(e.to_string()))?;
            let specs: Vec<_> = specs
                .into_iter()
                .filter(|s| s.name.contains("telemetry."))
                .map(|mut s| {
                    s.partitions = 1;
                    s
                })
                .collect();
            rt.block_on(crate::topics::apply(&config.kafka, &specs, false))
                .map_err(|e| BenchError::Timeout(e.to_string()))?;
        }
        None => {
            mock = MockCluster::new(1)?;
            config.set_brokers(&mock.bootstrap_servers());
            broker_name = "mock cluster (in-process)".into();
            for t in ["telemetry.raw", "telemetry.clean", "telemetry.dead-letter"] {
                mock.create_topic(&format!("{prefix}{t}"), 1, 1)?;
            }
        }
    }
    let topic = format!("{prefix}telemetry.raw");
    let cfg = fleet();
    let job = ProduceJob {
        kafka: config.kafka.clone(),
        topic: topic.clone(),
        pace: Pace::Fast(Duration::from_secs(10)),
        max_records: Some(records),
    };
    let clock = ManualClock::new(start());
    produce(
        &job,
        Generator::new(cfg, WireFormat::Json),
        &clock,
        &AtomicBool::new(false),
        &ProduceCounts::default(),
    )?;
    // The mock cluster keeps only ~5 MB per partition and drops older records, so measure over
    // what the topic holds, not over what was sent.
    let held = held_records(&config.kafka, &topic)?;
    let raw = raw_consume(&config.kafka, &topic, held)?;
    let filtered = filter_through_broker(&config, &topic, &prefix, held)?;
    let passthrough = through_broker(
        Passthrough,
        Arc::new(ManualClock::new(start())),
        &config,
        &topic,
        &prefix,
        held,
    )?;
    Ok(FilterFigures {
        records,
        broker_records: held,
        json_records_per_s: json.round(),
        avro_records_per_s: avro.round(),
        broker: broker_name,
        raw_consume_records_per_s: raw.round(),
        filter_records_per_s: filtered.round(),
        passthrough_records_per_s: passthrough.round(),
        ratio: (filtered / raw * 1000.0).round() / 1000.0,
    })
}
