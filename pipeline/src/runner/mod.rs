//! The one place that wires a stage to Kafka.
//!
//! At-least-once, pipelined: records are processed and their outputs produced as they
//! arrive; a partition's offset is stored for commit only once every output of its batch and
//! of every batch before it has been acknowledged by the broker (failures are re-sent with
//! back-off). Waiting for a flush per batch instead cost ~100 ms a batch and capped the stage
//! at ~18k records/s; tracking each record on its own cost an allocation and two maps per
//! record. A crash at any point re-reads uncommitted input; output keys are deterministic, so
//! a re-read overwrites rather than duplicates downstream state.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
use crate::stage::{Checkpoint, DeadLetter, Emitter, Input, Output, Restore, Source, Stage};

mod transactional;
pub use transactional::run_transactional;

/// Why a runner stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// A Kafka client could not be created or subscribed (bad config, not an outage).
    #[error("kafka client: {0}")]
    Client(#[from] KafkaError),
    /// A stage has an output that no topic was given for.
    #[error("stage output {0:?} has no topic")]
    UnknownOutput(String),
    /// A crash injected by `crash_before_commit`.
    #[error("crashed on purpose before committing transaction {0}")]
    InjectedCrash(u64),
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
    /// Topics the stage reads (several only when co-partitioned: same partition count and
    /// keys, so partition n of each lands on the same consumer).
    pub input_topics: Vec<String>,
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
    /// The stage's state topic (compacted, partitioned like the input), read back into the
    /// stage for each partition it is assigned.
    pub state_topic: Option<String>,
    /// Fault injection for tests of the transactional runner: after this many committed
    /// transactions, the next one is produced (and flushed) but never committed, and the
    /// runner returns at once, as if the process had been killed there.
    pub crash_before_commit: Option<u64>,
}

impl std::fmt::Debug for RunContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunContext")
            .field("group_id", &self.group_id)
            .field("input_topics", &self.input_topics)
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
    /// Partitions assigned or revoked since the loop last looked, for the stage to hear of
    /// before it sees any record of theirs.
    rebalances: Mutex<Vec<PartitionEvent>>,
    /// Commit the stored offsets when partitions are revoked (at-least-once). Never under
    /// transactions: offsets commit only inside a committed transaction, or the next owner
    /// would skip what an aborted one consumed.
    commit_on_revoke: bool,
}

/// A partition given to, or taken from, this consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PartitionEvent {
    Assigned(String, i32),
    Revoked(String, i32),
}

impl ConsumerCtx {
    /// Counts `change` partitions more (or fewer) held by this consumer.
    fn held(&self, change: i64) {
        self.metrics
            .stage(self.stage)
            .partitions
            .fetch_add(change, Ordering::Relaxed);
        self.metrics
            .partitions
            .get_or_create(&StageLabel {
                stage: self.stage.to_string(),
            })
            .inc_by(change);
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
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
            if let Ok(mut q) = self.rebalances.lock() {
                q.extend(
                    partitions_of(tpl)
                        .into_iter()
                        .map(|(t, p)| PartitionEvent::Revoked(t, p)),
                );
            }
            // Offsets stored so far belong to acknowledged batches: commit them before the
            // partitions move, so the next owner starts where this one stopped.
            if self.commit_on_revoke {
                match consumer.commit_consumer_state(CommitMode::Sync) {
                    Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                    Err(e) => warn!(stage = self.stage, error = %e, "commit on revoke failed"),
                }
            }
            self.held(-i64::try_from(tpl.count()).unwrap_or(0));
            info!(
                stage = self.stage,
                partitions = tpl.count(),
                "partitions revoked"
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if let Ok(mut q) = self.rebalances.lock() {
                q.extend(
                    partitions_of(tpl)
                        .into_iter()
                        .map(|(t, p)| PartitionEvent::Assigned(t, p)),
                );
            }
            self.held(i64::try_from(tpl.count()).unwrap_or(0));
            info!(
                stage = self.stage,
                partitions = tpl.count(),
                "partitions assigned"
            );
        }
    }
}

/// How many outputs of one batch (or one transaction) the broker has yet to acknowledge.
#[derive(Debug, Default)]
struct Tracker {
    remaining: AtomicUsize,
}

/// What a batch emitted, by output and by dead-letter reason, for the metrics.
#[derive(Debug, Default)]
struct Tally {
    outputs: BTreeMap<&'static str, u64>,
    reasons: BTreeMap<&'static str, u64>,
    events: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        for (k, n) in &other.outputs {
            *self.outputs.entry(k).or_default() += n;
        }
        for (k, n) in &other.reasons {
            *self.reasons.entry(k).or_default() += n;
        }
        for (k, n) in &other.events {
            *self.events.entry(k).or_default() += n;
        }
    }
}

/// The topic of each of a stage's outputs and its dead-letter topic, shared by every record
/// sent there rather than copied into each.
struct Topics {
    outputs: HashMap<&'static str, Arc<str>>,
    dead_letter: Arc<str>,
}

impl Topics {
    fn new(ctx: &RunContext) -> Self {
        Self {
            outputs: ctx
                .outputs
                .iter()
                .map(|(k, v)| (*k, Arc::from(v.as_str())))
                .collect(),
            dead_letter: Arc::from(ctx.dead_letter_topic.as_str()),
        }
    }
}

/// A failed delivery, owned so it can be re-sent.
struct Failed {
    record: Outgoing,
    tracker: Arc<Tracker>,
    error: String,
}

#[derive(Default)]
struct DeliveryCtx {
    failed: Mutex<Vec<Failed>>,
}

impl ClientContext for DeliveryCtx {}

impl ProducerContext for DeliveryCtx {
    type DeliveryOpaque = Arc<Tracker>;

    fn delivery(&self, result: &DeliveryResult<'_>, tracker: Arc<Tracker>) {
        match result {
            Ok(_) => {
                tracker.remaining.fetch_sub(1, Ordering::AcqRel);
            }
            Err((e, msg)) => {
                let headers = msg
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                let record = Outgoing {
                    topic: msg.topic().into(),
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().map(<[u8]>::to_vec),
                    headers,
                };
                if let Ok(mut f) = self.failed.lock() {
                    f.push(Failed {
                        record,
                        tracker,
                        error: e.to_string(),
                    });
                }
            }
        }
    }
}

/// One record to produce, owned so it can be re-sent.
struct Outgoing {
    topic: Arc<str>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

/// The headers of a dead letter from `stage`: the record's own, then the stage, the reason,
/// its detail and where the record came from.
pub(crate) fn dead_letter_headers(stage: &str, dl: &DeadLetter) -> Vec<(String, Vec<u8>)> {
    let mut headers = dl.headers.clone();
    headers.push(("ebb.stage".into(), stage.as_bytes().to_vec()));
    headers.push(("ebb.reason".into(), dl.reason.as_bytes().to_vec()));
    headers.push(("ebb.detail".into(), dl.detail.as_bytes().to_vec()));
    headers.push(("ebb.source".into(), dl.source.to_string().into_bytes()));
    headers
}

fn dead_letter_record(stage: &str, topic: &Arc<str>, dl: DeadLetter) -> Outgoing {
    Outgoing {
        topic: topic.clone(),
        headers: dead_letter_headers(stage, &dl),
        key: dl.key,
        payload: dl.payload,
    }
}

/// Kafka headers of `(key, value)` pairs, in order.
pub(crate) fn owned_headers(headers: &[(String, Vec<u8>)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |hs, (k, v)| {
            hs.insert(Header {
                key: k,
                value: Some(v),
            })
        },
    )
}

/// Enqueues one record, waiting (and serving delivery reports) while librdkafka's queue is full.
fn send(producer: &BaseProducer<DeliveryCtx>, r: &Outgoing, tracker: &Arc<Tracker>) {
    let mut rec: BaseRecord<'_, [u8], [u8], Arc<Tracker>> =
        BaseRecord::with_opaque_to(&r.topic, tracker.clone());
    if !r.headers.is_empty() {
        rec = rec.headers(owned_headers(&r.headers));
    }
    if let Some(k) = &r.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(p) = &r.payload {
        rec = rec.payload(p.as_slice());
    }
    loop {
        match producer.send(rec) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                producer.poll(Duration::from_millis(10));
            }
            Err((e, back)) => {
                // Not queueable now (e.g. unknown topic): treat it as a failed delivery, so it
                // is re-sent with back-off like any other.
                let record = Outgoing {
                    topic: r.topic.clone(),
                    key: r.key.clone(),
                    payload: r.payload.clone(),
                    headers: r.headers.clone(),
                };
                if let Ok(mut f) = producer.context().failed.lock() {
                    f.push(Failed {
                        record,
                        tracker: back.delivery_opaque,
                        error: e.to_string(),
                    });
                }
                return;
            }
        }
    }
}

/// The commit position of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    topic: String,
    partition: i32,
    /// Next offset to consume, as far as acknowledged outputs go.
    next: i64,
    /// The stage's checkpoint at `next`, if it keeps state.
    checkpoint: Option<Checkpoint>,
}

impl Position {
    /// The offset to commit (a stateful stage may need older records again) and the
    /// metadata that tells the next owner what was already done.
    fn commit(&self) -> (i64, Option<String>) {
        match self.checkpoint {
            None => (self.next, None),
            Some(c) => {
                let processed = c.processed_until.map_or(self.next, |p| p.max(self.next));
                let offset = c.replay_from.map_or(self.next, |r| r.min(self.next));
                (
                    offset,
                    Some(Restore::to_metadata(processed, c.watermark_ms)),
                )
            }
        }
    }
}

/// The input records of one round of the loop and every output they (and the stage's
/// `on_time` and `flush` in that round) caused. Its offsets may be committed once the broker
/// has acknowledged all of those outputs and those of every batch before it.
struct Batch {
    /// Counts the batch itself until it is sealed, so it cannot look done while records
    /// are still being added.
    tracker: Arc<Tracker>,
    tally: Tally,
    /// Input records read.
    records: usize,
    /// Where each partition read in this batch stands after it.
    positions: Vec<Position>,
    /// The Kafka timestamps of the input records, for the latency histogram.
    timestamps: Vec<i64>,
}

impl Batch {
    fn new() -> Self {
        Self {
            tracker: Arc::new(Tracker {
                remaining: AtomicUsize::new(1),
            }),
            tally: Tally::default(),
            records: 0,
            positions: Vec::new(),
            timestamps: Vec::new(),
        }
    }

    /// Sends `records` as outputs of this batch, leaving the vector empty for reuse.
    fn send(&mut self, producer: &BaseProducer<DeliveryCtx>, records: &mut Vec<Outgoing>) {
        self.tracker
            .remaining
            .fetch_add(records.len(), Ordering::AcqRel);
        for r in records.drain(..) {
            send(producer, &r, &self.tracker);
        }
    }

    /// Notes that the record at `offset` of `topic`/`partition` was processed.
    fn consumed(&mut self, topic: &str, partition: i32, offset: i64, kafka_ts_ms: Option<i64>) {
        self.records += 1;
        if let Some(ts) = kafka_ts_ms {
            self.timestamps.push(ts);
        }
        match self
            .positions
            .iter_mut()
            .find(|p| p.partition == partition && p.topic == topic)
        {
            Some(p) => p.next = offset + 1,
            None => self.positions.push(Position {
                topic: topic.to_string(),
                partition,
                next: offset + 1,
                checkpoint: None,
            }),
        }
    }

    fn is_done(&self) -> bool {
        self.tracker.remaining.load(Ordering::Acquire) == 0
    }
}

/// What one `advance` released.
#[derive(Default)]
struct Advanced {
    /// The new position of each partition that moved.
    offsets: Vec<Position>,
    /// Input records now fully acknowledged.
    records: u64,
    /// What they emitted.
    tally: Tally,
    /// Their Kafka timestamps.
    timestamps: Vec<i64>,
}

/// Batches consumed but not yet safe to commit, oldest first, and the one being filled.
struct Pending {
    sealed: VecDeque<Batch>,
    open: Batch,
    /// Input records in all of them.
    count: usize,
}

impl Default for Pending {
    fn default() -> Self {
        Self {
            sealed: VecDeque::new(),
            open: Batch::new(),
            count: 0,
        }
    }
}

impl Pending {
    /// Notes a processed record in the open batch.
    fn consumed(&mut self, topic: &str, partition: i32, offset: i64, kafka_ts_ms: Option<i64>) {
        self.open.consumed(topic, partition, offset, kafka_ts_ms);
        self.count += 1;
    }

    /// Closes the open batch: nothing more is added to it, and it is done once its outputs
    /// are. A batch that read and sent nothing is kept open instead.
    fn seal(&mut self) {
        if self.open.records == 0 && self.open.tracker.remaining.load(Ordering::Acquire) == 1 {
            return;
        }
        let batch = std::mem::replace(&mut self.open, Batch::new());
        batch.tracker.remaining.fetch_sub(1, Ordering::AcqRel);
        self.sealed.push_back(batch);
    }

    /// Forgets a revoked partition: its records are the new owner's to re-read.
    fn drop_partition(&mut self, topic: &str, partition: i32) {
        for batch in self
            .sealed
            .iter_mut()
            .chain(std::iter::once(&mut self.open))
        {
            batch
                .positions
                .retain(|p| !(p.partition == partition && p.topic == topic));
        }
    }

    /// Pops every fully acknowledged batch at the front: the next offset to commit per
    /// partition and what those batches read and emitted.
    fn advance(&mut self) -> Advanced {
        let mut out = Advanced::default();
        while self.sealed.front().is_some_and(Batch::is_done) {
            let Some(batch) = self.sealed.pop_front() else {
                break;
            };
            for position in batch.positions {
                match out
                    .offsets
                    .iter_mut()
                    .find(|p| p.partition == position.partition && p.topic == position.topic)
                {
                    Some(p) => *p = position,
                    None => out.offsets.push(position),
                }
            }
            out.records += batch.records as u64;
            out.tally.add(&batch.tally);
            out.timestamps.extend(batch.timestamps);
            self.count -= batch.records;
        }
        out
    }
}

/// Runs `stage` with [`run`] on a thread of its own, named after the stage.
pub fn spawn<S: Stage + Send + 'static>(
    stage: S,
    ctx: RunContext,
) -> std::io::Result<std::thread::JoinHandle<Result<RunSummary, RunnerError>>> {
    std::thread::Builder::new()
        .name(stage.name().into())
        .spawn(move || run(stage, ctx))
}

/// Runs `stage` with [`run_transactional`] on a thread of its own, named after the stage.
pub fn spawn_transactional<S: Stage + Send + 'static>(
    stage: S,
    ctx: RunContext,
    transactional_id: String,
) -> std::io::Result<std::thread::JoinHandle<Result<RunSummary, RunnerError>>> {
    std::thread::Builder::new()
        .name(stage.name().into())
        .spawn(move || run_transactional(stage, ctx, &transactional_id))
}

/// Waits, polling every millisecond, until every record `producer` sent is acknowledged or
/// `timeout` passes. rust-rdkafka's `flush` (also inside `commit_transaction`) naps 100 ms
/// between polls, which adds that much to whatever waits on it.
pub fn settle<C: ProducerContext>(producer: &BaseProducer<C>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        producer.poll(Duration::from_millis(1));
    }
}

/// The stage's consumer: `cc` with the shared defaults, subscribed to the input topics.
/// `commit_on_revoke` only for at-least-once (see [`ConsumerCtx`]).
fn subscribed(
    name: &'static str,
    ctx: &RunContext,
    mut cc: ClientConfig,
    commit_on_revoke: bool,
) -> Result<BaseConsumer<ConsumerCtx>, RunnerError> {
    set_default(&mut cc, "auto.offset.reset", "earliest");
    set_default(&mut cc, "statistics.interval.ms", "5000");
    set_default(
        &mut cc,
        "fetch.queue.backoff.ms",
        &ctx.settings.fetch_queue_backoff.as_millis().to_string(),
    );
    if let Some(wait) = ctx.settings.fetch_wait {
        set_default(&mut cc, "fetch.wait.max.ms", &wait.as_millis().to_string());
    }
    let consumer: BaseConsumer<ConsumerCtx> = cc.create_with_context(ConsumerCtx {
        stage: name,
        metrics: ctx.metrics.clone(),
        rebalances: Mutex::new(Vec::new()),
        commit_on_revoke,
    })?;
    let topics: Vec<&str> = ctx.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Runs `stage` until `ctx.shutdown` is set. Blocking: call it on its own thread.
///
/// Pipelined at-least-once: outputs are produced as records are processed, delivery reports
/// are served from this loop, and a partition's offset advances only over a prefix of records
/// whose every output the broker has acknowledged. Failed deliveries are re-sent with
/// back-off, never dropped. At most `runner.max_in_flight` records wait at once.
pub fn run<S: Stage>(mut stage: S, ctx: RunContext) -> Result<RunSummary, RunnerError> {
    let name = stage.name();
    let mut cc = client_config(&ctx.kafka);
    cc.set("group.id", &ctx.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    let consumer = subscribed(name, &ctx, cc, true)?;
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
    info!(stage = name, group = %ctx.group_id, input = ?ctx.input_topics, "stage running");

    let label = StageLabel {
        stage: name.to_string(),
    };
    let topics = Topics::new(&ctx);
    let mut loop_state = Loop {
        summary: RunSummary::default(),
        pending: Pending::default(),
        backoff: ctx.settings.retry_backoff,
    };
    let mut emitter = Emitter::new();
    let mut records = Vec::new();
    while !ctx.shutdown.load(Ordering::Relaxed) {
        // Outputs a stage emits on time alone (window close, model schedule) join the batch.
        stage.on_time(ctx.clock.now(), &mut emitter);
        if !emitter.is_empty() {
            let open = &mut loop_state.pending.open;
            collect(name, &topics, &mut emitter, &mut open.tally, &mut records)?;
            open.send(&producer, &mut records);
        }
        let started = Instant::now();
        let mut consumed = 0usize;
        // Waiting for input while deliveries are outstanding would hold their offsets back.
        let mut timeout = if loop_state.pending.count > 0 {
            Duration::from_millis(5)
        } else {
            ctx.settings.poll_timeout
        };
        while consumed < ctx.settings.batch_size
            && loop_state.pending.count < ctx.settings.max_in_flight
        {
            let polled = consumer.poll(timeout);
            // A rebalance happens inside poll: tell the stage before it sees a record of a
            // partition it was just given.
            handle_rebalances(&consumer, &mut stage, &mut loop_state.pending, &ctx);
            let Some(polled) = polled else {
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
            let open = &mut loop_state.pending.open;
            collect(name, &topics, &mut emitter, &mut open.tally, &mut records)?;
            open.send(&producer, &mut records);
            loop_state.pending.consumed(
                msg.topic(),
                msg.partition(),
                msg.offset(),
                msg.timestamp().to_millis(),
            );
            consumed += 1;
        }
        // Each partition's checkpoint as of its last record in the batch (a stage's state of
        // one partition does not change with another's records), taken before `flush`.
        for position in &mut loop_state.pending.open.positions {
            position.checkpoint = stage.checkpoint(position.partition);
        }
        stage.flush(&mut emitter);
        if !emitter.is_empty() {
            let open = &mut loop_state.pending.open;
            collect(name, &topics, &mut emitter, &mut open.tally, &mut records)?;
            open.send(&producer, &mut records);
        }
        loop_state.pending.seal();
        producer.poll(Duration::ZERO);
        loop_state.settle(&consumer, &producer, &ctx, &label);
        if consumed > 0 {
            ctx.metrics
                .batch_seconds
                .get_or_create(&label)
                .observe(started.elapsed().as_secs_f64());
        }
        if loop_state.pending.count >= ctx.settings.max_in_flight {
            // Back-pressure: let the broker catch up before reading more.
            producer.poll(Duration::from_millis(10));
        }
    }
    // Shutdown: everything processed must be acknowledged and committed before we go.
    let since = Instant::now();
    while loop_state.pending.count > 0 {
        if since.elapsed() > ctx.settings.shutdown_timeout {
            commit(&consumer, name);
            return Err(RunnerError::ShutdownTimeout(ctx.settings.shutdown_timeout));
        }
        producer.poll(Duration::from_millis(50));
        loop_state.settle(&consumer, &producer, &ctx, &label);
    }
    // Outputs that hold no offset (on-time emissions) still deserve their ack before exit.
    if producer.flush(ctx.settings.shutdown_timeout).is_err() {
        warn!(
            stage = name,
            "some on-time outputs were not acknowledged before shutdown"
        );
    }
    commit(&consumer, name);
    consumer.unsubscribe();
    let s = &loop_state.summary;
    info!(
        stage = name,
        consumed = s.consumed,
        emitted = s.emitted,
        dead_lettered = s.dead_lettered,
        "stage stopped"
    );
    Ok(loop_state.summary)
}

/// Tells the stage of partitions assigned or revoked in the last poll. An assigned
/// partition's committed metadata is read back so a stateful stage knows what its previous
/// owner already emitted.
fn handle_rebalances<S: Stage>(
    consumer: &BaseConsumer<ConsumerCtx>,
    stage: &mut S,
    pending: &mut Pending,
    ctx: &RunContext,
) {
    let events: Vec<PartitionEvent> = consumer
        .context()
        .rebalances
        .lock()
        .map(|mut q| std::mem::take(&mut *q))
        .unwrap_or_default();
    if events.is_empty() {
        return;
    }
    let mut assigned = TopicPartitionList::new();
    for event in events {
        match event {
            PartitionEvent::Revoked(topic, partition) => {
                pending.drop_partition(&topic, partition);
                stage.revoked(partition);
            }
            PartitionEvent::Assigned(topic, partition) => {
                assigned.add_partition(&topic, partition);
            }
        }
    }
    if assigned.count() == 0 {
        return;
    }
    let committed = match consumer
        .committed_offsets(assigned.clone(), ctx.settings.shutdown_timeout)
    {
        Ok(c) => c,
        Err(e) => {
            // Without the metadata the stage starts empty: windows already emitted may be
            // emitted again (same ids), nothing is lost.
            warn!(stage = stage.name(), error = %e, "committed offsets unreadable; rebuilding state from scratch");
            assigned
        }
    };
    if let Some(topic) = &ctx.state_topic {
        // Co-partitioned inputs share one state partition: read it once.
        let partitions: std::collections::BTreeSet<i32> =
            committed.elements().iter().map(|e| e.partition()).collect();
        for partition in partitions {
            let records = read_state(ctx, topic, partition);
            info!(
                stage = stage.name(),
                partition,
                records = records.len(),
                "state read back"
            );
            stage.restore_state(partition, &records);
        }
    }
    for e in committed.elements() {
        let restore = Restore::from_metadata(e.metadata());
        debug!(
            stage = stage.name(),
            partition = e.partition(),
            ?restore,
            "partition assigned"
        );
        stage.assigned(e.partition(), restore);
    }
}

/// Reads one partition of a state topic from its start to its current end, with a private
/// consumer that joins no group (live groups are not disturbed and nothing is committed).
/// A broker that cannot be reached gives what was read (possibly nothing), with a warning:
/// the stage then starts the models it found no state for afresh. That is a loss of
/// learned state, not of records, and it never blocks the partition.
fn read_state(ctx: &RunContext, topic: &str, partition: i32) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut config = client_config(&ctx.kafka);
    config.set("group.id", format!("{}.state-reader", ctx.group_id));
    config.set("enable.auto.commit", "false");
    config.set("enable.partition.eof", "true");
    // State written in transactions counts only once committed.
    config.set("isolation.level", "read_committed");
    let consumer: BaseConsumer = match config.create() {
        Ok(c) => c,
        Err(e) => {
            warn!(topic, partition, error = %e, "cannot create the state reader");
            return Vec::new();
        }
    };
    let timeout = ctx.settings.shutdown_timeout.max(Duration::from_secs(5));
    let (low, high) = match consumer.fetch_watermarks(topic, partition, timeout) {
        Ok(w) => w,
        Err(e) => {
            warn!(topic, partition, error = %e, "state topic unreadable; starting without it");
            return Vec::new();
        }
    };
    if high <= low {
        return Vec::new();
    }
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(topic, partition, Offset::Offset(low))
        .is_err()
        || consumer.assign(&tpl).is_err()
    {
        return Vec::new();
    }
    let deadline = Instant::now() + timeout * 6;
    let mut records = Vec::new();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let (Some(k), Some(v)) = (m.key(), m.payload()) {
                    records.push((k.to_vec(), v.to_vec()));
                }
                if m.offset() + 1 >= high {
                    break;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => debug!(topic, partition, error = %e, "state read"),
            None => {}
        }
    }
    records
}

fn commit(consumer: &BaseConsumer<ConsumerCtx>, stage: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => warn!(stage, error = %e, "commit failed; uncommitted input will be read again"),
    }
}

/// Turns what the stage emitted into records to produce (appended to `records`), counting
/// them in `tally`.
fn collect(
    stage: &'static str,
    topics: &Topics,
    emitter: &mut Emitter,
    tally: &mut Tally,
    records: &mut Vec<Outgoing>,
) -> Result<(), RunnerError> {
    let (outputs, dead_letters) = emitter.drain();
    for (event, n) in emitter.take_events() {
        *tally.events.entry(event).or_default() += n;
    }
    for Output {
        output,
        key,
        payload,
        headers,
    } in outputs
    {
        let topic = topics
            .outputs
            .get(output)
            .ok_or_else(|| RunnerError::UnknownOutput(output.to_string()))?;
        *tally.outputs.entry(output).or_default() += 1;
        records.push(Outgoing {
            topic: topic.clone(),
            key: Some(key),
            payload: Some(payload),
            headers,
        });
    }
    for dl in dead_letters {
        *tally.reasons.entry(dl.reason).or_default() += 1;
        records.push(dead_letter_record(stage, &topics.dead_letter, dl));
    }
    Ok(())
}

/// The loop's bookkeeping between polls.
struct Loop {
    summary: RunSummary,
    pending: Pending,
    backoff: Duration,
}

impl Loop {
    /// Re-sends failed deliveries (with back-off), then stores the offsets of every record
    /// whose outputs are all acknowledged and counts those records in the metrics.
    fn settle(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
        producer: &BaseProducer<DeliveryCtx>,
        ctx: &RunContext,
        label: &StageLabel,
    ) {
        let failed: Vec<Failed> = producer
            .context()
            .failed
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default();
        if let Some(first) = failed.first() {
            error!(stage = %label.stage, failed = failed.len(), first_error = %first.error, retry_in = ?self.backoff, "outputs not acknowledged; re-sending");
            ctx.metrics
                .retries
                .get_or_create(label)
                .inc_by(failed.len() as u64);
            std::thread::sleep(self.backoff);
            self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
            for f in &failed {
                send(producer, &f.record, &f.tracker);
            }
        } else {
            self.backoff = ctx.settings.retry_backoff;
        }
        let Advanced {
            offsets,
            records,
            tally,
            timestamps,
        } = self.pending.advance();
        if !offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for position in &offsets {
                let (offset, metadata) = position.commit();
                let mut elem = tpl.add_partition(&position.topic, position.partition);
                if let Err(e) = elem.set_offset(Offset::Offset(offset)) {
                    warn!(stage = %label.stage, error = %e, "cannot record offset");
                }
                if let Some(m) = metadata {
                    elem.set_metadata(m);
                }
            }
            // Fails only for partitions revoked meanwhile; the new owner reads those records
            // again, which at-least-once allows.
            if let Err(e) = consumer.store_offsets(&tpl) {
                debug!(stage = %label.stage, error = %e, "offsets not stored (partition revoked?)");
            }
        }
        if records == 0
            && tally.outputs.is_empty()
            && tally.reasons.is_empty()
            && tally.events.is_empty()
        {
            return;
        }
        let now_ms = ctx.clock.now().timestamp_millis();
        let latency = ctx.metrics.record_latency_seconds.get_or_create(label);
        for ts in timestamps {
            #[allow(clippy::cast_precision_loss)]
            latency.observe((now_ms - ts).max(0) as f64 / 1000.0);
        }
        self.summary.consumed += records;
        self.summary.emitted += tally.outputs.values().sum::<u64>();
        self.summary.dead_lettered += tally.reasons.values().sum::<u64>();
        ctx.metrics
            .record_batch(&label.stage, records, &tally.outputs, &tally.reasons);
        ctx.metrics.record_events(&label.stage, &tally.events);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn position(partition: i32, next: i64) -> Position {
        Position {
            topic: "raw".into(),
            partition,
            next,
            checkpoint: None,
        }
    }

    /// A sealed batch of `records` records of `partition` from `first`, with `outputs`
    /// outputs still unacknowledged; returns its tracker.
    fn batch(
        p: &mut Pending,
        partition: i32,
        first: i64,
        records: i64,
        outputs: usize,
    ) -> Arc<Tracker> {
        for offset in first..first + records {
            p.consumed("raw", partition, offset, Some(offset));
        }
        p.open
            .tracker
            .remaining
            .fetch_add(outputs, Ordering::AcqRel);
        let tracker = p.open.tracker.clone();
        p.seal();
        tracker
    }

    #[test]
    fn offsets_advance_only_over_fully_acknowledged_batches_in_order() {
        let mut p = Pending::default();
        let a = batch(&mut p, 0, 10, 2, 1);
        let b = batch(&mut p, 0, 12, 1, 2);
        let c = batch(&mut p, 1, 5, 1, 0);
        assert!(
            p.advance().offsets.is_empty(),
            "the first batch waits for its output"
        );
        assert_eq!(p.count, 4);
        b.remaining.store(0, Ordering::Release);
        assert!(
            p.advance().offsets.is_empty(),
            "later batches are done, but the first is not"
        );
        a.remaining.fetch_sub(1, Ordering::AcqRel);
        let last = p.advance();
        assert_eq!(last.offsets, vec![position(0, 13), position(1, 6)]);
        assert_eq!(last.records, 4);
        assert_eq!(last.timestamps, vec![10, 11, 12, 5]);
        assert_eq!(p.count, 0);
        assert_eq!(c.remaining.load(Ordering::Acquire), 0);
    }

    #[test]
    fn an_open_batch_is_never_done_and_an_empty_one_is_not_sealed() {
        let mut p = Pending::default();
        p.seal();
        assert!(p.sealed.is_empty());
        p.consumed("raw", 0, 1, None);
        assert!(!p.open.is_done(), "records are still being added");
        p.seal();
        assert_eq!(p.advance().offsets, vec![position(0, 2)]);
    }

    #[test]
    fn a_revoked_partition_is_never_committed_by_this_owner() {
        let mut p = Pending::default();
        batch(&mut p, 0, 0, 3, 0);
        p.consumed("raw", 0, 3, None);
        p.consumed("raw", 1, 7, None);
        p.drop_partition("raw", 0);
        p.seal();
        assert_eq!(p.advance().offsets, vec![position(1, 8)]);
        assert_eq!(p.count, 0);
    }

    #[test]
    fn a_stateful_stage_commits_its_oldest_open_record_with_the_processed_position() {
        let checkpoint = Checkpoint {
            replay_from: Some(40),
            watermark_ms: 1_000,
            processed_until: None,
        };
        let position = Position {
            topic: "clean".into(),
            partition: 0,
            next: 57,
            checkpoint: Some(checkpoint),
        };
        let (offset, meta) = position.commit();
        assert_eq!(offset, 40);
        assert_eq!(
            meta.as_deref().and_then(Restore::from_metadata),
            Some(Restore {
                processed_until: 57,
                watermark_ms: 1_000
            })
        );
        // Still rebuilding after a restart: the previous owner's position is kept, not lowered.
        let rebuilding = Position {
            next: 45,
            checkpoint: Some(Checkpoint {
                processed_until: Some(57),
                ..checkpoint
            }),
            ..position
        };
        let (offset, meta) = rebuilding.commit();
        assert_eq!(offset, 40);
        assert_eq!(
            meta.as_deref()
                .and_then(Restore::from_metadata)
                .map(|r| r.processed_until),
            Some(57)
        );
    }
}
