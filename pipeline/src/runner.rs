//! The one place that wires a stage to Kafka.
//!
//! At-least-once, batch by batch: poll up to `batch_size` records, let the stage process
//! each, produce every output and dead letter, wait until the broker has acknowledged all of
//! them (re-sending any that failed, with back-off), and only then store the batch's offsets
//! for the next commit. A crash at any point re-reads uncommitted input; output keys are
//! deterministic, so a re-read overwrites rather than duplicates downstream state.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use crate::clock::Clock;
use crate::codec::registry::{Registry, RegistryError};
use crate::codec::{confluent_schema_id, SchemaCache};
use crate::config::RunnerConfig;
use crate::metrics::{Metrics, PartitionLabel, StageLabel};
use crate::stage::{DeadLetter, Emitter, Input, Output, Source, Stage};

/// Why a runner stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// A Kafka client could not be created or subscribed (bad config, not an outage).
    #[error("kafka client: {0}")]
    Client(#[from] KafkaError),
    /// A stage has an output that no topic was given for.
    #[error("stage output {0:?} has no topic")]
    UnknownOutput(String),
    /// Shutdown gave up waiting for the broker; uncommitted input will be read again.
    #[error("shutdown timed out after {0:?} waiting for the broker to acknowledge outputs")]
    ShutdownTimeout(Duration),
}

/// An output schema the runner registers so the stage can encode Avro.
#[derive(Debug, Clone)]
pub struct OutputSchema {
    /// The key the codec looks the id up by (e.g. `telemetry.clean`).
    pub key: &'static str,
    /// The registry subject (e.g. `telemetry.clean-value`, prefix included).
    pub subject: String,
    /// The Avro schema text.
    pub schema: &'static str,
}

/// Registry access for stages that read or write Avro.
#[derive(Debug, Clone)]
pub struct AvroSupport {
    /// The registry.
    pub registry: Registry,
    /// The cache the stage's codec reads.
    pub cache: SchemaCache,
    /// Schemas to register for the stage's outputs.
    pub outputs: Vec<OutputSchema>,
    /// Runtime to run registry calls on.
    pub handle: tokio::runtime::Handle,
}

/// Everything a runner needs besides the stage.
#[derive(Clone)]
pub struct RunContext {
    /// librdkafka properties for every client.
    pub kafka: BTreeMap<String, String>,
    /// Consumer group.
    pub group_id: String,
    /// Topic the stage reads.
    pub input_topic: String,
    /// Topic for each of the stage's named outputs.
    pub outputs: HashMap<&'static str, String>,
    /// Dead-letter topic.
    pub dead_letter_topic: String,
    /// Loop settings.
    pub settings: RunnerConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The clock handed to the stage.
    pub clock: Arc<dyn Clock>,
    /// Set to stop: the runner finishes its batch, commits and returns.
    pub shutdown: Arc<AtomicBool>,
    /// Registry access, if Avro is in play.
    pub avro: Option<AvroSupport>,
}

impl std::fmt::Debug for RunContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunContext")
            .field("group_id", &self.group_id)
            .field("input_topic", &self.input_topic)
            .finish()
    }
}

/// What a finished run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// Records consumed and acknowledged.
    pub consumed: u64,
    /// Outputs acknowledged.
    pub emitted: u64,
    /// Dead letters acknowledged.
    pub dead_lettered: u64,
}

/// A client config with the passthrough properties applied.
pub fn client_config(kafka: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in kafka {
        c.set(k, v);
    }
    c
}

/// Sets `key` unless the user's `[kafka]` properties already did.
pub fn set_default(c: &mut ClientConfig, key: &str, value: &str) {
    if c.get(key).is_none() {
        c.set(key, value);
    }
}

struct ConsumerCtx {
    stage: &'static str,
    metrics: Arc<Metrics>,
}

impl ClientContext for ConsumerCtx {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal unassigned partition; lag -1 means unknown.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .get_or_create(&PartitionLabel {
                            stage: self.stage.to_string(),
                            topic: topic.clone(),
                            partition: partition.to_string(),
                        })
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Offsets stored so far belong to acknowledged batches: commit them before the
            // partitions move, so the next owner starts where this one stopped.
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                Err(e) => warn!(stage = self.stage, error = %e, "commit on revoke failed"),
            }
            info!(
                stage = self.stage,
                partitions = tpl.count(),
                "partitions revoked"
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            info!(
                stage = self.stage,
                partitions = tpl.count(),
                "partitions assigned"
            );
        }
    }
}

#[derive(Default)]
struct DeliveryCtx {
    failed: Mutex<Vec<(usize, String)>>,
}

impl ClientContext for DeliveryCtx {}

impl ProducerContext for DeliveryCtx {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        if let Err((e, _)) = result {
            if let Ok(mut f) = self.failed.lock() {
                f.push((index, e.to_string()));
            }
        }
    }
}

/// One record to produce, owned so it can be re-sent.
struct Outgoing {
    topic: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

fn dead_letter_record(stage: &str, topic: &str, dl: DeadLetter) -> Outgoing {
    let mut headers = dl.headers;
    headers.push(("ebb.stage".into(), stage.as_bytes().to_vec()));
    headers.push(("ebb.reason".into(), dl.reason.as_bytes().to_vec()));
    headers.push(("ebb.detail".into(), dl.detail.into_bytes()));
    headers.push(("ebb.source".into(), dl.source.to_string().into_bytes()));
    Outgoing {
        topic: topic.to_string(),
        key: dl.key,
        payload: dl.payload,
        headers,
    }
}

/// Runs `stage` until `ctx.shutdown` is set. Blocking: call it on its own thread.
pub fn run<S: Stage>(mut stage: S, ctx: RunContext) -> Result<RunSummary, RunnerError> {
    let name = stage.name();
    for output in ctx.outputs.keys() {
        debug!(stage = name, output, "output wired");
    }
    let mut cc = client_config(&ctx.kafka);
    cc.set("group.id", &ctx.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    set_default(&mut cc, "auto.offset.reset", "earliest");
    set_default(&mut cc, "statistics.interval.ms", "5000");
    let consumer: BaseConsumer<ConsumerCtx> = cc.create_with_context(ConsumerCtx {
        stage: name,
        metrics: ctx.metrics.clone(),
    })?;
    consumer.subscribe(&[&ctx.input_topic])?;
    let mut pc = client_config(&ctx.kafka);
    set_default(&mut pc, "enable.idempotence", "true");
    set_default(&mut pc, "linger.ms", "5");
    set_default(&mut pc, "compression.type", "lz4");
    // Dead letters carry whatever arrived, up to the raw topic's own limit.
    set_default(&mut pc, "message.max.bytes", "10485760");
    let producer: BaseProducer<DeliveryCtx> = pc.create_with_context(DeliveryCtx::default())?;
    if let Some(avro) = &ctx.avro {
        register_outputs(avro, &ctx, name, false);
    }
    info!(stage = name, group = %ctx.group_id, input = %ctx.input_topic, "stage running");

    let mut summary = RunSummary::default();
    let mut emitter = Emitter::new();
    let stage_label = StageLabel {
        stage: name.to_string(),
    };
    while !ctx.shutdown.load(Ordering::Relaxed) {
        stage.on_time(ctx.clock.now(), &mut emitter);
        let started = Instant::now();
        let mut next_offsets: HashMap<(String, i32), i64> = HashMap::new();
        let mut consumed = 0u64;
        let mut oldest_ms: Option<i64> = None;
        let mut timeout = ctx.settings.poll_timeout;
        while consumed < ctx.settings.batch_size as u64 {
            let Some(polled) = consumer.poll(timeout) else {
                break;
            };
            timeout = Duration::ZERO;
            let msg = match polled {
                Ok(m) => m,
                Err(e) => {
                    // Broker outages surface here; librdkafka reconnects by itself.
                    warn!(stage = name, error = %e, "consumer error (will retry)");
                    break;
                }
            };
            let payload = msg.payload();
            if let (Some(avro), Some(p)) = (&ctx.avro, payload) {
                ensure_schema(avro, &ctx, name, p);
            }
            let headers: Vec<(&str, &[u8])> = msg
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|Header { key, value }| (key, value.unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            let input = Input {
                key: msg.key(),
                payload,
                headers,
                source: Source {
                    topic: msg.topic().to_string(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                },
            };
            stage.process(&input, &mut emitter);
            consumed += 1;
            next_offsets.insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
            if let Some(ts) = msg.timestamp().to_millis() {
                oldest_ms = Some(oldest_ms.map_or(ts, |o: i64| o.min(ts)));
            }
        }
        if consumed == 0 && emitter.is_empty() {
            continue;
        }
        let (outputs, dead_letters) = emitter.drain();
        let mut out_counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut reasons: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut records = Vec::with_capacity(outputs.len() + dead_letters.len());
        for Output {
            output,
            key,
            payload,
            headers,
        } in outputs
        {
            let topic = ctx
                .outputs
                .get(output)
                .ok_or_else(|| RunnerError::UnknownOutput(output.to_string()))?;
            *out_counts.entry(output).or_default() += 1;
            records.push(Outgoing {
                topic: topic.clone(),
                key: Some(key),
                payload: Some(payload),
                headers,
            });
        }
        for dl in dead_letters {
            *reasons.entry(dl.reason).or_default() += 1;
            records.push(dead_letter_record(name, &ctx.dead_letter_topic, dl));
        }
        deliver(&producer, &records, &ctx, &stage_label)?;
        if !next_offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for ((topic, partition), offset) in &next_offsets {
                if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                {
                    warn!(stage = name, error = %e, "cannot record offset");
                }
            }
            // Fails only for partitions revoked mid-batch; their records are re-read by the
            // new owner, which at-least-once allows.
            if let Err(e) = consumer.store_offsets(&tpl) {
                debug!(stage = name, error = %e, "offsets not stored (partition revoked?)");
            }
        }
        let emitted: u64 = out_counts.values().sum();
        let rejected: u64 = reasons.values().sum();
        summary.consumed += consumed;
        summary.emitted += emitted;
        summary.dead_lettered += rejected;
        ctx.metrics
            .record_batch(name, consumed, &out_counts, &reasons);
        ctx.metrics
            .batch_seconds
            .get_or_create(&stage_label)
            .observe(started.elapsed().as_secs_f64());
        if let Some(oldest) = oldest_ms {
            let now_ms = ctx.clock.now().timestamp_millis();
            #[allow(clippy::cast_precision_loss)]
            let latency = (now_ms - oldest).max(0) as f64 / 1000.0;
            ctx.metrics
                .record_latency_seconds
                .get_or_create(&stage_label)
                .observe(latency);
        }
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            warn!(stage = name, error = %e, "final commit failed; uncommitted input will be read again")
        }
    }
    consumer.unsubscribe();
    info!(
        stage = name,
        consumed = summary.consumed,
        emitted = summary.emitted,
        dead_lettered = summary.dead_lettered,
        "stage stopped"
    );
    Ok(summary)
}

/// Produces `records` and returns once the broker acknowledged every one, re-sending
/// failures with back-off. Gives up only at shutdown, after `shutdown_timeout`.
fn deliver(
    producer: &BaseProducer<DeliveryCtx>,
    records: &[Outgoing],
    ctx: &RunContext,
    label: &StageLabel,
) -> Result<(), RunnerError> {
    let mut todo: Vec<usize> = (0..records.len()).collect();
    let mut backoff = ctx.settings.retry_backoff;
    let mut shutdown_started: Option<Instant> = None;
    loop {
        if let Ok(mut f) = producer.context().failed.lock() {
            f.clear();
        }
        for &i in &todo {
            let r = &records[i];
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            loop {
                let mut rec: BaseRecord<'_, [u8], [u8], usize> =
                    BaseRecord::with_opaque_to(&r.topic, i).headers(headers.clone());
                if let Some(k) = &r.key {
                    rec = rec.key(k.as_slice());
                }
                if let Some(p) = &r.payload {
                    rec = rec.payload(p.as_slice());
                }
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        producer.poll(Duration::from_millis(50));
                    }
                    Err((e, _)) => {
                        if let Ok(mut f) = producer.context().failed.lock() {
                            f.push((i, e.to_string()));
                        }
                        break;
                    }
                }
            }
        }
        loop {
            match producer.flush(Duration::from_secs(1)) {
                Ok(()) => break,
                Err(e) => {
                    if ctx.shutdown.load(Ordering::Relaxed) {
                        let since = *shutdown_started.get_or_insert_with(Instant::now);
                        if since.elapsed() > ctx.settings.shutdown_timeout {
                            return Err(RunnerError::ShutdownTimeout(
                                ctx.settings.shutdown_timeout,
                            ));
                        }
                    }
                    warn!(stage = %label.stage, error = %e, "waiting for the broker to acknowledge outputs");
                }
            }
        }
        let failed: Vec<(usize, String)> = producer
            .context()
            .failed
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default();
        if failed.is_empty() {
            return Ok(());
        }
        if ctx.shutdown.load(Ordering::Relaxed) {
            let since = *shutdown_started.get_or_insert_with(Instant::now);
            if since.elapsed() > ctx.settings.shutdown_timeout {
                return Err(RunnerError::ShutdownTimeout(ctx.settings.shutdown_timeout));
            }
        }
        error!(stage = %label.stage, failed = failed.len(), first_error = %failed[0].1, retry_in = ?backoff, "outputs not acknowledged; re-sending");
        ctx.metrics
            .retries
            .get_or_create(label)
            .inc_by(failed.len() as u64);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(30));
        todo = failed.into_iter().map(|(i, _)| i).collect();
    }
}

/// Makes sure the writer schema a payload names is in the cache (or known to be missing),
/// retrying while the registry is unreachable: an outage must not turn good records into
/// dead letters.
fn ensure_schema(avro: &AvroSupport, ctx: &RunContext, stage: &str, payload: &[u8]) {
    let Some(id) = confluent_schema_id(payload) else {
        return;
    };
    if avro.cache.knows(id) {
        return;
    }
    if avro
        .cache
        .output_id(avro.outputs.first().map_or("", |o| o.key))
        .is_none()
    {
        register_outputs(avro, ctx, stage, true);
    }
    let mut backoff = ctx.settings.retry_backoff;
    loop {
        match avro.handle.block_on(avro.registry.schema_by_id(id)) {
            Ok(text) => {
                if let Err(e) = avro.cache.insert(id, &text) {
                    warn!(stage, id, error = %e, "registry schema unusable; its records will be dead-lettered");
                    avro.cache.insert_missing(id);
                }
                return;
            }
            Err(RegistryError::NotFound(_)) => {
                avro.cache.insert_missing(id);
                return;
            }
            Err(e) if e.is_transient() && !ctx.shutdown.load(Ordering::Relaxed) => {
                warn!(stage, id, error = %e, retry_in = ?backoff, "schema registry unreachable");
                ctx.metrics
                    .retries
                    .get_or_create(&StageLabel {
                        stage: stage.to_string(),
                    })
                    .inc();
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                warn!(stage, id, error = %e, "schema lookup failed; its records will be dead-lettered");
                return;
            }
        }
    }
}

/// Registers the stage's output schemas. With `insist`, retries while the registry is
/// unreachable (an Avro record is waiting to be encoded); without, tries once.
fn register_outputs(avro: &AvroSupport, ctx: &RunContext, stage: &str, insist: bool) {
    for out in &avro.outputs {
        let mut backoff = ctx.settings.retry_backoff;
        loop {
            match avro
                .handle
                .block_on(avro.registry.register(&out.subject, out.schema))
            {
                Ok(id) => {
                    avro.cache.set_output_id(out.key, id);
                    info!(stage, subject = %out.subject, id, "output schema registered");
                    break;
                }
                Err(e) if insist && e.is_transient() && !ctx.shutdown.load(Ordering::Relaxed) => {
                    warn!(stage, subject = %out.subject, error = %e, retry_in = ?backoff, "schema registry unreachable");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(e) => {
                    warn!(stage, subject = %out.subject, error = %e, "cannot register output schema yet");
                    break;
                }
            }
        }
    }
}
