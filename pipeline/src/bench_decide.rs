//! `ebb bench decide`: end-to-end latency from a window's close (its aggregates produced)
//! to the command committed on the commands topic, for many services, through the real
//! transactional decide runner on librdkafka's mock cluster.
//!
//! Every window of every service gets a command: the load alternates between two levels and
//! the bench's policy has no tolerance, stabilization or cooldown, so each window's decision
//! is a scale. A read-committed consumer times each command from the moment its window's
//! aggregates were sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord};
use serde::Serialize;

use crate::clock::SystemClock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::runner::{self, client_config};
use crate::stages::window::WindowAggregate;

/// What the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct DecideFigures {
    /// Services.
    pub services: usize,
    /// Windows timed.
    pub windows: usize,
    /// Commands received.
    pub commands: usize,
    /// Window close to committed command, median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Worst, ms.
    pub max_ms: f64,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Kafka.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Topics.
    #[error(transparent)]
    Topics(#[from] crate::topics::TopicsError),
    /// Wiring.
    #[error(transparent)]
    Wiring(#[from] crate::wiring::WiringError),
    /// Threads.
    #[error("thread: {0}")]
    Thread(#[from] std::io::Error),
    /// Not every command arrived.
    #[error("only {got} of {want} commands arrived")]
    Missing {
        /// Received.
        got: usize,
        /// Expected.
        want: usize,
    },
}

fn aggregate(service: &str, metric: &str, start: i64, mean: f64) -> WindowAggregate {
    WindowAggregate {
        window_id: format!("{service}/{metric}/10000/{start}"),
        service: service.into(),
        metric: metric.into(),
        unit: None,
        window_start: start,
        window_end: start + 10_000,
        count: 40,
        sum: mean * 40.0,
        mean,
        min: mean,
        max: mean,
        stddev: None,
        p50: mean,
        p95: mean,
        p99: mean,
        rate: 4.0,
        instances: 4,
        top_instance: None,
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Runs the benchmark: `windows` timed windows after two warm-up windows, `pause` apart.
pub fn run(services: usize, windows: usize, pause: Duration) -> Result<DecideFigures, BenchError> {
    let handle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mock = MockCluster::new(3)?;
    let mut config = Config::default();
    crate::demo::use_mock(&mut config, &mock);
    for spec in crate::topics::declared(&config)? {
        mock.create_topic(&spec.name, spec.partitions, 1)?;
    }
    // Every window a decision: no tolerance, stabilization or cooldown; the utilization
    // signal alone (health metrics are not sent).
    let s = &mut config.decide.scale;
    s.tolerance = 0.0;
    s.up_stabilization = Duration::ZERO;
    s.down_stabilization = Duration::ZERO;
    s.cooldown = Duration::ZERO;
    s.capacity_per_replica = Some(100.0);
    config.decide.restart.metrics.clear();
    config.decide.utilization_signal.clear();
    config.runner.poll_timeout = Duration::from_millis(5);
    let metrics = Arc::new(Metrics::new());
    let shutdown = Arc::new(AtomicBool::new(false));
    let (stage, ctx) = crate::wiring::decide(
        &config,
        metrics,
        Arc::new(SystemClock),
        shutdown.clone(),
        handle.handle().clone(),
        None,
    )?;
    let decide = runner::spawn_transactional(stage, ctx, config.decide.transactional_id.clone())?;

    let mut pc = client_config(&config.kafka);
    pc.set("linger.ms", "0");
    let producer: BaseProducer = pc.create()?;
    let mut cc = client_config(&config.kafka);
    cc.set("group.id", "ebb-bench-commands")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5");
    let consumer: BaseConsumer = cc.create()?;
    consumer.subscribe(&[&config.topics.name(&config.topics.commands)])?;

    let aggregates_topic = config.topics.name(&config.topics.aggregates);
    let names: Vec<String> = (0..services).map(|i| format!("svc-{i:05}")).collect();
    let t0: i64 = 1_700_000_000_000;
    let mut sent_at: HashMap<i64, Instant> = HashMap::new();
    let mut latencies = Vec::new();
    let total = windows + 2;
    let mut received = 0usize;
    for w in 0..total {
        let start = t0 + w as i64 * 10_000;
        // 600 and 300 requests/s alternately on 4 replicas of 100: 9 then 5 replicas.
        let load = if w % 2 == 0 { 600.0 } else { 300.0 };
        let payloads: Vec<(String, Vec<u8>)> = names
            .iter()
            .map(|n| {
                let a = aggregate(n, "requests_per_s", start, load / 4.0);
                (n.clone(), serde_json::to_vec(&a).unwrap_or_default())
            })
            .collect();
        // The window closes now: its aggregates go out together, as the window stage sends them.
        sent_at.insert(start + 10_000, Instant::now());
        for (key, payload) in &payloads {
            let mut r: BaseRecord<'_, str, [u8]> = BaseRecord::to(&aggregates_topic)
                .key(key.as_str())
                .payload(payload.as_slice());
            while let Err((_, back)) = producer.send(r) {
                r = back;
                producer.poll(Duration::from_millis(1));
            }
        }
        // Not flush: its 100 ms naps would delay reading the commands, not making them.
        runner::settle(&producer, Duration::from_secs(10));
        // Each window's commands are awaited before the next window closes: a steady state,
        // not a backlog. The first window waits for the stage to join its group as well.
        let window_end = start + 10_000;
        let until = Instant::now() + pause;
        let give_up = Instant::now() + Duration::from_secs(60);
        let mut this_window = 0usize;
        while (Instant::now() < until || (w > 0 && this_window < services))
            && Instant::now() < give_up
        {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(1)) else {
                continue;
            };
            let Some(command) = m
                .payload()
                .and_then(|p| serde_json::from_slice::<crate::stages::decide::Command>(p).ok())
            else {
                continue;
            };
            received += 1;
            let end = chrono::DateTime::parse_from_rfc3339(&command.decided_at)
                .map(|t| t.timestamp_millis())
                .unwrap_or_default();
            if end == window_end {
                this_window += 1;
            }
            // The first windows warm the stage (capacity, first decisions) and are not timed.
            if end >= t0 + 30_000 {
                if let Some(at) = sent_at.get(&end) {
                    latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
    }
    shutdown.store(true, Ordering::Relaxed);
    let _ = decide.join();
    // The first window's decision has no previous replicas to change from; each window
    // after it scales, so every service has a command for windows 1..total.
    let expected = services * (total - 1);
    if received < expected {
        return Err(BenchError::Missing {
            got: received,
            want: expected,
        });
    }
    latencies.sort_by(f64::total_cmp);
    let round = |x: f64| (x * 100.0).round() / 100.0;
    Ok(DecideFigures {
        services,
        windows,
        commands: latencies.len(),
        p50_ms: round(percentile(&latencies, 0.5)),
        p99_ms: round(percentile(&latencies, 0.99)),
        max_ms: round(latencies.last().copied().unwrap_or(0.0)),
    })
}
