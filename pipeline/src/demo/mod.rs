//! `ebb demo`: the pipeline in one process on librdkafka's in-process mock cluster, fed by
//! the synthetic generator; and `ebb produce --synthetic`, the same generator aimed at any
//! broker.

pub mod generator;
pub mod view;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::runner::{self, client_config, set_default, RunnerError};
use crate::topics;
use crate::wiring;
use generator::{Generator, GeneratorConfig, Kind, WireFormat};

/// `[demo]`: the synthetic fleet of `ebb demo` and `ebb produce --synthetic`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Seed of the synthetic telemetry. Default 42.
    pub seed: u64,
    /// Services in the fleet. Default 6.
    pub services: usize,
    /// Instances per service. Default 3.
    pub instances: usize,
    /// Time between two samples of one metric. Default 250 ms (the demo runs a busy fleet).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Fraction of records replaced by bad ones, to show the dead-letter path. Default 0.01.
    pub fault_rate: f64,
    /// Load ramp, faulty instance and bursts. Default on.
    pub incidents: bool,
    /// Minute-scale pipeline settings (see [`quicken`]), so the incidents turn into anomalies
    /// and commands within a minute. Off, the demo runs with the configured windows and
    /// policies (ten-second windows: give it a quarter of an hour). Default on.
    pub quick: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            services: 6,
            instances: 3,
            interval: Duration::from_millis(250),
            fault_rate: 0.01,
            incidents: true,
            quick: true,
        }
    }
}

impl DemoConfig {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| {
            Err(ConfigError::Invalid {
                key: format!("demo.{key}"),
                why: why.into(),
            })
        };
        if self.services == 0 || self.services > 10_000 {
            return bad("services", "must be between 1 and 10000");
        }
        if self.instances == 0 || self.instances > 1_000 {
            return bad("instances", "must be between 1 and 1000");
        }
        if self.interval < Duration::from_millis(1) {
            return bad("interval", "must be at least 1ms");
        }
        if !(0.0..=1.0).contains(&self.fault_rate) {
            return bad("fault_rate", "must be between 0 and 1");
        }
        Ok(())
    }

    /// The generator settings these describe.
    pub fn generator(&self) -> GeneratorConfig {
        GeneratorConfig {
            services: self.services,
            instances: self.instances,
            fault_rate: self.fault_rate,
            seed: self.seed,
            incidents: self.incidents,
        }
    }
}

/// Shrinks windows, warm-ups and policy intervals to the scale of a one-minute demo:
/// 2 s windows closing a second after their end, forecasts every 2 s for 10 s to 1 min ahead,
/// detectors warm after 10 windows and alert at a lower score, and decide's intervals in
/// seconds.
pub fn quicken(config: &mut Config) {
    let secs = Duration::from_secs;
    let ms = Duration::from_millis;
    let w = &mut config.window;
    w.size = secs(2);
    w.advance = None;
    w.metrics.clear();
    w.allowed_lateness = ms(500);
    w.grace = ms(500);
    w.idle_timeout = secs(3);
    let m = &mut config.models;
    m.forecast_step = secs(2);
    m.forecast.horizons = vec![secs(10), secs(30), secs(60)];
    m.snapshot_every = 10;
    m.detector.warmup = 10;
    m.detector.baseline_halflife = 30.0;
    // A one-minute series has too few windows for the likelihood to reach the production
    // threshold (a score's z can be at most about the square root of the windows seen).
    m.detector.alert_score = 0.35;
    let d = &mut config.decide;
    d.scale.up_stabilization = secs(4);
    d.scale.down_stabilization = secs(30);
    d.scale.cooldown = secs(10);
    d.scale.startup_time = secs(10);
    d.scale.forecast_staleness = secs(10);
    d.restart.anomaly_hold = secs(30);
    d.restart.interval = secs(300);
}

/// Demo errors.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The mock cluster or a client could not start.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A topics declaration problem.
    #[error(transparent)]
    Topics(#[from] topics::TopicsError),
    /// The runner failed.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// Registry settings.
    #[error(transparent)]
    Registry(#[from] crate::codec::registry::RegistryError),
    /// A stage could not be assembled.
    #[error(transparent)]
    Wiring(#[from] crate::wiring::WiringError),
    /// The SQL engine could not start.
    #[error(transparent)]
    Sql(#[from] crate::sql::SqlError),
    /// A thread panicked.
    #[error("a pipeline thread panicked")]
    Panicked,
    /// The demo's settings do not validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The demo's final figures; the last line of `ebb demo --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DemoReport {
    /// Records the filter consumed.
    #[serde(rename = "in")]
    pub records_in: u64,
    /// Clean records the filter emitted.
    pub out: u64,
    /// Dead letters by reason.
    pub dead_lettered: BTreeMap<String, u64>,
    /// Records the generator produced.
    pub produced: u64,
    /// Bad records the generator injected, by the reason the filter should give.
    pub injected: BTreeMap<String, u64>,
    /// Window aggregates the window stage emitted.
    pub windows: u64,
    /// Records that arrived after their window closed (sent to the late topic).
    pub late: u64,
    /// Anomaly events the models stage emitted.
    pub anomalies: u64,
    /// Forecast records the models stage emitted.
    pub forecasts: u64,
    /// Commands the decide stage committed, by action (`scale`, `restart`).
    pub commands: BTreeMap<String, u64>,
    /// Commands the log actuator carried out.
    pub actuated: u64,
    /// Wall time the demo ran.
    pub duration_s: f64,
}

/// Counts kept by a synthetic producer.
#[derive(Debug, Default)]
pub struct ProduceCounts {
    /// Records acknowledged by the broker.
    pub produced: AtomicU64,
    /// Injected faults by expected reason.
    pub injected: Mutex<BTreeMap<String, u64>>,
}

/// How `produce` paces itself.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// One tick per interval of wall time, stamped with the wall clock.
    RealTime(Duration),
    /// As fast as possible, stamped `interval` apart starting now (a backfill).
    Fast(Duration),
}

/// Where and how fast synthetic telemetry goes.
#[derive(Debug, Clone)]
pub struct ProduceJob {
    /// librdkafka properties.
    pub kafka: BTreeMap<String, String>,
    /// Target topic.
    pub topic: String,
    /// Pacing.
    pub pace: Pace,
    /// Stop after this many records.
    pub max_records: Option<u64>,
}

/// Produces synthetic telemetry until `stop` is set or the job's record limit is reached.
pub fn produce(
    job: &ProduceJob,
    mut generator: Generator,
    clock: &dyn Clock,
    stop: &AtomicBool,
    counts: &ProduceCounts,
) -> Result<(), rdkafka::error::KafkaError> {
    let (topic, pace, max_records) = (job.topic.as_str(), job.pace, job.max_records);
    let mut pc = client_config(&job.kafka);
    set_default(&mut pc, "linger.ms", "5");
    set_default(&mut pc, "message.max.bytes", "10485760");
    let producer: BaseProducer<DefaultProducerContext> = pc.create()?;
    let mut sent = 0u64;
    let mut next = Instant::now();
    let start = clock.now();
    let mut tick = 0i64;
    'outer: while !stop.load(Ordering::Relaxed) {
        let at = match pace {
            Pace::RealTime(_) => clock.now(),
            Pace::Fast(step) => {
                start
                    + chrono::Duration::from_std(step * u32::try_from(tick).unwrap_or(u32::MAX))
                        .unwrap_or_default()
            }
        };
        tick += 1;
        for g in generator.tick(at) {
            if max_records.is_some_and(|m| sent >= m) {
                break 'outer;
            }
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(&g.payload);
            // The empty-key fault needs a present, empty key; a missing key is legitimate.
            record = record.key(&g.key);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        r,
                    )) => {
                        record = r;
                        producer.poll(Duration::from_millis(20));
                    }
                    Err((e, _)) => return Err(e),
                }
            }
            sent += 1;
            if let Kind::Bad(reason) = g.kind {
                if let Ok(mut m) = counts.injected.lock() {
                    *m.entry(reason.to_string()).or_default() += 1;
                }
            }
        }
        producer.poll(Duration::ZERO);
        if let Pace::RealTime(interval) = pace {
            next += interval;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
        counts.produced.store(sent, Ordering::Relaxed);
    }
    // Wait for acknowledgements, but not forever once asked to stop: a dead broker must not
    // make Ctrl-C useless. Only acknowledged records count as produced.
    let mut waited = 0;
    while producer.flush(Duration::from_secs(1)).is_err() {
        warn!(
            in_flight = producer.in_flight_count(),
            "waiting for the broker to acknowledge synthetic telemetry"
        );
        waited += 1;
        if stop.load(Ordering::Relaxed) && waited >= 30 {
            warn!("giving up on unacknowledged synthetic telemetry");
            break;
        }
    }
    let unacknowledged = u64::try_from(producer.in_flight_count()).unwrap_or(0);
    counts
        .produced
        .store(sent - unacknowledged.min(sent), Ordering::Relaxed);
    Ok(())
}

fn reasons_line(by_reason: &BTreeMap<String, u64>) -> String {
    let mut v: Vec<_> = by_reason.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Points `config` at the in-process mock cluster. The mock answers a fetch that finds no
/// data only when its wait runs out (a real broker answers as soon as data arrives), so
/// stage consumers here wait 10 ms, not librdkafka's default 500 ms, unless configured.
pub fn use_mock(
    config: &mut Config,
    mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
) {
    config.set_brokers(&mock.bootstrap_servers());
    config
        .runner
        .fetch_wait
        .get_or_insert(Duration::from_millis(10));
}

/// Runs the demo until `duration` passes or `interrupt` resolves, printing a live summary to
/// `out` (stderr in the CLI). Returns the final figures.
pub async fn run(
    config: Config,
    duration: Option<Duration>,
    interrupt: impl std::future::Future<Output = ()>,
    out: &mut dyn Write,
) -> Result<DemoReport, DemoError> {
    let mock = MockCluster::new(3)?;
    run_on(&mock, config, duration, interrupt, out).await
}

/// [`run`] on a mock cluster the caller keeps, so its topics outlive the demo (a test
/// replays them).
pub async fn run_on(
    mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    mut config: Config,
    duration: Option<Duration>,
    interrupt: impl std::future::Future<Output = ()>,
    out: &mut dyn Write,
) -> Result<DemoReport, DemoError> {
    if config.demo.quick {
        quicken(&mut config);
    }
    config.validate()?;
    use_mock(&mut config, mock);
    for spec in topics::declared(&config)? {
        mock.create_topic(&spec.name, spec.partitions, 1)?;
    }
    let metrics = Arc::new(Metrics::new());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let shutdown = Arc::new(AtomicBool::new(false));
    let stop_generator = Arc::new(AtomicBool::new(false));
    let key = wiring::anonymization_key(&config, rand::random);
    let sql = wiring::sql(&config, Some(&key))?;
    let (store, engine) = (sql.windows.clone(), sql.engine.clone());
    let http = match wiring::bind_http(&config).await {
        Ok(listener) => {
            listener.map(|l| wiring::serve_http(l, metrics.clone(), Some(engine.clone())))
        }
        Err(e) => {
            warn!(error = %e, listen = %config.http.listen, "demo runs without its HTTP endpoint");
            None
        }
    };
    let pg = match config.sql.pg_listen.parse() {
        Ok(addr) if config.sql.pg_enabled => {
            match crate::sql::pg::serve(engine.clone(), addr).await {
                Ok(task) => Some(task),
                Err(e) => {
                    warn!(error = %e, listen = %config.sql.pg_listen, "demo runs without the PostgreSQL endpoint");
                    None
                }
            }
        }
        _ => None,
    };
    let (stage, ctx) = wiring::filter(
        &config,
        &key,
        metrics.clone(),
        clock.clone(),
        shutdown.clone(),
        tokio::runtime::Handle::current(),
    )?;
    let filter_thread = runner::spawn(stage, ctx).map_err(|_| DemoError::Panicked)?;
    let (stage, ctx) = wiring::window(
        &config,
        metrics.clone(),
        clock.clone(),
        shutdown.clone(),
        tokio::runtime::Handle::current(),
        Some(store),
    )?;
    let window_thread = runner::spawn(stage, ctx).map_err(|_| DemoError::Panicked)?;
    let (stage, ctx) = wiring::models(
        &config,
        metrics.clone(),
        clock.clone(),
        shutdown.clone(),
        tokio::runtime::Handle::current(),
        Some(sql.models.clone()),
    )?;
    let models_thread = runner::spawn(stage, ctx).map_err(|_| DemoError::Panicked)?;
    let (stage, ctx) = wiring::decide(
        &config,
        metrics.clone(),
        clock.clone(),
        shutdown.clone(),
        tokio::runtime::Handle::current(),
        Some(sql.commands.clone()),
    )?;
    let decide_thread =
        runner::spawn_transactional(stage, ctx, config.decide.transactional_id.clone())
            .map_err(|_| DemoError::Panicked)?;
    // The log actuator prints each command with its reason as it is carried out.
    let (stage, ctx) = wiring::actuator(
        &config,
        Box::new(crate::actuators::log::LogDriver::to(Arc::new(Mutex::new(
            std::io::stderr(),
        )))),
        false,
        metrics.clone(),
        clock.clone(),
        shutdown.clone(),
        tokio::runtime::Handle::current(),
    )?;
    let actuate_thread = runner::spawn(stage, ctx).map_err(|_| DemoError::Panicked)?;
    let stop_view = Arc::new(AtomicBool::new(false));
    let load_metric = config
        .models
        .signals
        .iter()
        .find(|s| s.name == config.decide.load_signal)
        .map_or_else(|| config.decide.load_signal.clone(), |s| s.metric.clone());
    let (view, view_thread) = view::spawn(
        &config.kafka,
        view::ViewTopics {
            aggregates: config.topics.name(&config.topics.aggregates),
            forecasts: config.topics.name(&config.topics.forecasts),
            anomalies: config.topics.name(&config.topics.anomalies),
            commands: config.topics.name(&config.topics.commands),
        },
        load_metric,
        stop_view.clone(),
    )?;

    let counts = Arc::new(ProduceCounts::default());
    let generator = Generator::new(config.demo.generator(), WireFormat::Json);
    let gen_thread = {
        let job = ProduceJob {
            kafka: config.kafka.clone(),
            topic: config.topics.name(&config.topics.raw),
            pace: Pace::RealTime(config.demo.interval),
            max_records: None,
        };
        let (counts, stop, clock) = (counts.clone(), stop_generator.clone(), clock.clone());
        std::thread::Builder::new()
            .name("generator".into())
            .spawn(move || produce(&job, generator, clock.as_ref(), &stop, &counts))
            .map_err(|_| DemoError::Panicked)?
    };

    let started = Instant::now();
    let _ = writeln!(
        out,
        "ebb demo: {} services x {} instances on the in-process mock cluster ({}); metrics and SQL on http://{}, psql on {}",
        config.demo.services,
        config.demo.instances,
        config.brokers(),
        config.http.listen,
        config.sql.pg_listen,
    );
    let _ = writeln!(
        out,
        "{:>6}  {:>10}  {:>10}  {:>10}  {:>8}  {:>8}  {:>6}  {:>9}  {:>9}  {:>8}  dead letters by reason",
        "time",
        "produced",
        "filter in",
        "clean out",
        "rejected",
        "windows",
        "late",
        "forecasts",
        "anomalies",
        "commands"
    );
    let filter = metrics.stage("filter");
    let window = metrics.stage("window");
    let models = metrics.stage("models");
    let decide = metrics.stage("decide");
    let actuate = metrics.stage("actuate");
    let mut ticks = 0u64;
    let print = |out: &mut dyn Write| {
        let _ = writeln!(
            out,
            "{:>5.0}s  {:>10}  {:>10}  {:>10}  {:>8}  {:>8}  {:>6}  {:>9}  {:>9}  {:>8}  {}",
            started.elapsed().as_secs_f64(),
            counts.produced.load(Ordering::Relaxed),
            filter.records_in.load(Ordering::Relaxed),
            filter.records_out.load(Ordering::Relaxed),
            filter.dead_lettered_total(),
            window.output(crate::stages::window::AGGREGATES),
            window.output(crate::stages::window::LATE),
            models.output(crate::stages::models::FORECASTS),
            models.output(crate::stages::models::ANOMALIES),
            decide.output(crate::stages::decide::COMMANDS),
            reasons_line(&filter.dead_lettered_by_reason())
        );
    };
    let deadline = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    tokio::pin!(interrupt);
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    ticker.tick().await;
    loop {
        tokio::select! {
            () = &mut deadline => break,
            () = &mut interrupt => { info!("interrupted"); break },
            _ = ticker.tick() => {
                print(out);
                ticks += 1;
                if ticks.is_multiple_of(5) {
                    if let Ok(v) = view.lock() {
                        view::print_table(&v, out);
                    }
                }
            }
        }
    }

    stop_generator.store(true, Ordering::Relaxed);
    let produced = tokio::task::spawn_blocking(move || gen_thread.join())
        .await
        .map_err(|_| DemoError::Panicked)?
        .map_err(|_| DemoError::Panicked)?;
    if let Err(e) = produced {
        warn!(error = %e, "generator stopped early");
    }
    // Let the filter catch up with everything produced, so in = out + rejected covers it all.
    let produced = counts.produced.load(Ordering::Relaxed);
    let drain_until = Instant::now() + Duration::from_secs(20);
    while filter.records_in.load(Ordering::Relaxed) < produced && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the window stage with everything the filter let through.
    let clean = filter.records_out.load(Ordering::Relaxed);
    while window.records_in.load(Ordering::Relaxed) < clean && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the models with every aggregate.
    let aggregates = window.output(crate::stages::window::AGGREGATES);
    while models.records_in.load(Ordering::Relaxed) < aggregates && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And decide with every aggregate, forecast and anomaly; the actuator and the view with
    // every command.
    let decide_inputs = aggregates
        + models.output(crate::stages::models::FORECASTS)
        + models.output(crate::stages::models::ANOMALIES);
    while decide.records_in.load(Ordering::Relaxed) < decide_inputs && Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let commands = decide.output(crate::stages::decide::COMMANDS);
    let seen = |view: &Arc<Mutex<view::View>>| {
        view.lock()
            .map(|v| v.commands.values().sum::<u64>())
            .unwrap_or_default()
    };
    while (actuate.records_in.load(Ordering::Relaxed) < commands || seen(&view) < commands)
        && Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.store(true, Ordering::Relaxed);
    stop_view.store(true, Ordering::Relaxed);
    let summary = tokio::task::spawn_blocking(move || filter_thread.join())
        .await
        .map_err(|_| DemoError::Panicked)?
        .map_err(|_| DemoError::Panicked)??;
    let window_summary = tokio::task::spawn_blocking(move || window_thread.join())
        .await
        .map_err(|_| DemoError::Panicked)?
        .map_err(|_| DemoError::Panicked)?;
    if let Err(e) = window_summary {
        warn!(error = %e, "window stage stopped with an error");
    }
    let models_summary = tokio::task::spawn_blocking(move || models_thread.join())
        .await
        .map_err(|_| DemoError::Panicked)?
        .map_err(|_| DemoError::Panicked)?;
    if let Err(e) = models_summary {
        warn!(error = %e, "models stage stopped with an error");
    }
    for (name, thread) in [("decide", decide_thread), ("actuate", actuate_thread)] {
        let joined = tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|_| DemoError::Panicked)?
            .map_err(|_| DemoError::Panicked)?;
        if let Err(e) = joined {
            warn!(stage = name, error = %e, "stage stopped with an error");
        }
    }
    let _ = tokio::task::spawn_blocking(move || view_thread.join()).await;
    drop(http);
    if let Some(pg) = pg {
        pg.abort();
    }
    print(out);
    if let Ok(v) = view.lock() {
        view::print_table(&v, out);
    }
    let command_counts = view.lock().map(|v| v.commands.clone()).unwrap_or_default();
    Ok(DemoReport {
        records_in: summary.consumed,
        out: summary.emitted,
        dead_lettered: filter.dead_lettered_by_reason(),
        produced,
        injected: counts
            .injected
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default(),
        windows: window.output(crate::stages::window::AGGREGATES),
        late: window.output(crate::stages::window::LATE),
        anomalies: models.output(crate::stages::models::ANOMALIES),
        forecasts: models.output(crate::stages::models::FORECASTS),
        commands: command_counts,
        actuated: actuate.output(crate::actuators::ACTUATIONS),
        duration_s: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    })
}
