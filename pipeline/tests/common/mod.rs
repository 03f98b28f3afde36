//! Shared helpers: the same test runs on librdkafka's mock cluster and on the real broker
//! and registry that `compose/kafka.sh up` starts (named by EBB_TEST_BROKERS and
//! EBB_TEST_REGISTRY). Every test uses its own topic prefix and groups, so tests never see
//! each other's data.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ebb::clock::{Clock, SystemClock};
use ebb::config::Config;
use ebb::metrics::Metrics;
use ebb::runner::{self, client_config, RunSummary, RunnerError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// Where a test runs.
pub enum Target {
    Mock(MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
    Real { brokers: String, registry: String },
}

impl Target {
    pub fn mock() -> Self {
        logs();
        Target::Mock(MockCluster::new(3).expect("mock cluster"))
    }

    /// The real broker and registry, or `None` outside CI when they are not running.
    /// In CI (CI=true) a missing broker fails the test: it must never skip silently there.
    pub fn real() -> Option<Self> {
        logs();
        let brokers = std::env::var("EBB_TEST_BROKERS")
            .ok()
            .filter(|v| !v.is_empty());
        let registry = std::env::var("EBB_TEST_REGISTRY")
            .ok()
            .filter(|v| !v.is_empty());
        match (brokers, registry) {
            (Some(brokers), Some(registry)) => Some(Target::Real { brokers, registry }),
            _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI=true but EBB_TEST_BROKERS / EBB_TEST_REGISTRY are not set: run compose/test.sh")
            }
            _ => {
                eprintln!("SKIPPED: no real Kafka (run `compose/kafka.sh up` and export `compose/kafka.sh env`)");
                None
            }
        }
    }

    pub fn brokers(&self) -> String {
        match self {
            Target::Mock(m) => m.bootstrap_servers(),
            Target::Real { brokers, .. } => brokers.clone(),
        }
    }

    pub fn registry(&self) -> Option<String> {
        match self {
            Target::Mock(_) => None,
            Target::Real { registry, .. } => Some(registry.clone()),
        }
    }

    /// A config for this target with a fresh topic prefix, created topics, and no HTTP.
    pub fn config(&self, rt: &tokio::runtime::Runtime) -> Config {
        let mut config = Config::default();
        config.set_brokers(&self.brokers());
        config.registry.url = self.registry();
        config.topics.prefix = format!("t{}.", rand::random::<u32>());
        config.http.enabled = false;
        config.filter.group_id = format!("{}filter", config.topics.prefix);
        config.window.group_id = format!("{}window", config.topics.prefix);
        config.models.group_id = format!("{}models", config.topics.prefix);
        config.sql.pg_enabled = false;
        config.runner.poll_timeout = Duration::from_millis(50);
        let specs = ebb::topics::declared(&config).expect("topics");
        match self {
            Target::Mock(m) => {
                for s in &specs {
                    m.create_topic(&s.name, 3, 1).expect("mock topic");
                }
            }
            Target::Real { .. } => {
                let specs: Vec<_> = specs
                    .into_iter()
                    .map(|mut s| {
                        s.partitions = 3;
                        s
                    })
                    .collect();
                let report = rt
                    .block_on(ebb::topics::apply(&config.kafka, &specs, false))
                    .expect("topics apply");
                assert!(!report.is_empty());
            }
        }
        config
    }
}

/// A stage running through the runner on its own thread.
pub struct RunningStage {
    pub name: &'static str,
    pub shutdown: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    handle: JoinHandle<Result<RunSummary, RunnerError>>,
}

/// The filter's helper name, kept for the filter tests.
pub type RunningFilter = RunningStage;
/// The window's helper name.
pub type RunningWindow = RunningStage;

impl RunningStage {
    /// Wires a stage with fresh metrics and a shutdown flag, and runs it on its own thread.
    fn spawn<S: ebb::stage::Stage + Send + 'static>(
        wire: impl FnOnce(Arc<Metrics>, Arc<dyn Clock>, Arc<AtomicBool>) -> (S, ebb::runner::RunContext),
    ) -> Self {
        let metrics = Arc::new(Metrics::new());
        let shutdown = Arc::new(AtomicBool::new(false));
        let (stage, ctx) = wire(metrics.clone(), Arc::new(SystemClock), shutdown.clone());
        let name = stage.name();
        let handle = runner::spawn(stage, ctx).expect("stage thread");
        Self {
            name,
            shutdown,
            metrics,
            handle,
        }
    }

    /// The filter.
    pub fn start(config: &Config, rt: &tokio::runtime::Runtime) -> Self {
        Self::spawn(|metrics, clock, shutdown| {
            ebb::wiring::filter(
                config,
                b"integration-test-key",
                metrics,
                clock,
                shutdown,
                rt.handle().clone(),
            )
            .expect("wiring")
        })
    }

    /// The window stage.
    pub fn start_window(config: &Config, rt: &tokio::runtime::Runtime) -> Self {
        Self::spawn(|metrics, clock, shutdown| {
            ebb::wiring::window(config, metrics, clock, shutdown, rt.handle().clone(), None)
                .expect("wiring")
        })
    }

    /// The models stage.
    pub fn start_models(config: &Config, rt: &tokio::runtime::Runtime) -> Self {
        Self::spawn(|metrics, clock, shutdown| {
            ebb::wiring::models(config, metrics, clock, shutdown, rt.handle().clone(), None)
                .expect("wiring")
        })
    }

    pub fn consumed(&self) -> u64 {
        self.metrics
            .stage(self.name)
            .records_in
            .load(Ordering::Relaxed)
    }

    /// Waits until the stage has consumed `n` records.
    pub fn wait_for(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.consumed() < n {
            assert!(
                Instant::now() < deadline,
                "{} consumed {} of {n} records in {timeout:?}",
                self.name,
                self.consumed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(self) -> RunSummary {
        self.shutdown.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .expect("stage thread")
            .expect("stage result")
    }
}

/// Produces (key, value) pairs; `None` key means no key.
pub fn produce(config: &Config, topic: &str, records: &[(Option<Vec<u8>>, Vec<u8>)]) {
    let producer: BaseProducer = client_config(&config.kafka)
        .set("message.max.bytes", "10485760")
        .create()
        .expect("producer");
    for (key, payload) in records {
        let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(payload);
        if let Some(k) = key {
            r = r.key(k);
        }
        loop {
            match producer.send(r) {
                Ok(()) => break,
                Err((_, back)) => {
                    r = back;
                    producer.poll(Duration::from_millis(20));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// A record read back.
#[derive(Debug, Clone)]
pub struct Read {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
}

/// A consumed message as a [`Read`].
pub fn read(m: &rdkafka::message::BorrowedMessage<'_>) -> Read {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Read {
        topic: m.topic().to_string(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
    }
}

fn reader(config: &Config, topics: &[&str]) -> BaseConsumer {
    let consumer: BaseConsumer = client_config(&config.kafka)
        .set("group.id", format!("reader-{}", rand::random::<u32>()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(topics).expect("subscribe");
    consumer
}

/// Reads every record of `topics` (from the start) until at least `min` arrived and then
/// `quiet` passed with none, failing after `timeout`.
pub fn read_until_quiet(
    config: &Config,
    topics: &[&str],
    min: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<Read> {
    let consumer = reader(config, topics);
    let deadline = Instant::now() + timeout;
    let mut last = Instant::now();
    let mut out = Vec::new();
    while Instant::now() < deadline && (out.len() < min || last.elapsed() < quiet) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            last = Instant::now();
            out.push(read(&m));
        }
    }
    assert!(
        out.len() >= min,
        "read {} of at least {min} records from {topics:?}",
        out.len()
    );
    out
}

/// Reads exactly `n` records from `topics` (from the start), failing after `timeout`; after
/// the `n`-th, keeps polling for `settle` and fails if any more arrive (a duplicate, or a
/// record that should not exist).
pub fn read_exactly(
    config: &Config,
    topics: &[&str],
    n: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Read> {
    let consumer = reader(config, topics);
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "read {} of {n} records from {topics:?}",
            out.len()
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(read(&m));
        }
    }
    let quiet_until = Instant::now() + settle;
    while Instant::now() < quiet_until {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            panic!(
                "more than {n} records on {topics:?}: an extra one at {}/{}/{}",
                m.topic(),
                m.partition(),
                m.offset()
            );
        }
    }
    out
}

/// Stage logs in a test's output when RUST_LOG asks for them.
fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Commands as JSON values, from records read off a commands topic.
pub fn commands_of(records: &[Read]) -> Vec<serde_json::Value> {
    records
        .iter()
        .filter_map(|r| serde_json::from_slice(r.payload.as_deref()?).ok())
        .collect()
}

/// Commands a replay wrote to `commands.jsonl` in `dir`.
pub fn replayed_commands(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("commands.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a command per line"))
        .collect()
}

/// A replay reproduces a live run's commands: per service (Kafka orders a service's
/// commands, not the topic's), the live commands are the replay's first ones, equal field by
/// field, same ids, same order. The replay may go on past the live run's last decision: it
/// closes every window it read, where the live run stopped when it was told to.
pub fn assert_replay_reproduces(live: &[serde_json::Value], replayed: &[serde_json::Value]) {
    let by_service = |cs: &[serde_json::Value]| {
        let mut m: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        for c in cs {
            m.entry(c["service"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(c.clone());
        }
        m
    };
    let (live_by, replay_by) = (by_service(live), by_service(replayed));
    for (service, live_cs) in &live_by {
        let replay_cs = replay_by.get(service).cloned().unwrap_or_default();
        let ids = |cs: &[serde_json::Value]| -> Vec<String> {
            cs.iter()
                .map(|c| c["command_id"].as_str().unwrap_or_default().to_string())
                .collect()
        };
        assert!(
            replay_cs.len() >= live_cs.len(),
            "{service}: live {:?}, replay {:?}",
            ids(live_cs),
            ids(&replay_cs)
        );
        for (i, (l, r)) in live_cs.iter().zip(&replay_cs).enumerate() {
            assert_eq!(
                l,
                r,
                "{service}: command {i} differs; live ids {:?}, replay ids {:?}",
                ids(live_cs),
                ids(&replay_cs)
            );
        }
        let last_live = live_cs
            .last()
            .and_then(|c| c["decided_at"].as_str())
            .unwrap_or_default();
        for extra in &replay_cs[live_cs.len()..] {
            assert!(
                extra["decided_at"].as_str().unwrap_or_default() > last_live,
                "{service}: the replay has {extra} among the live run's decisions"
            );
        }
    }
    for (service, cs) in &replay_by {
        if !live_by.contains_key(service) {
            // Only after the live run stopped deciding anything at all.
            let last_live = live
                .iter()
                .filter_map(|c| c["decided_at"].as_str())
                .max()
                .unwrap_or_default();
            for c in cs {
                assert!(
                    c["decided_at"].as_str().unwrap_or_default() > last_live,
                    "{service}: the replay commanded {c} which the live run never did"
                );
            }
        }
    }
}

/// The `ebb` binary, free of the caller's config and prefix, logging warnings only.
pub fn ebb() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ebb"));
    c.env_remove("EBB_CONFIG")
        .env_remove("EBB_TOPIC_PREFIX")
        .env("RUST_LOG", "warn");
    c
}

/// One minute's aggregate of `metric` for `service`, as the window stage writes it: 24
/// samples from 4 instances around `mean`, peaking at `max` on instance `top`.
pub fn minute_aggregate(
    service: &str,
    metric: &str,
    start: i64,
    mean: f64,
    max: f64,
    top: &str,
) -> ebb::stages::window::WindowAggregate {
    const MINUTE: i64 = 60_000;
    ebb::stages::window::WindowAggregate {
        window_id: format!("{service}/{metric}/{MINUTE}/{start}"),
        service: service.into(),
        metric: metric.into(),
        unit: None,
        window_start: start,
        window_end: start + MINUTE,
        count: 24,
        sum: mean * 24.0,
        mean,
        min: mean,
        max,
        stddev: None,
        p50: mean,
        p95: max,
        p99: max,
        rate: 0.4,
        instances: 4,
        top_instance: Some(top.into()),
    }
}
